"""The Flower app: one round through Flower's Message API.

Three levels: the server's round against an in-process grid that answers
with Flower ``Message`` replies (corrupt, failed, duplicate and missing
clients); Flower's simulation engine (``launch.flower``), which must give
``launch.distill``'s synthetic set; and a real federation on localhost
(SuperLink + SuperNodes over HTTP, the app submitted with ``flwr run``).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="the [flower] extra is not installed")

from flwr.app import Error, Message  # noqa: E402

from collabdm_jax import flower_app  # noqa: E402
from collabdm_jax import metrics  # noqa: E402
from collabdm_jax import pipeline  # noqa: E402
from experiments.configs import smoke  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/smoke.py"
BIN = pathlib.Path(sys.executable).parent
# No usage reports from test runs (Flower's telemetry is on by default).
ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0",
           PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           # This checkout's collabdm_jax in every Flower process.
           PYTHONPATH=os.pathsep.join(
               [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


class FakeGrid:
  """A grid whose nodes answer from a table: node id -> reply maker."""

  def __init__(self, answers):
    self.answers = answers
    self.sent = []

  def get_node_ids(self):
    return list(self.answers)

  def send_and_receive(self, messages, *, timeout=None):
    replies = []
    for m in messages:
      self.sent.append(m)
      reply = self.answers[m.metadata.dst_node_id](m)
      if reply is not None:  # None: the node never answers
        replies.append(reply)
    return replies


def test_round_validates_replies_and_tolerates_missing_clients(
    tmp_path, caplog, monkeypatch):
  # Inside a Flower run, the runtime sets the process's run and node ids,
  # which every new Message carries.
  from flwr.supercore.task_identity import TaskIdentity
  monkeypatch.setattr(TaskIdentity, "_run_id", 1)
  monkeypatch.setattr(TaskIdentity, "_node_id", 1)
  monkeypatch.setattr(TaskIdentity, "_task_id", 1)
  config = smoke.get_config()
  config.partition.num_clients = 4
  good = {k: flower_app.client_reply(config, k) for k in (0, 1)}
  blob = good[1]["message"]["message"].numpy().tobytes()
  truncated = flower_app.client_reply(config, 1)
  truncated["message"]["message"] = flwr.app.Array(
      np.frombuffer(blob[:len(blob) // 2], np.uint8))
  truncated["client"]["client-id"] = 2
  answers = {
      11: lambda m: Message(good[0], reply_to=m),
      12: lambda m: Message(good[1], reply_to=m),
      13: lambda m: Message(truncated, reply_to=m),  # claims client 2
      14: lambda m: Message(Error(code=1, reason="disk full"), reply_to=m),
      15: lambda m: Message(good[0], reply_to=m),  # client 0 again
      16: lambda m: None,  # never answers
  }
  grid = FakeGrid(answers)
  results = flower_app.serve_round(grid, config, tmp_path / "out",
                                   connect_timeout_s=0, reply_timeout_s=1)
  # Every node got the one instruction, with the config the clients rebuild.
  assert sorted(m.metadata.dst_node_id for m in grid.sent) == list(answers)
  assert {m.metadata.message_type for m in grid.sent} == {"query.collabdm"}
  sent = grid.sent[0].content["instruction"]["config-json"]
  assert flower_app.config_from_json(sent).to_dict() == json.loads(
      flower_app.config_to_json(config))
  assert results["clients_used"] == [0, 1]
  rejected = results["clients_rejected"]
  assert set(rejected) == {"2", "node 14", "node 15"}
  assert "truncated" in rejected["2"]
  assert "disk full" in rejected["node 14"]
  assert "duplicate client id 0" in rejected["node 15"]
  assert "no message from client 3" in caplog.text
  assert "rejected the reply of node 14" in caplog.text
  # Written as launch.server writes.
  out = tmp_path / "out"
  for name in ("results.json", "synthetic.npz", "config.json",
               "metrics.jsonl", "synthetic.png"):
    assert (out / name).exists(), name
  assert set(results["upload_bytes_per_client"]) == {"0", "1"}
  assert results["upload_bytes_per_client"]["1"] == len(blob)
  # Nothing valid: a clear error, no results.
  bad = FakeGrid({14: answers[14]})
  with pytest.raises(ValueError, match="no valid client message"):
    flower_app.serve_round(bad, config, tmp_path / "none",
                           connect_timeout_s=0, reply_timeout_s=1)
  with pytest.raises(ValueError, match="no SuperNode connected"):
    flower_app.serve_round(FakeGrid({}), config, tmp_path / "none",
                           connect_timeout_s=0, reply_timeout_s=1)


def test_config_files_and_overrides():
  config = flower_app.load_config_file(CONFIG)
  assert config.partition.num_clients == 3
  config = flower_app.apply_overrides(
      config, "num_iterations=5 partition.alpha=0.25 server.weighting=uniform")
  assert (config.num_iterations, config.partition.alpha,
          config.server.weighting) == (5, 0.25, "uniform")
  with pytest.raises(ValueError, match="no field 'nope'"):
    flower_app.apply_overrides(config, "partition.nope=1")
  with pytest.raises(ValueError, match="not path=value"):
    flower_app.apply_overrides(config, "num_iterations")
  with pytest.raises(ValueError, match="not found"):
    flower_app.load_config_file("experiments/configs/missing.py")


@pytest.mark.slow
def test_simulation_gives_the_synthetic_set_of_distill(tmp_path):
  distilled = tmp_path / "distill"
  pipeline.run_distillation(smoke.get_config(), distilled)
  out = tmp_path / "flower"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.flower", f"--config={CONFIG}",
       f"--workdir={out}"], cwd=ROOT, env=ENV, capture_output=True,
      text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((out / "results.json").read_text())
  assert results["clients_used"] == [0, 1, 2]
  assert results["clients_rejected"] == {}
  a = np.load(distilled / "synthetic.npz")["images"]
  b = np.load(out / "synthetic.npz")["images"]
  np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
  # The simulated clients wrote their config and local DM losses.
  for k in range(3):
    rows = metrics.read_metrics(out / "clients" / f"client_{k:05d}")
    assert {r["client"] for r in rows} == {k}
  assert {r["phase"] for r in metrics.read_metrics(out)} >= {
      "server", "eval_final"}


def _start(args, log):
  # A session of its own, so the node's SuperExec children stop with it.
  return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc):
  try:
    os.killpg(proc.pid, signal.SIGTERM)
  except ProcessLookupError:
    return
  try:
    proc.wait(timeout=20)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None,
                    reason="flwr's command-line tools are not installed")
def test_federation_on_localhost_with_flwr_run(tmp_path):
  """SuperLink + 2 of 3 SuperNodes; the app is submitted with ``flwr run``."""
  home = tmp_path / "flwr_home"
  home.mkdir()
  link = _free_port()
  (home / "config.toml").write_text(
      '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
  env_home = {"FLWR_HOME": str(home)}
  ENV.update(env_home)
  logs = tmp_path / "logs"
  logs.mkdir()
  procs = []
  try:
    procs.append(_start([str(BIN / "flower-superlink"), "--insecure",
                         "--port", str(link),
                         "--database", str(tmp_path / "state.db")],
                        open(logs / "superlink.log", "w")))
    # Client 2's node never comes: the server goes on with clients 0 and 1.
    for k in (0, 1):
      procs.append(_start(
          [str(BIN / "flower-supernode"), "--insecure",
           "--superlink", f"127.0.0.1:{link}", "--port", str(_free_port()),
           "--node-config", f"partition-id={k}"],
          open(logs / f"node{k}.log", "w")))
    out = tmp_path / "out"
    run_config = (f'config="{CONFIG}" workdir="{out}" connect-timeout=60.0 '
                  'reply-timeout=900.0')
    deadline = time.monotonic() + 60
    while True:  # until the SuperLink accepts the run
      proc = subprocess.run(
          [str(BIN / "flwr"), "run", ".", "test", "--run-config", run_config,
           "--stream"], cwd=ROOT, env=ENV, capture_output=True, text=True,
          timeout=1200)
      if proc.returncode == 0 or time.monotonic() > deadline:
        break
      time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "results.json").exists(), proc.stdout[-6000:]
    results = json.loads((out / "results.json").read_text())
    assert results["clients_used"] == [0, 1]
    assert results["clients_rejected"] == {}
    assert 0.0 <= results["accuracy_mean"] <= 1.0
    assert "no message from client 2" in proc.stdout + proc.stderr
    syn = np.load(out / "synthetic.npz")
    assert syn["images"].shape == (20, 28, 28, 1)
    for k in (0, 1):
      assert (out / "clients" / f"client_{k:05d}" / "metrics.jsonl").exists()
  finally:
    for p in reversed(procs):
      _stop(p)
