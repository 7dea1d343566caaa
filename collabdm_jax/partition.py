"""Splitting a labelled dataset among federated clients.

Four schemes are offered, all driven by one integer seed through a local
``numpy.random.Generator`` (no global random state is read or written):

* ``iid``: a uniform random split into near-equal shares.
* ``dirichlet``: the label-Dirichlet split of NIID-Bench (Li et al., 2022).
  For every class a vector of client proportions is drawn from Dir(alpha);
  clients that already hold at least N/K samples get a zero share of that
  class, and the whole draw is repeated until every client holds at least
  ``min_size`` samples.
* ``collabdm``: the variant used by CollabDM (Holland et al., ECAI 2024),
  exactly as the authors' ``partition_data`` runs it. Every client first
  receives ``ipc`` random samples of every class (drawn once), so each
  client can initialise and distil every class locally; the rest of each
  class is split by the Dirichlet scheme above, where the N/K cap and the
  ``min_size`` check look only at what a client got of that rest.
* ``shards``: pathological k-classes-per-client. Each client holds
  ``classes_per_client`` distinct classes, and a class's samples are split
  evenly among the clients that hold it.

Every scheme returns a :class:`Partition` holding sorted ``int64`` index
arrays into the dataset and a clients x classes count matrix.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import numpy as np

METHODS = ("iid", "dirichlet", "collabdm", "shards")


@dataclasses.dataclass(frozen=True)
class Partition:
    """A split of a dataset among clients.

    Attributes:
      client_indices: one sorted ``int64`` array per client, indices into the
        dataset. Arrays are read-only so that a frozen partition stays frozen.
      counts: ``[num_clients, num_classes]`` ``int64``; ``counts[i, c]`` is the
        number of samples of class ``c`` held by client ``i``.
      method: the scheme that produced it (one of :data:`METHODS`).
    """

    client_indices: tuple[np.ndarray, ...]
    counts: np.ndarray
    method: str

    def __post_init__(self):
        indices = []
        for idx in self.client_indices:
            arr = np.array(idx, dtype=np.int64)
            arr.setflags(write=False)
            indices.append(arr)
        counts = np.array(self.counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] != len(indices):
            raise ValueError(
                f"counts must have shape [num_clients={len(indices)}, num_classes], "
                f"got {counts.shape}")
        counts.setflags(write=False)
        object.__setattr__(self, "client_indices", tuple(indices))
        object.__setattr__(self, "counts", counts)

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[1])

    def client_sizes(self) -> np.ndarray:
        """Number of samples per client, ``[num_clients]`` ``int64``."""
        return self.counts.sum(axis=1)


# ----------------------------------------------------------------------------
# Validation helpers


def _check_int(name: str, value, minimum: int | None = None) -> int:
    # bool is an Integral in Python; a flag passed by mistake should not count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    alpha = float(alpha)
    if math.isnan(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0 (Dirichlet concentration), got {alpha}")
    return alpha


def _prepare(labels, num_clients, seed, num_classes):
    """Validates the arguments shared by every scheme.

    Returns:
      (labels as int64 [N], num_clients, num_classes, numpy Generator).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    num_clients = _check_int("num_clients", num_clients, minimum=1)
    n = labels.shape[0]
    if num_clients > n:
        raise ValueError(
            f"num_clients={num_clients} exceeds the number of samples ({n}); "
            f"each client needs at least one sample")
    if labels.min() < 0:
        raise ValueError(f"labels must lie in [0, num_classes); found label {labels.min()}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    else:
        num_classes = _check_int("num_classes", num_classes, minimum=1)
        if labels.max() >= num_classes:
            raise ValueError(
                f"labels must lie in [0, num_classes={num_classes}); "
                f"found label {labels.max()}")
    seed = _check_int("seed", seed, minimum=0)
    return labels, num_clients, num_classes, np.random.default_rng(seed)


def _finish(labels, parts, num_classes, method) -> Partition:
    indices = tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)
    counts = np.stack([np.bincount(labels[idx], minlength=num_classes) for idx in indices])
    return Partition(client_indices=indices, counts=counts.astype(np.int64), method=method)


def _class_indices(labels, num_classes):
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


# ----------------------------------------------------------------------------
# Schemes


