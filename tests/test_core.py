"""CollabDM core: client statistics, aggregation and the server step."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collabdm_jax import augment
from collabdm_jax import client
from collabdm_jax import dm
from collabdm_jax import keys
from collabdm_jax import losses
from collabdm_jax import models
from collabdm_jax import parallel
from collabdm_jax import server

SHAPE = (28, 28, 1)
C = 3
STRATEGY = "color_crop_cutout_scale_rotate"
ROOT = jax.random.key(7)


@pytest.fixture(scope="module")
def tiny():
  """Three clients with skewed classes; one lacks class 2 entirely."""
  rng = np.random.default_rng(0)
  model = models.make_model("convnet", C, width=8, depth=2)
  sizes = [(30, 5, 0), (3, 20, 9), (12, 1, 14)]
  xs, ys = [], []
  for per_class in sizes:
    y = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    y = rng.permutation(y).astype(np.int32)
    xs.append(rng.standard_normal((len(y),) + SHAPE).astype(np.float32)
              + y[:, None, None, None])
    ys.append(y)
  return model, xs, ys


def full_spec(model, **kw):
  return client.StatsSpec(model=model, input_shape=SHAPE, num_classes=C,
                          batch_real=None, dsa_strategy=STRATEGY,
                          embed_batch=16, **kw)


def loop_reference(model, x, y, t):
  """Per-class mean embeddings by a plain loop over classes (full class)."""
  params = dm.network_params(model, ROOT, t, SHAPE)
  embed = models.embed_fn(model)
  out = {}
  for c in range(C):
    xc = x[y == c]
    if len(xc) == 0:
      continue
    aug = augment.dsa(keys.augment_key(ROOT, t, c), jnp.asarray(xc), STRATEGY,
                      siamese=True)
    out[c] = np.asarray(embed(params, aug)).mean(0)
  return out


def test_vmapped_stats_equal_per_client_loop(tiny):
  model, xs, ys = tiny
  spec = full_spec(model)
  stats = client.client_stats(ROOT, xs, ys, [0, 1, 2], spec, 2, t_chunk=1,
                              clients_per_device=2)
  assert stats.means.shape == (3, 2, C, models.feature_dim(model, SHAPE))
  for k in range(3):
    np.testing.assert_array_equal(stats.class_counts[k],
                                  np.bincount(ys[k], minlength=C))
    for t in range(2):
      ref = loop_reference(model, xs[k], ys[k], t)
      np.testing.assert_array_equal(stats.counts[k, t],
                                    np.bincount(ys[k], minlength=C))
      for c in range(C):
        if c in ref:
          np.testing.assert_allclose(stats.means[k, t, c], ref[c], rtol=2e-4,
                                     atol=2e-5)
        else:  # absent class: zero row, zero count
          assert not stats.means[k, t, c].any()


def test_client_result_independent_of_block_mates(tiny):
  model, xs, ys = tiny
  spec = full_spec(model)
  together = client.client_stats(ROOT, xs, ys, [0, 1, 2], spec, 2,
                                 clients_per_device=3)
  alone = client.client_stats(ROOT, xs[1:2], ys[1:2], [1], spec, 2)
  np.testing.assert_allclose(together.means[1], alone.means[0], rtol=1e-5,
                             atol=1e-6)


def test_minibatch_draws_without_replacement_and_changes_with_t(tiny):
  model, xs, ys = tiny
  spec = client.StatsSpec(model=model, input_shape=SHAPE, num_classes=C,
                          batch_real=4, dsa_strategy="", embed_batch=8)
  stats = client.client_stats(ROOT, xs, ys, [0, 1, 2], spec, 3)
  for k in range(3):
    expect = np.minimum(np.bincount(ys[k], minlength=C), 4)
    assert (stats.counts[k] == expect).all()
  # Class 0 of client 0 has 30 samples: different subsets at different t.
  assert not np.allclose(stats.means[0, 0, 0], stats.means[0, 1, 0])
  # The draw itself: distinct indices, all of the requested class.
  y = np.sort(ys[0])
  counts = np.bincount(y, minlength=C)
  sc, sr = client.class_slots(counts, np.minimum(counts, 4))
  start = np.concatenate([[0], np.cumsum(counts)[:-1]])
  idx = np.asarray(client.sample_class_slots(
      jax.random.key(3), jnp.asarray(y), jnp.asarray(start), jnp.asarray(sc),
      jnp.asarray(sr)))
  assert len(set(idx.tolist())) == len(idx)
  np.testing.assert_array_equal(y[idx], sc)


def test_count_weighting_gives_pooled_mean(tiny):
  model, xs, ys = tiny
  spec = full_spec(model)
  stats = client.client_stats(ROOT, xs, ys, [0, 1, 2], spec, 2)
  agg = losses.aggregate_class_moments(stats.means, stats.counts,
                                       stats.class_counts)
  pooled = client.client_stats(ROOT, [np.concatenate(xs)],
                               [np.concatenate(ys)], [0], spec, 2)
  np.testing.assert_allclose(agg.mean, pooled.means[0], rtol=2e-4, atol=2e-5)
  assert np.asarray(agg.valid).all()


def test_uniform_weighting_is_reference_formula():
  rng = np.random.default_rng(1)
  K, T, D = 4, 2, 5
  means = rng.standard_normal((K, T, C, D)).astype(np.float32)
  counts = rng.integers(0, 4, (K, T, C)).astype(np.int32)
  counts[:, :, 2] = 0  # nobody holds class 2
  means[counts == 0] = np.nan  # junk must not leak
  class_counts = counts[:, 0] * 10
  agg = losses.aggregate_class_moments(means, counts, class_counts,
                                       weighting="uniform")
  for t in range(T):
    for c in range(C):
      holders = [k for k in range(K) if counts[k, t, c] > 0]
      if holders:
        ref = np.mean([means[k, t, c] for k in holders], axis=0)
        np.testing.assert_allclose(agg.mean[t, c], ref, rtol=1e-6)
      else:
        assert not bool(agg.valid[t, c])
  assert np.isfinite(np.asarray(agg.mean)).all()
  assert np.isfinite(np.asarray(agg.std)).all()
  with pytest.raises(ValueError, match="weighting"):
    losses.aggregate_class_moments(means, counts, class_counts,
                                   weighting="mean")


def test_second_moments_give_pooled_std(tiny):
  model, xs, ys = tiny
  spec = full_spec(model, second_moments=True)
  stats = client.client_stats(ROOT, xs, ys, [0, 1, 2], spec, 1)
  agg = losses.aggregate_class_moments(stats.means, stats.counts,
                                       stats.class_counts,
                                       stats.second_moments)
  params = dm.network_params(model, ROOT, 0, SHAPE)
  x, y = np.concatenate(xs), np.concatenate(ys)
  aug = augment.dsa(keys.augment_key(ROOT, 0, 1), jnp.asarray(x[y == 1]),
                    STRATEGY)
  emb = np.asarray(models.embed_fn(model)(params, aug))
  np.testing.assert_allclose(agg.std[0, 1], emb.std(0), rtol=2e-3, atol=2e-4)


def test_losses_match_definitions():
  rng = np.random.default_rng(2)
  emb = rng.standard_normal((6, 4)).astype(np.float32)
  target = rng.standard_normal(4).astype(np.float32)
  np.testing.assert_allclose(losses.mean_embedding_loss(target, emb),
                             ((target - emb.mean(0)) ** 2).sum(), rtol=1e-5)
  w = np.array([1, 1, 0, 0, 1, 0], np.float32)
  np.testing.assert_allclose(
      losses.mean_embedding_loss(target, emb, w),
      ((target - emb[w > 0].mean(0)) ** 2).sum(), rtol=1e-5)
  np.testing.assert_allclose(
      losses.std_matching_loss(target, emb), ((target - emb.std(0)) ** 2).sum(),
      rtol=1e-4)
  g = jax.grad(lambda e: losses.std_matching_loss(target, e))(emb[:1])
  assert np.isfinite(np.asarray(g)).all()  # one image: no NaN gradient


def test_server_step_lowers_loss_on_fixed_problem(tiny):
  model, xs, ys = tiny
  cfg = server.ServerConfig(ipc=2, lr=1.0, dsa_strategy="")
  optimizer, step = server.make_step(model, SHAPE, C, cfg)
  params = dm.network_params(model, ROOT, 0, SHAPE)
  embed = models.embed_fn(model)
  target = jnp.stack([embed(params, jnp.asarray(xs[0][ys[0] == c][:5])).mean(0)
                      if (ys[0] == c).sum() else jnp.zeros(models.feature_dim(model, SHAPE))
                      for c in range(C)])
  targets = losses.ClassMoments(target, jnp.zeros_like(target),
                                jnp.array([True, True, False]))
  init = server.initial_synthetic_set(jax.random.key(0), "noise", C, 2, SHAPE)
  state = dm.init_state(jnp.asarray(init), optimizer)
  untouched = np.asarray(init[2])
  history = []
  for _ in range(15):
    state, class_losses = step(state, ROOT, jnp.int32(0), targets)
    history.append(np.asarray(class_losses))
  history = np.array(history)
  assert (history[-1, :2] < 0.5 * history[0, :2]).all()
  assert (history[:, 2] == 0).all()
  np.testing.assert_array_equal(np.asarray(state.images[2]), untouched)


def _per_class_reference(lr, momentum, embed, images, trace, params,
                         aug_draws, mean, std, valid, *, strategy, pae=False,
                         std_weight=0.0, std_ddof=0):
  """The reference's loop, written out: one optax SGD-momentum step over the
  whole tensor per valid class in turn. Returns (images, trace, losses)."""
  opt = optax.sgd(lr, momentum=momentum)
  opt_state = opt.init(images)
  opt_state = (opt_state[0]._replace(trace=trace),) + tuple(opt_state[1:])
  losses_ = []
  for c in range(images.shape[0]):
    if not valid[c]:
      losses_.append(0.0)
      continue
    def loss(im, c=c):
      return dm.class_matching_loss(embed, params, im[c],
                                    jax.tree.map(lambda a: a[c], aug_draws),
                                    mean[c], std[c], dsa_strategy=strategy,
                                    pae=pae, std_weight=std_weight,
                                    std_ddof=std_ddof)
    value, g = jax.value_and_grad(loss)(images)
    updates, opt_state = opt.update(g, opt_state, images)
    images = optax.apply_updates(images, updates)
    losses_.append(float(value))
  return images, opt_state[0].trace, np.array(losses_)


def test_per_class_steps_share_momentum():
  """Reference semantics: class c's step moves class c' by its momentum."""
  model = models.make_model("convnet", 2, width=4, depth=1)
  shape = (8, 8, 1)
  opt = dm.make_optimizer(1.0, 0.5)
  images = jnp.asarray(np.random.default_rng(0).standard_normal(
      (2, 1) + shape).astype(np.float32))
  params = dm.network_params(model, ROOT, 0, shape)
  embed = models.embed_fn(model)
  keys_ = dm.class_aug_draws(ROOT, 0, 2, "", shape)
  target = jnp.ones((2, models.feature_dim(model, shape)))
  valid = jnp.array([True, True])
  state = dm.init_state(jnp.array(images), opt)
  state, _ = jax.jit(lambda st: dm.iteration_step(
      opt, embed, st, params, keys_, target, target, valid, dsa_strategy="",
      pae=False, std_weight=0.0))(state)
  after_one = state.images
  g0 = jax.grad(lambda im: losses.mean_embedding_loss(
      target[0], embed(params, im)))(images[0])
  # Class 0 moved by its own gradient in step 0 and then by 0.5 * momentum
  # in class 1's step: total -(1 + 0.5) * g0.
  np.testing.assert_allclose(after_one[0], images[0] - 1.5 * g0, rtol=1e-4,
                             atol=1e-6)


def _compare_with_loop(model, dtype, valid, pae, std_weight, std_ddof,
                       momentum, lr, tol, classes_per_piece=None):
  """Three iterations of dm.iteration_step, each against the per-class loop
  run from the same state (so the momentum of earlier iterations is in it,
  and float rounding does not compound over iterations)."""
  shape = (12, 12, 3)
  opt = dm.make_optimizer(lr, momentum)
  embed = models.embed_fn(model)
  images = jnp.asarray(np.random.default_rng(1).standard_normal(
      (4, 3) + shape), dtype)
  valid = np.array(valid)
  state = dm.init_state(jnp.array(images), opt)
  step = jax.jit(lambda st, p, k, m, s: dm.iteration_step(
      opt, embed, st, p, k, m, s, jnp.asarray(valid), dsa_strategy=STRATEGY,
      pae=pae, std_weight=std_weight, std_ddof=std_ddof,
      classes_per_piece=classes_per_piece), donate_argnums=0)
  D = models.feature_dim(model, shape)
  for t in range(3):
    params = jax.tree.map(lambda a: a.astype(dtype),
                          dm.network_params(model, ROOT, t, shape))
    keys_ = dm.class_aug_draws(ROOT, t, 4, STRATEGY, shape)
    mean = jax.random.normal(jax.random.fold_in(ROOT, 100 + t), (4, D), dtype)
    std = jnp.abs(jax.random.normal(jax.random.fold_in(ROOT, 200 + t), (4, D),
                                    dtype))
    # Host copies: the step donates the state.
    before = (np.asarray(state.images), np.asarray(state.opt_state[0].trace))
    state, got = step(state, params, keys_, mean, std)
    ref_images, ref_trace, want = _per_class_reference(
        lr, momentum, embed, jnp.asarray(before[0]), jnp.asarray(before[1]),
        params, keys_, mean, std, valid, strategy=STRATEGY, pae=pae,
        std_weight=std_weight, std_ddof=std_ddof)
    assert state.images.dtype == dtype
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(state.images),
                               np.asarray(ref_images), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(state.opt_state[0].trace),
                               np.asarray(ref_trace), rtol=tol, atol=tol)
  assert np.abs(before[1][valid]).max() > 0  # momentum was carried in
  assert (want[valid] > 0).all() and (want[~valid] == 0).all()
  # The state keeps optax.sgd's structure (checkpoints restore into it).
  assert (jax.tree.structure(state.opt_state)
          == jax.tree.structure(optax.sgd(lr, momentum=momentum).init(images)))
  # Classes never valid never moved (their momentum stays zero).
  for c in np.flatnonzero(~valid):
    np.testing.assert_array_equal(np.asarray(state.images[c]),
                                  np.asarray(images[c]))


# classes_per_piece: None is the backend's default (on CPU 3 classes of 3
# images, then the remaining class: a vmapped piece and the remainder), 1
# a loop over classes, 2 vmapped pairs, 4 all classes in one pass.
@pytest.mark.parametrize(
    "valid,pae,std_weight,std_ddof,momentum,classes_per_piece", [
        ([True, False, True, True], False, 0.0, 0, 0.5, None),
        ([False, True, True, False], True, 0.0, 0, 0.5, 1),
        ([True, True, False, True], False, 0.7, 1, 0.9, 4),
        ([True, True, True, True], False, 0.0, 0, 0.0, 2),
    ])
def test_closed_form_iteration_is_the_per_class_loop_exactly(
    valid, pae, std_weight, std_ddof, momentum, classes_per_piece):
  """dm.iteration_step (independent class gradients, momentum in closed
  form) == one optax step per class, with momentum carried over iterations,
  skipped classes, DSA, PAE and the std term, whatever the pieces. In
  float64 (a network without instance norm, whose statistics are float32)
  the two agree to 1e-10: the closed form is the same algebra, not an
  approximation."""
  model = models.make_model("convnet", 4, width=8, depth=2, norm="none")
  with jax.enable_x64(True):
    _compare_with_loop(model, jnp.float64, valid, pae, std_weight, std_ddof,
                       momentum, lr=2.0, tol=1e-10,
                       classes_per_piece=classes_per_piece)


def test_closed_form_iteration_equals_the_per_class_loop_float32():
  """The same in float32 with DM's instance-norm ConvNet, as callers run it
  (to float rounding)."""
  model = models.make_model("convnet", 4, width=8, depth=2)
  _compare_with_loop(model, jnp.float32, [True, False, True, True], True, 0.7,
                     1, 0.5, lr=10.0, tol=1e-4)


def test_skipped_class_drifts_by_its_momentum_only():
  """A class valid in one iteration and skipped in the next moves in the
  second only by its decayed momentum, decayed once per VALID class step."""
  model = models.make_model("convnet", 3, width=4, depth=1)
  shape = (8, 8, 1)
  lr, mu = 1.0, 0.5
  opt = dm.make_optimizer(lr, mu)
  embed = models.embed_fn(model)
  images = jnp.asarray(np.random.default_rng(3).standard_normal(
      (3, 2) + shape).astype(np.float32))
  params = dm.network_params(model, ROOT, 0, shape)
  keys_ = dm.class_aug_draws(ROOT, 0, 3, "", shape)
  target = jnp.ones((3, models.feature_dim(model, shape)))
  step = jax.jit(lambda st, v: dm.iteration_step(
      opt, embed, st, params, keys_, target, target, v, dsa_strategy="",
      pae=False, std_weight=0.0))
  first, _ = step(dm.init_state(images, opt), jnp.array([True, True, True]))
  b = first.opt_state[0].trace[0]
  assert np.abs(np.asarray(b)).max() > 0
  second, got = step(first, jnp.array([False, True, True]))
  # Two valid steps (classes 1 and 2) each decay b by mu and move by it.
  np.testing.assert_allclose(second.images[0],
                             first.images[0] - lr * (mu + mu ** 2) * b,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(second.opt_state[0].trace[0], mu ** 2 * b,
                             rtol=1e-6)
  assert float(got[0]) == 0.0


def test_same_seed_bit_identical_synthetic_set(tiny):
  model, xs, ys = tiny
  spec = full_spec(model)

  def run():
    st = client.client_stats(ROOT, xs, ys, [0, 1, 2], spec, 2)
    tg = losses.aggregate_class_moments(st.means, st.counts, st.class_counts)
    cfg = server.ServerConfig(ipc=2, dsa_strategy=STRATEGY)
    init = server.initial_synthetic_set(jax.random.key(0), "noise", C, 2, SHAPE)
    return np.asarray(server.synthesize(ROOT, [(0, tg)], model, SHAPE, C, cfg,
                                        init).images)

  np.testing.assert_array_equal(run(), run())


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from collabdm_jax import client, losses, models, parallel, server
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    model = models.make_model("convnet", 3, width=8, depth=2)
    xs, ys = [], []
    for k in range(6):
        y = rng.integers(0, 3, 10 + 7 * k).astype(np.int32)
        xs.append(rng.standard_normal((len(y), 28, 28, 1)).astype(np.float32))
        ys.append(y)
    spec = client.StatsSpec(model=model, input_shape=(28, 28, 1), num_classes=3,
                            batch_real=8, dsa_strategy="color_crop_scale",
                            embed_batch=16)
    root = jax.random.key(0)
    out = {}
    for n in (1, 4):
        mesh = parallel.client_mesh(num_devices=n)
        st = client.client_stats(root, xs, ys, list(range(6)), spec, 3,
                                 mesh=mesh)
        tg = losses.aggregate_class_moments(st.means, st.counts, st.class_counts)
        cfg = server.ServerConfig(ipc=2, dsa_strategy="color_crop_scale")
        init = server.initial_synthetic_set(jax.random.key(1), "noise", 3, 2,
                                            (28, 28, 1))
        syn = server.synthesize(root, [(0, tg)], model, (28, 28, 1), 3, cfg,
                                init).images
        out[n] = (np.asarray(tg.mean), np.asarray(syn), st.counts)
    np.testing.assert_array_equal(out[1][2], out[4][2])
    np.testing.assert_allclose(out[1][0], out[4][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1][1], out[4][1], rtol=1e-4, atol=1e-5)
    print("OK")
""")


