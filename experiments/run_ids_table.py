"""Runs the intrusion-detection table and writes it with detection metrics.

  python -m experiments.run_ids_table --workdir=/tmp/sweeps/ids

For each data set of ``experiments/configs/ids_table.py`` (5G-IDS with and
without the GTP columns, NSL-KDD) this runs, for every root seed:

* the sweep's cells (collabdm, central_dm, merged_local_dm), in the same
  folders ``launch.sweep`` would use (``<workdir>/<sweep name>/<cell>``), so
  either driver can fill them and finished cells are skipped;
* ``full_data``: the evaluation MLP trained on all pooled training rows
  (``experiments/full_data_detector.py``), the upper bound;
* ``real_subset``: ``server.ipc`` real rows per class drawn from the pooled
  data (central DM with 0 iterations), i.e. the same budget without any
  distillation.

Then it writes ``ids_table.md`` and ``ids_table.csv`` (mean ± std over the
seeds of each run's mean over its evaluation networks: accuracy, balanced
accuracy, false-positive rate, per-class recall) and ``ids_runs.csv`` (one
line per run) to ``--results_dir`` (default ``experiments/results/ids_5g``).
``--collect_only`` only rewrites the tables from what is on disk.
"""

import csv
import dataclasses
import json
import logging
import pathlib
import time
from typing import Dict, List, Sequence

import numpy as np
from absl import app
from absl import flags

from collabdm_jax import pipeline
from collabdm_jax import results as results_lib
from experiments import full_data_detector
from experiments.configs import ids_table
from launch import sweep

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# Table order: the method, then its references.
METHOD_ORDER = ("collabdm", "merged_local_dm", "central_dm", "real_subset",
                "full_data")
