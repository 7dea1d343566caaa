"""Figures of runs and sweeps: synthetic sets, client partitions, accuracy.

Drawn with matplotlib's object API on an Agg canvas (``Figure`` +
``FigureCanvasAgg``): no pyplot, no global backend switch, no display, so
the functions are safe in headless jobs and in programs that use another
backend. Every figure has a fixed pixel layout (documented per function,
``DPI`` dots per inch) so its size is predictable; each function returns
the path of the PNG it wrote.
"""

import json
import pathlib
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from collabdm_jax import data as data_lib
from collabdm_jax import metrics as metrics_lib
from collabdm_jax import results as results_lib

DPI = 100
# Margins in pixels around the drawn area (labels, titles, colour bars).
GRID_LEFT_PX, GRID_RIGHT_PX, GRID_TOP_PX, GRID_BOTTOM_PX = 110, 10, 30, 10
HEAT_LEFT_PX, HEAT_RIGHT_PX, HEAT_TOP_PX, HEAT_BOTTOM_PX = 80, 90, 30, 100
FEAT_LEFT_PX, FEAT_RIGHT_PX, FEAT_TOP_PX, FEAT_BOTTOM_PX = 110, 90, 30, 45
SYNTHETIC_PNG = "synthetic.png"
COUNTS_PNG = "client_class_counts.png"
LOSS_PNG = "loss_curves.png"
# The loss curves' panels: (phase, label that tells lines apart, value, title).
LOSS_PANELS = (
    ("local_dm", "client", "loss", "local DM loss (per client)"),
    ("server", None, "loss", "server loss (sum over classes)"),
    ("eval", "net", "train_loss", "evaluation train loss (per net)"),
)


