"""Runs a grid of experiments and collects their results into tables.

  python -m launch.sweep --config=experiments/configs/fmnist_table.py --workdir=/tmp/fmnist_table

A sweep config (see ``experiments/configs/fmnist_table.py``) is a ConfigDict
with

* ``name``: the sweep's name (default results folder
  ``experiments/results/<name>``);
* ``base``: a full run config (``experiments/configs/default.py`` with
  overrides);
* ``grid``: field paths of ``base`` mapped to the values to try, either
  nested (``grid.partition.alpha = (0.1, 0.5)``, which the command line can
  override: ``--config.grid.partition.alpha='(0.5,)'``) or with dotted keys
  (``ConfigDict({"partition.alpha": [0.1, 0.5]}, allow_dotted_keys=True)``).
  Every combination is one cell (the Cartesian product, in sorted path
  order);
* optional ``variants``: names mapped to field overrides, one more axis
  for settings that are not a product (e.g. ``collabdm_uniform``,
  ``authors``); the name is recorded as ``config.variant``;
* optional ``seeds``: every cell runs once per seed s with ``seed`` and
  ``partition.seed`` set to s (``SEED_PATHS``);
* optional ``claims``: ``(key, a, b)`` comparisons whose paired difference
  over seeds the tables report (default ``results.default_claims``);
* optional ``script``: settings of another program that drives the same
  cells (e.g. ``experiments/run_ids_table.py``'s ``full_data_epochs``);
  the sweep does not read them.

Any other top-level field is an error (a misspelt ``seed`` would otherwise
run the sweep with one seed and say nothing).

Each cell runs ``pipeline.run`` in ``<workdir>/<cell name>``, where the name
lists the cell's values (``method=fedavg,partition.alpha=0.1,...``), so it
is readable and the same on every machine and rerun. A cell is finished
when its ``results.json`` exists; finished cells are skipped, so rerunning
the same command resumes a sweep (an interrupted CollabDM cell also resumes
from its server checkpoint, and a FedAvg or DENSE cell with
``baseline.client_cache_dir`` set from its client training's last
validation check and DENSE's last saved round). A cell that raises is
logged with its traceback, leaves ``error.json`` (its row in the table
reads ``failed``) and the sweep goes on; the next rerun retries it. Cells
are matched by name only: a finished cell whose recorded config differs
from the sweep's current one (e.g. after editing a budget) is kept, with a
warning; delete its folder to rerun it.

Modes:

* default: run every cell here, one after another, then write the tables;
* ``--list_cells``: print ``index<TAB>status<TAB>name`` per cell and exit
  (a dry run: every cell's config is built, nothing runs);
* ``--cell=N``: run only cell N (one process per cell, e.g. a cluster array
  job with ``--cell=$SLURM_ARRAY_TASK_ID``); no tables are written;
* ``--cells=4,0,7``: run only these cells, in this order;
* ``--workers=W``: run the cells W at a time, each in its own process
  (``--cell=N`` with the same flags; its output in ``<cell>/worker.log``),
  e.g. several small cells sharing one GPU, whose compilation then overlaps
  (point ``JAX_COMPILATION_CACHE_DIR`` at one folder so the workers share
  compiled programs); add ``--stop_starting_after_s=S`` to start no cell
  after S seconds in a time-boxed session;
* ``--collect_only``: only (re)write the tables from what is on disk.

Tables go to ``--results_dir``: ``results.md`` (one line per cell, then
paper-style method × (clients, α) tables), ``results.csv`` and one
``accuracy_vs_alpha_<dataset>_K<clients>_ipc<ipc>.png`` per group. Each
finished cell also gets ``synthetic.png`` and ``client_class_counts.png``.
The exit status is 1 when a cell run by this call failed.
"""

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import re
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from collabdm_jax import outputs
from collabdm_jax import pipeline
from collabdm_jax import plots
from collabdm_jax import provenance
from collabdm_jax import results as results_lib
from collabdm_jax import setup as setup_lib

log = logging.getLogger("collabdm_jax.sweep")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Cell names longer than this are cut and end in a hash of the full name,
# well below the usual 255-byte file-name limit.
MAX_NAME_CHARS = 200


