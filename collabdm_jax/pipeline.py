"""A whole CollabDM run, as the launchers drive it.

``run_distillation`` simulates every client and the server in one process;
``run_client`` and ``run_server`` are the same protocol split across
processes (one per client plus the server) that exchange message files.
Both paths go through the same encode/validate/decode of every message, so
the simulation measures exactly what a deployment would send (and the cost
of bf16 transport).

Configs are ``ml_collections.ConfigDict``s as in ``experiments/configs/``.
"""

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import threading
import time
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from collabdm_jax import aggregation
from collabdm_jax import augment
from collabdm_jax import checkpoint as ckpt_lib
from collabdm_jax import client as client_lib
from collabdm_jax import embedding_bounds
from collabdm_jax import data as data_lib
from collabdm_jax.data import tabular as tabular_lib
from collabdm_jax import evaluate
from collabdm_jax import keys as keys_lib
from collabdm_jax import metrics as metrics_lib
from collabdm_jax import models
from collabdm_jax import parallel
from collabdm_jax import partition as partition_lib
from collabdm_jax import privacy as privacy_lib
from collabdm_jax import protocol
from collabdm_jax import provenance
from collabdm_jax import server as server_lib
from collabdm_jax import signing

log = logging.getLogger("collabdm_jax")


class Progress:
  """Logs ``done/total`` with rate and ETA at most every ``every_s`` seconds."""

  def __init__(self, name, total, every_s=10.0):
    self.name, self.total, self.every_s = name, total, every_s
    self.start = self.last = time.perf_counter()

  def update(self, done, extra=""):
    now = time.perf_counter()
    if done < self.total and now - self.last < self.every_s:
      return
    self.last = now
    elapsed = now - self.start
    eta = elapsed / max(done, 1) * (self.total - done)
    log.info("%s %d/%d  %.1fs elapsed, ETA %.1fs %s", self.name, done,
             self.total, elapsed, eta, extra)


class Heartbeat:
  """Logs every ``every_s`` seconds that a phase is still running.

  For a phase that runs as one compiled program (evaluation), where no
  partial progress is visible from the host: the log shows the phase is
  alive and how long it has run. Use as a context manager.
  """

  def __init__(self, name, every_s=10.0):
    self.name, self.every_s = name, every_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name=f"heartbeat-{name}")

  def _beat(self):
    while not self._stop.wait(self.every_s):
      log.info("%s: running, %.0fs elapsed", self.name,
               time.perf_counter() - self.start)

  def __enter__(self):
    self.start = time.perf_counter()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    log.info("%s: done in %.1fs", self.name, time.perf_counter() - self.start)


@dataclasses.dataclass
class Setup:
  """Everything derived from a config before any client or server work."""
  config: object
  dataset: data_lib.Dataset
  partition: partition_lib.Partition
  model: object
  input_shape: tuple
  dsa_strategy: str
  stats_spec: client_lib.StatsSpec
  root: jax.Array
  train_x: np.ndarray  # what the embedding nets see (images, or tables)
  test_x: np.ndarray
  # provenance.start() when the run began; results.json gets it finished.
  provenance: Optional[Dict] = None


def _opt(value):
  """ConfigDict placeholders read as None."""
  return None if value is None else value


def dsa_strategy(config, dataset_name):
  s = config.dsa_strategy
  return augment.dsa_strategy_for(dataset_name) if s == "auto" else s


def protocol_fields(config) -> Dict:
  """The settings a client and the server must share; hashed into messages."""
  fields = {
      "seed": config.seed,
      "dataset": config.dataset,
      "model": config.model.to_dict(),
      "dsa_strategy": config.dsa_strategy,
      "num_iterations": config.num_iterations,
      "batch_real": _opt(config.stats.batch_real),
      "second_moments": bool(config.stats.second_moments),
      "tabular_as_image": bool(config.get("tabular_as_image", False)),
  }
  dp = privacy_lib.settings(config)
  if dp is not None:  # absent when off, so non-private messages are unchanged
    fields["privacy"] = {"epsilon": dp.epsilon, "delta": dp.delta,
                         "clip_norm": dp.clip_norm}
  return fields


def load_data(config) -> data_lib.Dataset:
  kwargs = {k: v for k, v in config.get("data_kwargs", {}).items()
            if v is not None}
  return data_lib.load_dataset(config.dataset, data_dir=_opt(config.data_dir),
                               **kwargs)


