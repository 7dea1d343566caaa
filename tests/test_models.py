"""Tests of collabdm_jax.models against DM's PyTorch definitions.

The forward-pass checks use an independent NumPy implementation written in
PyTorch's NCHW / OIHW layout, so agreement also proves that the Flax
parameters map one to one onto DM's PyTorch parameters.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import models as M

KEY = jax.random.key(0)

# XLA:CPU compiles are the cost of this file, so every (model, input shape) is
# initialised and every apply function jitted at most once.


@functools.lru_cache(maxsize=None)
def cached_params(model, shape):
  return M.init_params(model, KEY, shape)


@functools.lru_cache(maxsize=None)
def jitted(model):
  """One compiled ``f(params, x) -> (embedding, logits)`` per model."""
  embed, logits = M.embed_fn(model), M.logits_fn(model)
  return jax.jit(lambda p, x: (embed(p, x), logits(p, x)))


def abstract_params(model, shape):
  """Parameter shapes without running (or compiling) the initialiser."""
  return jax.eval_shape(lambda k: M.init_params(model, k, shape), KEY)


def param_count(model, shape):
  return sum(math.prod(v.shape)
             for v in jax.tree_util.tree_leaves(abstract_params(model, shape)))


def numpy_filled_params(model, shape, seed):
  """Arbitrary parameters (non-trivial norm affines included) drawn by NumPy,
  for forward-pass checks that must not depend on the initialiser."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      v = rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    elif name == "scale":
      v = 1.0 + 0.3 * rng.standard_normal(s.shape)
    else:
      v = 0.3 * rng.standard_normal(s.shape)
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract_params(model, shape))


# ----------------------------------------------------------------------------
# Independent NumPy reference (NCHW activations, OIHW weights, float64).
# ----------------------------------------------------------------------------


def np_conv2d(x, w, b, padding):
  """PyTorch Conv2d, stride 1: x [N,C,H,W], w [O,C,k,k], b [O]."""
  k = w.shape[-1]
  xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  ho, wo = xp.shape[2] - k + 1, xp.shape[3] - k + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for i in range(k):
    for j in range(k):
      out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + ho, j:j + wo],
                       w[:, :, i, j])
  return out + b[None, :, None, None]


def np_instancenorm(x, gamma, beta, eps=1e-5):
  mean = x.mean(axis=(2, 3), keepdims=True)
  var = x.var(axis=(2, 3), keepdims=True)
  return ((x - mean) / np.sqrt(var + eps) * gamma[None, :, None, None]
          + beta[None, :, None, None])