def test_four_devices_match_one():
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_blocks_share_one_shape_and_hold_every_sample_once():
  # 60 clients of very different sizes (Dirichlet-like): one block shape,
  # every sample stored exactly once, little padding.
  rng = np.random.default_rng(3)
  sizes = np.concatenate([rng.integers(1, 20, 50), rng.integers(100, 400, 10)])
  ys = [rng.integers(0, C, n).astype(np.int32) for n in sizes]
  xs = [np.full((n, 1, 1, 1), k, np.float32) for k, n in enumerate(sizes)]
  spec = client.StatsSpec(model=None, input_shape=(1, 1, 1), num_classes=C,
                          batch_real=8, embed_batch=16)
  slots = [int(spec.slots_per_class(np.bincount(y, minlength=C)).sum())
           for y in ys]
  layout = client.plan_layout(spec, sizes, slots, num_shards=2,
                              clients_per_shard=8)
  blocks = client.make_blocks(xs, ys, list(range(60)), spec, layout)
  assert len({tuple(a.shape for a in b[:9]) for b in blocks}) == 1
  assert layout.slots_per_shard % layout.embed_batch == 0
  members = [m for b in blocks for m in b.members if m >= 0]
  assert sorted(members) == list(range(60))
  stored = np.concatenate([b.x[b.sample_client < layout.clients_per_shard]
                           for b in blocks]).ravel()
  np.testing.assert_array_equal(np.bincount(stored.astype(int)), sizes)
  # Padding stays a fraction of the data (no per-client padding).
  padded = sum(b.x.shape[0] for b in blocks)
  assert padded < 2 * sizes.sum(), (padded, sizes.sum())
  for b in blocks:
    for d in range(2):
      shard = slice(d * layout.slots_per_shard, (d + 1) * layout.slots_per_shard)
      assert (b.slot_class[shard] >= 0).sum() <= layout.slots_per_shard
  with pytest.raises(ValueError, match="num_blocks"):
    client.make_blocks(xs, ys, list(range(60)), spec, layout, num_blocks=1)
  # A process with fewer clients pads with empty blocks of the same shapes.
  empty = client.make_blocks([], [], [], spec, layout, num_blocks=2)
  assert len(empty) == 2 and all(m == -1 for m in empty[0].members)
  assert tuple(a.shape for a in empty[0][:9]) == tuple(
      a.shape for a in blocks[0][:9])
  assert (empty[1].slot_class == -1).all()