def setup(config, dataset: Optional[data_lib.Dataset] = None) -> Setup:
  """Loads data, partitions it and builds the shared model and spec."""
  # Taken first, so the load average is the one the run started under.
  record = provenance.start()
  if config.server.std_weight > 0 and not config.stats.second_moments:
    raise ValueError("server.std_weight > 0 needs stats.second_moments=True "
                     "(clients must upload second moments for std targets)")
  aggregator_config(config)  # a bad server.aggregator fails before any work
  dp = privacy_lib.settings(config)  # so does a bad privacy config
  if dp is not None:
    log.info("differential privacy on: target epsilon %g at delta %g per "
             "example over its class's %d releases; clip norm %g; no local "
             "images, the server starts from noise", dp.epsilon, dp.delta,
             config.num_iterations, dp.clip_norm)
  dataset = dataset if dataset is not None else load_data(config)
  p = config.partition
  part = partition_lib.make_partition(
      p.method, dataset.train_y, p.num_clients, seed=p.seed, alpha=p.alpha,
      ipc=_opt(p.get("ipc")), classes_per_client=_opt(p.get("classes_per_client")),
      min_size=p.min_size, num_classes=dataset.num_classes)
  train_x, test_x = dataset.train_x, dataset.test_x
  if dataset.kind == "tabular" and config.get("tabular_as_image", False):
    train_x = tabular_lib.features_as_images(train_x)
    test_x = tabular_lib.features_as_images(test_x)
  input_shape = tuple(train_x.shape[1:])
  model = models.make_model(config.model.arch, dataset.num_classes,
                            **{k: v for k, v in config.model.items()
                               if k != "arch"})
  strategy = dsa_strategy(config, config.dataset)
  spec = client_lib.StatsSpec(
      model=model, input_shape=input_shape, num_classes=dataset.num_classes,
      batch_real=_opt(config.stats.batch_real), dsa_strategy=strategy,
      second_moments=bool(config.stats.second_moments),
      embed_batch=config.stats.embed_batch,
      compute_dtype=config.compute_dtype)
  return Setup(config, dataset, part, model, input_shape, strategy, spec,
               jax.random.key(config.seed), train_x, test_x, record)


