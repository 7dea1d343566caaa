"""The three stages of a CollabDM run on a ``setup.Setup``.

* ``client_messages``: each client's local DM and per-(t, class) embedding
  statistics, as the one-shot messages it uploads;
* ``synthesize_from_messages`` (or ``resume_synthesis`` from a server
  checkpoint): the server's targets and synthetic set;
* ``evaluate_images``: fresh networks trained on a set and tested.

``pipeline`` strings them together over a transport (in memory, files or
Flower); each stage adds its wall seconds to a ``timings`` dict and, given a
``metrics.MetricsWriter``, writes its per-step rows.
"""

import logging
from typing import List, Sequence

import numpy as np

from collabdm_jax import checkpoint as ckpt_lib
from collabdm_jax import client as client_lib
from collabdm_jax import evaluate
from collabdm_jax import keys as keys_lib
from collabdm_jax import metrics as metrics_lib
from collabdm_jax import models
from collabdm_jax import parallel
from collabdm_jax import privacy as privacy_lib
from collabdm_jax import progress
from collabdm_jax import protocol
from collabdm_jax import server as server_lib
from collabdm_jax import setup as setup_lib

log = logging.getLogger("collabdm_jax")


def _local_dm_reporter(name, owners, iterations, metrics):
  """Progress, and ``local_dm`` metric rows per owner (client) of the
  losses ``[len(owners), C]`` (or ``[C]`` for one) of each iteration."""
  prog = progress.Progress(name, iterations)
  pending = []

  def on_iteration(it, class_loss):
    prog.update(it + 1)
    if metrics is None:
      return
    # Reading a loss waits for its step: batching the reads keeps the
    # device queue full.
    pending.append((it, class_loss))
    if len(pending) == 32 or it + 1 == iterations:
      for j, l in pending:
        l = np.asarray(l).reshape(len(owners), -1)
        for k, lk in zip(owners, l):
          metrics.write("local_dm", j, {"client": int(k)}, loss=lk.sum(),
                        class_loss=lk)
      pending.clear()

  return on_iteration


def _client_stats(s, xs, ys, client_ids, mesh):
  """``client.ClientStats`` of the clients over all T iterations."""
  cfg = s.config
  prog = progress.Progress("client statistics", cfg.num_iterations)
  dp = privacy_lib.settings(cfg)
  if dp is not None:
    stats = privacy_lib.private_client_stats(
        s.root, xs, ys, list(client_ids), s.stats_spec, cfg.num_iterations,
        dp, privacy_lib.secret_seed(dp), t_chunk=cfg.stats.t_chunk)
    prog.update(cfg.num_iterations)
    return stats
  parts = []
  for t0, chunk in client_lib.iter_client_stats(
      s.root, xs, ys, list(client_ids), s.stats_spec, cfg.num_iterations,
      t_chunk=cfg.stats.t_chunk, mesh=mesh,
      clients_per_device=cfg.stats.clients_per_device):
    parts.append(chunk)
    prog.update(t0 + chunk.means.shape[1])
  cat = lambda name: (None if getattr(parts[0], name) is None else
                      np.concatenate([getattr(p, name) for p in parts], 1))
  return client_lib.ClientStats(cat("means"), cat("counts"),
                                parts[0].class_counts, cat("second_moments"))


def client_messages(s: setup_lib.Setup, client_ids: Sequence[int], mesh=None,
                    timings=None, metrics=None) -> List[protocol.ClientMessage]:
  """Computes the one-shot messages of the given clients (any subset).

  With a ``metrics.MetricsWriter``, each local-DM iteration's loss is
  written as a ``local_dm`` row labelled with the client.
  """
  cfg = s.config
  xs = [s.train_x[s.partition.client_indices[k]] for k in client_ids]
  ys = [s.dataset.train_y[s.partition.client_indices[k]] for k in client_ids]
  local = [None] * len(client_ids)
  if cfg.local.networks not in ("shared", "independent"):
    raise ValueError("local.networks must be 'shared' or 'independent', got "
                     f"{cfg.local.networks!r}")
  # Local images are not private: none under differential privacy.
  private = privacy_lib.settings(cfg) is not None
  shared = cfg.local.enabled and cfg.local.networks == "shared" and not private
  lcfg = setup_lib.local_config(cfg, s.dsa_strategy)
  C = s.dataset.num_classes
  with progress.timed(timings, "local_distill"):
    if cfg.local.enabled and not shared and not private:
      pad_to = client_lib.local_padding(ys, C, lcfg)
      for i, k in enumerate(client_ids):
        local[i] = client_lib.local_distill(
            keys_lib.local_distill_key(s.root, k), xs[i], ys[i], C, s.model,
            s.input_shape, lcfg, pad_to=pad_to, progress=_local_dm_reporter(
                f"local DM client {k}", [k], lcfg.iterations, metrics))
  with progress.timed(timings, "client_stats"):
    stats = _client_stats(s, xs, ys, client_ids, mesh)
  with progress.timed(timings, "local_distill"):
    if shared:
      # One pass over the real data: local DM matches the statistics just
      # computed, under the same networks and augmentations.
      local = client_lib.shared_local_distill(
          s.root, xs, ys, list(client_ids), stats, C, s.model, s.input_shape,
          lcfg, progress=_local_dm_reporter("local DM (shared networks)",
                                            client_ids, lcfg.iterations,
                                            metrics))
  fingerprint = protocol.key_fingerprint(s.root)
  chash = protocol.config_hash(setup_lib.protocol_fields(cfg))
  msgs = []
  for i, k in enumerate(client_ids):
    li, ll = local[i] if local[i] is not None else (None, None)
    sq = stats.second_moments
    msgs.append(protocol.ClientMessage(
        client_id=int(k), root_key_fingerprint=fingerprint,
        config_hash=chash, means=stats.means[i], counts=stats.counts[i],
        class_counts=stats.class_counts[i],
        second_moments=None if sq is None else sq[i],
        local_images=li, local_labels=ll))
  return msgs


