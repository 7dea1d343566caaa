"""Per-step metrics of a run: JSON lines plus TensorBoard event files.

Every launcher opens one ``MetricsWriter`` on its workdir. Each call to
``write`` appends one JSON object to ``WORKDIR/metrics.jsonl`` (flushed at
once, so a killed run keeps every row written so far and ``tail -f`` shows
progress) and adds the same scalars to TensorBoard event files under
``WORKDIR/tensorboard`` (``tensorboard --logdir WORKDIR/tensorboard``),
written by ``tensorboardX``, which needs no TensorFlow.

A row is ``{"phase": str, "step": int, "time": float, <labels>, <values>}``:

* ``phase``: ``local_dm`` (a client's local distillation; label ``client``)
  and ``server``, each with values ``loss`` (the sum over classes) and
  ``class_loss`` (the list of per-class losses, 0 for a class the client
  lacks), ``eval`` (label ``net``,
  value ``train_loss``: one evaluation network's mean training loss of an
  epoch) and ``eval_final`` (label ``net``, values ``train_loss`` of the
  final epoch and the network's test ``accuracy``);
* ``step``: the iteration (or epoch) the values belong to, from 0;
* ``time``: seconds since the writer was opened.

TensorBoard tags are ``<phase>[/<label>_<id>...]/<value>``, e.g.
``local_dm/client_3/loss`` or ``server/class_loss/7``.
"""

import json
import math
import pathlib
import time
from typing import Dict, Iterator, List, Optional

import numpy as np
import tensorboardX

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"


def write_config(workdir, config) -> pathlib.Path:
  """Writes ``config`` (a ConfigDict or dict) to ``WORKDIR/config.json``.

  Called when a run starts, so a run that dies early still records what it
  was asked to do. ``ml_collections.ConfigDict(json.load(f))`` reads it back.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  path = workdir / CONFIG_FILE
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(as_dict, indent=2, sort_keys=True, default=str))
  tmp.replace(path)
  return path


def _scalar(value) -> Optional[float]:
  """A finite Python float, or None for NaN/inf (JSON has no NaN)."""
  v = float(value)
  return v if math.isfinite(v) else None


class MetricsWriter:
  """Appends metric rows to ``metrics.jsonl`` and TensorBoard event files.

  Args:
    workdir: the run's output directory (created if missing).
    tensorboard: also write TensorBoard event files (under
      ``WORKDIR/tensorboard``).

  Use as a context manager, or call ``close``. Rows of an earlier run in the
  same workdir (e.g. before a resume) are kept: a reader takes, per phase
  and labels, the last row of each step.
  """

  def __init__(self, workdir, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / METRICS_FILE
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = (tensorboardX.SummaryWriter(str(self.workdir / TENSORBOARD_DIR))
                if tensorboard else None)
    self._start = time.perf_counter()

  def write(self, phase: str, step: int, labels: Optional[Dict] = None,
            **values):
    """Writes one row: ``values`` (scalars, or 1-D sequences) at ``step``.

    ``labels`` (e.g. ``{"client": 3}``) identify whose values they are.
    Non-finite values are written as JSON ``null`` (and skipped in
    TensorBoard).
    """
    labels = dict(labels or {})
    step = int(step)
    row = {"phase": phase, "step": step,
           "time": round(time.perf_counter() - self._start, 4)}
    row.update({k: int(v) for k, v in labels.items()})
    prefix = "/".join([phase] + [f"{k}_{int(v)}" for k, v in labels.items()])
    for name, value in values.items():
      arr = np.asarray(value, np.float64)
      if arr.ndim == 0:
        row[name] = _scalar(arr)
        if self._tb is not None and row[name] is not None:
          self._tb.add_scalar(f"{prefix}/{name}", row[name], step)
      elif arr.ndim == 1:
        row[name] = [_scalar(v) for v in arr]
        if self._tb is not None:
          for i, v in enumerate(row[name]):
            if v is not None:
              self._tb.add_scalar(f"{prefix}/{name}/{i}", v, step)
      else:
        raise ValueError(f"metric {name!r} must be a scalar or 1-D, got "
                         f"shape {arr.shape}")
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_eval(writer: Optional[MetricsWriter], result, epochs: int):
  """Rows of one evaluation (``evaluate.EvalResult``).

  ``eval`` rows, one per network and epoch, when the result carries the
  per-epoch training loss ``train_loss_per_epoch`` ``[num_nets, epochs]``;
  always one ``eval_final`` row per network (at step ``epochs - 1``) with
  its final-epoch training loss and test accuracy.
  """
  if writer is None:
    return
  per_epoch = getattr(result, "train_loss_per_epoch", None)
  if per_epoch is not None:
    per_epoch = np.asarray(per_epoch)
    for net, losses in enumerate(per_epoch):
      for epoch, loss in enumerate(losses):
        writer.write("eval", epoch, {"net": net}, train_loss=loss)
  for net, (loss, acc) in enumerate(zip(np.asarray(result.train_loss),
                                        np.asarray(result.accuracies))):
    writer.write("eval_final", max(int(epochs) - 1, 0), {"net": net},
                 train_loss=loss, accuracy=acc)


def read_metrics(path) -> List[Dict]:
  """The rows of a ``metrics.jsonl`` (a file or a workdir), in file order.

  Raises:
    FileNotFoundError: if there is no such file.
    ValueError: naming the line, if a line is not a JSON object with
      ``phase`` and ``step``.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  return list(_iter_rows(path))


def _iter_rows(path: pathlib.Path) -> Iterator[Dict]:
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e})") from e
      if not isinstance(row, dict) or "phase" not in row or "step" not in row:
        raise ValueError(f"{path}:{n}: a row needs 'phase' and 'step'")
      yield row
