"""Checkpoints of the server's synthesis, so a killed run resumes exactly.

Everything random in a server iteration is a function of (root key, t), so
the server's whole position is: the synthetic set and its optimiser state,
the next iteration ``t``, and the aggregated client targets (kept so that a
resumed server needs no client again). ``ServerCheckpointer`` writes these
with Orbax every ``every`` iterations; resuming from the latest checkpoint
and running the remaining iterations gives the same synthetic set, bit for
bit on CPU, as a run that was never interrupted.

Orbax step ``n`` holds the state after iterations ``0..n-1``, i.e. ``n`` is
the next iteration to run. Each step directory holds three items:

* ``state``: ``dm.SynthesisState`` (images ``[C, ipc, H, W, Ch]`` and the
  optax state),
* ``targets``: ``losses.ClassMoments`` with ``[T, C, D]`` / ``[T, C]`` arrays,
* ``meta``: JSON with the format version, config hash, root-key fingerprint,
  next iteration, each array's shape, dtype and sha256, and caller extras.

Orbax writes a step into a temporary directory and renames it when complete,
so a process killed at any moment leaves the previous step or the new one,
never a half-written step under a step name. A step that does not match the
run (another config or root key, other shapes) or whose bytes do not match
their recorded digests raises ``CheckpointError``; a fresh start happens only
when the directory holds no finished step at all.
"""

import hashlib
import json
import logging
import pathlib
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from collabdm_jax import dm
from collabdm_jax import losses
from collabdm_jax import protocol
from collabdm_jax import server as server_lib

log = logging.getLogger("collabdm_jax")

FORMAT = "collabdm_jax/server-checkpoint"
FORMAT_VERSION = 1

_STATE, _TARGETS, _META = "state", "targets", "meta"
# Config entries that cannot change the synthetic set: evaluation, where the
# data files live, how often/how many checkpoints are kept, the baselines'
# settings and a sweep's name for the variant.
_HASH_EXCLUDED = ("eval", "data_dir", "checkpoint", "baseline", "variant")


class CheckpointError(ValueError):
  """A checkpoint exists but cannot be used (corrupt or from another run)."""


class Restored(NamedTuple):
  """What ``ServerCheckpointer.restore_or_none`` hands back.

  Attributes:
    state: ``dm.SynthesisState`` with device arrays, ready for
      ``server.synthesize(..., state=...)``.
    targets: ``losses.ClassMoments`` of host arrays ``[T, C, D]``/``[T, C]``.
    next_t: the first iteration still to run (``T`` when synthesis is done).
    extra: the JSON ``extra`` dict given to the save (``{}`` when none).
  """
  state: dm.SynthesisState
  targets: losses.ClassMoments
  next_t: int
  extra: Dict[str, Any]


def synthesis_config_hash(config) -> str:
  """Hash of every config entry that can change the server's synthetic set.

  Args:
    config: the run's ``ml_collections.ConfigDict`` (or a plain mapping).
      Top-level ``eval``, ``data_dir``, ``checkpoint``, ``baseline`` and
      ``variant`` are left out: they do not affect what the server
      synthesises, so changing them must not invalidate a checkpoint.

  Returns:
    A 64-character sha256 hex string (``protocol.config_hash``).
  """
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return protocol.config_hash(
      {k: v for k, v in d.items() if k not in _HASH_EXCLUDED})


def templates(cfg: server_lib.ServerConfig, num_iterations: int,
              num_classes: int, input_shape, embed_dim: int
              ) -> Tuple[dm.SynthesisState, losses.ClassMoments]:
  """Abstract (shape/dtype only) state and targets of a server run.

  Args:
    cfg: the server config (ipc, and lr/momentum fix the optimiser state).
    num_iterations: T, the number of server iterations.
    num_classes: C.
    input_shape: one image's shape ``(H, W, Ch)``.
    embed_dim: D, the embedding size (``models.feature_dim``).

  Returns:
    ``(state_template, targets_template)`` of ``jax.ShapeDtypeStruct``s, as
    ``ServerCheckpointer.restore_or_none`` expects; no memory is allocated.
  """
  for name, value in (("num_iterations", num_iterations),
                      ("num_classes", num_classes), ("embed_dim", embed_dim),
                      ("cfg.ipc", cfg.ipc)):
    if int(value) < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  images = jax.ShapeDtypeStruct((num_classes, cfg.ipc) + tuple(input_shape),
                                jnp.float32)
  optimizer = dm.make_optimizer(cfg.lr, cfg.momentum)
  state = jax.eval_shape(lambda x: dm.init_state(x, optimizer), images)
  td = (num_iterations, num_classes, embed_dim)
  targets = losses.ClassMoments(
      jax.ShapeDtypeStruct(td, jnp.float32),
      jax.ShapeDtypeStruct(td, jnp.float32),
      jax.ShapeDtypeStruct(td[:2], jnp.bool_))
  return state, targets


