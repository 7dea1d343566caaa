"""Result tables: collect the ``results.json`` of many runs into rows.

A run directory (one sweep cell, or any ``launch.distill`` workdir) holds
``results.json`` when it finished. ``launch.sweep`` also writes

* ``cell.json``: the cell's grid overrides (``{"overrides": {path: value}}``),
  written before the run starts;
* ``error.json``: written instead of ``results.json`` when the run raised,
  with the same identifying keys as ``results.json`` (``method``,
  ``dataset``, ``num_clients``, ``alpha``, ``ipc``, ``config``) plus
  ``error_type``, ``error`` and ``traceback``.

``collect`` turns every such directory into one flat row (a dict); the other
helpers are pure functions of rows. Row keys:

==========================  ===================================================
``cell``                    the run directory relative to the collected folder
``status``                  ``"ok"``, ``"failed"`` or ``"pending"`` (only
                            ``cell.json``: running, or killed)
``method``, ``dataset``     as in ``results.json``
``partition``               the partition method (``config.partition.method``)
``num_clients``, ``ipc``    ints
``alpha``                   float, or ``"iid"`` for an iid partition or
                            ``alpha = inf`` (``format_alpha``)
``accuracy_mean``/``_std``  fractions in [0, 1] (None unless ok)
``n_eval``                  number of evaluated networks
``upload_bytes_per_client`` mean over clients of the upload in bytes
``upload_bytes_total``      sum over clients
``wall_s``                  total wall seconds of the run
``error``                   ``"ErrorType: message"`` of a failed run, else None
``commit``                  the code version the run was made from
                            (``commit_label`` of its ``provenance``)
``seed``                    the run's root seed (``config.seed``), when its
                            config has one; a sweep's ``seeds`` set it and
                            the partition seed together
``variant``                 the sweep variant the run belongs to, if any
``<grid path>``             one key per grid override not already a column
                            above (e.g. ``server.weighting``)
==========================  ===================================================

Markdown shows accuracies as percentages (``mean ± std``); the CSV keeps the
raw fractions of ``results.json``.
"""

import csv
import json
import math
import os
import pathlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as scipy_stats

RESULTS_FILE = "results.json"
CELL_FILE = "cell.json"
ERROR_FILE = "error.json"

# Grid paths that are already columns of every row.
STANDARD_PATHS = {
    "method": "method",
    "dataset": "dataset",
    "partition.method": "partition",
    "partition.num_clients": "num_clients",
    "partition.alpha": "alpha",
    "server.ipc": "ipc",
    "seed": "seed",
    "partition.seed": "partition_seed",
}
ID_COLUMNS = ("method", "dataset", "partition", "num_clients", "alpha", "ipc")
METRIC_COLUMNS = ("accuracy_mean", "accuracy_std", "n_eval",
                  "upload_bytes_per_client", "upload_bytes_total", "wall_s")
# CollabDM first, then the baselines from "not federated" to model-based.
METHOD_ORDER = ("collabdm", "collabdm-pae", "central_dm", "merged_local_dm",
                "fedavg", "dense")
STATUSES = ("ok", "failed", "pending")
SEED_COLUMNS = ("seed", "partition_seed")
AGGREGATE_COLUMNS = ("n_seeds", "seeds", "seeds_missing")
UNKNOWN_COMMIT = "unknown"


def format_alpha(alpha, partition_method: Optional[str] = None):
  """α as a table shows it: ``"iid"`` for an iid split, else a float.

  Args:
    alpha: the Dirichlet concentration (float, ``inf``, or None).
    partition_method: ``config.partition.method``; ``"iid"`` wins over alpha.

  Returns:
    ``"iid"`` when the partition is iid or ``alpha`` is infinite, otherwise
    ``float(alpha)`` (None stays None).
  """
  if partition_method == "iid":
    return "iid"
  if alpha is None:
    return None
  if isinstance(alpha, str) and alpha.lower() == "iid":
    return "iid"
  alpha = float(alpha)  # also reads "inf" / "Infinity" from CSV or JSON
  return "iid" if math.isinf(alpha) else alpha


