"""A real two-process run on this machine: JAX's distributed runtime, gloo.

Two processes with two simulated CPU devices each join one runtime over
localhost (``jax.distributed`` with CPU collectives through gloo). Each
process simulates only its own half of the clients; the client pass spans
all four devices; the server targets and the local-image pool are combined
across processes. The aggregated targets and the synthetic set must equal
those of a single process running every client.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Starts several JAX processes that run whole distillations.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from collabdm_jax import client, parallel, pipeline, server, stages
    from collabdm_jax import setup as setup_lib
    from experiments.configs import smoke

    port, nprocs, pid, workdir = (sys.argv[1], int(sys.argv[2]),
                                  int(sys.argv[3]), sys.argv[4])
    if nprocs > 1:
        parallel.initialize_distributed(f"localhost:{port}", nprocs, pid,
                                        cpu_collectives="gloo")
    cfg = smoke.get_config()
    cfg.partition.num_clients = 4
    cfg.eval.num_nets = 1
    cfg.eval.epochs = 1
    cfg.checkpoint.every = 0

    # The aggregated targets, straight from the library.
    s = setup_lib.setup(cfg)
    ids = parallel.process_clients(cfg.partition.num_clients)
    msgs = stages.client_messages(s, ids)
    targets = server.aggregate_messages(msgs, cfg.server.weighting)
    # The whole run, as launch/distill.py does it.
    results = pipeline.run(cfg, workdir)
    if jax.process_index() == 0:
        np.savez(f"{workdir}/targets.npz", mean=np.asarray(targets.mean),
                 valid=np.asarray(targets.valid))
        json.dump({"ids": ids, "devices": len(jax.devices()),
                   "local_devices": len(jax.local_devices()),
                   "processes": jax.process_count(),
                   "upload": results["upload_bytes_per_client"]},
                  open(f"{workdir}/worker.json", "w"))
    print("worker", pid, "done", ids)
    """)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _wait_all(procs, timeout):
  """Each process's output; kills stragglers, asserts every one exited 0."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _run(nprocs, devices_per_process, workdir, timeout=600):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                      f"{devices_per_process}")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER, str(port), str(nprocs), str(pid),
       str(workdir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for pid in range(nprocs)]
  _wait_all(procs, timeout)
  return json.loads((workdir / "worker.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  single = tmp_path_factory.mktemp("single")
  multi = tmp_path_factory.mktemp("multi")
  return _run(1, 1, single), single, _run(2, 2, multi), multi


def test_two_processes_share_the_clients_and_devices(runs):
  info1, _, info2, _ = runs
  assert info1["processes"] == 1 and info1["ids"] == [0, 1, 2, 3]
  assert info2["processes"] == 2 and info2["devices"] == 4
  assert info2["local_devices"] == 2
  # Process 0 simulated only its own half of the clients.
  assert info2["ids"] == [0, 1]
  # Upload sizes of all clients reach process 0.
  assert info2["upload"] == info1["upload"]


def test_two_processes_give_the_single_process_targets_and_set(runs):
  _, single, _, multi = runs
  t1, t2 = np.load(single / "targets.npz"), np.load(multi / "targets.npz")
  np.testing.assert_array_equal(t1["valid"], t2["valid"])
  assert t1["valid"].any()
  np.testing.assert_allclose(t2["mean"], t1["mean"], rtol=1e-5, atol=1e-6)
  s1, s2 = (np.load(d / "synthetic.npz") for d in (single, multi))
  np.testing.assert_array_equal(s1["labels"], s2["labels"])
  np.testing.assert_allclose(s2["images"], s1["images"], rtol=1e-4, atol=1e-4)
  r1, r2 = (json.loads((d / "results.json").read_text())
            for d in (single, multi))
  assert r2["environment"]["process_count"] == 2
  assert r1["environment"]["process_count"] == 1


# --------------------------------------------------------------------------
# launch.server in two processes: each reads its own clients' files.
# --------------------------------------------------------------------------

SERVER_FLAGS = ["--config=experiments/configs/smoke.py",
                "--config.partition.num_clients=4", "--config.eval.num_nets=1",
                "--config.eval.epochs=1", "--config.checkpoint.every=0"]


def _server_config():
  from experiments.configs import smoke
  cfg = smoke.get_config()
  cfg.partition.num_clients = 4
  cfg.eval.num_nets = 1
  cfg.eval.epochs = 1
  cfg.checkpoint.every = 0
  return cfg


def _launch_server(nprocs, message_dir, workdirs, timeout=600):
  """``python -m launch.server`` in ``nprocs`` processes (one CPU device each);
  process p writes to ``workdirs[p]``. Returns each process's output."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT)
  port = _free_port()
  procs = []
  for pid in range(nprocs):
    dist = ([f"--coordinator_address=localhost:{port}",
             f"--num_processes={nprocs}", f"--process_id={pid}",
             "--cpu_collectives=gloo"] if nprocs > 1 else [])
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "launch.server", *SERVER_FLAGS, *dist,
         f"--message_dir={message_dir}", f"--workdir={workdirs[pid]}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  return _wait_all(procs, timeout)


