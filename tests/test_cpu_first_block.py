"""The CPU first-block kernels: they build here and compute models.ConvNet's
first block, its input gradient and whole embeddings and their gradients to
float rounding; parameter gradients stay XLA's."""

import pathlib
import shutil
import subprocess

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
    ((2, 7, 5, 1), 16, 0),  # rows of 5 pixels: the gradient's one-by-one tail
    ((2, 10, 10, 3), 40, 1),  # 32 + 8 channels
    ((2, 6, 10, 1), 96, 1),  # 64 + 32 channels
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
  # The input gradient for a random cotangent, and every parameter's.
  dout = jax.random.normal(jax.random.key(9), ref.shape)
  _, vjp = jax.vjp(lambda *a: cfb.reference(*a, padding), x, kernel, bias,
                   scale, beta)
  want = vjp(dout)
  dx = jax.jit(lambda x, d: cfb.kernel_input_gradient(
      x, kernel, scale, beta, d, padding))(x, dout)
  assert rel(dx, want[0]) < 5e-6
  _, vjp_block = jax.vjp(lambda *a: cfb.first_block(*a, padding), x, kernel,
                         bias, scale, beta)
  got = vjp_block(dout)
  for g, w in zip(got, want):
    assert rel(g, w) < 5e-6


def test_bad_shapes_are_named():
  x, kernel, _, scale, beta = block_inputs((2, 8, 8, 1), 4)
  with pytest.raises(ValueError, match=r"\[3, 3, C, C_out\]"):
    cfb.kernel_forward(x, kernel[:, :, :, :, None], scale, beta, 1)
  with pytest.raises(ValueError, match="scale and beta"):
    cfb.kernel_forward(x, kernel, scale[:3], beta, 1)
  with pytest.raises(ValueError, match="too small to pool"):
    cfb.kernel_forward(x[:, :2, :2], kernel, scale, beta, 0)
  with pytest.raises(ValueError, match="dout must be"):
    cfb.kernel_input_gradient(x, kernel, scale, beta, jnp.zeros((2, 4, 4, 3)),
                              1)


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
  assert cfb.TARGET in jax.jit(f).lower(params, x).as_text()
  grad_text = jax.jit(jax.grad(lambda x: jnp.sum(embed(params, x) ** 2))
                      ).lower(x).as_text()
  assert cfb.BACKWARD_TARGET in grad_text
  monkeypatch.setenv("COLLABDM_CPU_KERNELS", "0")
  assert not cfb.enabled()
  plain = jax.jit(lambda p, x: embed(p, x))(params, x)
  assert cfb.TARGET not in jax.jit(lambda p, x: embed(p, x)).lower(
      params, x).as_text()
  plain_grad = jax.jit(jax.grad(
      lambda x: jnp.sum(embed(params, x) ** 2) * 1.0))(x)
  assert rel(with_kernel, plain) < 2e-6
  assert rel(grad, plain_grad) < 1e-5


def test_xla_ops_traces_the_layers_for_counting_flops(convnet):
  model, params = convnet
  x = jnp.zeros((3, 28, 28, 1))
  f = lambda: jax.jit(lambda p, x: models.embed_fn(model)(p, x)).lower(
      params, x)
  with cfb.xla_ops():
    assert not cfb.enabled()
    plain = f()
  assert cfb.enabled()
  fast = f()
  assert cfb.TARGET not in plain.as_text() and cfb.TARGET in fast.as_text()
  # XLA counts nothing for the custom call: fewer FLOPs than the layers.
  flops = lambda low: low.compile().cost_analysis()["flops"]
  assert flops(fast) < flops(plain)


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


@pytest.mark.slow  # builds the kernel source with the sanitizers (~20 s)
def test_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
  """The hand-written loops read and write only their buffers.

  ``tests/data/cpu_first_block_asan.cc`` runs one image's forward and input
  gradient over edge geometries (odd sides, no padding, widths off every
  vector multiple, rows not a multiple of four pixels), built with
  AddressSanitizer and UndefinedBehaviorSanitizer: an out-of-bounds access
  aborts it. A read past the dy map's end at rows of 5 pixels and no
  padding, whose values were then discarded, once went unnoticed by the
  value tests above.
  """
  harness = pathlib.Path(__file__).with_name("data") / "cpu_first_block_asan.cc"
  exe = tmp_path / "asan"
  build = subprocess.run(
      ["g++", "-O1", "-g", "-fsanitize=address,undefined",
       "-fno-sanitize-recover=all", "-march=native", "-std=c++17",
       "-I", jax.ffi.include_dir(), f'-DKERNEL_SOURCE="{cfb.SOURCE}"',
       str(harness), "-o", str(exe)], capture_output=True, text=True)
  if build.returncode != 0 and "asan" in build.stderr.lower():
    pytest.skip("this g++ has no AddressSanitizer runtime")
  assert build.returncode == 0, build.stderr[-3000:]
  run = subprocess.run([str(exe)], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.count(" ok") == 10