# A seed sets the root key (every network, augmentation, client draw, local
# DM, server initialisation and evaluation network derives from it, keys.py)
# and the partition together.
SEED_PATHS = ("seed", "partition.seed")
VARIANT_FIELD = "variant"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One grid point: its position, folder name and field overrides.

  ``labels`` are what identify the cell in its name and ``cell.json``: the
  grid values, then ``variant`` and ``seed`` when the sweep has them.
  """
  index: int
  name: str
  overrides: Tuple[Tuple[str, object], ...]  # (dotted path, value), in order
  labels: Tuple[Tuple[str, object], ...] = ()
  variant: Optional[str] = None


def grid_axes(grid) -> List[Tuple[str, list]]:
  """The grid as ``[(dotted path, [values...])]`` in sorted path order.

  Args:
    grid: a ConfigDict or dict, nested (``{"partition": {"alpha": [..]}}``)
      or with dotted keys (``{"partition.alpha": [..]}``); leaves are
      non-empty lists or tuples of scalar values (None, bool, int, float,
      str).

  Raises:
    ValueError: a leaf is not a non-empty list of scalars, or a path is
      given twice.
  """
  axes: Dict[str, list] = {}

  def walk(node, prefix):
    items = node.items() if hasattr(node, "items") else None
    if items is None:
      raise ValueError(f"grid must map field paths to value lists, got "
                       f"{type(node).__name__} at {prefix or 'the top'}")
    for key, value in items:
      path = f"{prefix}.{key}" if prefix else str(key)
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        walk(value, path)
        continue
      if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"grid[{path!r}] must be a non-empty list of values, "
                         f"got {value!r}")
      for v in value:
        if not (v is None or isinstance(v, (bool, int, float, str))):
          raise ValueError(f"grid[{path!r}] values must be None, bool, int, "
                           f"float or str, got {v!r}")
      if path in axes:
        raise ValueError(f"grid path {path!r} is given twice")
      axes[path] = list(value)

  walk(grid if grid is not None else {}, "")
  return sorted(axes.items())


def format_value(value) -> str:
  """A grid value as it appears in a cell name (floats by ``repr``)."""
  if isinstance(value, float):
    return "inf" if value == math.inf else ("-inf" if value == -math.inf
                                            else repr(value))
  return str(value)


def cell_name(overrides: Sequence[Tuple[str, object]]) -> str:
  """``path=value,path=value`` made safe as one folder name.

  Characters other than letters, digits and ``._+-=,`` become ``_``; a name
  over ``MAX_NAME_CHARS`` is cut and ends in a hash of the full name, so it
  stays unique. No overrides gives ``base``.
  """
  if not overrides:
    return "base"
  raw = ",".join(f"{p}={format_value(v)}" for p, v in overrides)
  name = re.sub(r"[^A-Za-z0-9._+=,-]", "_", raw)
  if name in (".", ".."):
    name = name.replace(".", "_")
  if len(name) > MAX_NAME_CHARS:
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    name = name[:MAX_NAME_CHARS - 13] + "-" + digest
  return name


def apply_overrides(base, overrides: Sequence[Tuple[str, object]]):
  """``setup.with_overrides``: a copy of ``base`` with each dotted path set."""
  return setup_lib.with_overrides(base, overrides)


def sweep_seeds(sweep_config) -> Optional[List[int]]:
  """The sweep's ``seeds`` (distinct integers >= 0), or None without them.

  Each seed s runs every cell with ``seed = partition.seed = s``
  (``SEED_PATHS``): another root key (hence other random networks,
  augmentations, client draws and evaluation networks) and another split.
  """
  seeds = sweep_config.get("seeds", None)
  if seeds is None:
    return None
  if isinstance(seeds, int) or not isinstance(seeds, (list, tuple)) or not seeds:
    raise ValueError(f"seeds must be a non-empty list of integers, got "
                     f"{seeds!r}")
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
      raise ValueError(f"seeds must be integers >= 0, got {s!r}")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct, got {list(seeds)}")
  return list(seeds)


def sweep_variants(sweep_config) -> Optional[List[Tuple[str, tuple]]]:
  """The sweep's ``variants`` as ``[(name, ((path, value), ...))]``, or None.

  ``variants`` maps a name to the field overrides that make that variant
  (nested or dotted paths, single values), e.g. ``collabdm_uniform:
  {method: collabdm, server.weighting: uniform}``: methods that are not a
  Cartesian product of settings (e.g. "authors' mode") share one axis.
  """
  variants = sweep_config.get("variants", None)
  if variants is None:
    return None
  if not hasattr(variants, "items") or not variants:
    raise ValueError("variants must map names to field overrides")
  out = []
  for name, spec in variants.items():
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", str(name)):
      raise ValueError(f"variant name {name!r} must be letters, digits or "
                       "._+-")
    flat = []

    def walk(node, prefix, flat=flat, name=name):
      if not hasattr(node, "items"):
        raise ValueError(f"variant {name!r} must map field paths to values")
      for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "items"):
          walk(value, path)
        else:
          flat.append((path, value))

    walk(spec, "")
    out.append((str(name), tuple(sorted(flat))))
  return out


# The top-level fields of a sweep config (see the module docstring).
SWEEP_FIELDS = ("name", "base", "grid", "variants", "seeds", "claims",
                "script")


def check_fields(sweep_config):
  """Raises ValueError for a top-level field the sweep does not know."""
  unknown = sorted(set(sweep_config.keys()) - set(SWEEP_FIELDS))
  if unknown:
    raise ValueError(f"unknown sweep config field(s) {unknown}; a sweep "
                     f"config has {list(SWEEP_FIELDS)} (settings for another "
                     "program go under 'script')")


def make_cells(sweep_config) -> List[Cell]:
  """Every cell of the sweep, in a fixed order.

  The product of ``grid_axes``, then of ``variants`` (when given), then of
  ``seeds`` (when given). A variant's and a seed's overrides come after the
  grid's, so they win where they overlap. Every cell's overrides are applied
  to ``base`` once here, so a bad path or value fails before any cell runs.

  Raises:
    ValueError: the config has an unknown top-level field or lacks
      ``base``, a grid path, variant or seed is invalid, or two cells map to
      the same folder name.
  """
  check_fields(sweep_config)
  if "base" not in sweep_config:
    raise ValueError("the sweep config must have a 'base' run config")
  axes = grid_axes(sweep_config.get("grid"))
  paths = [p for p, _ in axes]
  variants = sweep_variants(sweep_config) or [(None, ())]
  seeds = sweep_seeds(sweep_config)
  cells, names = [], {}
  products = itertools.product(itertools.product(*[v for _, v in axes]),
                               variants, seeds or [None])
  for i, (values, (variant, variant_overrides), seed) in enumerate(products):
    grid = tuple(zip(paths, values))
    overrides = grid + variant_overrides
    labels = ((((VARIANT_FIELD, variant),) if variant is not None else ())
              + grid)
    if seed is not None:
      overrides += tuple((p, seed) for p in SEED_PATHS)
      labels += (("seed", seed),)
    apply_overrides(sweep_config.base, overrides)
    name = cell_name(labels)
    if name in names:
      raise ValueError(f"cells {names[name]} and {i} both map to folder "
                       f"{name!r}: make the grid values distinct")
    names[name] = i
    cells.append(Cell(i, name, overrides, labels, variant))
  return cells


def cell_config(sweep_config, cell: Cell):
  """The run config of ``cell``: ``base`` with its overrides, and the
  variant's name in ``config.variant`` (declared by ``default.py``;
  recorded in ``results.json``)."""
  config = apply_overrides(sweep_config.base, cell.overrides)
  if cell.variant is not None:
    config[VARIANT_FIELD] = cell.variant
  return config


def sweep_name(sweep_config) -> str:
  """The sweep's name as a safe folder name (``name`` field, or ``sweep``)."""
  name = str(sweep_config.get("name", None) or "sweep")
  return re.sub(r"[^A-Za-z0-9._+=,-]", "_", name)


