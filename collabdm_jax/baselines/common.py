"""Helpers every baseline shares: its key stream, options, checks, predictions.

Baselines take the ``setup.Setup`` of their config; see the package
docstring (``collabdm_jax.baselines``) for what each returns.
"""


import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from collabdm_jax import augment
from collabdm_jax import evaluate
from collabdm_jax import models

# Folded into the root key once, then the baseline's index. keys.py uses
# stream ids 0..5 for the protocol; this id is far from them so a new
# protocol stream never collides with a baseline.
_BASELINE_STREAM = 1000
_STREAMS = {"central_dm": 0, "merged_local_dm": 1, "fedavg": 2, "dense": 3}


def baseline_key(root, name: str):
  """Private PRNG stream of baseline ``name`` (see ``_STREAMS``)."""
  if name not in _STREAMS:
    raise ValueError(f"name must be one of {sorted(_STREAMS)}, got {name!r}")
  return jax.random.fold_in(jax.random.fold_in(root, _BASELINE_STREAM),
                            _STREAMS[name])


def unless_none(value, default):
  """``value``, or ``default`` where the config leaves it None (derived)."""
  return default if value is None else value


def check_positive(value, name, integer=False, allow_zero=False):
  """Raises ValueError unless ``value`` is > 0 (or >= 0), an int if asked."""
  if integer and (isinstance(value, bool) or int(value) != value):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be {bound}, got {value!r}")
  return int(value) if integer else float(value)


def eval_model(config, num_classes: int):
  """The evaluation architecture (``config.eval``), used by model baselines."""
  kwargs = config.eval.model_kwargs.to_dict() if "model_kwargs" in config.eval \
      else {}
  return models.make_model(config.eval.arch, num_classes, **kwargs)


@functools.lru_cache(maxsize=None)
def _predict_fn(apply_fn):
  """Jitted ``(params of one model, x chunk) -> argmax predictions``."""
  return jax.jit(
      lambda p, x: jnp.argmax(apply_fn(p, x), -1).astype(jnp.int32))


def predict(apply_fn, params, x, chunk: int = 1000) -> np.ndarray:
  """Predicted classes of several models on ``x``.

  Models and chunks are looped over in Python rather than with ``lax.map``:
  XLA:CPU runs convolutions inside loop bodies much slower than at top level
  (jax-ml/jax#12868), and one model and one chunk at a time keeps memory
  small. The last chunk is zero-padded so every call has the same shape.

  Args:
    apply_fn: ``apply_fn(params, x [B, ...]) -> logits [B, C]``; must be
      hashable and stable across calls (e.g. ``logits_of(model)``) so the
      compiled program is reused.
    params: pytree whose leaves carry a leading model axis ``[n, ...]``.
    x: ``[N, ...]`` inputs (N >= 1).
    chunk: inputs per forward pass.

  Returns:
    ``[n, N]`` int32 predictions.
  """
  x = np.asarray(x, np.float32)
  if x.shape[0] < 1:
    raise ValueError("x must hold at least 1 example")
  chunk = check_positive(chunk, "chunk", integer=True)
  N = x.shape[0]
  c = min(chunk, N)
  num_chunks = -(-N // c)
  xs = np.concatenate([x, np.zeros((num_chunks * c - N,) + x.shape[1:],
                                   np.float32)])
  xs = jnp.asarray(xs.reshape((num_chunks, c) + x.shape[1:]))
  fn = _predict_fn(apply_fn)
  num_models = jax.tree.leaves(params)[0].shape[0]
  out = []
  for m in range(num_models):
    p = jax.tree.map(lambda a: a[m], params)
    out.append(np.concatenate([np.asarray(fn(p, xs[j]))
                               for j in range(num_chunks)])[:N])
  return np.stack(out)


@functools.lru_cache(maxsize=None)
def logits_of(model):
  """``models.logits_fn(model)``, cached so it is the same object per model."""
  return models.logits_fn(model)


def model_metrics(predictions, test_y, num_classes: int) -> Dict[str, Any]:
  """The result dict of a model baseline from ``[n, N_test]`` predictions.

  Returns ``accuracies`` ``[n]``, ``accuracy_mean``, ``accuracy_std``
  (population std, as the evaluator reports), ``per_class_recall`` (mean
  over the n models, NaN for classes absent from the test split) and the
  ``predictions`` themselves.
  """
  predictions = np.asarray(predictions, np.int32)
  m = evaluate.classification_metrics(predictions, test_y, num_classes)
  acc = np.atleast_1d(np.asarray(m["accuracy"], np.float64))
  return {
      "accuracies": acc,
      "accuracy_mean": float(acc.mean()),
      "accuracy_std": float(acc.std()),
      "per_class_recall": np.nanmean(np.atleast_2d(m["per_class_recall"]), 0),
      "predictions": predictions,
  }


def augment_strategy(dsa_strategy: str, families=("crop", "flip")) -> str:
  """The families of ``families`` that the dataset's DSA strategy allows.

  Used for the light crop/flip augmentation of one-shot FL baselines: a
  dataset whose strategy omits flips (digits) or every family (tables) gets
  none of them.
  """
  allowed = augment.parse_strategy(dsa_strategy)
  return "_".join(f for f in families if f in allowed)