@pytest.fixture(scope="module")
def server_runs(tmp_path_factory):
  """Clients 0-3 write their files; then one bad and one missing client.

  ``mixed``: client 1's file is corrupt and client 3's is missing, so each
  process of two has one good client. ``lopsided``: clients 2 and 3 are
  missing, so process 1 has no message at all.
  """
  from collabdm_jax import pipeline
  from collabdm_jax import wire
  cfg = _server_config()
  base = tmp_path_factory.mktemp("server_msgs")
  for k in range(4):
    pipeline.run_client(cfg, k, base)
  out = {}
  for name, corrupt, missing in (("mixed", [1], [3]),
                                 ("lopsided", [], [2, 3])):
    msg_dir = tmp_path_factory.mktemp(name)
    for k in range(4):
      if k in missing:
        continue
      data = wire.message_path(base, k).read_bytes()
      wire.message_path(msg_dir, k).write_bytes(
          data[:len(data) // 2] if k in corrupt else data)
    single = tmp_path_factory.mktemp(name + "_single")
    w0, w1 = (tmp_path_factory.mktemp(name + "_p0"),
              tmp_path_factory.mktemp(name + "_p1") / "never")
    _launch_server(1, msg_dir, [single])
    outs = _launch_server(2, msg_dir, [w0, w1])
    out[name] = (single, w0, w1, outs)
  return out


@pytest.mark.parametrize("name", ["mixed", "lopsided"])
def test_two_server_processes_give_the_single_process_outputs(server_runs,
                                                             name):
  single, w0, w1, outs = server_runs[name]
  # Each process read only its own clients' files.
  assert "process 0 of 2 reads the messages of clients [0, 1]" in outs[0]
  assert "process 1 of 2 reads the messages of clients [2, 3]" in outs[1]
  for k in (0, 1):
    assert f"client_{k:05d}" not in outs[1]
  for k in (2, 3):
    assert f"client_{k:05d}" not in outs[0]
  # Process 0 wrote everything; process 1 nothing.
  assert not w1.exists()
  r1, r2 = (json.loads((d / "results.json").read_text()) for d in (single, w0))
  for key in ("clients_used", "clients_rejected", "upload_bytes_per_client",
              "accuracies", "n_eval"):
    assert r2[key] == r1[key], key
  assert r2["environment"]["process_count"] == 2
  if name == "mixed":
    assert r1["clients_used"] == [0, 2] and list(r1["clients_rejected"]) == ["1"]
  else:
    assert r1["clients_used"] == [0, 1] and r1["clients_rejected"] == {}
  s1, s2 = (np.load(d / "synthetic.npz") for d in (single, w0))
  np.testing.assert_array_equal(s1["labels"], s2["labels"])
  np.testing.assert_allclose(s2["images"], s1["images"], rtol=1e-5, atol=1e-5)
  assert (w0 / "config.json").exists() and (w0 / "metrics.jsonl").exists()