def default_results_dir(sweep_config) -> pathlib.Path:
  """``experiments/results/<name>`` in this repository."""
  return REPO_ROOT / "experiments" / "results" / sweep_name(sweep_config)


def cell_status(workdir, cell: Cell) -> str:
  """``done``, ``failed``, ``started`` (cell.json only) or ``pending``."""
  d = pathlib.Path(workdir) / cell.name
  if (d / results_lib.RESULTS_FILE).exists():
    return "done"
  if (d / results_lib.ERROR_FILE).exists():
    return "failed"
  if (d / results_lib.CELL_FILE).exists():
    return "started"
  return "pending"


def _write_json(path: pathlib.Path, payload) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, default=str))
  os.replace(tmp, path)


def _error_payload(config, cell: Cell, error: BaseException) -> Dict:
  part = config.partition
  return {
      "status": "failed",
      "cell": cell.name,
      "index": cell.index,
      "overrides": dict(cell.labels),
      "method": outputs.method_name(config),
      "dataset": config.dataset,
      "num_clients": part.num_clients,
      "alpha": part.alpha,
      "ipc": config.server.ipc,
      "error_type": type(error).__name__,
      "error": str(error),
      "traceback": "".join(traceback.format_exception(error)),
      "config": config.to_dict(),
      "provenance": provenance.finish(None),
  }


