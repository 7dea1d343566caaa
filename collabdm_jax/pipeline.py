"""A whole run, as the launchers drive it: only the orchestration.

``run`` dispatches ``config.method``: CollabDM (``run_distillation``, every
client and the server simulated in one process) or a baseline of the
``baselines`` registry. ``run_client`` and ``run_server`` are CollabDM split
across processes (one per client plus the server) that exchange message
files; ``serve`` is the server's job around any transport (files, Flower).
Each path builds a ``setup.Setup`` from the config, runs the ``stages``
(client messages, server synthesis, evaluation), sends messages through
``wire`` exactly as a deployment would, and writes the ``outputs``; one
``_finish`` evaluates and writes the results of every method.

Configs are ``ml_collections.ConfigDict``s as in ``experiments/configs/``
(``default.py`` declares every field).
"""

import logging
import pathlib
import time
from typing import Dict

import jax
import numpy as np

from collabdm_jax import baselines
from collabdm_jax import outputs
from collabdm_jax import parallel
from collabdm_jax import partition as partition_lib
from collabdm_jax import progress
from collabdm_jax import server as server_lib
from collabdm_jax import setup as setup_lib
from collabdm_jax import signing
from collabdm_jax import stages
from collabdm_jax import wire

log = logging.getLogger("collabdm_jax")


def run(config, workdir) -> Dict:
  """Runs ``config.method``: CollabDM or one of ``baselines.RUNNERS``.

  Every method sees the same data, partition, budget and evaluator; image
  baselines are evaluated exactly like CollabDM's synthetic set, model
  baselines (FedAvg, DENSE) report their global model's test accuracy.
  """
  if config.method == "collabdm":
    return run_distillation(config, workdir)
  runner = baselines.runner(config.method)
  with outputs.run_outputs(config, workdir) as metrics:
    t0 = time.perf_counter()
    timings = {}
    with progress.timed(timings, "setup"):
      s = setup_lib.setup(config)
    out = runner(s, timings)
    # A baseline's own record (e.g. FedAvg's chosen learning rates and
    # epochs, DENSE's teacher accuracies) goes into results.json as is.
    return _finish(s, workdir, out, timings, t0,
                   out.get("upload_bytes_per_client", {}), out.get("extra"),
                   metrics=metrics)


def _finish(s, workdir, out, timings, t0, upload, extra=None, metrics=None):
  """Evaluates a method's output and writes ``synthetic.npz`` and
  ``results.json``; returns the results.

  ``out`` holds a synthetic set (``images [M, ...]``, ``labels [M]``), which
  is evaluated (``stages.evaluate_images``) and saved, or a model's test
  result (``accuracies``, ``predictions``). ``timings["total"]`` is the wall
  time since ``t0``, evaluation included.
  """
  workdir = pathlib.Path(workdir)
  if "images" in out:
    x, y = np.asarray(out["images"]), np.asarray(out["labels"])
    res = stages.evaluate_images(s, x, y, timings, metrics)
    outputs.save_synthetic(workdir / "synthetic.npz", s, x, y)
    accuracies, predictions = res.accuracies, res.predictions
  else:
    accuracies, predictions = out["accuracies"], out.get("predictions")
  timings["total"] = time.perf_counter() - t0
  results = outputs.results_record(s, timings, accuracies, predictions,
                                   upload, extra)
  outputs.write_results(workdir, results)
  log.info("%s accuracy %.4f +- %.4f over %d nets", results["method"],
           results["accuracy_mean"], results["accuracy_std"],
           results["n_eval"])
  return results


def _synthetic(images) -> Dict:
  """The server's ``[C, ipc, ...]`` images as ``_finish``'s flat set."""
  x, y = server_lib.synthetic_dataset(images)
  return {"images": x, "labels": y}


def _resume(s, workdir, ckpt, timings, t0, extra_keys, metrics=None):
  """Finishes a run from its latest server checkpoint; None if there is none.

  ``extra_keys`` are fields saved with the checkpoint that go back into
  ``results.json`` (the upload sizes always do).
  """
  restored = setup_lib.restore_server(s, ckpt)
  if restored is None:
    return None
  images = stages.resume_synthesis(s, restored, ckpt, timings, metrics)
  ckpt.close()
  extra = {k: restored.extra[k] for k in extra_keys if k in restored.extra}
  extra["resumed_from_t"] = restored.next_t
  return _finish(s, workdir, _synthetic(images), timings, t0,
                 restored.extra.get("upload", {}), extra, metrics)


def run_distillation(config, workdir, mesh=None) -> Dict:
  """The whole simulated run; writes synthetic.npz and results.json.

  Also ``config.json`` (at the start), ``metrics.jsonl`` and TensorBoard
  event files (see ``outputs.run_outputs``).
  """
  with outputs.run_outputs(config, workdir) as metrics:
    return _run_distillation(config, pathlib.Path(workdir), mesh, metrics)