def _figure(width_px: int, height_px: int) -> Figure:
  # Agg truncates width_in * dpi to an int: a quarter pixel of slack keeps
  # floating-point error from dropping the last pixel.
  fig = Figure(figsize=((width_px + 0.25) / DPI, (height_px + 0.25) / DPI),
               dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _axes(fig: Figure, left_px, bottom_px, width_px, height_px):
  """Axes at an exact pixel rectangle (origin bottom left)."""
  w, h = fig.get_size_inches() * DPI
  return fig.add_axes((left_px / w, bottom_px / h, width_px / w,
                       height_px / h))


def _save(fig: Figure, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=DPI, format="png")
  return path


def _check_positive_int(value, name):
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


def _class_names(class_names, num_classes):
  if class_names is None:
    return [str(c) for c in range(num_classes)]
  names = [str(n) for n in class_names]
  if len(names) != num_classes:
    raise ValueError(f"class_names must have {num_classes} entries, got "
                     f"{len(names)}")
  return names


def synthetic_grid(images, labels, class_names, mean, std, path,
                   max_per_class: int = 10, tile_px: int = 48):
  """A grid of the synthetic set: one row per class, denormalised pixels.

  Images (``[M, H, W, C]`` with ``C == len(mean)``) are mapped back to
  pixels (``x * std + mean``, clipped to [0, 1]); single-channel sets are
  shown grey. Each row holds the first ``max_per_class`` images of its
  class (fewer if the class has fewer), labelled with the class name.
  Tabular sets (``[M, F]`` features, or features laid out as images whose
  channel count differs from ``len(mean)``) are drawn by
  ``feature_heatmap`` instead.

  Layout (images): ``110 + cols * tile_px + 10`` by
  ``30 + num_classes * tile_px + 10`` pixels, where ``cols`` is the
  largest number of images shown for a class.

  Args:
    images: ``[M, H, W, C]`` normalised images, or ``[M, F]`` features.
    labels: ``[M]`` int class ids in ``[0, len(class_names))``.
    class_names: one name per class.
    mean, std: the per-channel normalisation (per-feature for tables).
    path: output PNG.
    max_per_class: at most this many images per class are drawn.
    tile_px: side of one drawn image in pixels.

  Returns:
    The path written.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if images.ndim not in (2, 4):
    raise ValueError(f"images must be [M, H, W, C] or [M, F], got shape "
                     f"{images.shape}")
  if labels.shape != (images.shape[0],):
    raise ValueError(f"labels must have shape [{images.shape[0]}], got "
                     f"{labels.shape}")
  num_classes = len(class_names)
  if num_classes < 1:
    raise ValueError("class_names must name at least one class")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must be in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  if images.ndim == 2 or images.shape[-1] != mean.size:
    return feature_heatmap(images.reshape(images.shape[0], -1), labels,
                           class_names, path)
  max_per_class = _check_positive_int(max_per_class, "max_per_class")
  tile_px = _check_positive_int(tile_px, "tile_px")
  if std.size != mean.size or np.any(std <= 0):
    raise ValueError(f"std must hold {mean.size} positive values, got {std}")
  M, H, W, C = images.shape
  pixels = np.clip(images * std + mean, 0.0, 1.0)
  per_class = [np.flatnonzero(labels == c)[:max_per_class]
               for c in range(num_classes)]
  cols = max(1, max(len(p) for p in per_class))
  gap = max(1, H // 14)  # white separation between tiles, in image pixels
  mosaic = np.ones((num_classes * (H + gap) - gap, cols * (W + gap) - gap, C),
                   np.float32)
  for c, idx in enumerate(per_class):
    for j, i in enumerate(idx):
      y, x = c * (H + gap), j * (W + gap)
      mosaic[y:y + H, x:x + W] = pixels[i]
  width = GRID_LEFT_PX + cols * tile_px + GRID_RIGHT_PX
  height = GRID_TOP_PX + num_classes * tile_px + GRID_BOTTOM_PX
  fig = _figure(width, height)
  ax = _axes(fig, GRID_LEFT_PX, GRID_BOTTOM_PX, cols * tile_px,
             num_classes * tile_px)
  if C == 1:
    ax.imshow(mosaic[..., 0], cmap="gray", vmin=0.0, vmax=1.0,
              interpolation="nearest", aspect="auto")
  else:
    ax.imshow(mosaic if C in (3, 4) else mosaic[..., :3],
              interpolation="nearest", aspect="auto")
  ax.set_xticks([])
  ax.set_yticks([c * (H + gap) + H / 2 for c in range(num_classes)])
  ax.set_yticklabels(_class_names(class_names, num_classes), fontsize=8)
  ax.tick_params(length=0)
  for side in ax.spines.values():
    side.set_visible(False)
  fig.suptitle(f"synthetic set: {M} images, {num_classes} classes",
               fontsize=9, y=1 - 6 / height, va="top")
  return _save(fig, path)


def feature_heatmap(features, labels, class_names, path, feature_px: int = 10,
                    sample_px: int = 4):
  """Heatmap of a tabular synthetic set: samples (grouped by class) × features.

  Values are drawn as stored, i.e. standardised (z-scores): features have
  different units, so a shared colour scale only means something before
  denormalisation. The colour range is [-3, 3]; classes are separated by
  lines and labelled on the left.

  Layout: ``110 + F * feature_px + 90`` by ``30 + M * sample_px + 45``
  pixels for ``[M, F]`` features.

  Args:
    features: ``[M, F]`` standardised features.
    labels: ``[M]`` int class ids.
    class_names: one name per class.
    path: output PNG.
    feature_px, sample_px: pixels per feature column and per sample row.

  Returns:
    The path written.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
    raise ValueError(f"features must be [M, F] with M, F >= 1, got shape "
                     f"{features.shape}")
  if labels.shape != (features.shape[0],):
    raise ValueError(f"labels must have shape [{features.shape[0]}], got "
                     f"{labels.shape}")
  feature_px = _check_positive_int(feature_px, "feature_px")
  sample_px = _check_positive_int(sample_px, "sample_px")
  names = _class_names(class_names, len(class_names))
  M, F = features.shape
  order = np.argsort(labels, kind="stable")
  features, labels = features[order], labels[order]
  width = FEAT_LEFT_PX + F * feature_px + FEAT_RIGHT_PX
  height = FEAT_TOP_PX + M * sample_px + FEAT_BOTTOM_PX
  fig = _figure(width, height)
  ax = _axes(fig, FEAT_LEFT_PX, FEAT_BOTTOM_PX, F * feature_px, M * sample_px)
  im = ax.imshow(features, cmap="coolwarm", vmin=-3.0, vmax=3.0,
                 interpolation="nearest", aspect="auto")
  present = np.unique(labels)
  starts = [int(np.searchsorted(labels, c)) for c in present]
  ends = [int(np.searchsorted(labels, c, side="right")) for c in present]
  for s in starts[1:]:
    ax.axhline(s - 0.5, color="black", linewidth=0.8)
  ax.set_yticks([(s + e - 1) / 2 for s, e in zip(starts, ends)])
  ax.set_yticklabels([names[c] for c in present], fontsize=8)
  ax.set_xlabel("feature", fontsize=8)
  ax.tick_params(labelsize=7)
  cax = _axes(fig, FEAT_LEFT_PX + F * feature_px + 15, FEAT_BOTTOM_PX, 12,
              M * sample_px)
  cbar = fig.colorbar(im, cax=cax)
  cbar.set_label("z-score", fontsize=8)
  cbar.ax.tick_params(labelsize=7)
  fig.suptitle(f"synthetic set: {M} samples × {F} features", fontsize=9,
               y=1 - 6 / height, va="top")
  return _save(fig, path)


def count_heatmap(counts, class_names, path, cell_px: int = 44):
  """Client × class heatmap of sample counts, each cell labelled.

  Layout: ``80 + num_classes * cell_px + 90`` by
  ``30 + num_clients * cell_px + 100`` pixels.

  Args:
    counts: ``[num_clients, num_classes]`` non-negative integers.
    class_names: one name per class, or None for the class indices.
    path: output PNG.
    cell_px: side of one cell in pixels.

  Returns:
    The path written.
  """
  counts = np.asarray(counts)
  if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
    raise ValueError(f"counts must be [num_clients, num_classes] with both "
                     f">= 1, got shape {counts.shape}")
  if np.any(counts < 0) or np.any(counts != np.round(counts)):
    raise ValueError("counts must be non-negative integers")
  counts = counts.astype(np.int64)
  cell_px = _check_positive_int(cell_px, "cell_px")
  K, C = counts.shape
  names = _class_names(class_names, C)
  width = HEAT_LEFT_PX + C * cell_px + HEAT_RIGHT_PX
  height = HEAT_TOP_PX + K * cell_px + HEAT_BOTTOM_PX
  fig = _figure(width, height)
  ax = _axes(fig, HEAT_LEFT_PX, HEAT_BOTTOM_PX, C * cell_px, K * cell_px)
  vmax = max(int(counts.max()), 1)
  im = ax.imshow(counts, cmap="viridis", vmin=0, vmax=vmax,
                 interpolation="nearest", aspect="auto")
  # Numbers scale with the cell; white on the dark end of viridis.
  fontsize = max(4.0, min(9.0, cell_px / 5.0))
  for k in range(K):
    for c in range(C):
      v = int(counts[k, c])
      ax.text(c, k, str(v), ha="center", va="center", fontsize=fontsize,
              color="white" if v < 0.6 * vmax else "black")
  ax.set_xticks(range(C))
  ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(K))
  ax.set_yticklabels([f"client {k}" for k in range(K)], fontsize=8)
  cax = _axes(fig, HEAT_LEFT_PX + C * cell_px + 15, HEAT_BOTTOM_PX, 12,
              K * cell_px)
  cbar = fig.colorbar(im, cax=cax)
  cbar.set_label("samples", fontsize=8)
  cbar.ax.tick_params(labelsize=7)
  fig.suptitle(f"samples per client and class ({int(counts.sum())} in all)",
               fontsize=9, y=1 - 6 / height, va="top")
  return _save(fig, path)