def test_many_clients_compile_the_block_function_once(tiny):
  model, xs, ys = tiny
  spec = full_spec(model)
  # 12 clients in several blocks (2 per call): one shape, one compilation.
  many_x, many_y = xs * 4, ys * 4
  before = client.block_stats_fn
  made = []

  def spy(*args):
    made.append(before(*args))
    return made[-1]

  client.block_stats_fn = spy
  try:
    stats = client.client_stats(ROOT, many_x, many_y, list(range(12)), spec, 2,
                                clients_per_device=2)
  finally:
    client.block_stats_fn = before
  assert len(made) == 1 and made[0].program._cache_size() == 1
  # Copies of the same data under different ids draw different subsets
  # only through their ids; with full-class statistics they agree.
  np.testing.assert_allclose(stats.means[0], stats.means[3], rtol=1e-5,
                             atol=1e-6)


def test_local_padding_shares_one_compiled_step_and_keeps_result(tiny):
  model, xs, ys = tiny  # 35, 32 and 27 samples: two size buckets
  dm_cfg = lambda lr: client.LocalDMConfig(ipc=2, iterations=2, lr=lr,
                                           batch_real=4, dsa_strategy="")
  padded_cfg, plain_cfg = dm_cfg(1.0), dm_cfg(1.0 + 1e-9)  # separate caches
  pad_to = client.local_padding(ys, C, padded_cfg)
  assert pad_to == (35, 11)  # largest party; client 1 draws 3 + 4 + 4
  run = lambda k, cfg, **kw: client.local_distill(
      jax.random.key(k), xs[k], ys[k], C, model, SHAPE, cfg, **kw)
  padded = [run(k, padded_cfg, pad_to=pad_to) for k in range(3)]
  plain = [run(k, plain_cfg) for k in range(3)]
  for (pi, pl), (qi, ql) in zip(padded, plain):
    np.testing.assert_array_equal(pl, ql)
    np.testing.assert_allclose(pi, qi, rtol=1e-4, atol=1e-5)
  targets = lambda cfg: client._local_dm_step(model, SHAPE, C, cfg)[1]
  assert targets(padded_cfg)._cache_size() == 1
  assert targets(plain_cfg)._cache_size() == 2


