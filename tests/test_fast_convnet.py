"""Tests of collabdm_jax.fast_convnet: the same ConvNet as models.ConvNet."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collabdm_jax import fast_convnet as F
from collabdm_jax import models as M


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _direct_conv(x, k, pad):
  """float64 NumPy 3x3 correlation (PyTorch's conv), NHWC / HWIO."""
  x = np.asarray(x, np.float64)
  k = np.asarray(k, np.float64)
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = xp.shape[1] - 2, xp.shape[2] - 2
  return sum(np.einsum("nhwc,cd->nhwd", xp[:, i:i + ho, j:j + wo], k[i, j])
             for i in range(3) for j in range(3))


def test_winograd_transforms_compute_the_convolution():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 8, 5)).astype(np.float32)
  k = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
  v = F.input_transform(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
  m = jnp.einsum("xmc,xcd->xmd", v, F.kernel_transform(k))
  y = np.asarray(F.output_transform(m)).reshape(2, 2, 2, 3, 4, 4)
  # [p, q, n, a, b, c] -> [n, 2a + p, 2b + q, c]
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(2, 6, 8, 4)
  exact = _direct_conv(x, k, 1)
  np.testing.assert_allclose(y, exact, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("which", ["input", "output"])
def test_transposed_transforms_are_adjoints(which):
  # <T a, b> = <a, T^T b> for random a, b: the backward pass is exact.
  rng = np.random.default_rng(1)
  if which == "input":
    a = rng.standard_normal((2, 8, 6, 3))
    b = rng.standard_normal((16, 2 * 3 * 2, 3))
    forward = F.input_transform(jnp.asarray(a, jnp.float32))
    back = F.input_transform_transpose(jnp.asarray(b, jnp.float32), 2, 3, 2)
  else:
    a = rng.standard_normal((16, 7, 3))
    b = rng.standard_normal((4, 7, 3))
    forward = F.output_transform(jnp.asarray(a, jnp.float32))
    back = F.output_transform_transpose(jnp.asarray(b, jnp.float32))
  lhs = np.sum(np.asarray(forward, np.float64) * b)
  rhs = np.sum(a * np.asarray(back, np.float64))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


@pytest.mark.parametrize("kwargs,shape,ok", [
    ({}, (28, 28, 1), True),
    ({}, (32, 32, 3), True),
    ({"depth": 5}, (28, 28, 1), True),
    ({"fused_first_block": True}, (28, 28, 1), True),
    ({}, (28, 20, 1), True),      # 32x24 maps
    ({}, (30, 30, 1), False),     # 34x34 maps: 17x17 after one pool
    ({"depth": 6}, (32, 32, 3), False),
    ({"pooling": "maxpool"}, (28, 28, 1), False),
    ({"norm": "layernorm"}, (28, 28, 1), False),
    ({"activation": "gelu"}, (28, 28, 1), False),
])
def test_supports(kwargs, shape, ok):
  assert F.supports(M.make_model("convnet", 10, **kwargs), shape) is ok


def test_supports_only_convnets():
  assert not F.supports(M.make_model("mlp", 10), (28, 28, 1))
  assert not F.supports(M.make_model("alexnet", 10), (28, 28, 1))


@pytest.mark.parametrize("shape,kwargs", [
    ((28, 28, 1), {"width": 16, "depth": 3}),
    ((32, 32, 3), {"width": 8, "depth": 2}),
    ((28, 28, 1), {"width": 8, "depth": 1}),  # the first block alone
    ((28, 20, 1), {"width": 8, "depth": 3}),  # not square
])
def test_logits_and_gradients_equal_the_model(shape, kwargs):
  model = M.make_model("convnet", 10, **kwargs)
  assert F.supports(model, shape)
  params = M.init_params(model, jax.random.key(0), shape)
  # Move the norms off scale 1 / bias 0 so every term of the backward
  # pass matters.
  params = jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape),
      params)
  x = jax.random.normal(jax.random.key(2), (6,) + shape)
  y = jnp.arange(6) % 10
  apply = M.logits_fn(model)

  def loss(logits_fn):
    return lambda p, v: jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, v), y))

  fast_logits = lambda p, v: F.logits(F.prepare(p), v)
  ref = jax.jit(jax.value_and_grad(loss(apply), argnums=(0, 1)))(params, x)
  got = jax.jit(jax.value_and_grad(loss(fast_logits), argnums=(0, 1)))(
      params, x)
  np.testing.assert_allclose(jax.jit(fast_logits)(params, x),
                             jax.jit(apply)(params, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  assert _rel(got[1][1], ref[1][1]) < 1e-5  # input gradient
  for layer, grads in ref[1][0].items():
    for name, g in grads.items():
      g_fast = got[1][0][layer][name]
      if layer.startswith("conv") and name == "bias":
        # Instance norm removes the bias: the gradient is exactly zero
        # here, float noise in the reference.
        np.testing.assert_array_equal(g_fast, 0.0)
        assert np.max(np.abs(g)) < 1e-5 * np.max(np.abs(grads["kernel"]))
      else:
        assert _rel(g_fast, g) < 1e-5, (layer, name)