def resume_chunks(targets: losses.ClassMoments, next_t: int
                  ) -> List[Tuple[int, losses.ClassMoments]]:
  """Target chunks for ``server.synthesize`` from iteration ``next_t`` on.

  Args:
    targets: ``ClassMoments`` with a leading iteration axis ``[T, ...]``.
    next_t: first iteration to run, ``0 <= next_t <= T``.

  Returns:
    ``[(next_t, targets[next_t:])]``, or ``[]`` when nothing is left.
  """
  T = int(np.shape(targets.mean)[0])
  if not 0 <= next_t <= T:
    raise ValueError(f"next_t must be in [0, {T}], got {next_t}")
  if next_t == T:
    return []
  return [(int(next_t), jax.tree.map(lambda a: a[next_t:], targets))]


def _leaves(tree) -> List[Tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def _digest(a: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(f"{a.dtype.str}{a.shape}".encode())
  h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _describe(tree) -> Dict[str, Dict[str, Any]]:
  """Per-leaf shape and dtype (no data), keyed by tree path."""
  return {k: {"shape": [int(s) for s in np.shape(v)],
              "dtype": np.dtype(v.dtype).name}
          for k, v in _leaves(tree)}


def _meta_digest(meta: Dict[str, Any]) -> str:
  """sha256 of the metadata itself (all but this field), canonical JSON."""
  body = {k: v for k, v in meta.items() if k != "meta_sha256"}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def _section(meta, key, item):
  """``meta[key][item]`` as a dict, or None when missing or malformed."""
  outer = meta.get(key)
  inner = outer.get(item) if isinstance(outer, dict) else None
  return inner if isinstance(inner, dict) else None


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(tuple(np.shape(x)), x.dtype), tree)


class ServerCheckpointer:
  """Saves and restores the server's synthesis with an Orbax manager.

  Saves are synchronous: when ``save``/``maybe_save`` returns, the step is
  committed (renamed into place), so a kill right after keeps it.
  """

  def __init__(self, directory, *, every: int, config_hash: str,
               root_fingerprint: str, max_to_keep: int = 2):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: where the step directories live (one per run, e.g.
        ``<workdir>/checkpoints``).
      every: save after every ``every``-th iteration (and after the last).
      config_hash: identifies the run's settings (``synthesis_config_hash``);
        a checkpoint with another hash is refused.
      root_fingerprint: ``protocol.key_fingerprint(root)``; likewise.
      max_to_keep: finished steps kept on disk (older ones are deleted only
        after a newer one is committed).

    Raises:
      ValueError: on a bad argument.
      CheckpointError: if ``directory`` cannot be used as a checkpoint
        directory (e.g. it is a file).
    """
    if int(every) < 1:
      raise ValueError(f"every must be >= 1, got {every}")
    if int(max_to_keep) < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    for name, value in (("config_hash", config_hash),
                        ("root_fingerprint", root_fingerprint)):
      if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    self.directory = pathlib.Path(directory).absolute()
    self.every = int(every)
    self.config_hash = config_hash
    self.root_fingerprint = root_fingerprint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(max_to_keep),
        # Synchronous: the caller's next step may donate (overwrite) the
        # state buffers, and a save must be committed before we move on.
        enable_async_checkpointing=False,
        # A save killed half-way leaves "<step>.orbax-checkpoint-tmp-*";
        # it is never read as a step, and removing it here keeps the
        # directory from filling up across restarts.
        cleanup_tmp_directories=True,
        create=True)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                         _TARGETS: ocp.StandardCheckpointHandler(),
                         _META: ocp.JsonCheckpointHandler()})
    except Exception as e:  # Orbax/OS errors of many types
      raise CheckpointError(
          f"cannot open checkpoint directory {self.directory}: "
          f"{type(e).__name__}: {e}") from e

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _error(self, what, step=None, cause=None):
    where = (self.directory if step is None
             else f"step {step} in {self.directory}")
    msg = (f"checkpoint {where}: {what}. Use a matching run, or delete "
           f"{self.directory} to start afresh")
    if cause is not None:
      msg += f" ({type(cause).__name__}: {cause})"
    return CheckpointError(msg)

  def latest_step(self) -> Optional[int]:
    """Latest finished step on disk (= next iteration), or None."""
    try:
      self._manager.reload()
      return self._manager.latest_step()
    except Exception as e:
      raise self._error("cannot list the checkpoint steps", cause=e) from e

  # -- saving ----------------------------------------------------------------

  def should_save(self, t: int, num_iterations: int) -> bool:
    """Whether iteration ``t`` (just finished) of ``num_iterations`` saves."""
    return (t + 1) % self.every == 0 or t + 1 == num_iterations

  def maybe_save(self, t: int, state: dm.SynthesisState,
                 targets: losses.ClassMoments,
                 extra: Optional[Dict[str, Any]] = None) -> bool:
    """Saves after iteration ``t`` when ``should_save``; returns whether it did.

    Meant to be called from ``server.synthesize``'s ``on_iteration``; also
    saves after the last iteration so a run killed later (e.g. during
    evaluation) skips synthesis when relaunched.
    """
    T = int(np.shape(targets.mean)[0])
    if not self.should_save(t, T):
      return False
    self.save(t, state, targets, extra)
    return True

  def save(self, t: int, state: dm.SynthesisState,
           targets: losses.ClassMoments,
           extra: Optional[Dict[str, Any]] = None) -> None:
    """Saves the state after iteration ``t`` as step ``t + 1`` and commits it.

    Args:
      t: the iteration just finished, ``0 <= t < T``.
      state: ``dm.SynthesisState`` after iteration ``t``.
      targets: the run's whole ``ClassMoments`` (``[T, C, D]``), so the
        server can resume without clients.
      extra: optional JSON-serialisable dict stored alongside (e.g. upload
        sizes, clients used) and returned by ``restore_or_none``.

    Raises:
      ValueError: on a bad ``t``, an ``extra`` that is not JSON, or a step
        not after the latest one on disk.
    """
    T = int(np.shape(targets.mean)[0])
    if not 0 <= t < T:
      raise ValueError(f"t must be in [0, {T}) (T = targets' iterations), "
                       f"got {t}")
    extra = {} if extra is None else extra
    try:
      json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"extra must be a JSON-serialisable dict: {e}") from e
    step = t + 1
    latest = self._manager.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(f"t={t} (step {step}) must come after the latest "
                       f"checkpoint step {latest} in {self.directory}")
    # Host copies: the next (donating) step may reuse the device buffers.
    host_state = jax.tree.map(lambda a: np.array(a, copy=True), state)
    host_targets = jax.tree.map(np.asarray, targets)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config_hash": self.config_hash,
        "root_fingerprint": self.root_fingerprint,
        "next_t": step,
        "num_iterations": T,
        "arrays": {
            _STATE: _describe(host_state),
            _TARGETS: _describe(host_targets),
        },
        "sha256": {
            _STATE: {k: _digest(v) for k, v in _leaves(host_state)},
            _TARGETS: {k: _digest(v) for k, v in _leaves(host_targets)},
        },
        "extra": extra,
    }
    meta["meta_sha256"] = _meta_digest(meta)
    self._manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(host_state),
        _TARGETS: ocp.args.StandardSave(host_targets),
        _META: ocp.args.JsonSave(meta),
    }), force=True)
    self._manager.wait_until_finished()
    log.info("checkpoint: saved step %d in %s", step, self.directory)

  def wait(self) -> None:
    """Blocks until pending writes and deletions are done (saves are sync)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending work and releases Orbax's resources."""
    self._manager.close()

  # -- restoring -------------------------------------------------------------

  def _check_meta(self, meta, step):
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise self._error(
          f"not a {FORMAT} checkpoint (metadata {str(meta)[:80]!r})", step)
    if meta.get("version") != FORMAT_VERSION:
      raise self._error(f"format version {meta.get('version')!r}, this code "
                        f"reads version {FORMAT_VERSION}", step)
    if meta.get("meta_sha256") != _meta_digest(meta):
      raise self._error("its metadata is corrupt (sha256 mismatch)", step)
    if meta.get("config_hash") != self.config_hash:
      raise self._error(
          f"config hash mismatch: checkpoint {meta.get('config_hash')!r}, "
          f"this run {self.config_hash!r} (the settings changed)", step)
    if meta.get("root_fingerprint") != self.root_fingerprint:
      raise self._error(
          f"root key fingerprint mismatch: checkpoint "
          f"{meta.get('root_fingerprint')!r}, this run "
          f"{self.root_fingerprint!r} (another seed)", step)
    if meta.get("next_t") != step:
      raise self._error(f"metadata says next_t={meta.get('next_t')!r} but "
                        f"the step is {step}", step)

  def _check_template(self, meta, item, template, step):
    want = _describe(template)
    have = _section(meta, "arrays", item)
    if have is None:
      raise self._error(f"metadata lacks the array list of {item!r}", step)
    if sorted(have) != sorted(want):
      raise self._error(
          f"{item} structure mismatch: checkpoint has {sorted(have)}, this "
          f"run expects {sorted(want)}", step)
    for k, w in want.items():
      if have[k] != w:
        raise self._error(
            f"{item}{k} mismatch: checkpoint {have[k]['dtype']}"
            f"{tuple(have[k]['shape'])}, this run {w['dtype']}"
            f"{tuple(w['shape'])}", step)

  def _check_arrays(self, meta, item, tree, step):
    digests = _section(meta, "sha256", item) or {}
    for k, v in _leaves(tree):
      if digests.get(k) != _digest(v):
        raise self._error(
            f"{item}{k} is corrupt (its bytes do not match the sha256 "
            f"recorded at save time)", step)

  def restore_or_none(self, template_state, template_targets
                      ) -> Optional[Restored]:
    """Restores the latest step, or returns None when there is none.

    Args:
      template_state: a ``dm.SynthesisState`` (arrays or ShapeDtypeStructs)
        with this run's shapes, e.g. from ``templates``.
      template_targets: likewise for the ``ClassMoments`` targets.

    Returns:
      ``Restored(state, targets, next_t, extra)``; None only when the
      directory holds no finished step (half-written temporary steps do not
      count).

    Raises:
      CheckpointError: the latest step belongs to another run (config hash,
        root key fingerprint, array shapes/structure) or cannot be read or
        fails its integrity check. The message names the directory.
    """
    step = self.latest_step()
    if step is None:
      return None
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(**{
          _META: ocp.args.JsonRestore()}))[_META]
    except Exception as e:
      raise self._error("cannot read its metadata", step, e) from e
    self._check_meta(meta, step)
    self._check_template(meta, _STATE, template_state, step)
    self._check_template(meta, _TARGETS, template_targets, step)
    T = meta.get("num_iterations")
    if not isinstance(T, int) or not 0 < step <= T:
      raise self._error(f"step is outside [1, T={T}]", step)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(_abstract(template_state)),
          _TARGETS: ocp.args.StandardRestore(_abstract(template_targets)),
      }))
      state = jax.tree.map(np.asarray, out[_STATE])
      targets = jax.tree.map(np.asarray, out[_TARGETS])
    except Exception as e:
      raise self._error("cannot read its arrays", step, e) from e
    self._check_template({"arrays": {_STATE: _describe(state)}}, _STATE,
                         template_state, step)
    self._check_template({"arrays": {_TARGETS: _describe(targets)}},
                         _TARGETS, template_targets, step)
    self._check_arrays(meta, _STATE, state, step)
    self._check_arrays(meta, _TARGETS, targets, step)
    log.info("checkpoint: restored step %d (next iteration %d) from %s",
             step, step, self.directory)
    return Restored(jax.tree.map(jnp.asarray, state),
                    losses.ClassMoments(*targets), step,
                    dict(meta.get("extra") or {}))