def format_accuracy(mean, std) -> str:
  """``"81.23 ± 0.45"``: a mean and std given as fractions, in percent."""
  if mean is None:
    return "–"
  if std is None:
    return f"{100 * mean:.2f}"
  return f"{100 * mean:.2f} ± {100 * std:.2f}"


def format_bytes(n) -> str:
  """A byte count with a decimal unit (``"1.64 MB"``); ``"–"`` for None."""
  if n is None:
    return "–"
  n, units, i = float(n), ("B", "kB", "MB", "GB", "TB"), 0
  while abs(n) >= 1000 and i < len(units) - 1:
    n, i = n / 1000, i + 1
  return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def format_value(value) -> str:
  """Any cell value as short text (floats with ``:g``, None as ``–``)."""
  if value is None:
    return "–"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return "inf" if math.isinf(value) else f"{value:g}"
  return str(value)


def commit_label(record: Optional[Dict]) -> str:
  """A provenance record's code version: the commit's first 12 hex digits,
  with ``+dirty`` when tracked files differed from it, or ``"unknown"`` (no
  record, or not made from a git checkout)."""
  if not record or not record.get("git_commit"):
    return UNKNOWN_COMMIT
  label = str(record["git_commit"])[:12]
  return label + "+dirty" if record.get("git_dirty") else label