def run_cell(sweep_config, cell: Cell, workdir) -> str:
  """Runs one cell unless it is finished.

  Writes ``cell.json`` first (with the provenance of this start), a
  per-cell ``log.txt`` of everything logged
  meanwhile, then either the run's own outputs or ``error.json``.

  Returns:
    ``"skipped"`` (already finished), ``"done"`` or ``"failed"``.
  """
  cell_dir = pathlib.Path(workdir) / cell.name
  config = cell_config(sweep_config, cell)
  if (cell_dir / results_lib.RESULTS_FILE).exists():
    log.info("cell %d %s: finished before, skipped", cell.index, cell.name)
    _warn_if_config_changed(cell_dir, config)
    _figures(cell_dir)
    return "skipped"
  cell_dir.mkdir(parents=True, exist_ok=True)
  # How the cell was started (commit, command, machine, load), also for a
  # cell that dies before writing results.json.
  _write_json(cell_dir / results_lib.CELL_FILE, {
      "sweep": sweep_name(sweep_config), "index": cell.index,
      "name": cell.name, "overrides": dict(cell.labels),
      "provenance": provenance.start()})
  stale = cell_dir / results_lib.ERROR_FILE
  if stale.exists():
    stale.unlink()
  handler = logging.FileHandler(cell_dir / "log.txt")
  handler.setFormatter(logging.Formatter(
      "%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root = logging.getLogger()
  root.addHandler(handler)
  # The cell's log keeps the package's progress lines (INFO) even when the
  # program's logging shows only warnings; the level is restored after.
  package = logging.getLogger("collabdm_jax")
  old_level = package.level
  if package.getEffectiveLevel() > logging.INFO:
    package.setLevel(logging.INFO)
  try:
    log.info("cell %d %s: running", cell.index, cell.name)
    pipeline.run(config, cell_dir)
  except Exception as e:  # one bad cell must not stop the sweep
    log.error("cell %d %s failed: %s: %s\n%s", cell.index, cell.name,
              type(e).__name__, e, traceback.format_exc())
    _write_json(cell_dir / results_lib.ERROR_FILE,
                _error_payload(config, cell, e))
    return "failed"
  finally:
    root.removeHandler(handler)
    handler.close()
    package.setLevel(old_level)
  _figures(cell_dir)
  return "done"


def _as_json(value):
  return json.loads(json.dumps(value, default=str))


def _warn_if_config_changed(cell_dir, config):
  # Cells are matched by name only; a finished cell run under another base
  # config (e.g. edited budgets) would otherwise pass silently into tables.
  try:
    done = json.loads((cell_dir / results_lib.RESULTS_FILE).read_text())
  except (OSError, ValueError):
    return
  old = done.get("config")
  if old is not None and old != _as_json(config.to_dict()):
    log.warning("%s finished under a different config than the sweep's now; "
                "its results are kept (delete the folder to rerun it)",
                cell_dir)


def _figures(cell_dir):
  # Figures are a convenience: a plotting problem is logged, never allowed
  # to turn a finished run into a failed one.
  try:
    plots.run_figures(cell_dir)
  except Exception:  # noqa: BLE001
    log.exception("figures of %s failed", cell_dir)


def chosen_cells(cells: Sequence[Cell],
                 cell_indices: Optional[Sequence[int]]) -> List[Cell]:
  """``cells[i]`` for each ``i`` of ``cell_indices`` in that order (all
  cells when None).

  Raises:
    ValueError: an index is out of range or given twice.
  """
  if cell_indices is None:
    return list(cells)
  for i in cell_indices:
    if not 0 <= i < len(cells):
      raise ValueError(f"cell must be in [0, {len(cells)}), got {i}")
  if len(set(cell_indices)) != len(cell_indices):
    raise ValueError(f"cells given twice in {list(cell_indices)}")
  return [cells[i] for i in cell_indices]


def run_sweep(sweep_config, workdir,
              cell_indices: Optional[Sequence[int]] = None,
              stop_starting_after_s: Optional[float] = None) -> Dict[str, str]:
  """Runs the sweep's cells (all, or ``cell_indices`` in that order) one
  after another in this process.

  Args:
    stop_starting_after_s: start no cell after this many seconds; the cells
      not started are left pending (outcome ``"not started"``) for a rerun.

  Returns:
    ``{cell name: "skipped" | "done" | "failed" | "not started"}``.

  Raises:
    ValueError: an index is out of range (before anything runs), or the
      grid is invalid (``make_cells``).
  """
  chosen = chosen_cells(make_cells(sweep_config), cell_indices)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.monotonic()
  outcome = {}
  for n, cell in enumerate(chosen):
    if _past(start, stop_starting_after_s):
      outcome[cell.name] = NOT_STARTED
      continue
    log.info("sweep %s: cell %d/%d", sweep_name(sweep_config), n + 1,
             len(chosen))
    outcome[cell.name] = run_cell(sweep_config, cell, workdir)
  return outcome


NOT_STARTED = "not started"
# Flags the parent sets itself for each worker.
_PARENT_ONLY_FLAGS = ("cell", "cells", "workers", "stop_starting_after_s",
                      "list_cells", "collect_only")


def _past(start: float, limit_s: Optional[float]) -> bool:
  return limit_s is not None and time.monotonic() - start >= limit_s


def worker_command(argv: Sequence[str], index: int) -> List[str]:
  """The command that runs cell ``index`` alone: this program's ``argv``
  without the parent-only flags (``--cells``, ``--workers``, ...), plus
  ``--cell=index``.

  Flags must be written ``--name=value`` (booleans ``--name``/``--noname``),
  as absl prints them.
  """
  def parent_only(arg):
    name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
    if name.startswith("no") and name[2:] in _PARENT_ONLY_FLAGS:
      return True
    return name in _PARENT_ONLY_FLAGS
  kept = [a for a in argv[1:] if not parent_only(a)]
  return [sys.executable, "-m", "launch.sweep", *kept, f"--cell={index}"]


def run_in_workers(sweep_config, workdir, argv: Sequence[str], workers: int,
                   cell_indices: Optional[Sequence[int]] = None,
                   stop_starting_after_s: Optional[float] = None,
                   poll_s: float = 0.5) -> Dict[str, str]:
  """Runs cells in up to ``workers`` processes at once, one process per cell.

  For several cells sharing one accelerator or many cores: each cell runs
  ``worker_command(argv, i)`` (so exactly what ``--cell=i`` runs, with the
  same config overrides), its output going to ``<cell>/worker.log``. Cells
  start in the order of ``cell_indices`` (default: all); finished cells are
  skipped without starting a process. With ``stop_starting_after_s`` no
  cell starts after that many seconds (running ones finish), so a
  time-boxed session ends with whole cells; the rest stay pending.

  Returns:
    ``{cell name: "skipped" | "done" | "failed" | "not started"}``; a worker
    that exits without ``results.json`` counts as failed.
  """
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  cells = chosen_cells(make_cells(sweep_config), cell_indices)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  outcome = {}
  todo = []
  for cell in cells:
    if cell_status(workdir, cell) == "done":
      outcome[cell.name] = "skipped"
    else:
      todo.append(cell)
  start = time.monotonic()
  running = {}  # cell name -> (process, its log file, cell)
  while todo or running:
    while todo and len(running) < workers:
      cell = todo.pop(0)
      if _past(start, stop_starting_after_s):
        outcome[cell.name] = NOT_STARTED
        continue
      cell_dir = workdir / cell.name
      cell_dir.mkdir(parents=True, exist_ok=True)
      out = open(cell_dir / "worker.log", "w")  # noqa: SIM115 (closed below)
      log.info("cell %d %s: started in a worker", cell.index, cell.name)
      running[cell.name] = (subprocess.Popen(
          worker_command(argv, cell.index), stdout=out,
          stderr=subprocess.STDOUT, cwd=REPO_ROOT), out, cell)
    for name, (proc, out, cell) in list(running.items()):
      if proc.poll() is None:
        continue
      out.close()
      del running[name]
      status = cell_status(workdir, cell)
      outcome[name] = "done" if status == "done" else "failed"
      log.info("cell %d %s: worker exited (%d), %s", cell.index, name,
               proc.returncode, outcome[name])
    if running:
      time.sleep(poll_s)
  return outcome


def sweep_claims(sweep_config, rows) -> List[Tuple[str, str, str]]:
  """The sweep's ``claims`` as ``(key, a, b)``, else ``default_claims``."""
  claims = sweep_config.get("claims", None) if sweep_config is not None else None
  if claims is None:
    return results_lib.default_claims(rows)
  out = []
  for claim in claims:
    if not isinstance(claim, (list, tuple)) or len(claim) != 3:
      raise ValueError(f"each claim must be (key, a, b), got {claim!r}")
    out.append(tuple(claim))
  return out


def write_tables(workdir, results_dir, claims=None) -> Dict[str, object]:
  """Collects every run under ``workdir`` into tables and plots.

  When some setting ran under several seeds, ``results.md`` adds the
  tables over seeds (mean ± std of the per-seed means,
  ``results.aggregate_seeds``; also ``results_seeds.csv``) and the paired
  difference with its 95 % interval of every claim (``(key, a, b)``, default
  ``results.default_claims``; also ``paired.csv``).

  Returns:
    ``{"rows": rows, "markdown": path, "csv": path, "plots": [paths]}``.
  """
  rows = results_lib.collect(workdir)
  results_dir = pathlib.Path(results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  counts = {s: sum(r["status"] == s for r in rows)
            for s in results_lib.STATUSES}
  text = (f"# Sweep results\n\n{len(rows)} runs under `{workdir}`: "
          + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".\n\n"
          "Accuracy: mean ± std (%) over the evaluated networks.\n\n"
          + results_lib.commits_summary(rows) + "\n\n"
          + results_lib.to_markdown(rows))
  by_seed = results_lib.seeds_vary(rows)
  if by_seed:
    agg = results_lib.aggregate_seeds(rows)
    index = ("variant" if any(r.get("variant") is not None for r in agg)
             else "method")
    seeds = sorted({s for r in agg for s in r["seeds"]},
                   key=lambda s: (s is None, s or 0))
    text += ("\n## Over seeds\n\nAccuracy: mean ± std (%) over seeds "
             f"{', '.join(map(str, seeds))} of each run's mean over its "
             "evaluated networks (std: sample std of the per-seed means). "
             "Settings with fewer finished seeds than others show fewer "
             "(`results_seeds.csv`: `n_seeds`).\n\n"
             + results_lib.to_pivot_markdown(agg, index=index))
    results_lib.dicts_to_csv(agg, results_dir / "results_seeds.csv")
    claims = claims if claims is not None else results_lib.default_claims(rows)
    text += ("\n## Paired differences\n\nEach claim `a − b` pairs runs of "
             "the same setting and seed (same root key, partition and "
             "evaluation networks); the interval is the Student t interval "
             "over seeds (`results.paired_differences`).\n\n"
             + results_lib.paired_markdown(rows, claims))
    results_lib.dicts_to_csv(results_lib.paired_rows(rows, claims),
                             results_dir / "paired.csv")
  elif any(r["status"] != "pending" for r in rows):
    try:
      text += "\n## By method\n\n" + results_lib.to_pivot_markdown(rows)
    except ValueError as e:  # rows the pivot cannot place: the list is enough
      log.warning("no pivot table: %s", e)
  md = results_lib.write_text(results_dir / "results.md", text)
  csv_path = results_lib.to_csv(rows, results_dir / "results.csv")
  # Over seeds, the error bars are the spread over seeds.
  figures = plots.sweep_figures(
      results_lib.aggregate_seeds(rows) if by_seed else rows, results_dir)
  log.info("tables: %s, %s; %d plots", md, csv_path, len(figures))
  return {"rows": rows, "markdown": md, "csv": csv_path, "plots": figures}


def define_flags():
  """Defines this launcher's absl flags (only when run as a program, so
  importing the module for its functions leaves the global flags alone)."""
  config_flags.DEFINE_config_file(
      "config", None, "Sweep config file (name, base, grid).",
      lock_config=True)
  flags.DEFINE_string("workdir", None,
                      "Sweep folder: one subfolder per cell.", required=True)
  flags.DEFINE_string(
      "results_dir", None,
      "Where tables and plots go; default experiments/results/<sweep name>.")
  flags.DEFINE_integer("cell", None,
                       "Run only this cell (0-based; see --list_cells).")
  flags.DEFINE_list("cells", None,
                    "Run only these cells, in this order (comma-separated "
                    "indices; see --list_cells).")
  flags.DEFINE_integer(
      "workers", 1,
      "Run the cells in this many processes at once, one process per cell "
      "(e.g. several cells sharing one GPU); 1 runs them here in turn.")
  flags.DEFINE_float(
      "stop_starting_after_s", None,
      "Start no cell after this many seconds (running cells finish); the "
      "rest stay pending for a rerun. For time-boxed sessions.")
  flags.DEFINE_bool("list_cells", False,
                    "Print index, status and name of every cell.")
  flags.DEFINE_bool("collect_only", False,
                    "Only write the tables from the cells on disk.")


def main(argv):
  del argv
  from launch import common  # the launchers' runtime flags and logging
  common.init_runtime()
  FLAGS = flags.FLAGS
  sweep_config = FLAGS.config
  if sweep_config is None:
    raise app.UsageError("--config is required")
  workdir = pathlib.Path(FLAGS.workdir)
  results_dir = (pathlib.Path(FLAGS.results_dir) if FLAGS.results_dir
                 else default_results_dir(sweep_config))
  cells = make_cells(sweep_config)
  if FLAGS.list_cells:
    for cell in cells:
      print(f"{cell.index}\t{cell_status(workdir, cell)}\t{cell.name}")
    return 0
  failed = []
  if not FLAGS.collect_only:
    if FLAGS.cell is not None and FLAGS.cells is not None:
      raise app.UsageError("give --cell or --cells, not both")
    indices = ([FLAGS.cell] if FLAGS.cell is not None else
               None if FLAGS.cells is None else [int(i) for i in FLAGS.cells])
    if FLAGS.workers > 1:
      outcome = run_in_workers(sweep_config, workdir, sys.argv, FLAGS.workers,
                               indices, FLAGS.stop_starting_after_s)
    else:
      outcome = run_sweep(sweep_config, workdir, indices,
                          FLAGS.stop_starting_after_s)
    failed = [n for n, s in outcome.items() if s == "failed"]
    print(f"{len(outcome)} cells: " + ", ".join(
        f"{sum(s == k for s in outcome.values())} {k}"
        for k in ("done", "skipped", "failed", NOT_STARTED)))
  if FLAGS.cell is None or FLAGS.collect_only:
    out = write_tables(workdir, results_dir,
                       sweep_claims(sweep_config, results_lib.collect(workdir)))
    print(f"results: {out['markdown']} and {out['csv']}")
  if failed:
    print("failed cells (see error.json and log.txt in each): "
          + ", ".join(failed), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