def partition_iid(labels, num_clients: int, *, seed: int,
                  num_classes: int | None = None) -> Partition:
    """Uniform random split into near-equal shares (sizes differ by at most 1).

    Args:
      labels: integer class labels, shape ``[N]``.
      num_clients: number of clients K, ``1 <= K <= N``.
      seed: non-negative integer; the split is a pure function of it.
      num_classes: C; defaults to ``max(labels) + 1``.

    Returns:
      A :class:`Partition` with ``method='iid'``.
    """
    labels, num_clients, num_classes, rng = _prepare(labels, num_clients, seed, num_classes)
    perm = rng.permutation(labels.shape[0])
    return _finish(labels, np.array_split(perm, num_clients), num_classes, "iid")


def _dirichlet_try(rng, class_idx, base, num_clients, alpha, cap):
    """One NIID-Bench style draw on top of an initial allocation.

    Args:
      rng: the Generator (advanced in place).
      class_idx: per class, the indices still to be split (already shuffled).
      base: per client, a list of index arrays already allocated.
      num_clients: K.
      alpha: Dirichlet concentration (``inf`` means equal shares).
      cap: clients whose size is at least ``cap`` get no share of a class.

    Returns:
      Per client, a list of index arrays, or ``None`` when at some class every
      client still below the cap drew an exactly-zero proportion (possible in
      floating point for tiny alpha); the caller treats that as a failed try.
    """
    parts = [list(b) for b in base]
    sizes = np.array([sum(len(a) for a in b) for b in base], dtype=np.int64)
    for idx in class_idx:
        if math.isinf(alpha):
            # Dir(alpha) concentrates on the uniform vector as alpha -> inf.
            props = np.full(num_clients, 1.0 / num_clients)
        else:
            props = rng.dirichlet(np.full(num_clients, alpha))
        props = np.where(sizes < cap, props, 0.0)
        total = props.sum()
        if total <= 0:
            return None
        cuts = (np.cumsum(props / total) * len(idx)).astype(np.int64)[:-1]
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
            sizes[i] += len(chunk)
    return parts


def _dirichlet_loop(labels, num_clients, num_classes, rng, alpha, min_size, max_tries,
                    ipc, method):
    n = labels.shape[0]
    if min_size * num_clients > n:
        raise ValueError(
            f"min_size * num_clients = {min_size} * {num_clients} = {min_size * num_clients} "
            f"exceeds the number of samples ({n})")
    by_class = _class_indices(labels, num_classes)
    base = [[] for _ in range(num_clients)]
    rest = by_class
    if ipc:
        for c, idx in enumerate(by_class):
            if ipc * num_clients > len(idx):
                raise ValueError(
                    f"ipc * num_clients = {ipc} * {num_clients} = {ipc * num_clients} exceeds "
                    f"the size of class {c} ({len(idx)} samples)")
        remainder = n - ipc * num_clients * num_classes
        if min_size * num_clients > remainder:
            raise ValueError(
                f"min_size * num_clients = {min_size} * {num_clients} = "
                f"{min_size * num_clients} exceeds the {remainder} samples left after the "
                f"ipc floor (the collabdm scheme checks min_size on that remainder)")
        # The floor is drawn once, as the authors do; only the split of the
        # remainder is redrawn until it meets min_size.
        rest = []
        for idx in by_class:
            idx = rng.permutation(idx)
            for i in range(num_clients):
                base[i].append(idx[i * ipc:(i + 1) * ipc])
            rest.append(idx[ipc * num_clients:])
    # The cap is N/K with N the whole dataset, compared with what a client
    # got of the remainder (its floor does not count), as in the authors' code.
    cap = n / num_clients
    for _ in range(max_tries):
        shuffled = [rng.permutation(idx) for idx in rest]
        parts = _dirichlet_try(rng, shuffled, [[] for _ in range(num_clients)],
                               num_clients, alpha, cap)
        if parts is None:
            continue
        if min(sum(len(a) for a in p) for p in parts) >= min_size:
            merged = [np.concatenate(b + p) if b + p else np.zeros(0, np.int64)
                      for b, p in zip(base, parts)]
            return _finish(labels, merged, num_classes, method)
    raise ValueError(
        f"Dirichlet partition could not give every one of {num_clients} clients at least "
        f"min_size={min_size} samples after max_tries={max_tries} draws with alpha={alpha}; "
        f"use a smaller min_size or a larger alpha")


