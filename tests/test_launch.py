"""End-to-end: launch.distill, and launch.client x K + launch.server by hand."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from collabdm_jax import metrics
from collabdm_jax import pipeline
from collabdm_jax import protocol
from collabdm_jax import setup as setup_lib
from collabdm_jax import stages
from collabdm_jax import wire
from experiments.configs import smoke
from tests import test_provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/smoke.py"


def run(module, *flags):
  proc = subprocess.run([sys.executable, "-m", module, f"--config={CONFIG}",
                         *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("distill")
  proc = run("launch.distill", f"--workdir={workdir}")
  return workdir, proc


@pytest.mark.slow  # whole runs of the launchers in subprocesses
def test_distill_writes_results_and_synthetic_set(distilled):
  workdir, proc = distilled
  results = json.loads((workdir / "results.json").read_text())
  for key in ("config", "accuracy_mean", "accuracy_std",
              "upload_bytes_per_client", "wall_s"):
    assert key in results
  assert 0.0 <= results["accuracy_mean"] <= 1.0
  assert len(results["accuracies"]) == 2
  assert set(results["upload_bytes_per_client"]) == {"0", "1", "2"}
  # Each message carries T x C x D float32 means at least.
  assert min(results["upload_bytes_per_client"].values()) > 3 * 10 * 512 * 4
  for phase in ("local_distill", "client_stats", "server", "evaluate"):
    assert results["wall_s"][phase] > 0
  syn = np.load(workdir / "synthetic.npz")
  assert syn["images"].shape == (20, 28, 28, 1)
  np.testing.assert_array_equal(syn["labels"], np.repeat(np.arange(10), 2))
  assert "test accuracy" in proc.stdout
  for png in ("synthetic.png", "client_class_counts.png"):
    assert (workdir / png).stat().st_size > 1000
  assert "total" in proc.stderr  # the client x class count table is logged
  test_provenance.check_record(results["provenance"])
  assert "launch/distill.py" in results["provenance"]["command"]
  assert "evaluation (2 convnet nets x 3 epochs" in proc.stderr


@pytest.mark.slow  # whole runs of the launchers in subprocesses
def test_distill_writes_config_and_per_step_metrics(distilled):
  workdir, _ = distilled
  config = smoke.get_config()
  assert json.loads((workdir / "config.json").read_text()) == json.loads(
      json.dumps(config.to_dict(), default=str))
  rows = metrics.read_metrics(workdir)
  by_phase = {}
  for r in rows:
    by_phase.setdefault(r["phase"], []).append(r)
  # Local DM: one row per client and iteration, per-class losses that sum
  # to the total, zero for the classes a client lacks.
  results = json.loads((workdir / "results.json").read_text())
  counts = np.asarray(results["client_class_counts"])
  local = by_phase["local_dm"]
  assert sorted((r["client"], r["step"]) for r in local) == [
      (k, t) for k in range(3) for t in range(config.local.iterations)]
  for r in local:
    assert len(r["class_loss"]) == 10
    np.testing.assert_allclose(sum(r["class_loss"]), r["loss"], rtol=1e-5)
    absent = counts[r["client"]] == 0
    assert all(r["class_loss"][c] == 0 for c in np.flatnonzero(absent))
    assert r["loss"] > 0
  # Server: one row per iteration with a positive loss for every class.
  server = by_phase["server"]
  assert [r["step"] for r in server] == list(range(config.num_iterations))
  for r in server:
    assert len(r["class_loss"]) == 10 and min(r["class_loss"]) > 0
    np.testing.assert_allclose(sum(r["class_loss"]), r["loss"], rtol=1e-5)
  # Evaluation: the final rows hold results.json's accuracies.
  final = by_phase["eval_final"]
  assert [r["net"] for r in final] == [0, 1]
  assert [r["accuracy"] for r in final] == pytest.approx(results["accuracies"])
  assert all(r["step"] == config.eval.epochs - 1 and r["train_loss"] > 0
             for r in final)
  # The evaluator reports per-epoch losses.
  assert sorted((r["net"], r["step"]) for r in by_phase["eval"]) == [
      (n, e) for n in range(2) for e in range(config.eval.epochs)]
  # Rows are written as they happen: times never decrease.
  times = [r["time"] for r in rows]
  assert times == sorted(times)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "loss_curves.png").stat().st_size > 1000


@pytest.mark.slow  # whole runs of the launchers in subprocesses
def test_client_server_processes_reproduce_distill(distilled, tmp_path):
  workdir, _ = distilled
  msgs = tmp_path / "msgs"
  for k in range(3):
    run("launch.client", f"--client_id={k}", f"--message_dir={msgs}")
  out = tmp_path / "server"
  run("launch.server", f"--message_dir={msgs}", f"--workdir={out}")
  # Each client's config and local DM losses land beside its message.
  for k in range(3):
    run_dir = wire.client_workdir(msgs, k)
    assert (run_dir / "config.json").exists()
    assert {r["client"] for r in metrics.read_metrics(run_dir)} == {k}
  assert {r["phase"] for r in metrics.read_metrics(out)} >= {
      "server", "eval_final"}
  assert (out / "config.json").exists()
  a = np.load(workdir / "synthetic.npz")["images"]
  b = np.load(out / "synthetic.npz")["images"]
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_server_tolerates_missing_and_rejects_invalid(tmp_path, caplog):
  config = smoke.get_config()
  s = setup_lib.setup(config)
  msgs = stages.client_messages(s, [0, 1])
  d = tmp_path / "msgs"
  d.mkdir()
  protocol.save_message(wire.message_path(d, 0), msgs[0])
  # Client 1's file is truncated in transit; client 2 never sends.
  blob = protocol.encode_message(msgs[1])
  wire.message_path(d, 1).write_bytes(blob[:len(blob) // 2])
  config.checkpoint.every = 1
  results = pipeline.run_server(config, d, tmp_path / "out")
  assert results["clients_used"] == [0]
  assert "truncated" in results["clients_rejected"]["1"]
  assert "no message from client 2" in caplog.text
  # A relaunch finishes from the server checkpoint and keeps the record of
  # which clients were used and rejected.
  again = pipeline.run_server(config, d, tmp_path / "out")
  assert again["resumed_from_t"] == config.num_iterations
  assert again["clients_used"] == [0]
  assert again["clients_rejected"] == results["clients_rejected"]
  # Same images, same seeded evaluation: the same accuracies.
  assert again["accuracies"] == results["accuracies"]
  # A message made under another root key is rejected with that reason.
  other = config.copy_and_resolve_references()
  other.seed = 1
  (foreign,) = stages.client_messages(setup_lib.setup(other), [0])
  protocol.save_message(wire.message_path(d, 0), foreign)
  with pytest.raises(ValueError, match="no valid client message"):
    pipeline.run_server(config, d, tmp_path / "out2")
  assert "root key" in caplog.text


def test_std_weight_requires_second_moments():
  config = smoke.get_config()
  config.server.std_weight = 1.0
  with pytest.raises(ValueError, match="second_moments"):
    setup_lib.setup(config)


def test_shared_pass_leaves_the_uploaded_statistics_unchanged():
  """local.networks only changes the local images: the statistics a client
  uploads are bit-identical with local DM on the shared networks or not."""
  msgs = {}
  for networks in ("shared", "independent"):
    config = smoke.get_config()
    config.local.networks = networks
    s = setup_lib.setup(config)
    msgs[networks] = stages.client_messages(s, [0, 1, 2])
  for a, b in zip(msgs["shared"], msgs["independent"]):
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.class_counts, b.class_counts)
    np.testing.assert_array_equal(a.local_labels, b.local_labels)
    assert a.local_images.shape == b.local_images.shape
    assert not np.array_equal(a.local_images, b.local_images)
  config = smoke.get_config()
  config.local.networks = "private"
  with pytest.raises(ValueError, match="local.networks"):
    stages.client_messages(setup_lib.setup(config), [0])