def test_slots_of_counts_the_samples_drawn_per_iteration(tiny):
  model, _, ys = tiny
  for batch_real, expect in ((None, [35, 32, 27]), (4, [8, 11, 9])):
    spec = client.StatsSpec(model=model, input_shape=SHAPE, num_classes=C,
                            batch_real=batch_real)
    assert [spec.slots_of(y) for y in ys] == expect


def test_shared_local_dm_targets_are_the_uploaded_means(tiny):
  """Local DM on the shared networks: iteration t is DM under psi_t and the
  Siamese keys of (t, c) towards the client's own uploaded mean."""
  model, xs, ys = tiny
  spec = client.StatsSpec(model=model, input_shape=SHAPE, num_classes=C,
                          batch_real=6, dsa_strategy=STRATEGY, embed_batch=16)
  ids = [0, 1, 2]
  stats = client.client_stats(ROOT, xs, ys, ids, spec, 3)
  cfg = client.LocalDMConfig(ipc=2, iterations=4, lr=1.0,
                             dsa_strategy=STRATEGY)
  got = client.shared_local_distill(ROOT, xs, ys, ids, stats, C, model, SHAPE,
                                    cfg)
  opt = dm.make_optimizer(cfg.lr, cfg.momentum)
  embed = models.embed_fn(model)
  for k in ids:
    y = ys[k]
    order = np.argsort(y, kind="stable")
    init = dm.initial_images(
        jax.random.fold_in(keys.local_distill_key(ROOT, k), 0), xs[k][order],
        y[order], C, cfg.ipc, "real", False)
    state = dm.init_state(jnp.asarray(init), opt)
    for it in range(cfg.iterations):
      t = it % 3  # 4 local iterations over 3 networks: t = 0, 1, 2, 0
      mean = jnp.asarray(stats.means[k, t])
      state, _ = dm.iteration_step(
          opt, embed, state, dm.network_params(model, ROOT, t, SHAPE),
          dm.class_aug_draws(ROOT, t, C, STRATEGY, SHAPE), mean,
          jnp.zeros_like(mean),
          jnp.asarray(stats.counts[k, t] > 0), dsa_strategy=STRATEGY,
          pae=False, std_weight=0.0)
    held = np.bincount(y, minlength=C) > 0
    want = np.asarray(state.images)[held]
    np.testing.assert_allclose(got[k][0], want.reshape((-1,) + SHAPE),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        got[k][1], np.repeat(np.flatnonzero(held), cfg.ipc))
  # Client 0 holds no image of class 2: no local images of it.
  assert 2 not in got[0][1]


