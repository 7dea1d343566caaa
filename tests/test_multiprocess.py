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