def _alpha_key(alpha):
  return (1, 0.0) if alpha == "iid" else (0, float(alpha))


# Keys (besides method and alpha) that can tell two lines apart.
_LINE_KEYS = ("dataset", "partition", "num_clients", "ipc")


def alpha_curves(rows: Sequence[Dict]):
  """The curves of ``accuracy_vs_alpha``: ``[(label, {alpha: row})]``.

  Only finished rows (``status`` ok, with an accuracy and an α) count; α is
  normalised by ``results.format_alpha``. A curve is a method plus every
  other key that varies among the rows (dataset, partition, clients, ipc,
  extra grid columns), labelled ``method (key=value, ...)``. The partition
  method does not tell iid rows apart (an iid split is the same whether
  asked for as ``iid`` or as Dirichlet with α = inf), so an iid point joins
  every curve that matches it on the other keys.

  Raises:
    ValueError: no finished row, or two finished rows on the same curve and
      α (the rows do not identify a single curve).
  """
  ok = [dict(r, alpha=results_lib.format_alpha(r["alpha"])) for r in rows
        if r.get("status", "ok") == "ok"
        and r.get("accuracy_mean") is not None and r.get("alpha") is not None]
  if not ok:
    raise ValueError("rows must hold at least one finished run (status 'ok') "
                     "with an alpha and an accuracy")
  keys = list(_LINE_KEYS) + results_lib.extra_columns(ok)
  skewed = [r for r in ok if r["alpha"] != "iid"]

  def varies(k, rows):
    return len({repr(r.get(k)) for r in rows}) > 1

  varying = [k for k in keys
             if varies(k, skewed if k == "partition" and skewed else ok)]
  lines: Dict[tuple, Dict] = {}

  def add(key, r):
    points = lines.setdefault(key, {})
    if r["alpha"] in points:
      raise ValueError(
          f"rows {points[r['alpha']].get('cell')!r} and {r.get('cell')!r} "
          f"are both {dict(zip(['method'] + varying, key))} at "
          f"alpha={r['alpha']}")
    points[r["alpha"]] = r

  def key_of(r, partition):
    return (r.get("method"),) + tuple(
        partition if k == "partition" else r.get(k) for k in varying)

  for r in results_lib.sort_rows(skewed):
    add(key_of(r, r.get("partition")), r)
  pi = 1 + varying.index("partition") if "partition" in varying else None
  for r in results_lib.sort_rows([r for r in ok if r["alpha"] == "iid"]):
    own = key_of(r, r.get("partition"))
    matches = [k for k in list(lines) if pi is not None
               and k[:pi] + k[pi + 1:] == own[:pi] + own[pi + 1:]]
    for k in matches or [own]:
      add(k, r)
  labelled = []
  for key, points in lines.items():
    label = str(key[0])
    if varying:
      label += " (" + ", ".join(
          f"{results_lib.short_name(k)}={results_lib.format_value(v)}"
          for k, v in zip(varying, key[1:])) + ")"
    labelled.append((label, points))
  return labelled


