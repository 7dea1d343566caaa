"""Figures: sizes, pixel content and error handling (read back from PNG)."""

import json

import matplotlib.image
import numpy as np
import pytest

from collabdm_jax import plots

MEAN, STD = 0.2861, 0.3530  # Fashion-MNIST normalisation


def read_png(path):
  assert path.exists() and path.stat().st_size > 0
  return matplotlib.image.imread(str(path))  # [H, W, 4] floats in [0, 1]


def grey_set(per_class, num_classes=10, side=28):
  """Class c is a constant image of brightness c / (num_classes - 1)."""
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  pixels = labels[:, None, None, None] / (num_classes - 1) * np.ones(
      (1, side, side, 1), np.float32)
  return ((pixels - MEAN) / STD).astype(np.float32), labels


def test_synthetic_grid_grey_is_denormalised_and_sized(tmp_path):
  images, labels = grey_set(per_class=3)
  names = [f"class {c}" for c in range(10)]
  out = plots.synthetic_grid(images, labels, names, [MEAN], [STD],
                             tmp_path / "grid.png", tile_px=20)
  assert out == tmp_path / "grid.png"
  img = read_png(out)
  # 110 label px + 3 tiles of 20 + 10 | 30 title px + 10 rows of 20 + 10.
  assert img.shape[:2] == (240, 180)
  for c in range(10):
    y, x = 30 + 20 * c + 10, 110 + 20 * 1 + 10  # centre of tile (c, 1)
    r, g, b = img[y, x, :3]
    assert r == pytest.approx(g, abs=1e-6) and g == pytest.approx(b, abs=1e-6)
    assert r == pytest.approx(c / 9, abs=0.02), c


def test_synthetic_grid_rgb_caps_images_per_class(tmp_path):
  rgb_mean, rgb_std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
  colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
  labels = np.array([0] * 5 + [1, 2], np.int32)  # class 0 has 5 images
  pixels = colours[labels][:, None, None, :] * np.ones((1, 32, 32, 1))
  images = ((pixels - rgb_mean) / rgb_std).astype(np.float32)
  out = plots.synthetic_grid(images, labels, ["r", "g", "b"], rgb_mean,
                             rgb_std, tmp_path / "rgb.png", max_per_class=4,
                             tile_px=16)
  img = read_png(out)
  assert img.shape[:2] == (30 + 3 * 16 + 10, 110 + 4 * 16 + 10)
  for c in range(3):
    y, x = 30 + 16 * c + 8, 110 + 8
    np.testing.assert_allclose(img[y, x, :3], colours[c], atol=0.02)
  # Class 1 has one image: the rest of its row is background (white).
  np.testing.assert_allclose(img[30 + 16 + 8, 110 + 3 * 16 + 8, :3], 1.0,
                             atol=0.02)


def test_tabular_sets_become_a_feature_heatmap(tmp_path):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(20, 6)).astype(np.float32)
  labels = np.repeat(np.arange(4), 5).astype(np.int32)
  out = plots.synthetic_grid(features, labels, list("abcd"), np.zeros(6),
                             np.ones(6), tmp_path / "tab.png")
  assert read_png(out).shape[:2] == (30 + 20 * 4 + 45, 110 + 6 * 10 + 90)
  # Features laid out as 3x3 single-channel images (9 != 6 features) too.
  as_images = np.zeros((20, 3, 3, 1), np.float32)
  as_images.reshape(20, -1)[:, :6] = features
  out = plots.synthetic_grid(as_images, labels, list("abcd"), np.zeros(6),
                             np.ones(6), tmp_path / "tab_img.png")
  assert read_png(out).shape[:2] == (30 + 20 * 4 + 45, 110 + 9 * 10 + 90)


def test_synthetic_grid_rejects_bad_input(tmp_path):
  images, labels = grey_set(per_class=1)
  with pytest.raises(ValueError, match="labels must be in"):
    plots.synthetic_grid(images, labels, ["a"] * 5, [MEAN], [STD],
                         tmp_path / "x.png")
  with pytest.raises(ValueError, match="labels must have shape"):
    plots.synthetic_grid(images, labels[:3], ["a"] * 10, [MEAN], [STD],
                         tmp_path / "x.png")
  with pytest.raises(ValueError, match="images must be"):
    plots.synthetic_grid(images[0], labels[:28], ["a"] * 10, [MEAN], [STD],
                         tmp_path / "x.png")
  with pytest.raises(ValueError, match="max_per_class"):
    plots.synthetic_grid(images, labels, ["a"] * 10, [MEAN], [STD],
                         tmp_path / "x.png", max_per_class=0)