def _server_loop(s, chunks, init, state, targets, ckpt, extra, metrics=None):
  prog = progress.Progress("server", s.config.num_iterations)

  def on_iteration(t, st, l):
    l = np.asarray(l)
    prog.update(t + 1, f"loss {float(l.sum()):.3f}")
    if metrics is not None:
      metrics.write("server", t, loss=l.sum(), class_loss=l)
    if ckpt is not None:
      ckpt.maybe_save(t, st, targets, extra)

  state = server_lib.synthesize(
      s.root, chunks, s.model, s.input_shape, s.dataset.num_classes,
      setup_lib.server_config(s), init, state=state, on_iteration=on_iteration)
  return np.asarray(state.images)


def resume_synthesis(s: setup_lib.Setup, restored, ckpt=None, timings=None,
                     metrics=None):
  """Finishes the server run from a checkpoint (no client needed)."""
  log.info("resuming the server at iteration %d/%d", restored.next_t,
           s.config.num_iterations)
  with progress.timed(timings, "server"):
    return _server_loop(
        s, ckpt_lib.resume_chunks(restored.targets, restored.next_t), None,
        restored.state, restored.targets, ckpt, restored.extra, metrics)


def _initial_set(s, messages):
  """The server's starting images ``[C, ipc, ...]`` (``server.init``)."""
  cfg = s.config
  pool_x = pool_y = None
  init_mode = cfg.server.init
  if privacy_lib.settings(cfg) is not None:
    init_mode = "noise"  # no local images under DP; "real" is refused
  if init_mode == "local":
    have = [m for m in messages if m.local_images is not None]
    # A process whose clients sent none still joins the gather.
    pool_x = parallel.concat_over_processes(
        np.concatenate([m.local_images for m in have]) if have else
        np.zeros((0,) + tuple(s.input_shape), np.float32))
    pool_y = parallel.concat_over_processes(
        np.concatenate([m.local_labels for m in have]) if have else
        np.zeros((0,), np.int32))
    if not len(pool_x):
      raise ValueError("server.init='local' but no message carries local "
                       "images; enable local distillation or use init='noise'")
  elif init_mode == "real":
    pool_x, pool_y = s.train_x, s.dataset.train_y
  return server_lib.initial_synthetic_set(
      keys_lib.server_key(s.root), init_mode, s.dataset.num_classes,
      cfg.server.ipc, s.input_shape, pool_x, pool_y, pae=bool(cfg.server.pae))


def synthesize_from_messages(s: setup_lib.Setup, messages, timings=None,
                             ckpt=None, extra=None, metrics=None):
  """Aggregates messages into targets and runs the server; returns images.

  With a checkpointer, the server state, targets and ``extra`` (JSON) are
  saved every ``ckpt.every`` iterations; with a ``metrics.MetricsWriter``,
  each iteration's total and per-class losses are written (``server`` rows).
  """
  cfg = s.config
  with progress.timed(timings, "server"):
    # Multi-process: messages are this process's clients'; targets and the
    # local-image pool are combined over processes, then every process runs
    # the same (deterministic) server.
    targets = server_lib.aggregate_messages(
        messages, cfg.server.weighting, with_std=cfg.server.std_weight > 0,
        aggregator=setup_lib.aggregator_config(cfg),
        shape=(cfg.num_iterations, s.dataset.num_classes,
               models.feature_dim(s.model, s.input_shape)))
    if not np.asarray(targets.valid).any():
      raise ValueError("no client holds any class: nothing to distil")
    init = _initial_set(s, messages)
    return _server_loop(s, [(0, targets)], init, None, targets, ckpt, extra,
                        metrics)


def evaluate_images(s: setup_lib.Setup, images, labels, timings=None,
                    metrics=None) -> evaluate.EvalResult:
  """Trains ``eval.num_nets`` fresh networks on a set and tests them.

  Logs a heartbeat while the networks train, and with a
  ``metrics.MetricsWriter`` writes their per-epoch training losses (when the
  evaluator reports them) and final losses and accuracies.
  """
  cfg = s.config.eval
  name = (f"evaluation ({cfg.num_nets} {cfg.arch} nets x {cfg.epochs} "
          f"epochs on {len(labels)} examples)")
  with progress.timed(timings, "evaluate"):
    # A heartbeat while a net trains (one compiled program), and the rate
    # and ETA each time one finishes.
    with progress.Progress(name, cfg.num_nets, every_s=0.0) as prog:
      res = evaluate.evaluate_synthetic(
          keys_lib.eval_key(s.root), images, labels, s.test_x,
          s.dataset.test_y, num_classes=s.dataset.num_classes,
          config=setup_lib.eval_config(s),
          on_net_done=lambda done, total: prog.update(done))
    metrics_lib.write_eval(metrics, res, cfg.epochs)
  return res
