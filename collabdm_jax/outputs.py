"""What a run writes to its workdir, and the numbers in ``results.json``.

``run_outputs`` writes ``config.json`` at the start and opens
``metrics.jsonl`` and the TensorBoard files; at the end ``save_synthetic``
writes ``synthetic.npz`` and ``write_results`` ``results.json``, whose
record ``results_record`` builds: accuracies, detection metrics, upload
sizes, wall seconds, environment and provenance. CollabDM and every
baseline write the same files with the same fields.
"""

import contextlib
import json
import os
import pathlib
from typing import Dict, Optional, Sequence

import jax
import numpy as np

from collabdm_jax import evaluate
from collabdm_jax import metrics as metrics_lib
from collabdm_jax import provenance
from collabdm_jax import setup as setup_lib


@contextlib.contextmanager
def run_outputs(config, workdir):
  """Starts a run's outputs in ``workdir``; yields its metrics writer.

  Writes ``config.json`` at once and opens ``metrics.jsonl`` plus the
  TensorBoard event files (``metrics.MetricsWriter``), closed when the block
  exits (also on error: rows written so far stay). In a multi-process run
  only process 0 writes; the others get ``None``.
  """
  workdir = pathlib.Path(workdir)
  if jax.process_index() > 0:
    yield None
    return
  workdir.mkdir(parents=True, exist_ok=True)
  metrics_lib.write_config(workdir, config)
  with metrics_lib.MetricsWriter(workdir) as writer:
    yield writer


def save_synthetic(path, s: setup_lib.Setup, images, labels):
  """Writes a synthetic set as .npz: normalised images ``[M, ...]``, labels
  ``[M]``, class names, the normalisation and whether the images are PAE
  mosaics (``pae``)."""
  np.savez(path, images=np.asarray(images), labels=np.asarray(labels),
           class_names=np.asarray(s.dataset.class_names),
           mean=np.asarray(s.dataset.mean), std=np.asarray(s.dataset.std),
           pae=np.asarray(bool(s.config.server.pae)))


def environment() -> Dict:
  """JAX backend, devices, process count and version of this run."""
  return {"backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "process_count": jax.process_count(), "jax": jax.__version__}


def method_name(config) -> str:
  """``config.method``, with ``-pae`` for CollabDM with PAE."""
  method = config.method
  return f"{method}-pae" if method == "collabdm" and config.server.pae else method


def write_results(workdir, results):
  """Writes ``results.json`` atomically (a reader never sees half a file)."""
  tmp = pathlib.Path(workdir) / "results.json.tmp"
  tmp.write_text(json.dumps(results, indent=2, default=str))
  os.replace(tmp, pathlib.Path(workdir) / "results.json")


def detection_metrics(s: setup_lib.Setup, predictions) -> Dict:
  """Mean and std over eval nets of what a security team reads.

  Balanced accuracy, per-class recall and (for tabular intrusion data, where
  class 0 is benign traffic) the false-positive rate.
  """
  if predictions is None:
    return {}
  benign = 0 if s.dataset.kind == "tabular" else None
  m = evaluate.classification_metrics(np.asarray(predictions),
                                      s.dataset.test_y, s.dataset.num_classes,
                                      benign_class=benign)
  out = {"balanced_accuracy_mean": float(np.mean(m["balanced_accuracy"])),
         "balanced_accuracy_std": float(np.std(m["balanced_accuracy"])),
         "per_class_recall": np.nanmean(m["per_class_recall"], 0).tolist()}
  if benign is not None:
    out["false_positive_rate_mean"] = float(np.mean(m["false_positive_rate"]))
    out["false_positive_rate_std"] = float(np.std(m["false_positive_rate"]))
  return out


def results_record(s: setup_lib.Setup, timings, accuracies: Sequence[float],
                   predictions, upload: Dict[str, int],
                   extra: Optional[Dict] = None) -> Dict:
  """The ``results.json`` record of a finished run.

  ``accuracies`` of the ``n_eval`` networks (mean and population std),
  ``predictions [n_eval, N_test]`` (or None) for ``detection_metrics``,
  ``upload`` bytes per client id; ``extra`` fields are added last.
  """
  acc = [float(a) for a in accuracies]
  results = {
      "config": s.config.to_dict(),
      "method": method_name(s.config),
      "dataset": s.config.dataset,
      "num_clients": s.config.partition.num_clients,
      "alpha": s.config.partition.alpha,
      "ipc": s.config.server.ipc,
      "wall_s": {k: round(v, 3) for k, v in timings.items()},
      "client_class_counts": s.partition.counts.tolist(),
      "environment": environment(),
      "provenance": provenance.finish(s.provenance),
      "accuracy_mean": float(np.mean(acc)),
      "accuracy_std": float(np.std(acc)),
      "accuracies": acc,
      "n_eval": len(acc),
      "upload_bytes_per_client": upload,
      "upload_bytes_total": int(sum(upload.values())),
  }
  results.update(detection_metrics(s, predictions))
  results.update(extra or {})
  return results
