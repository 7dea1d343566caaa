"""Config -> the objects a run works with, before any client or server work.

Every other module takes dataclasses (``client.StatsSpec``,
``client.LocalDMConfig``, ``server.ServerConfig``, ``evaluate.EvalConfig``,
``protocol.MessageSpec``, ...); this module is the one place that reads an
``ml_collections.ConfigDict`` (``experiments/configs/default.py`` declares
every field) and builds them. ``setup(config)`` loads the data, partitions
it and derives the shared model and root key: the ``Setup`` that the client,
server and evaluation stages and the baselines all take.
"""

import copy
import dataclasses
import logging
import pathlib
from typing import Dict, Optional

import jax
import ml_collections
import numpy as np

from collabdm_jax import aggregation
from collabdm_jax import augment
from collabdm_jax import checkpoint as ckpt_lib
from collabdm_jax import client as client_lib
from collabdm_jax import data as data_lib
from collabdm_jax.data import tabular as tabular_lib
from collabdm_jax import embedding_bounds
from collabdm_jax import evaluate
from collabdm_jax import models
from collabdm_jax import partition as partition_lib
from collabdm_jax import privacy as privacy_lib
from collabdm_jax import protocol
from collabdm_jax import provenance
from collabdm_jax import server as server_lib
from collabdm_jax import signing

log = logging.getLogger("collabdm_jax")


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


def with_overrides(config, overrides):
  """A copy of ``config`` with each ``(dotted path, value)`` of
  ``overrides`` set, in order.

  The copy keeps the config's field references live (e.g. a field tied to
  ``server.ipc`` follows an override of ``server.ipc``); ``config`` itself
  is not modified.

  Raises:
    ValueError: a path names no existing field (typos fail before anything
      runs), or the value does not fit the field's type.
  """
  config = copy.deepcopy(config)
  for path, value in overrides:
    parts = path.split(".")
    node = config
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parts[:i]) or "the config"
        raise ValueError(f"override {path!r}: {where} has no field {part!r}")
      if i < len(parts) - 1:
        node = node[part]
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"override {path!r} cannot take {value!r}: {e}") from e
  return config


def dsa_strategy(config, dataset_name):
  """``config.dsa_strategy``, with "auto" resolved for the dataset."""
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
      "batch_real": config.stats.batch_real,
      "second_moments": bool(config.stats.second_moments),
      "tabular_as_image": bool(config.tabular_as_image),
  }
  dp = privacy_lib.settings(config)
  if dp is not None:  # absent when off, so non-private messages are unchanged
    fields["privacy"] = {"epsilon": dp.epsilon, "delta": dp.delta,
                         "clip_norm": dp.clip_norm}
  return fields


def load_data(config) -> data_lib.Dataset:
  """``config.dataset`` with the ``data_kwargs`` that are set (not None)."""
  kwargs = {k: v for k, v in config.data_kwargs.items() if v is not None}
  return data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
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
      ipc=p.ipc, classes_per_client=p.classes_per_client,
      min_size=p.min_size, num_classes=dataset.num_classes)
  train_x, test_x = dataset.train_x, dataset.test_x
  if dataset.kind == "tabular" and config.tabular_as_image:
    train_x = tabular_lib.features_as_images(train_x)
    test_x = tabular_lib.features_as_images(test_x)
  input_shape = tuple(train_x.shape[1:])
  model = models.make_model(config.model.arch, dataset.num_classes,
                            **{k: v for k, v in config.model.items()
                               if k != "arch"})
  strategy = dsa_strategy(config, config.dataset)
  spec = client_lib.StatsSpec(
      model=model, input_shape=input_shape, num_classes=dataset.num_classes,
      batch_real=config.stats.batch_real, dsa_strategy=strategy,
      second_moments=bool(config.stats.second_moments),
      embed_batch=config.stats.embed_batch,
      compute_dtype=config.compute_dtype)
  return Setup(config, dataset, part, model, input_shape, strategy, spec,
               jax.random.key(config.seed), train_x, test_x, record)


