"""The CPU first-block kernel: it builds here, computes models.ConvNet's
first block (and whole embeddings) to float rounding, and leaves gradients
to XLA's ops."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import cpu_first_block as cfb
from collabdm_jax import models

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or jax.default_backend() != "cpu",
    reason="the kernel is built with g++ for the CPU backend")


def rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def block_inputs(shape, width, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], shape)
  kernel = jax.random.normal(ks[1], (3, 3, shape[-1], width)) / 3
  bias = 0.1 * jax.random.normal(ks[2], (width,))
  scale = 1 + 0.2 * jax.random.normal(ks[3], (width,))
  beta = 0.2 * jax.random.normal(ks[4], (width,))
  return x, kernel, bias, scale, beta


def test_the_kernel_builds_and_is_used_on_this_machine():
  assert cfb.enabled()
  assert cfb.library_path().exists()


@pytest.mark.parametrize("shape,width,padding", [
    ((5, 28, 28, 1), 128, 3),  # the reference: 32x32 maps
    ((2, 32, 32, 3), 128, 1),  # CIFAR-10
    ((3, 9, 11, 3), 8, 1),  # odd sides: the last row and column unpooled
    ((1, 4, 4, 2), 20, 0),  # no padding, a width the kernel does not unroll
])
def test_kernel_equals_the_layers(shape, width, padding):
  x, kernel, bias, scale, beta = block_inputs(shape, width)
  ref = cfb.reference(x, kernel, bias, scale, beta, padding)
  out = jax.jit(lambda *a: cfb.kernel_forward(*a, padding))(
      x, kernel, scale, beta)
  assert out.shape == ref.shape
  assert rel(out, ref) < 2e-6
  # The bias cancels in the instance norm: the block ignores it.
  out2 = cfb.first_block(x, kernel, bias + 5.0, scale, beta, padding)
  assert rel(out2, ref) < 2e-6


def test_bad_shapes_are_named():
  x, kernel, _, scale, beta = block_inputs((2, 8, 8, 1), 4)
  with pytest.raises(ValueError, match=r"\[3, 3, C, C_out\]"):
    cfb.kernel_forward(x, kernel[:, :, :, :, None], scale, beta, 1)
  with pytest.raises(ValueError, match="scale and beta"):
    cfb.kernel_forward(x, kernel, scale[:3], beta, 1)
  with pytest.raises(ValueError, match="too small to pool"):
    cfb.kernel_forward(x[:, :2, :2], kernel, scale, beta, 0)


@pytest.fixture(scope="module")
def convnet():
  model = models.make_model("convnet", 10)
  return model, models.init_params(model, jax.random.key(0), (28, 28, 1))


def test_convnet_embedding_with_and_without_the_kernel(convnet, monkeypatch):
  model, params = convnet
  embed = models.embed_fn(model)
  x = jax.random.normal(jax.random.key(1), (7, 28, 28, 1))
  f = lambda p, x: embed(p, x)
  with_kernel = jax.jit(f)(params, x)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(embed(params, x) ** 2)))(x)
  hlo = jax.jit(f).lower(params, x).as_text()
  assert cfb.TARGET in hlo
  monkeypatch.setenv("COLLABDM_CPU_KERNELS", "0")
  assert not cfb.enabled()
  plain = jax.jit(lambda p, x: embed(p, x))(params, x)
  assert cfb.TARGET not in jax.jit(lambda p, x: embed(p, x)).lower(
      params, x).as_text()
  plain_grad = jax.jit(jax.grad(
      lambda x: jnp.sum(embed(params, x) ** 2) * 1.0))(x)
  assert rel(with_kernel, plain) < 2e-6
  # Gradients come from XLA's ops either way.
  assert rel(grad, plain_grad) < 1e-5


def test_vmapped_networks_each_use_their_own_parameters(convnet):
  model, _ = convnet
  embed = models.embed_fn(model)
  keys = jax.random.split(jax.random.key(3), 3)
  stacked = jax.vmap(lambda k: models.init_params(model, k, (28, 28, 1)))(keys)
  x = jax.random.normal(jax.random.key(4), (4, 28, 28, 1))
  out = jax.jit(jax.vmap(embed, in_axes=(0, None)))(stacked, x)
  for i in range(3):
    one = jax.tree.map(lambda a, i=i: a[i], stacked)
    np.testing.assert_allclose(out[i], embed(one, x), rtol=1e-6, atol=1e-6)


def test_other_blocks_and_dtypes_keep_xla(convnet):
  model, params = convnet
  x = jnp.zeros((2, 28, 28, 1))
  for other in (models.make_model("convnet", 10, pooling="maxpool"),
                models.make_model("convnet", 10, norm="none")):
    p = models.init_params(other, jax.random.key(0), (28, 28, 1))
    text = jax.jit(models.embed_fn(other)).lower(p, x).as_text()
    assert cfb.TARGET not in text
  bf16 = models.embed_fn(model, "bfloat16")
  assert cfb.TARGET not in jax.jit(bf16).lower(params, x).as_text()