def np_layernorm_chw(x, gamma, beta, eps=1e-5):
  """PyTorch LayerNorm([C, H, W]): gamma, beta [C, H, W]."""
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  var = x.var(axis=(1, 2, 3), keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * gamma[None] + beta[None]


_erf = np.vectorize(math.erf)

NP_ACTS = {
    "relu": lambda v: np.maximum(v, 0.0),
    "leakyrelu": lambda v: np.where(v > 0, v, 0.01 * v),
    "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))),
}


def np_pool2(x, kind):
  n, c, h, w = x.shape
  x = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
  return x.mean(axis=(3, 5)) if kind == "avgpool" else x.max(axis=(3, 5))


def torch_layout(params, depth, norm):
  """Flax ConvNet params -> PyTorch-layout float64 arrays."""
  out = {}
  for d in range(depth):
    conv = params[f"conv{d}"]
    out[f"w{d}"] = np.transpose(np.asarray(conv["kernel"], np.float64),
                                (3, 2, 0, 1))  # HWIO -> OIHW
    out[f"b{d}"] = np.asarray(conv["bias"], np.float64)
    if norm == "instancenorm":
      out[f"g{d}"] = np.asarray(params[f"norm{d}"]["scale"], np.float64)
      out[f"beta{d}"] = np.asarray(params[f"norm{d}"]["bias"], np.float64)
    elif norm == "layernorm":  # Flax [H, W, C] -> PyTorch [C, H, W].
      out[f"g{d}"] = np.transpose(
          np.asarray(params[f"norm{d}"]["scale"], np.float64), (2, 0, 1))
      out[f"beta{d}"] = np.transpose(
          np.asarray(params[f"norm{d}"]["bias"], np.float64), (2, 0, 1))
  out["W"] = np.asarray(params["classifier"]["kernel"], np.float64).T  # [O, I]
  out["bc"] = np.asarray(params["classifier"]["bias"], np.float64)
  return out


def np_convnet(x_nhwc, tp, depth, norm, activation, pooling):
  """DM's ConvNet forward in NumPy; returns (embedding, logits)."""
  x = np.transpose(np.asarray(x_nhwc, np.float64), (0, 3, 1, 2))
  channels_in = x.shape[1]
  for d in range(depth):
    pad = 3 if (d == 0 and channels_in == 1) else 1
    x = np_conv2d(x, tp[f"w{d}"], tp[f"b{d}"], pad)
    if norm == "instancenorm":
      x = np_instancenorm(x, tp[f"g{d}"], tp[f"beta{d}"])
    elif norm == "layernorm":
      x = np_layernorm_chw(x, tp[f"g{d}"], tp[f"beta{d}"])
    x = NP_ACTS[activation](x)
    if pooling != "none":
      x = np_pool2(x, pooling)
  emb = x.reshape(x.shape[0], -1)
  return emb, emb @ tp["W"].T + tp["bc"]


# ----------------------------------------------------------------------------
# Shapes.
# ----------------------------------------------------------------------------

DEFAULT_CONVNET = M.make_model("convnet", 10)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_default_convnet_embeds_2048(shape):
  assert M.feature_dim(DEFAULT_CONVNET, shape) == 2048
  params = cached_params(DEFAULT_CONVNET, shape)
  x = jax.random.uniform(KEY, (2,) + shape)
  emb, logits = jitted(DEFAULT_CONVNET)(params, x)
  assert emb.shape == (2, 2048)
  assert logits.shape == (2, 10)


@pytest.mark.parametrize("depth,width,pooling,shape,expected", [
    (1, 16, "avgpool", (32, 32, 3), 16 * 16 * 16),
    (2, 8, "maxpool", (32, 32, 3), 8 * 8 * 8),
    (4, 32, "avgpool", (28, 28, 1), 32 * 2 * 2),
    (3, 64, "avgpool", (32, 32, 3), 64 * 4 * 4),
    (2, 4, "none", (28, 28, 1), 4 * 32 * 32),
    (2, 4, "none", (32, 32, 3), 4 * 32 * 32),
])
def test_convnet_feature_dim_per_depth_width(depth, width, pooling, shape,
                                             expected):
  model = M.make_model("convnet", 10, depth=depth, width=width,
                       pooling=pooling)
  assert M.feature_dim(model, shape) == expected
  out = jax.eval_shape(M.embed_fn(model), abstract_params(model, shape),
                       jax.ShapeDtypeStruct((5,) + shape, jnp.float32))
  assert out.shape == (5, expected)


def test_first_conv_padding_rule():
  # Single-channel inputs: first conv pads by 3 (28 -> 32), later ones by 1.
  model = M.make_model("convnet", 10, width=4, depth=2, pooling="none")
  params = abstract_params(model, (28, 28, 1))
  assert params["conv0"]["kernel"].shape == (3, 3, 1, 4)
  maps = jax.eval_shape(
      lambda p, x: model.apply({"params": p}, x, method=M.ConvNet.feature_map),
      params, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
  assert maps.shape == (1, 32, 32, 4)
  # Three-channel inputs keep their size.
  assert M.feature_dim(model, (32, 32, 3)) == 4 * 32 * 32
  # The padding is zeros and really 3 wide: with a 3x3 kernel the outermost
  # ring of outputs sees only padding (bias only), the next ring sees pixels.
  one = M.make_model("convnet", 10, width=2, depth=1, norm="none",
                     pooling="none", activation="sigmoid")
  p1 = numpy_filled_params(one, (28, 28, 1), seed=0)
  out = jax.jit(lambda p, x: one.apply({"params": p}, x,
                                       method=M.ConvNet.feature_map))(
                                           p1, jnp.ones((1, 28, 28, 1)))
  assert out.shape == (1, 32, 32, 2)
  bias_only = jax.nn.sigmoid(p1["conv0"]["bias"])
  for i, j in [(0, 0), (0, 17), (31, 31), (20, 0)]:
    np.testing.assert_allclose(out[0, i, j], bias_only, rtol=1e-6)
  for i, j in [(1, 1), (1, 17), (30, 30)]:
    assert not np.allclose(out[0, i, j], bias_only)


def test_too_small_input_for_depth_raises():
  model = M.make_model("convnet", 10, width=4, depth=6)
  with pytest.raises(ValueError, match="depth"):
    M.feature_dim(model, (32, 32, 3))


# ----------------------------------------------------------------------------
# Initialisation distributions.
# ----------------------------------------------------------------------------


def _uniform_checks(values, bound, std_tol, name):
  """|v| <= bound and std within std_tol (relative) of the uniform's."""
  values = np.asarray(values, np.float64).ravel()
  assert np.all(np.abs(values) <= bound * (1 + 1e-6)), name
  std = values.std()
  assert abs(std - bound / math.sqrt(3)) < std_tol * bound / math.sqrt(3), (
      name, std, bound)
  return values


def test_conv_and_dense_init_match_pytorch():
  params = cached_params(DEFAULT_CONVNET, (32, 32, 3))
  # 128x128x3x3 conv: fan_in 1152.
  w = params["conv1"]["kernel"]
  assert w.shape == (3, 3, 128, 128)
  bound = 1 / math.sqrt(128 * 9)
  v = _uniform_checks(w, bound, 0.02, "conv1 kernel")
  assert abs(v.mean()) < 0.01 * bound
  # Uniform, not (truncated) normal: kurtosis 1.8 (normal 3); Flax's default
  # lecun-normal would also break the bound above.
  kurt = np.mean(v**4) / np.mean(v**2)**2
  assert abs(kurt - 1.8) < 0.05, kurt
  assert np.max(np.abs(v)) > 0.99 * bound
  # Biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not Flax's zeros. conv1 and
  # conv2 share fan_in 1152: 256 values.
  b = np.concatenate([params["conv1"]["bias"], params["conv2"]["bias"]])
  _uniform_checks(b, bound, 0.12, "conv biases")
  # First conv (fan_in 27) and classifier (fan_in 2048).
  _uniform_checks(params["conv0"]["kernel"], 1 / math.sqrt(27), 0.1, "conv0")
  assert np.all(np.abs(params["conv0"]["bias"]) <= 1 / math.sqrt(27))
  assert np.max(np.abs(params["conv0"]["bias"])) > 0.8 / math.sqrt(27)
  _uniform_checks(params["classifier"]["kernel"], 1 / math.sqrt(2048), 0.05,
                  "classifier")
  cb = np.asarray(params["classifier"]["bias"])
  assert np.all(np.abs(cb) <= 1 / math.sqrt(2048)) and np.any(cb != 0)
  # Norm layers start as the identity affine map.
  for d in range(3):
    np.testing.assert_array_equal(params[f"norm{d}"]["scale"], np.ones(128))
    np.testing.assert_array_equal(params[f"norm{d}"]["bias"], np.zeros(128))


def test_single_channel_first_conv_init():
  params = cached_params(DEFAULT_CONVNET, (28, 28, 1))
  _uniform_checks(params["conv0"]["kernel"], 1 / 3, 0.15, "conv0 1ch")
  assert np.all(np.abs(params["conv0"]["bias"]) <= 1 / 3)
  # Same fan_in as with 3 channels from the second conv on.
  _uniform_checks(params["conv2"]["kernel"], 1 / math.sqrt(1152), 0.02,
                  "conv2 1ch")


def test_mlp_init_match_pytorch():
  params = cached_params(M.make_model("mlp", 5), (44,))
  _uniform_checks(params["fc0"]["kernel"], 1 / math.sqrt(44), 0.05, "fc0")
  _uniform_checks(params["fc0"]["bias"], 1 / math.sqrt(44), 0.15, "fc0 bias")
  hidden_b = np.concatenate([params["fc1"]["bias"], params["fc2"]["bias"]])
  _uniform_checks(hidden_b, 1 / 16, 0.12, "hidden biases")
  _uniform_checks(params["fc1"]["kernel"], 1 / 16, 0.02, "fc1")


def test_layernorm_convnet_params_shapes():
  model = M.make_model("convnet", 10, width=8, depth=2, norm="layernorm")
  params = abstract_params(model, (32, 32, 3))
  # PyTorch LayerNorm([C, H, W]): element-wise affine over the whole map.
  assert params["norm0"]["scale"].shape == (32, 32, 8)
  assert params["norm1"]["scale"].shape == (16, 16, 8)
  assert params["norm1"]["bias"].shape == (16, 16, 8)


# ----------------------------------------------------------------------------
# Forward pass against NumPy.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,depth,norm,activation,pooling", [
    ((6, 6, 3), 1, "instancenorm", "relu", "avgpool"),
    ((10, 10, 1), 1, "instancenorm", "relu", "avgpool"),  # pad-3 first conv
    ((10, 10, 1), 2, "instancenorm", "sigmoid", "avgpool"),
    ((7, 9, 3), 1, "instancenorm", "leakyrelu", "maxpool"),  # odd, non-square
    ((6, 6, 2), 1, "layernorm", "gelu", "none"),
    ((8, 8, 3), 2, "none", "relu", "avgpool"),
])
def test_convnet_matches_numpy(shape, depth, norm, activation, pooling):
  model = M.make_model("convnet", 3, width=4, depth=depth, norm=norm,
                       activation=activation, pooling=pooling)
  params = numpy_filled_params(model, shape, seed=depth)
  x = jax.random.normal(jax.random.key(1), (3,) + shape)
  # Full float32 convolutions also on accelerators that default to TF32.
  with jax.default_matmul_precision("float32"):
    emb, logits = jitted(model)(params, x)
  ref_emb, ref_logits = np_convnet(x, torch_layout(params, depth, norm),
                                   depth, norm, activation, pooling)
  assert emb.shape == ref_emb.shape
  np.testing.assert_allclose(emb, ref_emb, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,depth,activation,pooling", [
    ((10, 10, 1), 2, "relu", "avgpool"),  # pad-3 first conv
    ((7, 9, 3), 1, "leakyrelu", "maxpool"),  # odd, non-square
    ((6, 6, 2), 1, "gelu", "none"),
])
def test_fused_first_block_is_the_same_network(shape, depth, activation,
                                               pooling):
  kwargs = dict(width=4, depth=depth, activation=activation, pooling=pooling)
  plain = M.make_model("convnet", 3, **kwargs)
  fused = M.make_model("convnet", 3, fused_first_block=True, **kwargs)
  # Same parameters from the same key, structure and values.
  p_plain = M.init_params(plain, jax.random.key(4), shape)
  p_fused = M.init_params(fused, jax.random.key(4), shape)
  chex.assert_trees_all_equal(p_plain, p_fused)
  params = numpy_filled_params(fused, shape, seed=depth)
  x = jax.random.normal(jax.random.key(1), (3,) + shape)
  with jax.default_matmul_precision("float32"):
    emb, logits = jitted(fused)(params, x)
    grad = lambda m: jax.grad(lambda x: jnp.sum(jnp.sin(
        m.apply({"params": params}, x, method=m.embed))))(x)
    g_plain, g_fused = grad(plain), grad(fused)
  ref_emb, ref_logits = np_convnet(x, torch_layout(params, depth,
                                                   "instancenorm"),
                                   depth, "instancenorm", activation, pooling)
  np.testing.assert_allclose(emb, ref_emb, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_fused, g_plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ci,co,k,pad", [
    (1, 6, 3, 3),  # DM's first conv on 1-channel images: column-to-image
    (3, 6, 3, 1),
    (6, 6, 3, 1),  # input gradient as a forward convolution
    (6, 4, 3, 0),
    (5, 4, 1, 0),  # 1x1
    (4, 4, 3, 2),  # pad > k - 1: the input gradient's pad crops
])
def test_conv_matmul_grads_values_and_gradients_are_xlas(ci, co, k, pad):
  """Same value and same input and kernel gradients as differentiating XLA's
  own convolution (float64, so only the algebra is compared)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(ci * 100 + co * 10 + k + pad)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, ci)))
    kernel = jnp.asarray(rng.standard_normal((k, k, ci, co)))
    w = jnp.asarray(rng.standard_normal((2, 7 + 2 * pad - k + 1,
                                         6 + 2 * pad - k + 1, co)))
    padding = ((pad, pad), (pad, pad))

    def loss(conv):
      return lambda x, kernel: jnp.sum(w * jnp.sin(conv(
          x, kernel, (1, 1), padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))))

    ours = jax.jit(jax.value_and_grad(loss(M.conv_matmul_grads), (0, 1)))
    xla = jax.jit(jax.value_and_grad(loss(jax.lax.conv_general_dilated),
                                     (0, 1)))
    (v1, (dx1, dk1)), (v2, (dx2, dk2)) = ours(x, kernel), xla(x, kernel)
    assert dx1.dtype == x.dtype and dk1.dtype == kernel.dtype
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dk1, dk2, rtol=1e-10, atol=1e-12)


def test_fused_first_block_must_be_bool():
  with pytest.raises(ValueError, match="fused_first_block"):
    M.make_model("convnet", 3, fused_first_block="yes")


def test_mlp_matches_numpy_with_nchw_flatten():
  model = M.make_model("mlp", 4, width=6, depth=2, activation="leakyrelu")
  shape = (3, 5, 2)
  params = numpy_filled_params(model, shape, seed=3)
  x = jax.random.normal(jax.random.key(2), (2,) + shape)
  h = np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2)).reshape(2, -1)
  for d in range(2):
    w = np.asarray(params[f"fc{d}"]["kernel"], np.float64)
    h = NP_ACTS["leakyrelu"](h @ w + np.asarray(params[f"fc{d}"]["bias"]))
  with jax.default_matmul_precision("float32"):
    emb, logits = jitted(model)(params, x)
  np.testing.assert_allclose(emb, h, rtol=1e-5, atol=1e-6)
  ref = h @ np.asarray(params["classifier"]["kernel"]) + np.asarray(
      params["classifier"]["bias"])
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-6)


def test_mlp_layernorm_matches_numpy():
  model = M.make_model("mlp", 3, width=5, depth=1, norm="layernorm")
  params = numpy_filled_params(model, (7,), seed=4)
  x = jax.random.normal(jax.random.key(5), (4, 7))
  h = np.asarray(x, np.float64) @ np.asarray(params["fc0"]["kernel"]) + (
      np.asarray(params["fc0"]["bias"]))
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = np.maximum(h * np.asarray(params["norm0"]["scale"])
                 + np.asarray(params["norm0"]["bias"]), 0.0)
  with jax.default_matmul_precision("float32"):
    emb = jitted(model)(params, x)[0]
  np.testing.assert_allclose(emb, h, rtol=1e-4, atol=1e-5)


def test_embedding_is_flattened_in_nchw_order():
  model = M.make_model("convnet", 10, width=5, depth=1, pooling="none")
  shape = (6, 7, 3)
  params = numpy_filled_params(model, shape, seed=6)
  x = jax.random.normal(jax.random.key(3), (2,) + shape)
  maps, emb = jax.jit(lambda p, x: (
      model.apply({"params": p}, x, method=M.ConvNet.feature_map),
      M.embed_fn(model)(p, x)))(params, x)
  maps, emb = np.asarray(maps), np.asarray(emb)
  assert maps.shape == (2, 6, 7, 5)
  # Separately fused computations: equal up to float32 rounding.
  np.testing.assert_allclose(emb, maps.transpose(0, 3, 1, 2).reshape(2, -1),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(emb, maps.reshape(2, -1), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------
# Random networks.
# ----------------------------------------------------------------------------

SMALL = M.make_model("convnet", 10, width=8, depth=2)
SMALL_SHAPE = (28, 28, 1)


def _weight_leaves(params):
  return [v for path, v in jax.tree_util.tree_leaves_with_path(params)
          if not any(getattr(p, "key", "").startswith("norm") for p in path)]


def test_random_network_params_deterministic_and_distinct():
  a = M.random_network_params(SMALL, KEY, 3, SMALL_SHAPE)
  b = M.random_network_params(SMALL, KEY, 3, SMALL_SHAPE)
  c = M.random_network_params(SMALL, KEY, 4, SMALL_SHAPE)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  direct = M.init_params(SMALL, jax.random.fold_in(KEY, 3), SMALL_SHAPE)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, direct)
  weights_a, weights_c = _weight_leaves(a), _weight_leaves(c)
  assert len(weights_a) == 6  # 2 convs + classifier, kernel and bias each
  for va, vc in zip(weights_a, weights_c):
    assert not np.allclose(va, vc)
  # A different root key gives a different network for the same t.
  d = M.random_network_params(SMALL, jax.random.key(1), 3, SMALL_SHAPE)
  assert not np.allclose(a["conv0"]["kernel"], d["conv0"]["kernel"])


def test_vmap_over_t_matches_per_t_calls():
  T = 3
  stacked = jax.jit(jax.vmap(
      lambda t: M.random_network_params(SMALL, KEY, t, SMALL_SHAPE)))(
          jnp.arange(T))
  x = jax.random.normal(KEY, (4,) + SMALL_SHAPE)
  feats = jax.jit(jax.vmap(M.embed_fn(SMALL), in_axes=(0, None)))(stacked, x)
  assert feats.shape == (T, 4, 8 * 8 * 8)
  for t in range(T):
    single = M.random_network_params(SMALL, KEY, t, SMALL_SHAPE)
    jax.tree_util.tree_map(
        lambda s, p: np.testing.assert_array_equal(s[t], p), stacked, single)
    np.testing.assert_allclose(feats[t], jitted(SMALL)(single, x)[0],
                               rtol=1e-5, atol=1e-6)
  assert not np.allclose(feats[0], feats[1])
  # The sequential variant gives the same features.
  mapped = jax.jit(M.embed_many_fn(SMALL))(stacked, x)
  np.testing.assert_allclose(mapped, feats, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Every architecture.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch,shape,feat", [
    ("convnet", (32, 32, 3), 2048),
    ("alexnet", (32, 32, 3), 3072),
    ("vgg11", (32, 32, 3), 512),
    ("resnet18", (32, 32, 3), 512),
    ("mlp", (32, 32, 3), 256),
    ("convnet", (28, 28, 1), 2048),
    ("mlp", (28, 28, 1), 256),
    ("mlp", (44,), 256),
])
def test_every_arch_logits_and_embedding(arch, shape, feat):
  model = M.make_model(arch, 10)
  params = cached_params(model, shape)
  x = jax.random.uniform(KEY, (2,) + shape)
  emb, logits = jitted(model)(params, x)
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(logits))
  assert not np.allclose(logits[0], logits[1])  # not a degenerate net
  assert M.feature_dim(model, shape) == feat
  # The classifier is one Linear layer on the embedding.
  assert emb.shape == (2, feat)
  expected = emb @ params["classifier"]["kernel"] + params["classifier"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,feat", [
    ("alexnet", 3072), ("vgg11", 512), ("resnet18", 512)])
def test_archs_on_28x28x1(arch, feat):
  model = M.make_model(arch, 10)
  assert M.feature_dim(model, (28, 28, 1)) == feat
  out = jax.eval_shape(M.logits_fn(model), abstract_params(model, (28, 28, 1)),
                       jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32))
  assert out.shape == (2, 10)


def test_resnet18_structure_matches_dm():
  params = abstract_params(M.make_model("resnet18", 10), (32, 32, 3))
  # DM's ResNet convs have no bias; stride/width changes get a 1x1 shortcut.
  assert set(params["conv1"]) == {"kernel"}
  assert "shortcut_conv" not in params["layer1_0"]
  assert "shortcut_conv" not in params["layer2_1"]
  assert params["layer2_0"]["shortcut_conv"]["kernel"].shape == (1, 1, 64, 128)
  assert set(params["layer2_0"]["shortcut_norm"]) == {"scale", "bias"}
  assert params["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
  # PyTorch's CIFAR ResNet18 (affine norms, 10 classes): 11,173,962.
  assert param_count(M.make_model("resnet18", 10), (32, 32, 3)) == 11_173_962


def test_vgg11_and_alexnet_parameter_counts_match_dm():
  # Parameter counts of DM's PyTorch models for 3-channel inputs, 10 classes.
  vgg_expected, cin = 0, 3
  for c in (64, 128, 256, 256, 512, 512, 512, 512):
    vgg_expected += 9 * cin * c + c + 2 * c  # conv weight, bias, GroupNorm
    cin = c
  vgg_expected += 512 * 10 + 10
  assert param_count(M.make_model("vgg11", 10), (32, 32, 3)) == vgg_expected
  alex_expected = (25 * 3 * 128 + 128 + 25 * 128 * 192 + 192
                   + 9 * 192 * 256 + 256 + 9 * 256 * 192 + 192
                   + 9 * 192 * 192 + 192 + 3072 * 10 + 10)
  assert param_count(M.make_model("alexnet", 10), (32, 32, 3)) == alex_expected
  # 1-channel AlexNet: first conv 5x5x1 (padding 4), same 3072 features.
  assert param_count(M.make_model("alexnet", 10), (28, 28, 1)) == (
      alex_expected - 25 * 2 * 128)


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def test_make_model_overrides_and_case():
  model = M.make_model("ConvNet", 5, width=32, depth=2, activation="gelu")
  assert isinstance(model, M.ConvNet)
  assert (model.num_classes, model.width, model.depth, model.activation) == (
      5, 32, 2, "gelu")
  assert isinstance(M.make_model("mlp", 3, norm="layernorm"), M.MLP)


@pytest.mark.parametrize("arch,kwargs,match", [
    ("lenet", {}, "arch"),
    ("convnet", {"foo": 1}, "foo"),
    ("alexnet", {"width": 64}, "width"),
    ("convnet", {"norm": "batchnorm"}, "norm"),
    ("convnet", {"activation": "tanh"}, "activation"),
    ("convnet", {"pooling": "avgpooling"}, "pooling"),
    ("convnet", {"depth": 0}, "depth"),
    ("convnet", {"width": 0}, "width"),
    ("mlp", {"norm": "instancenorm"}, "norm"),
    ("mlp", {"depth": 0}, "depth"),
])
def test_invalid_make_model_raises(arch, kwargs, match):
  with pytest.raises(ValueError, match=match):
    M.make_model(arch, 10, **kwargs)


def test_invalid_num_classes_and_shapes_raise():
  with pytest.raises(ValueError, match="num_classes"):
    M.make_model("vgg11", 0)
  model = M.make_model("convnet", 10, width=4, depth=1)
  with pytest.raises(ValueError, match="input_shape"):
    M.init_params(model, KEY, (28, 28))
  with pytest.raises(ValueError, match="input_shape"):
    M.init_params(model, KEY, (28, 0, 1))
  with pytest.raises(ValueError, match="input_shape"):
    M.feature_dim(model, 28)
  # NumPy integers (e.g. from array shapes or configs) are accepted.
  assert M.feature_dim(M.make_model("convnet", np.int64(10), width=np.int32(4),
                                    depth=1), (np.int64(8), 8, 3)) == 4 * 4 * 4
  params = abstract_params(model, (8, 8, 3))
  with pytest.raises(ValueError, match="x must"):
    jax.eval_shape(M.embed_fn(model), params,
                   jax.ShapeDtypeStruct((8, 8, 3), jnp.float32))