def commits_summary(rows: Sequence[Dict]) -> str:
  """One Markdown line naming the commits the finished rows were made from.

  ``"Made from commits: `abc` (3 runs), `def+dirty` (1 run)."``, most used
  first; rows without a ``commit`` (pending, failed) are not counted.
  """
  counts: Dict[str, int] = {}
  for r in rows:
    if r.get("status") == "ok":
      c = r.get("commit") or UNKNOWN_COMMIT
      counts[c] = counts.get(c, 0) + 1
  if not counts:
    return "Made from commits: none (no finished run)."
  parts = [f"`{c}` ({n} run{'s' if n != 1 else ''})" for c, n in
           sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
  return "Made from commits: " + ", ".join(parts) + "."


def _read_json(path: pathlib.Path):
  return json.loads(path.read_text())


def _wall_total(wall) -> Optional[float]:
  if wall is None:
    return None
  if isinstance(wall, (int, float)):
    return float(wall)
  if "total" in wall:
    return float(wall["total"])
  return float(sum(wall.values())) if wall else None


def _upload(per_client) -> Tuple[Optional[float], Optional[int]]:
  if not per_client:
    return None, None
  values = [float(v) for v in per_client.values()]
  return sum(values) / len(values), int(sum(values))


def _partition_method(payload) -> Optional[str]:
  config = payload.get("config") or {}
  return (config.get("partition") or {}).get("method")


def _identity(payload) -> Dict:
  part = _partition_method(payload)
  return {
      "method": payload.get("method"),
      "dataset": payload.get("dataset"),
      "partition": part,
      "num_clients": payload.get("num_clients"),
      "alpha": format_alpha(payload.get("alpha"), part),
      "ipc": payload.get("ipc"),
  }


def _empty_metrics() -> Dict:
  return {k: None for k in METRIC_COLUMNS}


def row_from_results(results: Dict, cell: str = "",
                     overrides: Optional[Dict] = None) -> Dict:
  """One ``ok`` row from a ``results.json`` payload (see module docstring)."""
  mean_up, total_up = _upload(results.get("upload_bytes_per_client"))
  accs = results.get("accuracies")
  n_eval = results.get("n_eval", len(accs) if accs is not None else None)
  row = {"cell": cell, "status": "ok", **_identity(results)}
  row.update({
      "accuracy_mean": results.get("accuracy_mean"),
      "accuracy_std": results.get("accuracy_std"),
      "n_eval": n_eval,
      "upload_bytes_per_client": mean_up,
      "upload_bytes_total": results.get("upload_bytes_total", total_up),
      "wall_s": _wall_total(results.get("wall_s")),
      "error": None,
      "commit": commit_label(results.get("provenance")),
  })
  row.update(_from_config(results))
  row.update(_extra_columns(overrides))
  return row


def _from_config(payload) -> Dict:
  # The seed and variant a run records itself, so rows of runs made outside
  # a sweep (or whose cell.json is lost) still have them.
  config = payload.get("config") or {}
  out = {}
  if "seed" in config:
    out["seed"] = config["seed"]
  if config.get("variant") is not None:
    out["variant"] = config["variant"]
  return out


def row_from_error(error: Dict, cell: str = "",
                   overrides: Optional[Dict] = None) -> Dict:
  """One ``failed`` row from an ``error.json`` payload."""
  row = {"cell": cell, "status": "failed", **_identity(error),
         **_empty_metrics()}
  row["error"] = f"{error.get('error_type', 'Error')}: {error.get('error', '')}"
  row["commit"] = (commit_label(error["provenance"]) if error.get("provenance")
                   else None)
  row.update(_from_config(error))
  row.update(_extra_columns(overrides))
  return row


def _extra_columns(overrides: Optional[Dict]) -> Dict:
  return {path: value for path, value in (overrides or {}).items()
          if path not in STANDARD_PATHS}


def _pending_row(cell: str, overrides: Dict) -> Dict:
  row = {"cell": cell, "status": "pending", **{k: None for k in ID_COLUMNS},
         **_empty_metrics(), "error": None, "commit": None}
  for path, column in STANDARD_PATHS.items():
    if path in overrides:
      row[column] = overrides[path]
  if row.get("seed") is None:
    row.pop("seed", None)
  row["alpha"] = format_alpha(row["alpha"], row["partition"])
  row.update(_extra_columns(overrides))
  return row


def read_run(run_dir, cell: str = "") -> Optional[Dict]:
  """The row of one run directory, or None if it holds no run files.

  ``results.json`` wins over ``error.json`` (a failed cell that was rerun
  successfully); an unreadable ``results.json`` gives a ``failed`` row
  rather than an exception, so one damaged file never hides the others.
  """
  run_dir = pathlib.Path(run_dir)
  overrides = {}
  if (run_dir / CELL_FILE).exists():
    try:
      overrides = _read_json(run_dir / CELL_FILE).get("overrides", {})
    except (OSError, ValueError):
      overrides = {}
  if (run_dir / RESULTS_FILE).exists():
    try:
      return row_from_results(_read_json(run_dir / RESULTS_FILE), cell,
                              overrides)
    except (OSError, ValueError, TypeError, AttributeError) as e:
      return row_from_error({"error_type": type(e).__name__,
                             "error": f"unreadable {RESULTS_FILE}: {e}"},
                            cell, overrides)
  if (run_dir / ERROR_FILE).exists():
    try:
      return row_from_error(_read_json(run_dir / ERROR_FILE), cell, overrides)
    except (OSError, ValueError) as e:
      return row_from_error({"error_type": type(e).__name__,
                             "error": f"unreadable {ERROR_FILE}: {e}"},
                            cell, overrides)
  if (run_dir / CELL_FILE).exists():
    return _pending_row(cell, overrides)
  return None


def collect(sweep_dir) -> List[Dict]:
  """Rows of every run under ``sweep_dir`` (itself included), sorted.

  A directory counts as a run when it holds ``results.json``,
  ``error.json`` or ``cell.json``; runs are leaves (their subfolders, e.g.
  checkpoints, are not searched).

  Args:
    sweep_dir: folder to search recursively.

  Returns:
    ``sort_rows`` of the rows (see the module docstring for the keys).
  """
  sweep_dir = pathlib.Path(sweep_dir)
  if not sweep_dir.is_dir():
    raise ValueError(f"sweep_dir must be an existing folder, got {sweep_dir}")
  rows = []
  for dirpath, dirnames, _ in os.walk(sweep_dir):
    path = pathlib.Path(dirpath)
    rel = path.relative_to(sweep_dir).as_posix()
    row = read_run(path, "" if rel == "." else rel)
    if row is not None:
      rows.append(row)
      dirnames[:] = []  # a run is a leaf
    else:
      dirnames.sort()
  return sort_rows(rows)


def extra_columns(rows: Iterable[Dict]) -> List[str]:
  """Keys of ``rows`` beyond the standard ones, in first-seen order."""
  known = (set(ID_COLUMNS) | set(METRIC_COLUMNS) | set(SEED_COLUMNS)
           | set(AGGREGATE_COLUMNS) | {"cell", "status", "error", "commit"})
  seen = []
  for row in rows:
    for key in row:
      if key not in known and key not in seen:
        seen.append(key)
  return seen


def _sort_value(value):
  # Numbers before strings (so "iid" follows every finite alpha), None last.
  if value is None:
    return (3, 0.0, "")
  if isinstance(value, bool):
    return (1, float(value), "")
  if isinstance(value, (int, float)):
    return (0, float(value), "")
  return (2, 0.0, str(value))


def _method_key(method):
  if method in METHOD_ORDER:
    return (0, METHOD_ORDER.index(method), "")
  return (1, 0, str(method))


def sort_rows(rows: Sequence[Dict]) -> List[Dict]:
  """Rows ordered by dataset, clients, ipc, α, extra columns, then method."""
  extras = extra_columns(rows)

  def key(row):
    return ((_sort_value(row.get("dataset")),
             _sort_value(row.get("num_clients")), _sort_value(row.get("ipc")),
             _sort_value(row.get("alpha")))
            + tuple(_sort_value(row.get(e)) for e in extras)
            + (_method_key(row.get("method")), row.get("cell", "")))

  return sorted(rows, key=key)


def _md_escape(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in body]
  return "\n".join(lines) + "\n"


def _accuracy_cell(row) -> str:
  if row.get("status") == "failed":
    return "failed"
  if row.get("status") == "pending":
    return "pending"
  return format_accuracy(row.get("accuracy_mean"), row.get("accuracy_std"))


def to_markdown(rows: Sequence[Dict], max_error_chars: int = 120) -> str:
  """One Markdown table, a line per row (see module docstring for keys).

  Columns: method, dataset, clients, α, ipc, any extra grid columns,
  ``accuracy (%)`` as ``mean ± std`` in percent (``failed``/``pending``
  otherwise), n_eval, mean upload per client, wall seconds, status, and the
  error (cut to ``max_error_chars``) when any row failed.
  """
  if max_error_chars < 1:
    raise ValueError(f"max_error_chars must be >= 1, got {max_error_chars}")
  extras = extra_columns(rows) + (["seed"] if _has_seeds(rows) else [])
  any_error = any(r.get("error") for r in rows)
  header = (["method", "dataset", "clients", "α", "ipc"] + extras
            + ["accuracy (%)", "n_eval", "upload/client", "wall (s)",
               "status", "commit"] + (["error"] if any_error else []))
  body = []
  for r in rows:
    wall = r.get("wall_s")
    line = ([format_value(r.get("method")), format_value(r.get("dataset")),
             format_value(r.get("num_clients")), format_value(r.get("alpha")),
             format_value(r.get("ipc"))]
            + [format_value(r.get(e)) for e in extras]
            + [_accuracy_cell(r), format_value(r.get("n_eval")),
               format_bytes(r.get("upload_bytes_per_client")),
               "–" if wall is None else f"{wall:.1f}",
               format_value(r.get("status")), format_value(r.get("commit"))])
    if any_error:
      err = r.get("error") or ""
      line.append(err if len(err) <= max_error_chars
                  else err[:max_error_chars - 1] + "…")
    body.append(line)
  return _md_table(header, body)


def to_pivot_markdown(rows: Sequence[Dict], index: str = "method",
                      columns: Sequence[str] = ("num_clients", "alpha")) -> str:
  """Paper-style tables: ``index`` down, ``columns`` across, accuracy in cells.

  Rows are split into one table per combination of the remaining
  identifying keys (dataset, partition, ipc, extra grid columns) that vary,
  each under a ``#### key=value, ...`` heading. A cell reads ``mean ± std``
  (percent), ``failed`` or ``pending``; ``–`` where no run exists.

  Raises:
    ValueError: if two rows land in the same table cell (``index`` and
      ``columns`` do not identify runs), naming both cells.
  """
  columns = tuple(columns)
  if index in columns:
    raise ValueError(f"index {index!r} must not be one of columns {columns}")
  # An iid split is the same whichever partition method asked for it, so
  # the partition only separates tables when skewed runs differ in it.
  skewed_parts = {r.get("partition") for r in rows if r.get("alpha") != "iid"}
  group_keys = [k for k in ("dataset", "partition", "ipc", "num_clients",
                            "alpha") + tuple(extra_columns(rows))
                if k != index and k not in columns
                and not (k == "partition" and len(skewed_parts) <= 1)]
  groups: Dict[tuple, List[Dict]] = {}
  for r in sort_rows(rows):
    groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
  out = []
  for gkey, grows in groups.items():
    if len(groups) > 1 or any(v is not None for v in gkey):
      out.append("#### " + ", ".join(
          f"{k}={format_value(v)}" for k, v in zip(group_keys, gkey)) + "\n")
    col_values, idx_values, cells = [], [], {}
    for r in grows:
      c = tuple(r.get(k) for k in columns)
      i = r.get(index)
      if c not in col_values:
        col_values.append(c)
      if i not in idx_values:
        idx_values.append(i)
      if (i, c) in cells:
        raise ValueError(
            f"rows {cells[(i, c)]['cell']!r} and {r.get('cell')!r} share "
            f"{index}={i!r} and {dict(zip(columns, c))}: add the key that "
            "tells them apart to columns")
      cells[(i, c)] = r
    col_values.sort(key=lambda c: tuple(_sort_value(v) for v in c))
    if index == "method":
      idx_values.sort(key=_method_key)
    else:
      idx_values.sort(key=_sort_value)
    header = [index] + [", ".join(f"{short_name(k)}={format_value(v)}"
                                  for k, v in zip(columns, c))
                        for c in col_values]
    body = [[format_value(i)] + [
        _accuracy_cell(cells[(i, c)]) if (i, c) in cells else "–"
        for c in col_values] for i in idx_values]
    out.append(_md_table(header, body))
  return "\n".join(out)


def short_name(key: str) -> str:
  """Column key as a header shows it (``K`` for clients, ``α``)."""
  return {"num_clients": "K", "alpha": "α"}.get(key, key)


def csv_columns(rows: Sequence[Dict]) -> List[str]:
  """The CSV header for ``rows``: cell, status, ids, extras, metrics, error."""
  return (["cell", "status"] + list(ID_COLUMNS) + extra_columns(rows)
          + (["seed"] if _has_seeds(rows) else [])
          + list(METRIC_COLUMNS) + ["commit", "error"])


def _has_seeds(rows) -> bool:
  return any(r.get("seed") is not None for r in rows)


def to_csv(rows: Sequence[Dict], path) -> pathlib.Path:
  """Writes ``rows`` as CSV (raw values, accuracies as fractions).

  The file is replaced atomically, so a reader never sees half a table.

  Args:
    rows: rows as ``collect`` returns them.
    path: output file; its folder is created.

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=csv_columns(rows),
                            extrasaction="ignore")
    writer.writeheader()
    for r in rows:
      writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
  os.replace(tmp, path)
  return path


def write_text(path, text: str) -> pathlib.Path:
  """Writes ``text`` to ``path`` atomically (folder created); returns path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
  return path


# ---------------------------------------------------------------------------
# Several seeds per setting: aggregates and paired differences.


def setting_keys(rows: Sequence[Dict]) -> List[str]:
  """The keys that identify a setting (a run up to its seed)."""
  return list(ID_COLUMNS) + extra_columns(rows)


def aggregate_seeds(rows: Sequence[Dict]) -> List[Dict]:
  """One row per setting, over its seeds.

  For the finished (``ok``) runs of a setting with per-seed accuracies
  ``a_s`` (each the mean over that run's evaluation networks):
  ``accuracy_mean = mean_s a_s`` and ``accuracy_std`` the sample standard
  deviation ``sqrt(sum_s (a_s - mean)^2 / (n - 1))`` of the per-seed means
  (None for one seed): the spread a reader would see when rerunning with
  another seed, partition and evaluation networks, not the spread of the
  networks of one run. ``n_seeds`` and ``seeds`` count the finished runs,
  ``seeds_missing`` the failed or pending ones; upload and wall time are
  means over the finished runs; ``commit`` joins their commits. A setting
  without any finished run keeps the status of its runs (``failed`` wins
  over ``pending``).
  """
  keys = setting_keys(rows)
  groups: Dict[tuple, List[Dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
  out = []
  for gkey, grows in groups.items():
    ok = [r for r in grows if r.get("status") == "ok"
          and r.get("accuracy_mean") is not None]
    row = dict(zip(keys, gkey))
    row["cell"] = ";".join(r.get("cell", "") for r in grows)
    accs = np.asarray([r["accuracy_mean"] for r in ok], np.float64)

    def mean_of(key, ok=ok):
      vals = [r[key] for r in ok if r.get(key) is not None]
      return float(np.mean(vals)) if vals else None

    row.update({
        "status": ("ok" if ok else "failed" if any(
            r.get("status") == "failed" for r in grows) else "pending"),
        "accuracy_mean": float(accs.mean()) if ok else None,
        "accuracy_std": float(accs.std(ddof=1)) if len(ok) > 1 else None,
        "n_seeds": len(ok),
        "seeds": sorted((r.get("seed") for r in ok),
                        key=lambda s: (s is None, s or 0)),
        "seeds_missing": len(grows) - len(ok),
        "n_eval": ok[0].get("n_eval") if ok else None,
        "upload_bytes_per_client": mean_of("upload_bytes_per_client"),
        "upload_bytes_total": mean_of("upload_bytes_total"),
        "wall_s": mean_of("wall_s"),
        "error": next((r.get("error") for r in grows if r.get("error")), None),
        "commit": ";".join(sorted({r.get("commit") or UNKNOWN_COMMIT
                                   for r in ok})) or None,
    })
    out.append(row)
  return sort_rows(out)


def seeds_vary(rows: Sequence[Dict]) -> bool:
  """True when some setting has runs under more than one seed."""
  keys = setting_keys(rows)
  seen: Dict[tuple, set] = {}
  for r in rows:
    seen.setdefault(tuple(r.get(k) for k in keys), set()).add(r.get("seed"))
  return any(len(s) > 1 for s in seen.values())


def paired_differences(rows: Sequence[Dict], key: str, a, b,
                       metric: str = "accuracy_mean",
                       confidence: float = 0.95) -> List[Dict]:
  """Paired difference ``a - b`` along ``key``, per setting, with a t interval.

  Runs are paired when they agree on every identifying key but ``key`` (and,
  for ``key == "variant"``, ``method`` and ``partition``, which a variant
  sets) and have the same seed, so both sides saw the same root key,
  partition and evaluation networks. With per-seed differences
  ``d_s = metric(a, s) - metric(b, s)`` over the ``n`` seeds both sides
  finished:

  * ``mean = (1/n) sum_s d_s``,
  * ``std = sqrt(sum_s (d_s - mean)^2 / (n - 1))`` (sample std),
  * ``ci = mean ± t_{(1+confidence)/2, n-1} · std / sqrt(n)``, the Student t
    interval for the mean difference, which assumes the d_s are independent
    draws from a normal distribution (seeds are independent; normality is an
    assumption that matters little for the mean of a few small differences
    but makes the interval only approximate). ``ci`` is None for n < 2.

  Pairing removes what the two sides share (the split, the networks psi_t,
  the evaluation networks), so the interval is usually much narrower than
  one computed from the two unpaired means.

  Args:
    rows: ``ok`` rows as ``collect`` returns them (others are ignored).
    key: the column that tells the two sides apart (``method``,
      ``variant``, or a grid path such as ``server.weighting``).
    a, b: the two values of ``key``.
    metric: a numeric row column (fractions for accuracies).
    confidence: the interval's coverage, in (0, 1).

  Returns:
    One dict per setting where both sides have at least one common seed:
    ``setting`` (the shared keys), ``key``, ``a``, ``b``, ``n``, ``seeds``,
    ``differences`` (per seed), ``mean``, ``std``, ``t``, ``ci_low``,
    ``ci_high`` (None when n < 2), ``confidence``.
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  ok = [r for r in rows if r.get("status") == "ok"
        and r.get(metric) is not None and r.get(key) in (a, b)]
  drop = {key} | ({"method", "partition"} if key == "variant" else set())
  keys = [k for k in setting_keys(rows) if k not in drop]
  sides: Dict[tuple, Dict[object, Dict]] = {}
  for r in ok:
    gkey = tuple(r.get(k) for k in keys)
    side = sides.setdefault(gkey, {a: {}, b: {}})
    seed = r.get("seed")
    if seed in side[r[key]]:
      raise ValueError(f"two runs of {key}={r[key]!r} share seed {seed!r} "
                       f"in setting {dict(zip(keys, gkey))}: "
                       f"{side[r[key]][seed].get('cell')!r} and "
                       f"{r.get('cell')!r}")
    side[r[key]][seed] = r
  out = []
  for gkey, side in sides.items():
    common = sorted(set(side[a]) & set(side[b]),
                    key=lambda s: (s is None, s or 0))
    if not common:
      continue
    d = np.asarray([side[a][s][metric] - side[b][s][metric] for s in common],
                   np.float64)
    n = len(d)
    entry = {"setting": dict(zip(keys, gkey)), "key": key, "a": a, "b": b,
             "n": n, "seeds": common, "differences": d.tolist(),
             "mean": float(d.mean()), "std": None, "t": None,
             "ci_low": None, "ci_high": None, "confidence": confidence}
    if n > 1:
      std = float(d.std(ddof=1))
      t = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1))
      half = t * std / math.sqrt(n)
      entry.update(std=std, t=t, ci_low=entry["mean"] - half,
                   ci_high=entry["mean"] + half)
    out.append(entry)
  return out


def default_claims(rows: Sequence[Dict]) -> List[Tuple[str, str, str]]:
  """The main claims a table can test, as ``(key, a, b)``.

  CollabDM against merged local DM and against central DM (by ``method``),
  and count against uniform weighting when ``server.weighting`` is a grid
  column.
  """
  claims = [("method", "collabdm", "merged_local_dm"),
            ("method", "collabdm", "central_dm")]
  if any("server.weighting" in r for r in rows):
    claims.append(("server.weighting", "count", "uniform"))
  return claims


def _points(x) -> str:
  return "–" if x is None else f"{100 * x:+.2f}"


def paired_markdown(rows: Sequence[Dict], claims) -> str:
  """Markdown table of ``paired_differences`` for each ``(key, a, b)`` claim.

  Differences are in accuracy points (percent); claims no setting can pair
  are listed as such, so a missing comparison is visible.
  """
  lines = ["| claim | setting | seeds | difference (points) | 95 % CI "
           "| per seed |", "|---|---|---|---|---|---|"]
  for key, a, b in claims:
    found = paired_differences(rows, key, a, b)
    if not found:
      lines.append(f"| {a} − {b} ({key}) | – | 0 | no paired seeds | – | – |")
    for e in found:
      setting = ", ".join(f"{short_name(k)}={format_value(v)}"
                          for k, v in e["setting"].items() if v is not None)
      ci = ("–" if e["ci_low"] is None
            else f"[{_points(e['ci_low'])}, {_points(e['ci_high'])}]")
      per_seed = ", ".join(_points(x) for x in e["differences"])
      lines.append(f"| {_md_escape(a)} − {_md_escape(b)} ({_md_escape(key)}) "
                   f"| {_md_escape(setting)} | {e['n']} | "
                   f"{_points(e['mean'])} | {ci} | {per_seed} |")
  return "\n".join(lines) + "\n"


def paired_rows(rows: Sequence[Dict], claims) -> List[Dict]:
  """``paired_differences`` of every claim, flattened for a CSV."""
  out = []
  for key, a, b in claims:
    for e in paired_differences(rows, key, a, b):
      flat = {f"setting.{k}": v for k, v in e["setting"].items()}
      flat.update({k: v for k, v in e.items() if k != "setting"})
      flat["seeds"] = ";".join(str(s) for s in e["seeds"])
      flat["differences"] = ";".join(f"{x:.6f}" for x in e["differences"])
      out.append(flat)
  return out


def dicts_to_csv(dicts: Sequence[Dict], path) -> pathlib.Path:
  """Writes dicts as CSV (columns in first-seen order), atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  columns = []
  for d in dicts:
    columns += [k for k in d if k not in columns]
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for d in dicts:
      writer.writerow({k: ("" if v is None else v) for k, v in d.items()})
  os.replace(tmp, path)
  return path