def partition_dirichlet(labels, num_clients: int, *, alpha: float, seed: int,
                        min_size: int = 10, num_classes: int | None = None,
                        max_tries: int = 1000) -> Partition:
    """Label-Dirichlet split (NIID-Bench).

    For each class, the shuffled samples are cut by proportions drawn from
    ``Dir(alpha * 1_K)``; a client already holding at least ``N / K`` samples
    gets a zero share of the class (this keeps sizes from running away). The
    whole draw is repeated until every client holds ``>= min_size`` samples.

    Args:
      labels: integer class labels, shape ``[N]``.
      num_clients: number of clients K, ``1 <= K <= N``.
      alpha: concentration, ``> 0``; small values give skewed label mixes.
        ``float('inf')`` gives the limit of equal shares of every class.
      seed: non-negative integer; the split is a pure function of it.
      min_size: smallest allowed client size, ``min_size * K <= N``.
      num_classes: C; defaults to ``max(labels) + 1``.
      max_tries: number of draws before giving up (``>= 1``).

    Returns:
      A :class:`Partition` with ``method='dirichlet'``.

    Raises:
      ValueError: on bad arguments or when no draw meets ``min_size``.
    """
    labels, num_clients, num_classes, rng = _prepare(labels, num_clients, seed, num_classes)
    alpha = _check_alpha(alpha)
    min_size = _check_int("min_size", min_size, minimum=0)
    max_tries = _check_int("max_tries", max_tries, minimum=1)
    return _dirichlet_loop(labels, num_clients, num_classes, rng, alpha, min_size,
                           max_tries, ipc=0, method="dirichlet")


def partition_collabdm(labels, num_clients: int, *, alpha: float, ipc: int, seed: int,
                       min_size: int = 10, num_classes: int | None = None,
                       max_tries: int = 1000) -> Partition:
    """The CollabDM partition: ``ipc`` samples of every class per client, rest Dirichlet.

    Each client first receives ``ipc`` random samples of every class (so every
    client can distil every class), drawn once; the remainder of each class is
    split as in :func:`partition_dirichlet`, redrawn until every client's share
    of the remainder holds ``>= min_size`` samples. As in the authors' code, a
    client is excluded from a class once its share of the remainder reaches
    ``N / K`` (N the whole dataset); the floor counts for neither test.

    Args:
      labels: integer class labels, shape ``[N]``.
      num_clients: number of clients K, ``1 <= K <= N``.
      alpha: concentration, ``> 0`` (``inf``: equal shares of the remainder).
      ipc: guaranteed samples per class per client, ``>= 1``; ``ipc * K`` may
        not exceed the size of any class.
      seed: non-negative integer; the split is a pure function of it.
      min_size: smallest allowed share of the remainder per client (the
        authors use 10); ``min_size * K`` may not exceed the remainder.
      num_classes: C; defaults to ``max(labels) + 1``.
      max_tries: number of draws of the remainder before giving up (``>= 1``).

    Returns:
      A :class:`Partition` with ``method='collabdm'``.
    """
    labels, num_clients, num_classes, rng = _prepare(labels, num_clients, seed, num_classes)
    alpha = _check_alpha(alpha)
    ipc = _check_int("ipc", ipc, minimum=1)
    min_size = _check_int("min_size", min_size, minimum=0)
    max_tries = _check_int("max_tries", max_tries, minimum=1)
    return _dirichlet_loop(labels, num_clients, num_classes, rng, alpha, min_size,
                           max_tries, ipc=ipc, method="collabdm")


