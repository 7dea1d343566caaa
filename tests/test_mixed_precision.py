"""The ``compute_dtype="bfloat16"`` option: mixed-precision embedding networks.

bfloat16 keeps 8 bits of mantissa, so features differ from float32 by about
1e-2 relative; these tests check that the option really computes in bf16,
stays close to float32, keeps every output float32, and reaches every part
of a run (client pass, local DM, server) from the config.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import client
from collabdm_jax import dm
from collabdm_jax import losses
from collabdm_jax import models
from collabdm_jax import server
from collabdm_jax import setup as setup_lib
from experiments.configs import smoke

SHAPE = (28, 28, 1)
C = 3
ROOT = jax.random.key(11)
MODEL = models.make_model("convnet", C, width=16, depth=3)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).standard_normal((24,) + SHAPE).astype(
      np.float32)


def test_bf16_features_close_to_f32_and_float32_out(images):
  params = dm.network_params(MODEL, ROOT, 0, SHAPE)
  f32 = jax.jit(models.embed_fn(MODEL))(params, images)
  bf16_fn = models.embed_fn(MODEL, "bfloat16")
  bf16 = jax.jit(bf16_fn)(params, images)
  assert bf16.dtype == jnp.float32
  err = rel_err(bf16, f32)
  # Really lower precision (not a silent float32 path), yet close.
  assert 1e-4 < err < 3e-2, err
  # The convolutions themselves run on bfloat16 operands.
  jaxpr = str(jax.make_jaxpr(bf16_fn)(params, images))
  convs = [l for l in jaxpr.splitlines() if "conv_general_dilated" in l]
  assert convs and all("bf16" in l for l in convs), convs
  # The parameters passed in are untouched (the casts happen inside).
  leaves = jax.tree_util.tree_leaves(params)
  assert all(l.dtype == jnp.float32 for l in leaves)


def test_bf16_gradient_wrt_images_is_close(images):
  params = dm.network_params(MODEL, ROOT, 1, SHAPE)
  target = jnp.ones((models.feature_dim(MODEL, SHAPE),))

  def grad(dtype):
    embed = models.embed_fn(MODEL, dtype)
    return jax.jit(jax.grad(lambda x: losses.mean_embedding_loss(
        target, embed(params, x))))(images[:8])

  g32, g16 = grad("float32"), grad("bfloat16")
  assert g16.dtype == jnp.float32
  assert np.isfinite(np.asarray(g16)).all()
  cos = float(jnp.vdot(g32, g16) / (jnp.linalg.norm(g32) *
                                     jnp.linalg.norm(g16)))
  assert cos > 0.99, cos


def test_unknown_compute_dtype_is_refused():
  with pytest.raises(ValueError, match="compute_dtype.*float16"):
    models.embed_fn(MODEL, "float16")
  with pytest.raises(ValueError, match="compute_dtype"):
    client.StatsSpec(model=MODEL, input_shape=SHAPE, num_classes=C,
                     compute_dtype="bf16")
  with pytest.raises(ValueError, match="compute_dtype"):
    server.ServerConfig(ipc=1, compute_dtype="half")
  with pytest.raises(ValueError, match="compute_dtype"):
    client.LocalDMConfig(ipc=1, compute_dtype="fp8")


def test_bf16_client_statistics_close_to_f32():
  rng = np.random.default_rng(1)
  ys = [rng.integers(0, C, n).astype(np.int32) for n in (40, 25)]
  xs = [rng.standard_normal((len(y),) + SHAPE).astype(np.float32)
        + y[:, None, None, None] for y in ys]

  def stats(dtype):
    spec = client.StatsSpec(model=MODEL, input_shape=SHAPE, num_classes=C,
                            batch_real=None, dsa_strategy="scale_rotate",
                            embed_batch=16, compute_dtype=dtype)
    return client.client_stats(ROOT, xs, ys, [0, 1], spec, 2)

  s32, s16 = stats("float32"), stats("bfloat16")
  np.testing.assert_array_equal(s16.counts, s32.counts)
  assert s16.means.dtype == np.float32
  err = rel_err(s16.means, s32.means)
  assert 1e-4 < err < 3e-2, err


def test_bf16_server_step_lowers_the_loss():
  rng = np.random.default_rng(2)
  cfg = server.ServerConfig(ipc=2, lr=1.0, dsa_strategy="",
                            compute_dtype="bfloat16")
  optimizer, step = server.make_step(MODEL, SHAPE, C, cfg)
  params = dm.network_params(MODEL, ROOT, 0, SHAPE)
  real = rng.standard_normal((C, 6) + SHAPE).astype(np.float32) + 1.0
  target = jax.vmap(lambda x: models.embed_fn(MODEL)(params, x).mean(0))(
      jnp.asarray(real))
  targets = losses.ClassMoments(target, jnp.zeros_like(target),
                                jnp.ones((C,), bool))
  init = server.initial_synthetic_set(jax.random.key(0), "noise", C, 2, SHAPE)
  state = dm.init_state(jnp.asarray(init), optimizer)
  history = []
  for _ in range(10):
    state, class_losses = step(state, ROOT, jnp.int32(0), targets)
    history.append(np.asarray(class_losses))
  assert state.images.dtype == jnp.float32
  assert (history[-1] < 0.5 * history[0]).all(), history


def test_config_compute_dtype_reaches_every_stage():
  config = smoke.get_config()
  config.compute_dtype = "bfloat16"
  s = setup_lib.setup(config)
  assert s.stats_spec.compute_dtype == "bfloat16"
  assert setup_lib.server_config(s).compute_dtype == "bfloat16"
  assert setup_lib.local_config(config, s.dsa_strategy).compute_dtype == (
      "bfloat16")
  config.compute_dtype = "float16"
  with pytest.raises(ValueError, match="compute_dtype"):
    setup_lib.setup(config)