def test_count_heatmap_colours_cells_by_count(tmp_path):
  counts = np.array([[0, 5, 100, 0], [7, 0, 0, 3], [50, 50, 0, 0]])
  out = plots.count_heatmap(counts, ["a", "b", "c", "d"], tmp_path / "h.png",
                            cell_px=30)
  img = read_png(out)
  assert img.shape[:2] == (30 + 3 * 30 + 100, 80 + 4 * 30 + 90)

  def corner(k, c):  # inside cell (k, c), away from its centred number
    return img[30 + 30 * k + 4, 80 + 30 * c + 4, :3]

  dark, bright = corner(0, 0), corner(0, 2)  # counts 0 and 100 (max)
  np.testing.assert_allclose(dark, [0.267, 0.005, 0.329], atol=0.03)
  assert bright.sum() > 1.5 and bright[0] > 0.8  # viridis yellow
  with pytest.raises(ValueError, match="non-negative integers"):
    plots.count_heatmap(-counts, None, tmp_path / "bad.png")
  with pytest.raises(ValueError, match="class_names must have 4"):
    plots.count_heatmap(counts, ["a"], tmp_path / "bad.png")


def result_row(method, alpha, mean, std=0.01, status="ok", **kw):
  row = {"cell": f"{method}-{alpha}", "status": status, "method": method,
         "dataset": "fashion_mnist", "partition": "dirichlet",
         "num_clients": 5, "alpha": alpha, "ipc": 10, "accuracy_mean": mean,
         "accuracy_std": std}
  row.update(kw)
  return row


def test_accuracy_vs_alpha_draws_lines_with_iid_last(tmp_path):
  rows = [result_row("collabdm", a, m) for a, m in
          [(0.5, 0.8), (0.1, 0.7), ("iid", 0.85)]]
  rows += [result_row("fedavg", a, m) for a, m in [(0.1, 0.4), (0.5, 0.6)]]
  # iid asked for as partition "iid" joins the Dirichlet lines.
  rows += [result_row("fedavg", "iid", 0.7, partition="iid")]
  rows += [result_row("dense", 0.1, None, status="failed")]
  out = plots.accuracy_vs_alpha(rows, tmp_path / "acc.png", title="t")
  img = read_png(out)
  assert img.shape[:2] == (420, 640)
  # Not blank: the lines put coloured (non-grey) pixels on the canvas.
  rgb = img[..., :3]
  assert (rgb.max(-1) - rgb.min(-1) > 0.3).sum() > 200
  lines = plots.alpha_curves(rows)  # the failed dense row is left out
  assert [label for label, _ in lines] == ["collabdm", "fedavg"]
  assert [list(points) for _, points in lines] == [[0.1, 0.5, "iid"]] * 2
  out = plots.accuracy_vs_alpha(rows, tmp_path / "small.png", width_px=300,
                                height_px=200)
  assert read_png(out).shape[:2] == (200, 300)


def test_accuracy_vs_alpha_labels_other_varying_keys_and_rejects(tmp_path):
  rows = [result_row("collabdm", 0.1, 0.7, num_clients=k) for k in (5, 10)]
  labels = [label for label, _ in plots.alpha_curves(rows)]
  assert labels == ["collabdm (K=5)", "collabdm (K=10)"]
  with pytest.raises(ValueError, match="at alpha=0.1"):
    plots.accuracy_vs_alpha(rows + [result_row("collabdm", 0.1, 0.6)],
                            tmp_path / "dup.png")
  with pytest.raises(ValueError, match="at least one finished run"):
    plots.accuracy_vs_alpha([result_row("dense", 0.1, None, status="failed")],
                            tmp_path / "none.png")


def test_run_figures_from_a_run_directory(tmp_path):
  images, labels = grey_set(per_class=2)
  np.savez(tmp_path / "synthetic.npz", images=images, labels=labels,
           class_names=np.asarray([str(c) for c in range(10)]),
           mean=np.asarray([MEAN]), std=np.asarray([STD]))
  (tmp_path / "results.json").write_text(json.dumps({
      "dataset": "fashion_mnist", "client_class_counts": [[3] * 10, [1] * 10]}))
  written = plots.run_figures(tmp_path)
  assert [p.name for p in written] == ["synthetic.png",
                                       "client_class_counts.png"]
  assert read_png(written[0]).shape[:2] == (30 + 10 * 48 + 10,
                                            110 + 2 * 48 + 10)
  assert read_png(written[1]).shape[:2] == (30 + 2 * 44 + 100,
                                            80 + 10 * 44 + 90)
  assert plots.run_figures(tmp_path) == []  # existing figures are kept
  assert len(plots.run_figures(tmp_path, overwrite=True)) == 2
