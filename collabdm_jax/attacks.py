"""What a malicious client can upload instead of its honest statistics.

Each attack maps a client's honest ``protocol.ClientMessage`` to a forged
one with the same client id, fingerprint and config hash, so it is a
well-formed message of the run; whether the server's checks
(``protocol.validate_message``) reject it depends on the attack and its
strength. Used by the robustness tests and ``experiments/attack_table.py``.

* ``scaled``: means (and second moments, squared factor) times ``factor``;
  optionally claiming ``claim_class_size`` samples of every class it holds,
  to grab the count weight.
* ``sign_flip``: means negated (the opposite direction of the honest ones).
* ``noise``: means replaced by Gaussian noise of standard deviation ``std``.
* ``label_swap``: every per-class statistic reported under another class
  (a permutation of the classes; local image labels likewise).
* ``copy``: another client's statistics sent as its own (a Sybil).
"""

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from collabdm_jax.protocol import ClientMessage

ATTACKS = ("scaled", "sign_flip", "noise", "label_swap", "copy")


def _present(msg):
  return (np.asarray(msg.counts) > 0)[..., None]


def scaled(msg: ClientMessage, factor: float,
           claim_class_size: Optional[int] = None,
           batch_real: Optional[int] = None) -> ClientMessage:
  """Means times ``factor``, second moments times ``factor**2``.

  With ``claim_class_size`` the client also claims that many samples of
  each class it holds (and ``min(claim, batch_real)`` per (t, c)), the
  largest count weight the server's checks allow it.
  """
  means = (np.asarray(msg.means, np.float64) * factor).astype(np.float32)
  sq = msg.second_moments
  if sq is not None:
    sq = (np.asarray(sq, np.float64) * factor**2).astype(np.float32)
  counts, cc = msg.counts, msg.class_counts
  if claim_class_size is not None:
    held = np.asarray(cc) > 0
    cc = np.where(held, claim_class_size, 0).astype(np.int32)
    per_t = cc if batch_real is None else np.minimum(cc, batch_real)
    counts = np.where(np.asarray(counts) > 0, per_t[None, :], 0).astype(np.int32)
  return dataclasses.replace(msg, means=means, second_moments=sq,
                             counts=counts, class_counts=cc)


def sign_flip(msg: ClientMessage) -> ClientMessage:
  """Means negated; second moments (sign-blind) kept."""
  return dataclasses.replace(msg, means=(-np.asarray(msg.means)).astype(np.float32))


def noise(key, msg: ClientMessage, std: float) -> ClientMessage:
  """Means replaced by N(0, std**2) entries where the client sent a mean.

  Second moments become the noise's squares plus ``std**2`` (consistent with
  a spread of ``std``), so the forgery passes the mean-of-squares check.
  """
  z = np.asarray(jax.random.normal(key, np.shape(msg.means)), np.float32) * std
  means = np.where(_present(msg), z, 0.0).astype(np.float32)
  sq = msg.second_moments
  if sq is not None:
    sq = np.where(_present(msg), np.square(means) + std**2, 0.0).astype(np.float32)
  return dataclasses.replace(msg, means=means, second_moments=sq)


def label_swap(msg: ClientMessage,
               permutation: Optional[Sequence[int]] = None) -> ClientMessage:
  """Class c's statistics reported as class ``permutation[c]``.

  Default permutation: classes reversed (c -> C - 1 - c).
  """
  C = np.shape(msg.counts)[-1]
  perm = np.arange(C)[::-1] if permutation is None else np.asarray(permutation)
  if sorted(perm.tolist()) != list(range(C)):
    raise ValueError(f"permutation must be a permutation of range({C}), got {perm}")
  inv = np.argsort(perm)  # new class j holds old class inv[j]
  take = lambda a: None if a is None else np.asarray(a)[..., inv, :]
  labels = msg.local_labels
  if labels is not None:
    labels = perm[np.asarray(labels)].astype(np.int32)
  return dataclasses.replace(
      msg, means=take(msg.means), second_moments=take(msg.second_moments),
      counts=np.asarray(msg.counts)[..., inv],
      class_counts=np.asarray(msg.class_counts)[inv], local_labels=labels)


def copy(msg: ClientMessage, source: ClientMessage) -> ClientMessage:
  """``source``'s statistics (and local images) under ``msg``'s identity."""
  return dataclasses.replace(
      source, client_id=msg.client_id,
      root_key_fingerprint=msg.root_key_fingerprint, config_hash=msg.config_hash)


def attack(name: str, key, msg: ClientMessage, honest: Sequence[ClientMessage],
           *, factor: float = 100.0, std: float = 1.0,
           claim_class_size: Optional[int] = None,
           batch_real: Optional[int] = None) -> ClientMessage:
  """Applies attack ``name`` (one of ``ATTACKS``) to ``msg``.

  ``key`` drives the randomness (``noise``; ``copy`` picks its source among
  ``honest``). ``factor``/``claim_class_size``/``batch_real`` are
  ``scaled``'s, ``std`` is ``noise``'s.
  """
  if name == "scaled":
    return scaled(msg, factor, claim_class_size, batch_real)
  if name == "sign_flip":
    return sign_flip(msg)
  if name == "noise":
    return noise(key, msg, std)
  if name == "label_swap":
    return label_swap(msg)
  if name == "copy":
    if not honest:
      raise ValueError("the copy attack needs an honest message to copy")
    return copy(msg, honest[int(jax.random.randint(key, (), 0, len(honest)))])
  raise ValueError(f"attack must be one of {ATTACKS}, got {name!r}")