@pytest.mark.parametrize("classes_per_piece", [None, 1, 2, 3])
def test_shared_local_step_equals_each_partys_iteration_step(
    classes_per_piece):
  """The P x C (party, class) gradients of one shared local step, the
  parties' images of ``classes_per_piece`` classes per network pass (2
  leaves a remainder of 1 of the 3 classes), give every party exactly its
  own dm.iteration_step: momentum carried over from an earlier step, and a
  class the party lacks skipped."""
  model = models.make_model("convnet", C, width=8, depth=2)
  shape = (12, 12, 1)
  parties, ipc = 2, 2
  cfg = client.LocalDMConfig(ipc=ipc, iterations=1, lr=0.5,
                             dsa_strategy=STRATEGY)
  opt, step = client.shared_local_step(model, shape, C, cfg,
                                       classes_per_piece)
  rng = np.random.default_rng(7)
  images = rng.standard_normal((parties, C, ipc) + shape).astype(np.float32)
  d = models.feature_dim(model, shape)
  means = rng.standard_normal((2, parties, C, d)).astype(np.float32)
  valid = np.array([[True, True, True], [True, False, True]])
  states = jax.vmap(lambda im: dm.init_state(im, opt))(jnp.asarray(images))
  embed = models.embed_fn(model)
  want = [dm.init_state(jnp.asarray(images[p]), opt) for p in range(parties)]
  for t in range(2):
    states, got_losses = step(states, ROOT, jnp.int32(t),
                              jnp.asarray(means[t]),
                              jnp.zeros((parties, C, d)), jnp.asarray(valid))
    for p in range(parties):
      want[p], losses_p = dm.iteration_step(
          opt, embed, want[p], dm.network_params(model, ROOT, t, shape),
          dm.class_aug_draws(ROOT, t, C, STRATEGY, shape),
          jnp.asarray(means[t, p]),
          jnp.zeros((C, d)), jnp.asarray(valid[p]), dsa_strategy=STRATEGY,
          pae=False, std_weight=0.0)
      np.testing.assert_allclose(got_losses[p], losses_p, rtol=1e-5)
  for p in range(parties):
    np.testing.assert_allclose(states.images[p], want[p].images, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(states.opt_state[0].trace[p],
                               want[p].opt_state[0].trace, rtol=1e-5,
                               atol=1e-6)
  assert float(got_losses[1, 1]) == 0.0  # the skipped class


def test_class_pieces_prefer_a_divisor_of_the_classes():
  if jax.default_backend() != "cpu":
    pytest.skip("pieces are a CPU setting")
  # 50 units of 3 images: 3 per piece would leave 2 over; 2 divides 50.
  assert dm.default_classes_per_piece(50, 3) == 2
  assert dm.default_classes_per_piece(10, 10) == 1
  assert dm.default_classes_per_piece(10, 1) == 10
  # No divisor in [2, 3]: 3 per piece, the remainder as one more piece.
  assert dm.default_classes_per_piece(7, 3) == 3


def test_shared_local_dm_std_term_needs_second_moments(tiny):
  model, xs, ys = tiny
  spec = full_spec(model)
  stats = client.client_stats(ROOT, xs[:1], ys[:1], [0], spec, 1)
  cfg = client.LocalDMConfig(ipc=1, iterations=1, std_weight=1.0,
                             dsa_strategy=STRATEGY)
  with pytest.raises(ValueError, match="second_moments"):
    client.shared_local_distill(ROOT, xs[:1], ys[:1], [0], stats, C, model,
                                SHAPE, cfg)


def test_one_program_draws_every_iterations_randomness():
  """The client pass, local DM and the server share one compiled program
  for psi_t and the Siamese augmentations, and it gives what they would
  draw themselves."""
  model = models.make_model("convnet", C, width=8, depth=2)
  shape = (12, 12, 1)
  _, srv = server.make_step(model, shape, C,
                            server.ServerConfig(ipc=2, dsa_strategy=STRATEGY))
  _, loc = client.shared_local_step(
      model, shape, C, client.LocalDMConfig(ipc=2, dsa_strategy=STRATEGY))
  spec = client.StatsSpec(model=model, input_shape=shape, num_classes=C,
                          dsa_strategy=STRATEGY)
  blk = client.block_stats_fn(spec, parallel.client_mesh(), 2, 8)
  assert srv.inputs is loc.inputs is blk.inputs
  for t in (0, 5):
    params, draws = srv.inputs(ROOT, jnp.int32(t))
    equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
    equal(params, dm.network_params(model, ROOT, t, shape))
    for c in range(C):
      equal(jax.tree.map(lambda a: a[c], draws),
                 augment.siamese_draws(keys.augment_key(ROOT, t, c),
                                       STRATEGY, shape))
