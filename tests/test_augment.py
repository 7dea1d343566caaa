"""Tests of collabdm_jax.augment: DSA families, Siamese sharing, PAE, tables."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import augment as A

ATOL = 1e-5


def _images(n, h=8, w=8, c=3, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(n, h, w, c), jnp.float32)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


# ---------------------------------------------------------------------------
# Strategy names and parameter validation.
# ---------------------------------------------------------------------------


def test_dsa_strategy_for_datasets():
  assert A.DEFAULT_STRATEGY == "color_crop_cutout_flip_scale_rotate"
  for name in ("mnist", "MNIST", "svhn", "usps", "emnist", "emnist_digits"):
    strategy = A.dsa_strategy_for(name)
    assert "flip" not in A.parse_strategy(strategy), name
    assert set(A.parse_strategy(strategy)) == set(A.FAMILIES) - {"flip"}
  for name in ("fashion_mnist", "FashionMNIST", "cifar10", "cifar100"):
    assert A.dsa_strategy_for(name) == A.DEFAULT_STRATEGY, name
  for name in ("5g_ids", "5G-IDS", "nsl_kdd", "nsl-kdd"):
    assert A.parse_strategy(A.dsa_strategy_for(name)) == ()
  with pytest.raises(ValueError, match="dataset_name"):
    A.dsa_strategy_for("")


def test_invalid_arguments_raise():
  with pytest.raises(ValueError, match="scale"):
    A.DSAParams(scale=0.9)
  with pytest.raises(ValueError, match="flip"):
    A.DSAParams(flip=1.5)
  with pytest.raises(ValueError, match="cutout"):
    A.DSAParams(cutout=-0.1)
  with pytest.raises(ValueError, match="blur"):
    A.parse_strategy("color_blur")
  with pytest.raises(ValueError, match="images"):
    A.dsa(jax.random.key(0), jnp.zeros((8, 8, 3)))
  with pytest.raises(ValueError, match="floating"):
    A.dsa(jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.int32))
  with pytest.raises(ValueError, match="multiple of 4"):
    A.mosaic_init(jnp.zeros((6, 8, 8, 1)))
  with pytest.raises(ValueError, match="labels"):
    A.pae_expand(jnp.zeros((2, 8, 8, 1)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="mask_prob"):
    A.tabular_augment(jax.random.key(0), jnp.zeros((4, 3)), mask_prob=1.5)


def test_none_strategy_is_identity():
  x = _images(2)
  for strategy in ("", "none", "None"):
    np.testing.assert_array_equal(A.dsa(jax.random.key(3), x, strategy), x)


# ---------------------------------------------------------------------------
# Siamese property over the full default strategy.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siamese_outputs():
  """Default-strategy outputs for 48 keys on a batch of 5 and on each image."""
  keys = _keys(48, seed=1)
  pool = _images(5, seed=1)
  order = jnp.array([3, 2, 4, 0, 1])
  batch = pool[order]
  out = jax.vmap(lambda k: A.dsa(k, batch))(keys)  # [48, 5, H, W, C]
  one = jax.jit(jax.vmap(lambda k, img: A.dsa(k, img[None]),
                         in_axes=(0, None)))
  alone = [one(keys, pool[i])[:, 0] for i in range(5)]  # 5 x [48, H, W, C]
  return (keys, np.asarray(batch), np.asarray(order), np.asarray(out),
          [np.asarray(a) for a in alone])


def test_siamese_same_transform_across_batch_sizes(siamese_outputs):
  _, _, order, out, alone = siamese_outputs
  # Every image of the batch of 5 gets, for every key, what it gets alone.
  for slot, image in enumerate(order):
    np.testing.assert_allclose(out[:, slot], alone[image], atol=ATOL)


def test_different_keys_give_different_transforms(siamese_outputs):
  _, batch, _, out, _ = siamese_outputs
  flat = out.reshape(out.shape[0], -1)
  distinct = 0
  for i in range(len(flat)):
    others = np.delete(flat, i, axis=0)
    if np.min(np.max(np.abs(others - flat[i]), axis=1)) > 1e-3:
      distinct += 1
  # Only flip draws (two outcomes) and crops (9 shifts on 8x8) can repeat
  # an output exactly; the other four families are continuous or have 81+
  # outcomes.
  assert distinct >= 0.6 * len(flat)
  unchanged = np.all(np.abs(flat - batch.ravel()) < 1e-6, axis=1)
  assert unchanged.mean() < 0.25


def test_non_siamese_draws_per_image():
  img = _images(1, seed=2)
  batch = jnp.repeat(img, 5, axis=0)
  key = jax.random.key(7)
  for strategy in ("color", "rotate"):
    shared = np.asarray(A.dsa(key, batch, strategy))
    per_image = np.asarray(A.dsa(key, batch, strategy, siamese=False))
    np.testing.assert_allclose(shared, np.repeat(shared[:1], 5, 0), atol=ATOL)
    diffs = [np.abs(per_image[i] - per_image[0]).max() for i in range(1, 5)]
    assert min(diffs) > 1e-3, strategy


# ---------------------------------------------------------------------------
# Hand-computed cases of each operation.
# ---------------------------------------------------------------------------


def test_flip_reverses_width():
  x = _images(3)
  out = A.dsa(jax.random.key(0), x, "flip", A.DSAParams(flip=1.0))
  np.testing.assert_array_equal(out, x[:, :, ::-1, :])
  out = A.dsa(jax.random.key(0), x, "flip", A.DSAParams(flip=0.0))
  np.testing.assert_array_equal(out, x)
  flags = A._apply_flip(x, jnp.array([True, False, True]))
  np.testing.assert_array_equal(flags[1], x[1])
  np.testing.assert_array_equal(flags[2], x[2, :, ::-1])


def test_color_operations_by_hand():
  x = jnp.asarray([[[[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]]]])  # [1, 1, 2, 3]
  # Brightness adds (u - 0.5) * ratio everywhere: u = 0.9 -> +0.4.
  np.testing.assert_allclose(A._apply_brightness(x, 0.9, 1.0), x + 0.4,
                             atol=1e-6)
  # Saturation scales around the per-pixel channel mean (3 and 3) by u*ratio.
  np.testing.assert_allclose(A._apply_saturation(x, 0.25, 2.0),
                             [[[[2.0, 2.5, 4.5], [3.0, 3.0, 3.0]]]], atol=1e-6)
  # Contrast scales around the image mean (3) by u + ratio.
  np.testing.assert_allclose(A._apply_contrast(x, 1.5, 0.5),
                             [[[[-1.0, 1.0, 9.0], [3.0, 3.0, 3.0]]]], atol=1e-6)
  # Saturation is a no-op on one channel.
  gray = _images(2, c=1)
  np.testing.assert_allclose(A._apply_saturation(gray, 0.9, 2.0), gray)


def test_color_family_invariants():
  x = _images(4, c=1, seed=3)
  for i, key in enumerate(_keys(6, seed=3)):
    out = np.asarray(A.dsa(key, x, "color"))
    # 1 channel: out = (x + b - m) * k + m + b with m the image mean, i.e. an
    # affine map per image whose slope k is in [0.5, 1.5] and shared (Siamese).
    xs = np.asarray(x).reshape(4, -1)
    os_ = out.reshape(4, -1)
    slopes = [np.polyfit(xs[j], os_[j], 1)[0] for j in range(4)]
    assert 0.5 - 1e-4 <= slopes[0] <= 1.5 + 1e-4, i
    np.testing.assert_allclose(slopes, slopes[0], atol=1e-4)
    # The image mean moves by the brightness shift, within [-0.5, 0.5].
    shift = os_.mean(1) - xs.mean(1)
    np.testing.assert_allclose(shift, shift[0], atol=1e-5)
    assert abs(shift[0]) <= 0.5 + 1e-5


def test_translate_by_hand():
  img = jnp.arange(16.0).reshape(4, 4, 1)
  out = np.asarray(A._translate_image(img, 1, -2))[..., 0]
  expected = np.array([[0, 0, 4, 5], [0, 0, 8, 9], [0, 0, 12, 13],
                       [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(out, expected)


def test_translate_past_the_border_gives_zeros():
  img = jnp.arange(1.0, 17.0).reshape(4, 4, 1)
  for dy, dx in ((4, 0), (-9, 1), (0, 5), (2, -4)):
    np.testing.assert_array_equal(A._translate_image(img, dy, dx), 0.0)
  # Under jit the shifts are traced values.
  shifted = jax.jit(A._translate_image)(img, -1, 3)
  np.testing.assert_array_equal(shifted[1:, :1], img[:3, 3:])
  assert float(jnp.abs(shifted).sum()) == float(img[:3, 3:].sum())


_all_shifts = jax.jit(
    lambda x, dys, dxs: jax.vmap(lambda dy, dx: jax.vmap(
        lambda im: A._translate_image(im, dy, dx))(x))(dys, dxs))


def _matching_shifts(out, x, max_shift):
  """The (dy, dx) whose zero-filled translation of x equals out exactly."""
  grid = [(dy, dx) for dy in range(-max_shift, max_shift + 1)
          for dx in range(-max_shift, max_shift + 1)]
  cands = np.asarray(_all_shifts(x, jnp.array([g[0] for g in grid]),
                                 jnp.array([g[1] for g in grid])))
  return [g for g, cand in zip(grid, cands) if np.array_equal(out, cand)]


def test_crop_family_is_integer_shift_with_zero_fill():
  x = _images(2, h=16, w=16, c=1, seed=4) + 10.0  # no zeros in the input
  shift = int(16 * 0.125 + 0.5)  # 2 pixels
  shifts_seen = set()
  for key in _keys(12, seed=4):
    out = np.asarray(A.dsa(key, x, "crop"))
    matches = _matching_shifts(out, x, shift)
    assert len(matches) == 1
    shifts_seen.add(matches[0])
    dy, dx = matches[0]
    assert (out == 0).sum() == 2 * (16 * 16 - (16 - abs(dy)) * (16 - abs(dx)))
  assert len(shifts_seen) >= 6


def test_cutout_mask_by_hand():
  # 8x8 image, side int(8*0.5+0.5)=4, centre (0, 3): rows -2..1 -> 0..1,
  # columns 1..4.
  mask = np.asarray(A._cutout_mask(8, 8, 0, 3, 4, 4))
  expected = np.ones((8, 8), np.float32)
  expected[0:2, 1:5] = 0
  np.testing.assert_array_equal(mask, expected)
  # Interior centre removes the full square.
  assert (np.asarray(A._cutout_mask(8, 8, 4, 4, 4, 4)) == 0).sum() == 16


def test_cutout_family_zeros_a_clamped_square():
  x = jnp.ones((3, 16, 16, 2))
  side = int(16 * 0.5 + 0.5)
  areas = set()
  for key in _keys(16, seed=5):
    out = np.asarray(A.dsa(key, x, "cutout"))
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])
    zero = out[0, :, :, 0] == 0
    assert np.array_equal(zero, out[0, :, :, 1] == 0)  # all channels
    rows, cols = np.where(zero.any(1))[0], np.where(zero.any(0))[0]
    # A solid rectangle, between half and the full side in each direction.
    assert zero.sum() == len(rows) * len(cols)
    assert rows.max() - rows.min() + 1 == len(rows)
    assert side // 2 <= len(rows) <= side and side // 2 <= len(cols) <= side
    areas.add(int(zero.sum()))
  assert side * side in areas


_affine = jax.jit(A._affine_sample)


def test_affine_sampling_by_hand():
  row = jnp.arange(1.0, 6.0)  # one 1x5 row, align_corners=True centre = 2
  img = jnp.tile(row[None, :, None], (5, 1, 1))

  def scale_x(s):
    theta = jnp.array([[s, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return np.asarray(_affine(img, theta))[2, :, 0]

  # Pixel j reads the input at 2 + s * (j - 2), bilinear, zero outside.
  np.testing.assert_allclose(scale_x(0.5), [2.0, 2.5, 3.0, 3.5, 4.0], atol=1e-5)
  np.testing.assert_allclose(scale_x(2.0), [0.0, 1.0, 3.0, 5.0, 0.0], atol=1e-5)
  np.testing.assert_allclose(scale_x(1.25), [0.5, 1.75, 3.0, 4.25, 2.5],
                             atol=1e-5)


def test_rotate_90_matches_rot90_direction():
  img = np.random.RandomState(6).randn(7, 7, 2).astype(np.float32)
  out = _affine(jnp.asarray(img), A._rotation_matrix(jnp.pi / 2))
  # DM: positive angles turn the picture anticlockwise, like np.rot90(k=1).
  np.testing.assert_allclose(out, np.rot90(img, 1, axes=(0, 1)), atol=1e-5)
  out = _affine(jnp.asarray(img), A._rotation_matrix(-jnp.pi / 2))
  np.testing.assert_allclose(out, np.rot90(img, -1, axes=(0, 1)), atol=1e-5)


def test_scale_and_rotate_limits_are_identity():
  x = _images(5, seed=7)
  key = jax.random.key(11)
  np.testing.assert_allclose(A.dsa(key, x, "scale", A.DSAParams(scale=1.0)), x,
                             atol=1e-5)
  np.testing.assert_allclose(A.dsa(key, x, "rotate", A.DSAParams(rotate=0.0)),
                             x, atol=1e-5)
  # With the default strengths they do change the images.
  assert np.abs(A.dsa(key, x, "scale") - x).max() > 1e-2
  assert np.abs(A.dsa(key, x, "rotate") - x).max() > 1e-2


# ---------------------------------------------------------------------------
# Family choice, modes, gradients, transformations.
# ---------------------------------------------------------------------------


def _chosen_family(keys):
  return np.asarray(jax.jit(jax.vmap(
      lambda k: A._family_index(A._split_dsa_key(k)[0], len(A.FAMILIES))))(
          keys))


def test_one_family_choice_is_uniform():
  counts = collections.Counter(_chosen_family(_keys(1200, seed=8)).tolist())
  assert set(counts) == set(range(len(A.FAMILIES)))
  for family in range(len(A.FAMILIES)):
    # Expected 200 each, std ~13: a 4.5-sigma band.
    assert 140 <= counts[family] <= 260, counts


def test_one_family_output_is_the_chosen_family(siamese_outputs):
  keys, batch, _, out, _ = siamese_outputs
  chosen = _chosen_family(keys)
  for family_id, family in enumerate(A.FAMILIES):
    hits = np.where(chosen == family_id)[0]
    assert len(hits) > 0, family
    for i in hits[:2]:
      single = A.dsa(keys[i], jnp.asarray(batch), family)
      np.testing.assert_allclose(out[i], single, atol=ATOL, err_msg=family)


def test_strategy_without_flip_never_flips():
  # Left half +1, right half -1, one channel: every non-flip family keeps the
  # left half brighter (colour slopes are positive, shifts and cutouts are
  # small), a flip makes the right half brighter.
  x = jnp.concatenate([jnp.ones((1, 16, 8, 1)), -jnp.ones((1, 16, 8, 1))], 2)
  keys = _keys(200, seed=9)

  def left_brighter(strategy):
    out = jax.vmap(lambda k: A.dsa(k, x, strategy))(keys)
    return np.asarray(out[:, 0, :, :8].mean((1, 2, 3)) >
                      out[:, 0, :, 8:].mean((1, 2, 3)))

  assert left_brighter(A.dsa_strategy_for("mnist")).all()
  flipped = 1.0 - left_brighter("flip").mean()
  assert 0.35 < flipped < 0.65  # probability 0.5


def test_all_families_mode_applies_every_family():
  x = _images(2, h=16, w=16, c=1, seed=10) + 10.0
  out = np.asarray(A.dsa(jax.random.key(5), x, "flip_crop",
                         A.DSAParams(flip=1.0), one_family=False))
  # flip then crop: un-flipping leaves a zero-filled integer translation.
  assert len(_matching_shifts(out[:, :, ::-1], x, 2)) == 1


def test_gradient_flows_for_every_family():
  x = _images(2, seed=12)
  params = A.DSAParams(flip=1.0)

  def loss(family, im):
    return jnp.sum(A.dsa(jax.random.key(13), im, family, params) ** 2)

  grads = jax.jit(lambda im: [jax.grad(functools.partial(loss, f))(im)
                              for f in A.FAMILIES])(x)
  for family, grad in zip(A.FAMILIES, grads):
    grad = np.asarray(grad)
    assert np.isfinite(grad).all(), family
    assert np.abs(grad).max() > 1e-3, family
    # Scaled, rotated or cut-out pixels: the gradient is not just 2x.
    if family in ("cutout", "scale", "rotate", "crop"):
      assert not np.allclose(grad, 2 * np.asarray(x), atol=1e-3), family


def test_jit_and_vmap_over_keys(siamese_outputs):
  # The fixture already ran the full strategy under jit(vmap(dsa)) on batches
  # of 1 and under vmap(dsa) on batches of 5; here per-image draws.
  keys, batch, _, _, _ = siamese_outputs
  run = jax.jit(jax.vmap(lambda k: A.dsa(k, batch, "rotate", siamese=False)))
  per_image = run(keys[:4])
  assert per_image.shape == (4,) + batch.shape
  for i in (0, 3):
    np.testing.assert_allclose(per_image[i],
                               A.dsa(keys[i], batch, "rotate", siamese=False),
                               atol=ATOL)
  assert np.abs(per_image[0] - per_image[3]).max() > 1e-3


# ---------------------------------------------------------------------------
# Partition and expansion, mosaics.
# ---------------------------------------------------------------------------


def test_pae_expand_hand_computed_upsampling():
  x = np.zeros((1, 4, 4, 1), np.float32)
  x[0, :2, :2, 0] = [[0, 1], [2, 3]]
  # PyTorch bilinear x2, align_corners=False: 1-D [a, b] -> [a, .75a+.25b,
  # .25a+.75b, b]; separable in 2-D.
  expected = np.array([[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5],
                       [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]])
  np.testing.assert_allclose(A.pae_expand(x)[0, :, :, 0], expected, atol=1e-6)


def test_pae_expand_order_shapes_and_labels():
  n, h = 3, 8
  x = np.zeros((n, h, h, 2), np.float32)
  for i in range(n):  # quadrant q of image i holds the constant 10 * i + q
    x[i, :4, :4], x[i, :4, 4:] = 10 * i + 0, 10 * i + 1
    x[i, 4:, :4], x[i, 4:, 4:] = 10 * i + 2, 10 * i + 3
  labels = jnp.array([7, 1, 4], jnp.int32)
  out, out_labels = A.pae_expand(jnp.asarray(x), labels)
  assert out.shape == (4 * n, h, h, 2)
  np.testing.assert_array_equal(out_labels, np.repeat([7, 1, 4], 4))
  for i in range(n):
    for q in range(4):
      np.testing.assert_allclose(out[4 * i + q], 10 * i + q, atol=1e-5)
  assert A.pae_expand(jnp.asarray(x)).shape == (4 * n, h, h, 2)


def test_pae_expand_odd_size_uses_floor_split():
  x = np.zeros((1, 5, 7, 1), np.float32)
  x[0, :2, :3] = 1.0  # exactly the top-left quadrant
  out = np.asarray(A.pae_expand(x))
  assert out.shape == (4, 5, 7, 1)
  np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
  np.testing.assert_allclose(out[1:], 0.0, atol=1e-6)
  # mosaic_init uses the same split: 2x3, 2x4, 3x3 and 3x4 tiles.
  consts = jnp.arange(4.0)[:, None, None, None] * jnp.ones((4, 5, 7, 1))
  mosaic = np.asarray(A.mosaic_init(consts))[0, :, :, 0]
  np.testing.assert_allclose(mosaic[:2, :3], 0.0, atol=1e-6)
  np.testing.assert_allclose(mosaic[:2, 3:], 1.0, atol=1e-6)
  np.testing.assert_allclose(mosaic[2:, :3], 2.0, atol=1e-6)
  np.testing.assert_allclose(mosaic[2:, 3:], 3.0, atol=1e-6)


def test_pae_expand_is_differentiable():
  x = _images(2, seed=15)
  grad = jax.grad(lambda im: jnp.sum(A.pae_expand(im) ** 2))(x)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(grad).min() > 0


def test_mosaic_init_layout_and_pae_round_trip():
  x = _images(8, h=8, w=8, c=3, seed=16)
  mosaics = A.mosaic_init(x)
  assert mosaics.shape == (2, 8, 8, 3)
  # Downsampling x0.5 is the 2x2 mean (PyTorch bilinear, align_corners=False).
  half = np.asarray(x).reshape(8, 4, 2, 4, 2, 3).mean((2, 4))
  np.testing.assert_allclose(mosaics[0, :4, :4], half[0], atol=1e-5)
  np.testing.assert_allclose(mosaics[0, :4, 4:], half[1], atol=1e-5)
  np.testing.assert_allclose(mosaics[0, 4:, :4], half[2], atol=1e-5)
  np.testing.assert_allclose(mosaics[1, 4:, 4:], half[7], atol=1e-5)
  # pae_expand undoes the tiling: image k comes back as up(down(x_k)).
  expanded = np.asarray(A.pae_expand(mosaics))
  up = np.asarray(jax.image.resize(jnp.asarray(half), x.shape, "linear"))
  np.testing.assert_allclose(expanded, up, atol=1e-5)
  # ... which is close to the original for smooth images.
  smooth = jnp.asarray(jax.image.resize(_images(4, h=4, w=4, c=1, seed=17),
                                        (4, 16, 16, 1), "linear"))
  back = A.pae_expand(A.mosaic_init(smooth))
  rel = np.abs(back - smooth).mean() / np.abs(smooth).mean()
  assert rel < 0.15


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


def test_tabular_augment_siamese_and_mask_rate():
  rng = np.random.RandomState(18)
  small = jnp.asarray(rng.randn(3, 40) + 5.0, jnp.float32)
  large = jnp.asarray(rng.randn(9, 40) + 5.0, jnp.float32)
  key = jax.random.key(19)
  out_small = A.tabular_augment(key, small)
  out_large = A.tabular_augment(key, large)
  factor_small = np.asarray(out_small / small)
  factor_large = np.asarray(out_large / large)
  # One factor per feature, the same for every row and both batches.
  np.testing.assert_allclose(factor_small, factor_small[:1].repeat(3, 0),
                             atol=1e-5)
  np.testing.assert_allclose(factor_large[0], factor_small[0], atol=1e-5)
  kept = factor_small[0] != 0
  assert np.all(np.abs(factor_small[0][kept] - 1.0) <= 0.1 + 1e-5)
  assert not np.allclose(factor_small[0][kept], 1.0)
  # Other keys give other transforms.
  other = np.asarray(A.tabular_augment(jax.random.key(20), small) / small)
  assert np.abs(other - factor_small).max() > 1e-3

  # Mask rate over many features.
  x = jnp.ones((4, 5000))
  masked = np.asarray(A.tabular_augment(key, x, mask_prob=0.2)) == 0
  assert np.all(masked == masked[:1])
  assert abs(masked[0].mean() - 0.2) < 0.03
  per_row = np.asarray(A.tabular_augment(key, x, mask_prob=0.2,
                                         siamese=False)) == 0
  assert abs(per_row.mean() - 0.2) < 0.02
  assert not np.array_equal(per_row[0], per_row[1])
  grad = jax.grad(lambda t: jnp.sum(A.tabular_augment(key, t) ** 2))(small)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(grad).max() > 0


# ---------------------------------------------------------------------------
# Draws apart from the transform (what the synthesis steps take as inputs).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [A.DEFAULT_STRATEGY, "crop", "scale_rotate",
                                      "none"])
@pytest.mark.parametrize("siamese", [True, False])
@pytest.mark.parametrize("one_family", [True, False])
def test_draws_drawn_in_their_own_program_give_dsa_exactly(strategy, siamese,
                                                           one_family):
  x = _images(5, 10, 12, 3, seed=4)
  draw = jax.jit(functools.partial(
      A.dsa_draws, strategy=strategy, image_hw=(10, 12),
      batch=None if siamese else 5, one_family=one_family))
  apply = jax.jit(functools.partial(A.apply_dsa, strategy=strategy,
                                    one_family=one_family))
  seen = set()
  for key in _keys(12, seed=3):
    draws = draw(key)
    want = A.dsa(key, x, strategy, siamese=siamese, one_family=one_family)
    got = apply(draws, x)
    np.testing.assert_array_equal(got, want)
    # Their gradients too: the same function of the images.
    g = lambda f: jax.grad(lambda z: jnp.sum(f(z) ** 3))(x)
    np.testing.assert_array_equal(
        g(lambda z: apply(draws, z)),
        g(lambda z: A.dsa(key, z, strategy, siamese=siamese,
                          one_family=one_family)))
    if "family" in draws:
      seen.add(int(draws["family"]))
  families = len(A.parse_strategy(strategy))
  if one_family and families > 1:
    assert len(seen) > 1  # several families drawn over the keys
  # Every family is drawn whichever applies; Siamese draws are scalars.
  draws = draw(jax.random.key(0))
  assert set(draws) - {"family"} == set(A.parse_strategy(strategy))
  for leaf in jax.tree.leaves({k: v for k, v in draws.items() if k != "family"}):
    assert leaf.shape == (() if siamese else (5,))


@pytest.mark.parametrize("strategy", [A.DEFAULT_STRATEGY, A.TABULAR_STRATEGY,
                                      "none"])
def test_siamese_draws_apply_to_any_batch_as_siamese_augment(strategy):
  shape = (7,) if strategy == A.TABULAR_STRATEGY else (9, 9, 1)
  rng = np.random.default_rng(0)
  for key in _keys(6, seed=8):
    draws = jax.jit(A.siamese_draws, static_argnums=(1, 2))(key, strategy,
                                                            shape)
    for n in (1, 4):
      x = jnp.asarray(rng.standard_normal((n,) + shape), jnp.float32)
      np.testing.assert_array_equal(A.apply_siamese(draws, x, strategy),
                                    A.siamese_augment(key, x, strategy))