def local_ipc(config):
  ipc = _opt(config.local.ipc)
  # The reference gives each client ipc // K + 1 images per class, so the
  # pooled local images always cover the server's ipc.
  return ipc if ipc is not None else (
      config.server.ipc // config.partition.num_clients + 1)


def local_config(config, strategy) -> client_lib.LocalDMConfig:
  c = config.local
  return client_lib.LocalDMConfig(
      ipc=local_ipc(config), iterations=c.iterations, lr=c.lr,
      momentum=c.momentum, batch_real=c.batch_real, dsa_strategy=strategy,
      pae=bool(config.server.pae), std_weight=c.std_weight,
      # Absent from older configs: population std, as before the option.
      std_ddof=c.std_ddof, init=c.init,
      compute_dtype=config.compute_dtype)


def embedding_range(s: Setup):
  """``(lo, hi)`` the server holds client means to, or None (unchecked).

  ``server.max_abs_embedding`` configures ``|entry| <= bound``; unset, the
  range is derived from psi_t where the architecture allows
  (``embedding_bounds.embedding_ranges``), as ``[T, 1, D]`` arrays.
  """
  bound = _opt(s.config.server.get("max_abs_embedding"))
  if bound is not None:
    if not bound > 0:
      raise ValueError(f"server.max_abs_embedding must be > 0, got {bound}")
    return (np.float32(-bound), np.float32(bound))
  ranges = embedding_bounds.embedding_ranges(
      s.model, s.input_shape, s.root, s.config.num_iterations)
  return None if ranges is None else tuple(r[:, None, :] for r in ranges)


def message_spec(s: Setup) -> protocol.MessageSpec:
  """Everything the server checks of an upload it does not trust."""
  max_class = _opt(s.config.server.get("max_class_size"))
  if max_class is not None and max_class < 1:
    raise ValueError(f"server.max_class_size must be >= 1, got {max_class}")
  box = embedding_range(s)
  return protocol.MessageSpec(
      root_key_fingerprint=protocol.key_fingerprint(s.root),
      config_hash=protocol.config_hash(protocol_fields(s.config)),
      num_iterations=s.config.num_iterations,
      num_classes=s.dataset.num_classes,
      embed_dim=models.feature_dim(s.model, s.input_shape),
      image_shape=s.input_shape,
      requires_second_moments=s.config.server.std_weight > 0,
      batch_real=_opt(s.config.stats.batch_real),
      max_class_size=max_class,
      embedding_range=box,
      noised_range=noised_range(s, box))


def noised_range(s: Setup, box):
  """Under differential privacy, ``class_counts -> (lo, hi)`` of noised means.

  None when privacy is off or psi_t's range is unchecked. Class sizes no
  accountant can handle are the client's problem: a ``MessageError``.
  """
  dp = privacy_lib.settings(s.config)
  if dp is None or box is None:
    return None
  T, dim = s.config.num_iterations, models.feature_dim(s.model, s.input_shape)

  def bounds(class_counts):
    try:
      return privacy_lib.noised_mean_range(
          box[0], box[1], class_counts, s.stats_spec.batch_real, T, dim, dp)
    except ValueError as e:
      raise protocol.MessageError(f"class sizes {class_counts.tolist()}: {e}")

  return bounds


def client_messages(s: Setup, client_ids: Sequence[int], mesh=None,
                    timings=None, metrics=None) -> List[protocol.ClientMessage]:
  """Computes the one-shot messages of the given clients (any subset).

  With a ``metrics.MetricsWriter``, each local-DM iteration's loss is
  written as a ``local_dm`` row labelled with the client.
  """
  cfg = s.config
  xs = [s.train_x[s.partition.client_indices[k]] for k in client_ids]
  ys = [s.dataset.train_y[s.partition.client_indices[k]] for k in client_ids]
  local = [None] * len(client_ids)
  shared = cfg.local.enabled and cfg.local.networks == "shared"
  if cfg.local.networks not in ("shared", "independent"):
    raise ValueError("local.networks must be 'shared' or 'independent', got "
                     f"{cfg.local.networks!r}")
  lcfg = local_config(cfg, s.dsa_strategy)
  dp = privacy_lib.settings(cfg)
  if dp is not None:  # local images are not private: none under DP
    shared = False
  t0 = time.perf_counter()
  def local_dm_reporter(name, owners):
    """Progress, and ``local_dm`` metric rows per owner (client) of the
    losses ``[len(owners), C]`` (or ``[C]`` for one) of each iteration."""
    prog = Progress(name, lcfg.iterations)
    pending = []

    def on_iteration(it, class_loss):
      prog.update(it + 1)
      if metrics is None:
        return
      # Reading a loss waits for its step: batching the reads keeps the
      # device queue full.
      pending.append((it, class_loss))
      if len(pending) == 32 or it + 1 == lcfg.iterations:
        for j, l in pending:
          l = np.asarray(l).reshape(len(owners), -1)
          for k, lk in zip(owners, l):
            metrics.write("local_dm", j, {"client": int(k)}, loss=lk.sum(),
                          class_loss=lk)
        pending.clear()

    return on_iteration

  if cfg.local.enabled and not shared and dp is None:
    pad_to = client_lib.local_padding(ys, s.dataset.num_classes, lcfg)
    for i, k in enumerate(client_ids):
      on_iteration = local_dm_reporter(f"local DM client {k}", [k])
      local[i] = client_lib.local_distill(
          keys_lib.local_distill_key(s.root, k), xs[i], ys[i],
          s.dataset.num_classes, s.model, s.input_shape, lcfg,
          progress=on_iteration, pad_to=pad_to)
  t1 = time.perf_counter()
  T = cfg.num_iterations
  prog = Progress("client statistics", T)
  parts = []
  if dp is not None:
    parts.append(privacy_lib.private_client_stats(
        s.root, xs, ys, list(client_ids), s.stats_spec, T, dp,
        privacy_lib.secret_seed(dp), t_chunk=cfg.stats.t_chunk))
    prog.update(T)
  else:
    for t0_, chunk in client_lib.iter_client_stats(
        s.root, xs, ys, list(client_ids), s.stats_spec, T,
        t_chunk=cfg.stats.t_chunk, mesh=mesh,
        clients_per_device=cfg.stats.clients_per_device):
      parts.append(chunk)
      prog.update(t0_ + chunk.means.shape[1])
  t2 = time.perf_counter()
  cat = lambda name: (None if getattr(parts[0], name) is None else
                      np.concatenate([getattr(p, name) for p in parts], 1))
  means, counts, sq = cat("means"), cat("counts"), cat("second_moments")
  if shared:
    # One pass over the real data: local DM matches the statistics just
    # computed, under the same networks and augmentations.
    local = client_lib.shared_local_distill(
        s.root, xs, ys, list(client_ids),
        client_lib.ClientStats(means, counts, parts[0].class_counts, sq),
        s.dataset.num_classes, s.model, s.input_shape, lcfg,
        progress=local_dm_reporter("local DM (shared networks)", client_ids))
  t3 = time.perf_counter()
  if timings is not None:
    timings["local_distill"] = (timings.get("local_distill", 0.0)
                                + (t1 - t0) + (t3 - t2))
    timings["client_stats"] = timings.get("client_stats", 0.0) + t2 - t1
  fingerprint = protocol.key_fingerprint(s.root)
  chash = protocol.config_hash(protocol_fields(cfg))
  msgs = []
  for i, k in enumerate(client_ids):
    li, ll = local[i] if local[i] is not None else (None, None)
    msgs.append(protocol.ClientMessage(
        client_id=int(k), root_key_fingerprint=fingerprint,
        config_hash=chash, means=means[i], counts=counts[i],
        class_counts=parts[0].class_counts[i],
        second_moments=None if sq is None else sq[i],
        local_images=li, local_labels=ll))
  return msgs


def server_config(s: Setup) -> server_lib.ServerConfig:
  cfg = s.config
  return server_lib.ServerConfig(
      ipc=cfg.server.ipc, lr=cfg.server.lr, momentum=cfg.server.momentum,
      dsa_strategy=s.dsa_strategy, pae=bool(cfg.server.pae),
      std_weight=cfg.server.std_weight, weighting=cfg.server.weighting,
      compute_dtype=cfg.compute_dtype)


def aggregator_config(config) -> aggregation.AggregatorConfig:
  """``server.aggregator`` and its parameters (defaults where a config lacks them)."""
  c, d = config.server, aggregation.AggregatorConfig()
  return aggregation.AggregatorConfig(
      name=c.get("aggregator", d.name),
      trim_fraction=c.get("trim_fraction", d.trim_fraction),
      clip_multiplier=c.get("clip_multiplier", d.clip_multiplier),
      weight_cap=c.get("weight_cap", d.weight_cap))


def open_checkpointer(s: Setup, workdir):
  """The server's checkpointer under ``workdir/checkpoints``, or None (off)."""
  c = s.config.get("checkpoint")
  if c is None or not c.every:
    return None
  if jax.process_count() > 1:
    log.warning("server checkpoints are single-process only: disabled")
    return None
  return ckpt_lib.ServerCheckpointer(
      pathlib.Path(workdir) / "checkpoints", every=c.every,
      config_hash=ckpt_lib.synthesis_config_hash(s.config),
      root_fingerprint=protocol.key_fingerprint(s.root),
      max_to_keep=c.max_to_keep)


def restore_server(s: Setup, ckpt):
  """The latest server checkpoint (``checkpoint.Restored``) or None."""
  if ckpt is None:
    return None
  return ckpt.restore_or_none(*ckpt_lib.templates(
      server_config(s), s.config.num_iterations, s.dataset.num_classes,
      s.input_shape, models.feature_dim(s.model, s.input_shape)))


def _server_loop(s: Setup, chunks, init, state, targets, ckpt, extra,
                 metrics=None):
  prog = Progress("server", s.config.num_iterations)

  def on_iteration(t, st, l):
    l = np.asarray(l)
    prog.update(t + 1, f"loss {float(l.sum()):.3f}")
    if metrics is not None:
      metrics.write("server", t, loss=l.sum(), class_loss=l)
    if ckpt is not None:
      ckpt.maybe_save(t, st, targets, extra)

  state = server_lib.synthesize(
      s.root, chunks, s.model, s.input_shape, s.dataset.num_classes,
      server_config(s), init, state=state, on_iteration=on_iteration)
  return np.asarray(state.images)


def resume_synthesis(s: Setup, restored, ckpt=None, timings=None,
                     metrics=None):
  """Finishes the server run from a checkpoint (no client needed)."""
  t0 = time.perf_counter()
  log.info("resuming the server at iteration %d/%d", restored.next_t,
           s.config.num_iterations)
  images = _server_loop(
      s, ckpt_lib.resume_chunks(restored.targets, restored.next_t), None,
      restored.state, restored.targets, ckpt, restored.extra, metrics)
  if timings is not None:
    timings["server"] = time.perf_counter() - t0
  return images


def synthesize_from_messages(s: Setup, messages, timings=None, ckpt=None,
                             extra=None, metrics=None):
  """Aggregates messages into targets and runs the server; returns images.

  With a checkpointer, the server state, targets and ``extra`` (JSON) are
  saved every ``ckpt.every`` iterations; with a ``metrics.MetricsWriter``,
  each iteration's total and per-class losses are written (``server`` rows).
  """
  cfg = s.config
  t0 = time.perf_counter()
  # Multi-process: messages are this process's clients'; targets and the
  # local-image pool are combined over processes, then every process runs
  # the same (deterministic) server.
  targets = server_lib.aggregate_messages(
      messages, cfg.server.weighting, with_std=cfg.server.std_weight > 0,
      aggregator=aggregator_config(cfg),
      shape=(cfg.num_iterations, s.dataset.num_classes,
             models.feature_dim(s.model, s.input_shape)))
  valid = np.asarray(targets.valid)
  if not valid.any():
    raise ValueError("no client holds any class: nothing to distil")
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
  init = server_lib.initial_synthetic_set(
      keys_lib.server_key(s.root), init_mode, s.dataset.num_classes,
      cfg.server.ipc, s.input_shape, pool_x, pool_y, pae=bool(cfg.server.pae))
  images = _server_loop(s, [(0, targets)], init, None, targets, ckpt, extra,
                        metrics)
  if timings is not None:
    timings["server"] = time.perf_counter() - t0
  return images


def evaluate_images(s: Setup, images, labels, timings=None, metrics=None):
  """Trains ``eval.num_nets`` fresh networks on a set and tests them.

  Logs a heartbeat while the networks train, and with a
  ``metrics.MetricsWriter`` writes their per-epoch training losses (when the
  evaluator reports them) and final losses and accuracies.
  """
  cfg = s.config.eval
  t0 = time.perf_counter()
  ecfg = evaluate.EvalConfig(
      arch=cfg.arch, num_nets=cfg.num_nets, epochs=cfg.epochs, lr=cfg.lr,
      momentum=cfg.momentum, weight_decay=cfg.weight_decay,
      batch_size=cfg.batch_size,
      # Evaluation nets train with DSA on images; tables are not augmented.
      dsa_strategy=(s.dsa_strategy if cfg.dsa and s.dataset.kind == "image"
                    else ""),
      pae=bool(s.config.server.pae),
      model_kwargs=tuple(sorted(cfg.model_kwargs.to_dict().items())))
  name = (f"evaluation ({cfg.num_nets} {cfg.arch} nets x {cfg.epochs} "
          f"epochs on {len(labels)} examples)")
  # A heartbeat while a net trains (one compiled program), and the rate and
  # ETA each time one finishes.
  prog = Progress("evaluation nets trained", cfg.num_nets, every_s=0.0)
  with Heartbeat(name):
    res = evaluate.evaluate_synthetic(
        keys_lib.eval_key(s.root), images, labels, s.test_x, s.dataset.test_y,
        num_classes=s.dataset.num_classes, config=ecfg,
        on_net_done=lambda done, total: prog.update(done))
  metrics_lib.write_eval(metrics, res, cfg.epochs)
  if timings is not None:
    timings["evaluate"] = time.perf_counter() - t0
  return res


def save_synthetic(path, s: Setup, images):
  """Writes the synthetic set as .npz (normalised images, labels, metadata)."""
  x, y = server_lib.synthetic_dataset(images)
  np.savez(path, images=x, labels=y,
           class_names=np.asarray(s.dataset.class_names),
           mean=np.asarray(s.dataset.mean), std=np.asarray(s.dataset.std),
           pae=np.asarray(bool(s.config.server.pae)))


def _env():
  return {"backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "process_count": jax.process_count(), "jax": jax.__version__}


def method_name(config):
  method = config.get("method", "collabdm")
  return f"{method}-pae" if method == "collabdm" and config.server.pae else method


def _write_results(workdir, results):
  tmp = pathlib.Path(workdir) / "results.json.tmp"
  tmp.write_text(json.dumps(results, indent=2, default=str))
  os.replace(tmp, pathlib.Path(workdir) / "results.json")


def _base_results(s: Setup, timings):
  return {
      "config": s.config.to_dict(),
      "method": method_name(s.config),
      "dataset": s.config.dataset,
      "num_clients": s.config.partition.num_clients,
      "alpha": s.config.partition.alpha,
      "ipc": s.config.server.ipc,
      "wall_s": {k: round(v, 3) for k, v in timings.items()},
      "client_class_counts": s.partition.counts.tolist(),
      "environment": _env(),
      "provenance": provenance.finish(s.provenance),
  }


def detection_metrics(s: Setup, predictions):
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


def _finish(s: Setup, workdir, images, timings, upload, extra=None,
            metrics=None):
  workdir = pathlib.Path(workdir)
  x, y = server_lib.synthetic_dataset(images)
  res = evaluate_images(s, x, y, timings, metrics)
  if "total" in timings:
    timings["total"] += timings["evaluate"]
  save_synthetic(workdir / "synthetic.npz", s, images)
  results = _base_results(s, timings)
  results.update({
      "accuracy_mean": res.mean,
      "accuracy_std": res.std,
      "accuracies": [float(a) for a in res.accuracies],
      "n_eval": int(len(res.accuracies)),
      "upload_bytes_per_client": upload,
      "upload_bytes_total": int(sum(upload.values())),
  })
  results.update(detection_metrics(s, res.predictions))
  results.update(extra or {})
  _write_results(workdir, results)
  log.info("accuracy %.4f +- %.4f over %d nets", res.mean, res.std,
           len(res.accuracies))
  return results


def _resume(s: Setup, workdir, ckpt, timings, t0, extra_keys, metrics=None):
  """Finishes a run from its latest server checkpoint; None if there is none.

  ``extra_keys`` are fields saved with the checkpoint that go back into
  ``results.json`` (the upload sizes always do).
  """
  restored = restore_server(s, ckpt)
  if restored is None:
    return None
  images = resume_synthesis(s, restored, ckpt, timings, metrics)
  ckpt.close()
  timings["total"] = time.perf_counter() - t0
  extra = {k: restored.extra[k] for k in extra_keys if k in restored.extra}
  extra["resumed_from_t"] = restored.next_t
  return _finish(s, workdir, images, timings,
                 restored.extra.get("upload", {}), extra, metrics)


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


def run_distillation(config, workdir, mesh=None) -> Dict:
  """The whole simulated run; writes synthetic.npz and results.json.

  Also ``config.json`` (at the start), ``metrics.jsonl`` and TensorBoard
  event files (see ``run_outputs``).
  """
  with run_outputs(config, workdir) as metrics:
    return _run_distillation(config, pathlib.Path(workdir), mesh, metrics)


def _run_distillation(config, workdir, mesh, metrics) -> Dict:
  timings = {}
  t0 = time.perf_counter()
  s = setup(config)
  timings["setup"] = time.perf_counter() - t0
  log.info("dataset %s (%s): %d train, %d test\n%s", s.dataset.name,
           s.dataset.source, len(s.dataset.train_y), len(s.dataset.test_y),
           partition_lib.format_count_table(s.partition.counts,
                                            s.dataset.class_names))
  ckpt = open_checkpointer(s, workdir)
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
  msgs = client_messages(s, ids, mesh=mesh, timings=timings, metrics=metrics)
  # Every message crosses the same wire format as in a real deployment.
  t1 = time.perf_counter()
  spec = message_spec(s)
  upload, received = {}, []
  for m in msgs:
    blob = protocol.encode_message(
        m, transport_dtype=config.message.transport_dtype)
    upload[str(m.client_id)] = len(blob)
    received.append(protocol.decode_message(blob, spec))
  if jax.process_count() > 1:
    sizes = np.zeros(K, np.int64)
    sizes[ids] = [upload[str(k)] for k in ids]
    upload = {str(k): int(n) for k, n in
              enumerate(parallel.sum_over_processes(sizes))}
  timings["transport"] = time.perf_counter() - t1
  # Every client of a simulation is used: the accounting covers them all.
  dp_extra = privacy_record(s, dict(enumerate(s.partition.counts)))
  images = synthesize_from_messages(s, received, timings, ckpt,
                                    {"upload": upload, **dp_extra}, metrics)
  if ckpt is not None:
    ckpt.close()
  timings["total"] = time.perf_counter() - t0
  if jax.process_index() > 0:
    # Every process holds the same synthetic set; process 0 evaluates it and
    # writes the outputs.
    return {"method": method_name(config), "wall_s": timings,
            "upload_bytes_per_client": upload}
  return _finish(s, workdir, images, timings, upload, dp_extra,
                 metrics=metrics)


def privacy_record(s: Setup, class_counts: Dict[int, np.ndarray]) -> Dict:
  """``{"privacy": accounting report}`` for results.json; {} when off.

  ``class_counts`` maps each client the server used to its class sizes.
  """
  dp = privacy_lib.settings(s.config)
  if dp is None:
    return {}
  report = privacy_lib.accounting_report(
      class_counts, s.stats_spec.batch_real, s.config.num_iterations, dp)
  log.info("differential privacy: every example spends epsilon <= %.4f "
           "(target %g) at delta %g over %d releases", report["epsilon"],
           dp.epsilon, dp.delta, s.config.num_iterations)
  return {"privacy": report}


def message_path(message_dir, client_id):
  return pathlib.Path(message_dir) / f"client_{client_id:05d}.cdm"


def client_workdir(message_dir, client_id) -> pathlib.Path:
  """Where a client run keeps its config and metrics by default."""
  return pathlib.Path(message_dir) / f"client_{client_id:05d}_run"


def run_id(s: Setup) -> str:
  """The id signatures are bound to (``signing.run_id``)."""
  return signing.run_id(protocol.key_fingerprint(s.root),
                        protocol.config_hash(protocol_fields(s.config)))


def run_client(config, client_id, message_dir, mesh=None, workdir=None,
               signing_key=None) -> pathlib.Path:
  """One client's whole job: compute its message and write it to a file.

  Only this client's shard of the data is used (the partition is recomputed
  from the shared seed, as a real client would already hold its own data).
  ``config.json``, ``metrics.jsonl`` (local DM losses) and TensorBoard files
  go to ``workdir`` (default ``client_workdir(message_dir, client_id)``).
  With ``signing_key`` (the path of the client's Ed25519 private key, from
  ``launch.keygen``) the message is signed for this run into
  ``<message>.sig``.
  """
  key = None if signing_key is None else signing.load_private_key(signing_key)
  K = config.partition.num_clients
  if not 0 <= client_id < K:
    raise ValueError(f"client_id must be in [0, {K}), got {client_id}")
  if workdir is None:
    workdir = client_workdir(message_dir, client_id)
  with run_outputs(config, workdir) as metrics:
    s = setup(config)
    (msg,) = client_messages(s, [client_id], mesh=mesh, metrics=metrics)
  path = message_path(message_dir, client_id)
  path.parent.mkdir(parents=True, exist_ok=True)
  sig = signing.signature_path(path)
  if sig.exists():
    sig.unlink()  # a stale signature must not vouch for the new message
  n = protocol.save_message(path, msg,
                            transport_dtype=config.message.transport_dtype)
  if key is not None:
    signing.sign_file(path, key, client_id, run_id(s))
  log.info("client %d wrote %s (%d bytes%s)", client_id, path, n,
           ", signed" if key is not None else "")
  return path


def _read_upload(path):
  """``(message bytes, signature record or None)`` of one client's files."""
  data = path.read_bytes()
  sig = signing.signature_path(path)
  return data, (sig.read_bytes() if sig.exists() else None)


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

  def receive(s: Setup):
    spec = message_spec(s)
    verifier = signing.Verifier(public_key_dir, run_id(s))
    blobs, records = {}, {}
    # Several processes share the clients: each reads only its own.
    ids = parallel.process_clients(config.partition.num_clients)
    if jax.process_count() > 1:
      log.info("process %d of %d reads the messages of clients %s",
               jax.process_index(), jax.process_count(), ids)
    for k in ids:
      path = message_path(message_dir, k)
      if not path.exists():
        log.warning("no message from client %d (%s): continuing without it",
                    k, path)
        continue
      try:
        blobs[k], records[k] = _read_upload(path)
      except OSError as e:
        blobs[k], records[k] = e, None
    received = accept_messages(
        blobs, spec, source=lambda k: str(message_path(message_dir, k)),
        verifier=verifier, signatures=records)
    (total,) = parallel.sum_over_processes([len(received.messages)])
    if not total:
      raise ValueError(f"no valid client message in {message_dir}")
    return received

  return serve(config, workdir, receive)


@dataclasses.dataclass
class Received:
  """The messages a server accepted, and the record of what it refused."""
  messages: List[protocol.ClientMessage]
  upload: Dict[str, int]  # client id -> bytes received
  rejected: Dict[str, str]  # client id -> reason


def accept_messages(blobs: Dict[int, bytes], spec: protocol.MessageSpec,
                    source=str, verifier=None, signatures=None) -> Received:
  """Decodes and validates each client's encoded message.

  ``blobs`` maps the client id a message arrived from to its bytes (or the
  ``OSError`` that reading them raised). With a ``signing.Verifier``, each
  message is authenticated against ``signatures[k]`` before anything it
  holds is parsed. A message that fails a check, or that claims another
  client's id, is rejected (logged with its reason, ``source(k)`` naming
  where it came from) and the rest go on: an untrusted upload costs the run
  that client, never the run.
  """
  msgs, upload, rejected = [], {}, {}
  for k, blob in sorted(blobs.items()):
    try:
      if isinstance(blob, OSError):
        raise blob
      if verifier is not None:
        verifier.check(k, blob, (signatures or {}).get(k))
      m = protocol.decode_message(blob, spec)
    except (protocol.MessageError, OSError) as e:
      log.error("rejected message of client %d (%s): %s", k, source(k), e)
      rejected[str(k)] = str(e)
      continue
    if m.client_id != k:
      log.error("rejected message of client %d (%s): it claims client id %d",
                k, source(k), m.client_id)
      rejected[str(k)] = (f"message of client {k} claims client id "
                          f"{m.client_id}")
      continue
    msgs.append(m)
    upload[str(k)] = len(blob)
  return Received(msgs, upload, rejected)


def serve(config, workdir, receive) -> Dict:
  """The server's job around a transport: receive, synthesise, evaluate.

  ``receive(setup) -> Received`` collects the clients' messages (files for
  ``run_server``, a Flower round for ``flower_app``); it raises if there is
  nothing to distil from. A relaunch with a server checkpoint in ``workdir``
  finishes from it without receiving again. Writes what ``_finish`` writes,
  with ``clients_used`` and ``clients_rejected``.
  """
  with run_outputs(config, workdir) as metrics:
    workdir = pathlib.Path(workdir)
    timings = {}
    t0 = time.perf_counter()
    s = setup(config)
    ckpt = open_checkpointer(s, workdir)
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
    extra.update(privacy_record(s, {k: np.asarray(v) for k, v in
                                    sorted(class_counts.items())}))
    images = synthesize_from_messages(
        s, received.messages, timings, ckpt, {"upload": upload, **extra},
        metrics)
    if ckpt is not None:
      ckpt.close()
    timings["total"] = time.perf_counter() - t0
    if jax.process_index() > 0:
      # Every process holds the same synthetic set; process 0 evaluates it
      # and writes the outputs.
      return {"method": method_name(config), "wall_s": timings,
              "upload_bytes_per_client": upload, **extra}
    return _finish(s, workdir, images, timings, upload, extra, metrics)


BASELINES = ("central_dm", "merged_local_dm", "fedavg", "dense")


def run(config, workdir) -> Dict:
  """Runs ``config.method``: CollabDM or one of the ``BASELINES``.

  Every method sees the same data, partition, budget and evaluator; image
  baselines are evaluated exactly like CollabDM's synthetic set, model
  baselines (FedAvg, DENSE) report their global model's test accuracy.
  """
  method = config.get("method", "collabdm")
  if method == "collabdm":
    return run_distillation(config, workdir)
  if method not in BASELINES:
    raise ValueError(f"method must be 'collabdm' or one of {BASELINES}, got "
                     f"{method!r}")
  import importlib
  module = importlib.import_module(f"collabdm_jax.baselines.{method}")
  with run_outputs(config, workdir) as metrics:
    return _run_baseline(config, pathlib.Path(workdir), method, module,
                         metrics)


def _run_baseline(config, workdir, method, module, metrics) -> Dict:
  timings = {}
  t0 = time.perf_counter()
  s = setup(config)
  timings["setup"] = time.perf_counter() - t0
  out = module.run(s, timings)
  if "images" in out:
    x, y = np.asarray(out["images"]), np.asarray(out["labels"])
    res = evaluate_images(s, x, y, timings, metrics)
    np.savez(workdir / "synthetic.npz", images=x, labels=y,
             class_names=np.asarray(s.dataset.class_names),
             mean=np.asarray(s.dataset.mean), std=np.asarray(s.dataset.std))
    acc = [float(a) for a in res.accuracies]
    predictions = res.predictions
  else:
    acc = [float(a) for a in out["accuracies"]]
    predictions = out.get("predictions")
  timings["total"] = time.perf_counter() - t0
  results = _base_results(s, timings)
  results.update({
      "accuracy_mean": float(np.mean(acc)),
      "accuracy_std": float(np.std(acc)),
      "accuracies": acc,
      "n_eval": len(acc),
      "upload_bytes_per_client": out.get("upload_bytes_per_client", {}),
  })
  results.update(detection_metrics(s, predictions))
  _write_results(workdir, results)
  log.info("%s accuracy %.4f +- %.4f", method, results["accuracy_mean"],
           results["accuracy_std"])
  return results