def _run_distillation(config, workdir, mesh, metrics) -> Dict:
  timings = {}
  t0 = time.perf_counter()
  with progress.timed(timings, "setup"):
    s = setup_lib.setup(config)
  log.info("dataset %s (%s): %d train, %d test\n%s", s.dataset.name,
           s.dataset.source, len(s.dataset.train_y), len(s.dataset.test_y),
           partition_lib.format_count_table(s.partition.counts,
                                            s.dataset.class_names))
  ckpt = setup_lib.open_checkpointer(s, workdir)
  resumed = _resume(s, workdir, ckpt, timings, t0, ("privacy",), metrics)
  if resumed is not None:
    return resumed
  K = config.partition.num_clients
  if K < jax.process_count():
    raise ValueError(f"partition.num_clients ({K}) must be >= the number of "
                     f"processes ({jax.process_count()})")
  # Each process simulates its own share of the clients and touches only
  # their data; the client pass itself spans every process's devices.
  ids = parallel.process_clients(K)
  msgs = stages.client_messages(s, ids, mesh=mesh, timings=timings,
                                metrics=metrics)
  # Every message crosses the same wire format as in a real deployment.
  with progress.timed(timings, "transport"):
    received, upload = wire.round_trip(s, msgs, ids)
  # Every client of a simulation is used: the accounting covers them all.
  dp_extra = setup_lib.privacy_record(s, dict(enumerate(s.partition.counts)))
  images = stages.synthesize_from_messages(
      s, received, timings, ckpt, {"upload": upload, **dp_extra}, metrics)
  if ckpt is not None:
    ckpt.close()
  if jax.process_index() > 0:
    # Every process holds the same synthetic set; process 0 evaluates it and
    # writes the outputs.
    timings["total"] = time.perf_counter() - t0
    return {"method": outputs.method_name(config), "wall_s": timings,
            "upload_bytes_per_client": upload}
  return _finish(s, workdir, _synthetic(images), timings, t0, upload,
                 dp_extra, metrics=metrics)


def run_client(config, client_id, message_dir, mesh=None, workdir=None,
               signing_key=None) -> pathlib.Path:
  """One client's whole job: compute its message and write it to a file.

  Only this client's shard of the data is used (the partition is recomputed
  from the shared seed, as a real client would already hold its own data).
  ``config.json``, ``metrics.jsonl`` (local DM losses) and TensorBoard files
  go to ``workdir`` (default ``wire.client_workdir(message_dir,
  client_id)``). With ``signing_key`` (the path of the client's Ed25519
  private key, from ``launch.keygen``) the message is signed for this run
  into ``<message>.sig``.
  """
  # Read first: a bad key fails before the client's work, not after it.
  key = None if signing_key is None else signing.load_private_key(signing_key)
  K = config.partition.num_clients
  if not 0 <= client_id < K:
    raise ValueError(f"client_id must be in [0, {K}), got {client_id}")
  if workdir is None:
    workdir = wire.client_workdir(message_dir, client_id)
  with outputs.run_outputs(config, workdir) as metrics:
    s = setup_lib.setup(config)
    (msg,) = stages.client_messages(s, [client_id], mesh=mesh,
                                    metrics=metrics)
  return wire.save_client_message(s, msg, message_dir, key)


def run_server(config, message_dir, workdir, public_key_dir=None) -> Dict:
  """Reads every message in ``message_dir``, synthesises and evaluates.

  Missing clients are tolerated with a warning; an invalid message is
  rejected (logged with its reason) and the run goes on with the rest.
  With ``public_key_dir`` (``client_NNNNN.pub`` files from
  ``launch.keygen``) only messages signed for this run by the slot's client
  are accepted; without it uploads are unsigned (simulations). Either way a
  message received twice is rejected as a duplicate.

  Run in several processes (``jax.distributed``), each process reads only
  its own share of the clients (``parallel.process_clients``), the targets
  and the local-image pool are combined across processes, and process 0
  evaluates and writes the outputs: the same as one process.
  """
  return serve(config, workdir, lambda s: wire.receive_files(
      s, message_dir, public_key_dir))


def serve(config, workdir, receive) -> Dict:
  """The server's job around a transport: receive, synthesise, evaluate.

  ``receive(setup) -> wire.Received`` collects the clients' messages (files
  for ``run_server``, a Flower round for ``flower_app``); it raises if there
  is nothing to distil from. A relaunch with a server checkpoint in
  ``workdir`` finishes from it without receiving again. Writes what
  ``_finish`` writes, with ``clients_used`` and ``clients_rejected``.
  """
  with outputs.run_outputs(config, workdir) as metrics:
    workdir = pathlib.Path(workdir)
    timings = {}
    t0 = time.perf_counter()
    s = setup_lib.setup(config)
    ckpt = setup_lib.open_checkpointer(s, workdir)
    resumed = _resume(s, workdir, ckpt, timings, t0,
                      ("clients_used", "clients_rejected", "privacy"), metrics)
    if resumed is not None:
      return resumed
    received = receive(s)
    timings["receive"] = time.perf_counter() - t0
    # Multi-process: the record covers every process's clients (merged in
    # process order, so in client order); the statistics stay with their
    # process (aggregation combines them). Keys are whatever the transport
    # names a source by (a client id, or a Flower node).
    upload, rejected, class_counts = {}, {}, {}
    for part in parallel.allgather_json(
        [received.upload, received.rejected,
         {m.client_id: m.class_counts.tolist() for m in received.messages}]):
      upload.update(part[0])
      rejected.update(part[1])
      class_counts.update({int(k): v for k, v in part[2].items()})
    extra = {"clients_used": sorted(class_counts),
             "clients_rejected": rejected}
    extra.update(setup_lib.privacy_record(
        s, {k: np.asarray(v) for k, v in sorted(class_counts.items())}))
    images = stages.synthesize_from_messages(
        s, received.messages, timings, ckpt, {"upload": upload, **extra},
        metrics)
    if ckpt is not None:
      ckpt.close()
    if jax.process_index() > 0:
      # Every process holds the same synthetic set; process 0 evaluates it
      # and writes the outputs.
      timings["total"] = time.perf_counter() - t0
      return {"method": outputs.method_name(config), "wall_s": timings,
              "upload_bytes_per_client": upload, **extra}
    return _finish(s, workdir, _synthetic(images), timings, t0, upload,
                   extra, metrics)