def partition_shards(labels, num_clients: int, *, classes_per_client: int, seed: int,
                     num_classes: int | None = None) -> Partition:
    """k-classes-per-client split.

    Classes are laid out in a random cyclic order and client slots are dealt
    along it, so client ``i`` holds ``k`` consecutive classes of that order
    (always distinct since ``k <= C``), every class is held by
    ``floor(K*k/C)`` or ``ceil(K*k/C)`` clients, and every class is covered
    when ``K * k >= C``. When ``K * k < C`` the classes nobody holds are left
    out of the partition. Each class's shuffled samples are split into
    near-equal parts among its holders.

    Args:
      labels: integer class labels, shape ``[N]``.
      num_clients: number of clients K, ``1 <= K <= N``.
      classes_per_client: k, in ``[1, C]``.
      seed: non-negative integer; the split is a pure function of it.
      num_classes: C; defaults to ``max(labels) + 1``.

    Returns:
      A :class:`Partition` with ``method='shards'``.

    Raises:
      ValueError: on bad arguments, or when some class has fewer samples than
        the ``ceil(K*k/C)`` clients that may share it (a holder would get
        nothing of it).
    """
    labels, num_clients, num_classes, rng = _prepare(labels, num_clients, seed, num_classes)
    k = _check_int("classes_per_client", classes_per_client, minimum=1)
    if k > num_classes:
        raise ValueError(
            f"classes_per_client must be in [1, num_classes={num_classes}], got {k}")
    by_class = _class_indices(labels, num_classes)
    # Checked against the largest possible number of holders so that whether a
    # configuration is valid does not depend on the seed.
    max_holders = -(-num_clients * k // num_classes)
    for c, idx in enumerate(by_class):
        if len(idx) < max_holders:
            raise ValueError(
                f"class {c} has {len(idx)} samples but may be shared by up to {max_holders} "
                f"clients (ceil(num_clients * classes_per_client / num_classes)); "
                f"use fewer clients or a smaller classes_per_client")
    class_order = rng.permutation(num_classes)
    client_order = rng.permutation(num_clients)
    holders = [[] for _ in range(num_classes)]
    for slot, client in enumerate(client_order):
        for j in range(k):
            holders[class_order[(slot * k + j) % num_classes]].append(client)
    parts = [[] for _ in range(num_clients)]
    for c, idx in enumerate(by_class):
        if not holders[c]:
            continue
        for client, chunk in zip(holders[c], np.array_split(rng.permutation(idx), len(holders[c]))):
            parts[client].append(chunk)
    parts = [np.concatenate(p) for p in parts]
    return _finish(labels, parts, num_classes, "shards")


def make_partition(method: str, labels, num_clients: int, *, seed: int,
                   alpha: float | None = None, ipc: int | None = None,
                   classes_per_client: int | None = None, min_size: int = 10,
                   num_classes: int | None = None) -> Partition:
    """Dispatches to one of the schemes by name (for configs and launch scripts).

    Args:
      method: one of ``'iid'``, ``'dirichlet'``, ``'collabdm'``, ``'shards'``.
      labels: integer class labels, shape ``[N]``.
      num_clients: number of clients K.
      seed: non-negative integer.
      alpha: required for ``'dirichlet'`` and ``'collabdm'``. With
        ``'dirichlet'``, ``alpha=float('inf')`` means an iid split (the result
        then has ``method='iid'``); with ``'collabdm'`` it keeps the ``ipc``
        floor and splits the remainder of each class equally.
      ipc: required for ``'collabdm'``.
      classes_per_client: required for ``'shards'``.
      min_size: for the Dirichlet schemes.
      num_classes: C; defaults to ``max(labels) + 1``.

    Arguments a method does not use are ignored, so one config can carry all
    of them.

    Returns:
      A :class:`Partition`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def require(name, value):
        if value is None:
            raise ValueError(f"{name} is required for method {method!r}")
        return value

    if method == "iid":
        return partition_iid(labels, num_clients, seed=seed, num_classes=num_classes)
    if method == "dirichlet":
        alpha = _check_alpha(require("alpha", alpha))
        if math.isinf(alpha):
            return partition_iid(labels, num_clients, seed=seed, num_classes=num_classes)
        return partition_dirichlet(labels, num_clients, alpha=alpha, seed=seed,
                                   min_size=min_size, num_classes=num_classes)
    if method == "collabdm":
        return partition_collabdm(labels, num_clients, alpha=require("alpha", alpha),
                                  ipc=require("ipc", ipc), seed=seed, min_size=min_size,
                                  num_classes=num_classes)
    return partition_shards(labels, num_clients,
                            classes_per_client=require("classes_per_client", classes_per_client),
                            seed=seed, num_classes=num_classes)


def format_count_table(counts, class_names: Sequence[str] | None = None) -> str:
    """Renders a clients x classes count matrix as a fixed-width table.

    One row per client plus a ``total`` row; one column per class plus a
    ``total`` column. Numbers are right-aligned.

    Args:
      counts: ``[num_clients, num_classes]`` non-negative integers.
      class_names: optional column headers, one per class (default: indices).

    Returns:
      The table as a string (lines joined by ``\\n``, no trailing newline).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be 2-D [num_clients, num_classes], got shape {counts.shape}")
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {counts.dtype}")
    counts = counts.astype(np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError(f"counts must be >= 0, found {counts.min()}")
    num_clients, num_classes = counts.shape
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    else:
        class_names = [str(n) for n in class_names]
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names must have num_classes={num_classes} entries, got {len(class_names)}")
    header = ["client"] + class_names + ["total"]
    rows = [[str(i)] + [str(v) for v in row] + [str(row.sum())] for i, row in enumerate(counts)]
    col_tot = counts.sum(axis=0)
    rows.append(["total"] + [str(v) for v in col_tot] + [str(col_tot.sum())])
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]

    def fmt(cells):
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest)

    rule = "-" * len(fmt(header))
    lines = [fmt(header), rule] + [fmt(r) for r in rows[:-1]] + [rule, fmt(rows[-1])]
    return "\n".join(lines)