EXTRA_METHODS = ("real_subset", "full_data")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the table: where it lives and how to produce it."""
  table: str  # data set label, e.g. "5G-IDS, no GTP columns"
  method: str  # a METHOD_ORDER entry
  seed: int
  directory: pathlib.Path
  config: object  # the run config
  full_data_epochs: int


def table_label(config) -> str:
  """The data set a run config reads, as the table names it."""
  if config.dataset == "5g_ids":
    return ("5G-IDS, no GTP columns" if config.data_kwargs.get("drop_gtp")
            else "5G-IDS, all features")
  if config.dataset == "nsl_kdd":
    grouping = config.data_kwargs.get("grouping", "5class")
    return f"NSL-KDD, {'5 classes' if grouping == '5class' else grouping}"
  return config.dataset


def plan(dataset_args: Sequence[str], workdir) -> List[Run]:
  """Every run of the table, in a fixed order (see the module docstring)."""
  runs = []
  for arg in dataset_args:
    sweep_config = ids_table.get_config(arg)
    folder = pathlib.Path(workdir) / sweep.sweep_name(sweep_config)
    epochs = int(sweep_config.script.full_data_epochs)
    for cell in sweep.make_cells(sweep_config):
      config = sweep.apply_overrides(sweep_config.base, cell.overrides)
      runs.append(Run(table_label(config), config.method, config.seed,
                      folder / cell.name, config, epochs))
      if config.method != ids_table.METHODS[0]:
        continue
      # The references share the first method's data, partition and seed.
      for extra in EXTRA_METHODS:
        overrides = tuple((p, extra if p == "method" else v)
                          for p, v in cell.overrides)
        extra_config = sweep.apply_overrides(
            sweep_config.base,
            [(p, v) for p, v in cell.overrides if p != "method"])
        if extra == "real_subset":
          extra_config.method = "central_dm"
          extra_config.num_iterations = 0
        else:
          extra_config.method = "full_data"
        runs.append(Run(table_label(config), extra, config.seed,
                        folder / sweep.cell_name(overrides), extra_config,
                        epochs))
  return runs


def execute(run: Run) -> str:
  """Runs ``run`` unless its results.json exists; ``"done"``/``"skipped"``."""
  if (run.directory / "results.json").exists():
    return "skipped"
  run.directory.mkdir(parents=True, exist_ok=True)
  if run.method == "full_data":
    full_data_detector.run(run.config, run.directory, run.full_data_epochs)
  else:
    pipeline.run(run.config, run.directory)
  return "done"


def _mean_std(values):
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), float(np.std(values))


def summarize(runs: Sequence[Run]) -> List[Dict]:
  """One row per (table, method) with the seed statistics of finished runs."""
  groups: Dict = {}
  for run in runs:
    path = run.directory / "results.json"
    if not path.exists():
      continue
    groups.setdefault((run.table, run.method), []).append(
        json.loads(path.read_text()))
  tables = list(dict.fromkeys(r.table for r in runs))
  rows = []
  for table in tables:
    for method in METHOD_ORDER:
      results = groups.get((table, method))
      if not results:
        continue
      row = {"table": table, "dataset": results[0]["dataset"],
             "method": method, "n_seeds": len(results),
             "n_eval_per_seed": results[0]["n_eval"]}
      for key in ("accuracy", "balanced_accuracy", "false_positive_rate"):
        row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(
            [r[f"{key}_mean"] for r in results])
      recall = np.asarray([r["per_class_recall"] for r in results])
      row["per_class_recall_mean"] = recall.mean(0).tolist()
      row["per_class_recall_std"] = recall.std(0).tolist()
      row["upload_bytes_per_client"] = float(np.mean(
          [np.mean(list(r["upload_bytes_per_client"].values()))
           if r.get("upload_bytes_per_client") else 0.0 for r in results]))
      row["wall_s"] = float(np.mean([r["wall_s"]["total"] for r in results]))
      row["commits"] = sorted({results_lib.commit_label(r.get("provenance"))
                               for r in results})
      rows.append(row)
  return rows


CLASS_NAMES = {"5g_ids": ("normal", "attack"),
               "nsl_kdd": ("normal", "DoS", "Probe", "R2L", "U2R")}


def to_markdown(rows: Sequence[Dict]) -> str:
  """The table as Markdown, one section per data set."""
  out = []
  for table in dict.fromkeys(r["table"] for r in rows):
    part = [r for r in rows if r["table"] == table]
    names = CLASS_NAMES.get(part[0]["dataset"],
                            tuple(str(i) for i in range(
                                len(part[0]["per_class_recall_mean"]))))
    out.append(f"### {table}\n")
    out.append("| method | accuracy % | balanced accuracy % | FPR % | "
               "recall per class % (" + ", ".join(names) + ") | "
               "upload per site | wall s |")
    out.append("|---|---|---|---|---|---|---|")
    for r in part:
      recall = ", ".join(f"{100 * m:.1f}" for m in r["per_class_recall_mean"])
      pct = lambda key: results_lib.format_accuracy(r[f"{key}_mean"],
                                                    r[f"{key}_std"])
      # No upload (the references) reads as a dash.
      upload = results_lib.format_bytes(r["upload_bytes_per_client"] or None)
      out.append(
          f"| {r['method']} | {pct('accuracy')} | {pct('balanced_accuracy')} "
          f"| {pct('false_positive_rate')} | {recall} | {upload} "
          f"| {r['wall_s']:.0f} |")
    out.append("")
  commits = sorted({c for r in rows for c in r.get("commits", ())})
  out.append("Made from commits: " + (", ".join(f"`{c}`" for c in commits)
                                      or "none") + ".\n")
  return "\n".join(out)


def write_csv(rows: Sequence[Dict], path) -> pathlib.Path:
  """``rows`` as CSV (fractions, not percent; recalls joined by ';')."""
  fields = ["table", "dataset", "method", "n_seeds", "n_eval_per_seed",
            "accuracy_mean", "accuracy_std", "balanced_accuracy_mean",
            "balanced_accuracy_std", "false_positive_rate_mean",
            "false_positive_rate_std", "per_class_recall_mean",
            "per_class_recall_std", "upload_bytes_per_client", "wall_s",
            "commits"]
  path = pathlib.Path(path)
  with open(path, "w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
      r = dict(r)
      for k in ("per_class_recall_mean", "per_class_recall_std"):
        r[k] = ";".join(f"{v:.6f}" for v in r[k])
      r["commits"] = ";".join(r.get("commits", ()))
      writer.writerow(r)
  return path


def write_runs_csv(runs: Sequence[Run], path) -> pathlib.Path:
  """Every finished run on its own line (the raw material of the table)."""
  path = pathlib.Path(path)
  with open(path, "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(["table", "method", "seed", "accuracy_mean",
                     "accuracy_std", "balanced_accuracy_mean",
                     "false_positive_rate_mean", "per_class_recall",
                     "n_eval", "wall_s", "run", "commit"])
    for run in runs:
      p = run.directory / "results.json"
      if not p.exists():
        continue
      r = json.loads(p.read_text())
      writer.writerow([
          run.table, run.method, run.seed, f"{r['accuracy_mean']:.6f}",
          f"{r['accuracy_std']:.6f}", f"{r['balanced_accuracy_mean']:.6f}",
          f"{r['false_positive_rate_mean']:.6f}",
          ";".join(f"{v:.6f}" for v in r["per_class_recall"]), r["n_eval"],
          r["wall_s"]["total"], run.directory.name,
          results_lib.commit_label(r.get("provenance"))])
  return path


def define_flags():
  """This program's absl flags (defined only when it runs as a program)."""
  flags.DEFINE_string("workdir", None, "Folder of the runs.", required=True)
  flags.DEFINE_list("datasets", list(ids_table.DATASETS),
                    "ids_table.py arguments to run.")
  flags.DEFINE_string(
      "results_dir", str(REPO_ROOT / "experiments" / "results" / "ids_5g"),
      "Where the tables go.")
  flags.DEFINE_bool("collect_only", False, "Only write the tables from disk.")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  logging.basicConfig(level=logging.WARNING,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  runs = plan(FLAGS.datasets, FLAGS.workdir)
  if not FLAGS.collect_only:
    for i, run in enumerate(runs):
      t0 = time.perf_counter()
      status = execute(run)
      print(f"[{i + 1}/{len(runs)}] {run.table} | {run.method} | seed "
            f"{run.seed}: {status} in {time.perf_counter() - t0:.1f}s",
            flush=True)
  rows = summarize(runs)
  results_dir = pathlib.Path(FLAGS.results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  (results_dir / "ids_table.md").write_text(to_markdown(rows))
  write_csv(rows, results_dir / "ids_table.csv")
  write_runs_csv(runs, results_dir / "ids_runs.csv")
  print(to_markdown(rows))
  print(f"tables in {results_dir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