def accuracy_vs_alpha(rows: Sequence[Dict], path, title: Optional[str] = None,
                      width_px: int = 640, height_px: int = 420):
  """Test accuracy against α, one line per method, std as error bars.

  Only rows with ``status == "ok"`` are drawn. α values are evenly spaced
  categories in increasing order with ``"iid"`` last (so iid fits on the
  axis). When rows differ in more than method and α (dataset, partition,
  clients, ipc or extra grid columns), each combination is its own line,
  labelled ``method (key=value, ...)`` with the keys that vary.

  Args:
    rows: result rows (``results.collect``): ``method``, ``alpha``,
      ``accuracy_mean``, ``accuracy_std`` (fractions) and ``status``.
    path: output PNG of ``width_px`` × ``height_px`` pixels.
    title: optional title.

  Returns:
    The path written.

  Raises:
    ValueError: see ``alpha_curves``; or a size too small for the axes.
  """
  width_px = _check_positive_int(width_px, "width_px")
  height_px = _check_positive_int(height_px, "height_px")
  if width_px < 200 or height_px < 150:
    raise ValueError(f"width_px >= 200 and height_px >= 150 are needed for "
                     f"axes and labels, got {width_px} x {height_px}")
  lines = alpha_curves(rows)
  fig = _figure(width_px, height_px)
  ax = _axes(fig, 70, 55, width_px - 70 - 20, height_px - 55 - 35)
  alphas = sorted({a for _, points in lines for a in points}, key=_alpha_key)
  n = len(lines)
  for j, (label, points) in enumerate(lines):
    xs = sorted(points, key=_alpha_key)
    # Small horizontal offsets keep overlapping error bars readable.
    offset = (j - (n - 1) / 2) * min(0.06, 0.3 / max(n, 1))
    ax.errorbar([alphas.index(a) + offset for a in xs],
                [100 * points[a]["accuracy_mean"] for a in xs],
                yerr=[100 * (points[a].get("accuracy_std") or 0.0) for a in xs],
                marker="o", markersize=4, capsize=3, linewidth=1.2,
                label=label)
  ax.set_xticks(range(len(alphas)))
  ax.set_xticklabels([results_lib.format_value(a) for a in alphas])
  ax.set_xlim(-0.5, len(alphas) - 0.5)
  ax.set_xlabel("Dirichlet α (smaller = more label skew)", fontsize=9)
  ax.set_ylabel("test accuracy (%)", fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


def _dataset_class_names(dataset: Optional[str], num_classes: int):
  """Class names of a registered image dataset, when the count matches."""
  spec = data_lib.IMAGE_SPECS.get(str(dataset))
  if spec is not None and spec.num_classes == num_classes:
    return list(spec.class_names)
  return None


def loss_series(rows: Sequence[Dict], phase: str, label: Optional[str],
                value: str) -> Dict[Optional[int], tuple]:
  """``{label id: (steps, values)}`` of one phase's rows, steps increasing.

  A step written twice (a resumed run appends to the same file) keeps its
  last row; rows whose value is null (non-finite) are left out.
  """
  by_line: Dict[Optional[int], Dict[int, float]] = {}
  for r in rows:
    if r.get("phase") != phase or r.get(value) is None:
      continue
    key = None if label is None else r.get(label)
    by_line.setdefault(key, {})[int(r["step"])] = float(r[value])
  return {k: (np.asarray(sorted(v)), np.asarray([v[t] for t in sorted(v)]))
          for k, v in sorted(by_line.items(), key=lambda kv: (
              kv[0] is None, kv[0]))}


def loss_curves(metrics, path, panel_px=(420, 300)) -> pathlib.Path:
  """Loss against step for each phase found in a run's ``metrics.jsonl``.

  One panel per phase with rows, left to right, in the order of
  ``LOSS_PANELS`` (local DM per client, server, evaluation per net); each
  panel is ``panel_px`` (width, height) pixels plus margins.

  Args:
    metrics: a ``metrics.jsonl`` file, a workdir holding one, or its rows
      (``metrics.read_metrics``).
    path: PNG to write.

  Raises:
    ValueError: if no row has a loss to draw.
  """
  rows = (metrics if isinstance(metrics, (list, tuple))
          else metrics_lib.read_metrics(metrics))
  panels = [(title, label, loss_series(rows, phase, label, value))
            for phase, label, value, title in LOSS_PANELS]
  panels = [p for p in panels if p[2]]
  if not panels:
    raise ValueError("no loss rows (phases "
                     f"{[p[0] for p in LOSS_PANELS]}) to draw")
  w, h = (_check_positive_int(v, "panel_px") for v in panel_px)
  left, right, top, bottom = 70, 20, 30, 50
  fig = _figure(len(panels) * (left + w + right), top + h + bottom)
  for i, (title, label, series) in enumerate(panels):
    ax = _axes(fig, i * (left + w + right) + left, bottom, w, h)
    for key, (steps, values) in series.items():
      ax.plot(steps, values, marker="." if len(steps) < 30 else None,
              label=None if key is None else f"{label} {key}")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch" if label == "net" else "iteration", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    if label is not None and len(series) <= 10:
      ax.legend(fontsize=6, loc="upper right")
  return _save(fig, path)


def run_figures(run_dir, overwrite: bool = False) -> List[pathlib.Path]:
  """The figures of one finished run directory.

  From ``synthetic.npz`` (``outputs.save_synthetic``): ``synthetic.png``
  (``synthetic_grid``). From ``results.json``'s ``client_class_counts``:
  ``client_class_counts.png`` (``count_heatmap``). From ``metrics.jsonl``:
  ``loss_curves.png`` (``loss_curves``). Inputs that are absent are skipped
  (model baselines write no synthetic set).

  Args:
    run_dir: a run's workdir.
    overwrite: redraw figures that already exist (otherwise they are kept,
      so backfilling a sweep is cheap).

  Returns:
    The paths drawn by this call.
  """
  run_dir = pathlib.Path(run_dir)
  written = []
  class_names = None
  npz = run_dir / "synthetic.npz"
  if npz.exists():
    with np.load(npz, allow_pickle=False) as syn:
      class_names = [str(n) for n in syn["class_names"]]
      out = run_dir / SYNTHETIC_PNG
      if overwrite or not out.exists():
        written.append(synthetic_grid(syn["images"], syn["labels"],
                                      class_names, syn["mean"], syn["std"],
                                      out))
  res = run_dir / results_lib.RESULTS_FILE
  out = run_dir / COUNTS_PNG
  if res.exists() and (overwrite or not out.exists()):
    payload = json.loads(res.read_text())
    counts = payload.get("client_class_counts")
    if counts:
      num_classes = len(counts[0])
      if class_names is None or len(class_names) != num_classes:
        class_names = _dataset_class_names(payload.get("dataset"),
                                           num_classes)
      written.append(count_heatmap(counts, class_names, out))
  rows_path = run_dir / metrics_lib.METRICS_FILE
  out = run_dir / LOSS_PNG
  if rows_path.exists() and (overwrite or not out.exists()):
    rows = metrics_lib.read_metrics(rows_path)
    if any(loss_series(rows, *p[:3]) for p in LOSS_PANELS):
      written.append(loss_curves(rows, out))
  return written


def sweep_figures(rows: Sequence[Dict], out_dir) -> List[pathlib.Path]:
  """``accuracy_vs_alpha`` per (dataset, clients, ipc) group of rows.

  Files are named ``accuracy_vs_alpha_<dataset>_K<clients>_ipc<ipc>.png``;
  groups with no finished run are skipped.

  Returns:
    The paths written.
  """
  groups: Dict[tuple, List[Dict]] = {}
  for r in rows:
    if r.get("status") == "ok" and r.get("alpha") is not None:
      key = (r.get("dataset"), r.get("num_clients"), r.get("ipc"))
      groups.setdefault(key, []).append(r)
  written = []
  for (dataset, k, ipc), grows in groups.items():
    name = f"accuracy_vs_alpha_{dataset}_K{k}_ipc{ipc}"
    name = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    title = f"{dataset}, {k} clients, ipc {ipc}"
    written.append(accuracy_vs_alpha(grows, pathlib.Path(out_dir) /
                                     f"{name}.png", title=title))
  return written