def local_ipc(config):
  """Images per class of a client's local DM (``local.ipc``, or derived)."""
  ipc = config.local.ipc
  # The reference gives each client ipc // K + 1 images per class, so the
  # pooled local images always cover the server's ipc.
  return ipc if ipc is not None else (
      config.server.ipc // config.partition.num_clients + 1)


def local_config(config, strategy) -> client_lib.LocalDMConfig:
  """``config.local`` as a ``client.LocalDMConfig``."""
  c = config.local
  return client_lib.LocalDMConfig(
      ipc=local_ipc(config), iterations=c.iterations, lr=c.lr,
      momentum=c.momentum, batch_real=c.batch_real, dsa_strategy=strategy,
      pae=bool(config.server.pae), std_weight=c.std_weight,
      std_ddof=c.std_ddof, init=c.init, compute_dtype=config.compute_dtype)


def server_config(s: Setup) -> server_lib.ServerConfig:
  """``config.server`` as a ``server.ServerConfig``."""
  cfg = s.config
  return server_lib.ServerConfig(
      ipc=cfg.server.ipc, lr=cfg.server.lr, momentum=cfg.server.momentum,
      dsa_strategy=s.dsa_strategy, pae=bool(cfg.server.pae),
      std_weight=cfg.server.std_weight, weighting=cfg.server.weighting,
      compute_dtype=cfg.compute_dtype)


def aggregator_config(config) -> aggregation.AggregatorConfig:
  """``server.aggregator`` and its parameters."""
  c = config.server
  return aggregation.AggregatorConfig(
      name=c.aggregator, trim_fraction=c.trim_fraction,
      clip_multiplier=c.clip_multiplier, weight_cap=c.weight_cap)


def eval_config(s: Setup) -> evaluate.EvalConfig:
  """``config.eval`` as an ``evaluate.EvalConfig``."""
  cfg = s.config.eval
  return evaluate.EvalConfig(
      arch=cfg.arch, num_nets=cfg.num_nets, epochs=cfg.epochs, lr=cfg.lr,
      momentum=cfg.momentum, weight_decay=cfg.weight_decay,
      batch_size=cfg.batch_size,
      # Evaluation nets train with DSA on images; tables are not augmented.
      dsa_strategy=(s.dsa_strategy if cfg.dsa and s.dataset.kind == "image"
                    else ""),
      pae=bool(s.config.server.pae),
      model_kwargs=tuple(sorted(cfg.model_kwargs.to_dict().items())))


def embedding_range(s: Setup):
  """``(lo, hi)`` the server holds client means to, or None (unchecked).

  ``server.max_abs_embedding`` configures ``|entry| <= bound``; unset, the
  range is derived from psi_t where the architecture allows
  (``embedding_bounds.embedding_ranges``), as ``[T, 1, D]`` arrays.
  """
  bound = s.config.server.max_abs_embedding
  if bound is not None:
    if not bound > 0:
      raise ValueError(f"server.max_abs_embedding must be > 0, got {bound}")
    return (np.float32(-bound), np.float32(bound))
  ranges = embedding_bounds.embedding_ranges(
      s.model, s.input_shape, s.root, s.config.num_iterations)
  return None if ranges is None else tuple(r[:, None, :] for r in ranges)


def message_spec(s: Setup) -> protocol.MessageSpec:
  """Everything the server checks of an upload it does not trust."""
  max_class = s.config.server.max_class_size
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
      batch_real=s.config.stats.batch_real,
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


def run_id(s: Setup) -> str:
  """The id signatures are bound to (``signing.run_id``)."""
  return signing.run_id(protocol.key_fingerprint(s.root),
                        protocol.config_hash(protocol_fields(s.config)))


def open_checkpointer(s: Setup, workdir):
  """The server's checkpointer under ``workdir/checkpoints``, or None (off)."""
  c = s.config.checkpoint
  if not c.every:
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
