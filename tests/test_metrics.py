"""Metrics: JSON lines and TensorBoard files, config.json, loss curves.

The launchers' real runs are checked in test_launch.py and test_sweep.py
(and the Flower app's in test_flower.py); these are the writer's own rules.
"""

import json
import struct
import subprocess
import sys
import types

import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from collabdm_jax import metrics
from collabdm_jax import pipeline
from collabdm_jax import plots
from experiments.configs import smoke


def tensorboard_scalars(logdir):
  """{tag: [(step, value)]} read back from the event files (TFRecord)."""
  out = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]  # skip the length's CRC
      pos += 12 + length + 4  # and the record's CRC
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_rows_and_tensorboard_hold_the_same_values(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    w.write("server", 0, loss=3.5, class_loss=[1.0, 2.5])
    w.write("local_dm", 4, {"client": 7}, loss=np.float32(0.25))
    w.write("eval", 1, {"net": 0}, train_loss=float("nan"))
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["phase"], r["step"]) for r in rows] == [
      ("server", 0), ("local_dm", 4), ("eval", 1)]
  assert rows[0]["class_loss"] == [1.0, 2.5] and rows[0]["loss"] == 3.5
  assert rows[1]["client"] == 7 and rows[1]["loss"] == 0.25
  assert rows[2]["train_loss"] is None  # NaN is not JSON
  assert all(r["time"] >= 0 for r in rows)
  tb = tensorboard_scalars(tmp_path / "tensorboard")
  assert tb == {"server/loss": [(0, 3.5)], "server/class_loss/0": [(0, 1.0)],
                "server/class_loss/1": [(0, 2.5)],
                "local_dm/client_7/loss": [(4, 0.25)]}
  with pytest.raises(ValueError, match="scalar or 1-D"):
    with metrics.MetricsWriter(tmp_path) as w:
      w.write("server", 1, loss=np.zeros((2, 2)))


def test_rows_are_appended_and_bad_lines_named(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write("server", 0, loss=1.0)
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write("server", 1, loss=2.0)
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [0, 1]
  assert not (tmp_path / "tensorboard").exists()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"phase": "server", "step": 2, "loss"\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:3: not JSON"):
    metrics.read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"loss": 1}\n')
  with pytest.raises(ValueError, match=":1: a row needs 'phase' and 'step'"):
    metrics.read_metrics(tmp_path)


def test_eval_rows_use_per_epoch_losses_when_reported(tmp_path):
  per_epoch = np.array([[2.0, 1.5, 1.0], [2.2, 1.2, 0.9]])
  with_epochs = types.SimpleNamespace(
      train_loss=per_epoch[:, -1], accuracies=np.array([0.5, 0.75]),
      train_loss_per_epoch=per_epoch)
  without = types.SimpleNamespace(train_loss=np.array([1.0]),
                                  accuracies=np.array([0.25]))
  with metrics.MetricsWriter(tmp_path / "a", tensorboard=False) as w:
    metrics.write_eval(w, with_epochs, epochs=3)
  with metrics.MetricsWriter(tmp_path / "b", tensorboard=False) as w:
    metrics.write_eval(w, without, epochs=3)
  metrics.write_eval(None, without, epochs=3)  # no writer: nothing to do
  rows = metrics.read_metrics(tmp_path / "a")
  curve = [(r["net"], r["step"], r["train_loss"]) for r in rows
           if r["phase"] == "eval"]
  assert curve == [(n, e, per_epoch[n, e]) for n in range(2) for e in range(3)]
  final = [(r["net"], r["step"], r["accuracy"]) for r in rows
           if r["phase"] == "eval_final"]
  assert final == [(0, 2, 0.5), (1, 2, 0.75)]
  rows = metrics.read_metrics(tmp_path / "b")
  assert [(r["phase"], r["accuracy"]) for r in rows] == [("eval_final", 0.25)]


def test_loss_curves_draw_each_phase(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    for t in range(5):
      w.write("server", t, loss=10.0 - t)
      for k in range(2):
        w.write("local_dm", t, {"client": k}, loss=5.0 - t + k)
    w.write("server", 4, loss=1.0)  # a resumed run rewrites step 4
  rows = metrics.read_metrics(tmp_path)
  steps, values = plots.loss_series(rows, "server", None, "loss")[None]
  np.testing.assert_array_equal(steps, np.arange(5))
  np.testing.assert_array_equal(values, [10, 9, 8, 7, 1])
  assert set(plots.loss_series(rows, "local_dm", "client", "loss")) == {0, 1}
  out = plots.loss_curves(tmp_path, tmp_path / "loss.png", panel_px=(200, 100))
  img = matplotlib.image.imread(str(out))
  # Two panels (local DM, server), each 70 + 200 + 20 wide, 30 + 100 + 50 high.
  assert img.shape[:2] == (180, 580)
  with pytest.raises(ValueError, match="no loss rows"):
    plots.loss_curves([{"phase": "other", "step": 0}], tmp_path / "x.png")


def test_config_is_written_before_the_run_can_fail(tmp_path):
  config = smoke.get_config()
  config.server.std_weight = 1.0  # invalid without second moments
  with pytest.raises(ValueError, match="second_moments"):
    pipeline.run_distillation(config, tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["server"]["std_weight"] == 1.0
  assert written["num_iterations"] == config.num_iterations


def test_metrics_and_the_pipeline_import_no_tensorflow():
  code = ("import sys; from collabdm_jax import pipeline, plots; "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, timeout=300)
  assert out.stdout.strip() == "False"
