"""The one-shot client -> server upload of CollabDM, and its wire format.

Each client sends exactly one message. For every server iteration t (one
random network psi_t each) and class c it carries the mean embedding of the
client's augmented real images of class c under psi_t, how many images stand
behind that mean, the client's local class sizes, optionally the mean of the
squared embeddings (for std-matching targets) and optionally a few locally
distilled images that the server may use to initialise its synthetic set.

Wire format (version 1), all integers little-endian::

    magic         6 bytes   b"CDMMSG"
    version       uint16    PROTOCOL_VERSION
    header_len    uint32    length of the msgpack header
    body_len      uint64    length of the concatenated array bytes
    header        msgpack map: protocol_version, client_id,
                  root_key_fingerprint, config_hash, transport_dtype and
                  "arrays", a list of {name, dtype, shape} in body order
    body          raw C-order array bytes, one array after another
    digest        32 bytes  sha256 of everything above

The version sits at a fixed offset ahead of anything version-dependent so a
reader can name a version mismatch before trying to parse the rest; the two
lengths let it tell a truncated file from a corrupted one. No pickle is
involved anywhere: the header is plain msgpack data and arrays are raw bytes
read back with ``numpy.frombuffer``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import ml_dtypes
import msgpack
import numpy as np

PROTOCOL_VERSION = 1

MAGIC = b"CDMMSG"
# magic, version (uint16), header_len (uint32), body_len (uint64).
_PREFIX = struct.Struct("<6sHIQ")
_DIGEST_LEN = hashlib.sha256().digest_size
TRANSPORT_DTYPES = ("float32", "bfloat16")

# Wire dtype names. Float arrays travel in the transport dtype; integer
# arrays always travel as int32 so counts and labels are never rounded.
_WIRE_F32 = "<f4"
_WIRE_BF16 = "bfloat16"
_WIRE_I32 = "<i4"
_FLOAT_FIELDS = ("means", "second_moments", "local_images")
_INT_FIELDS = ("counts", "class_counts", "local_labels")
_ARRAY_FIELDS = ("means", "counts", "class_counts", "second_moments",
                 "local_images", "local_labels")
_REQUIRED_ARRAYS = ("means", "counts", "class_counts")
_HEADER_KEYS = ("protocol_version", "client_id", "root_key_fingerprint",
                "config_hash", "transport_dtype", "arrays")
# Limits on declared array shapes, checked before anything is allocated. No
# field has more than 4 axes (images [M, H, W, Ch]); numpy itself refuses more
# than 64 axes or sizes past 2**63, and would raise its own ValueError.
_MAX_NDIM = 8
_MAX_DIM = 2**31 - 1
_MAX_NONZERO_PRODUCT = 2**56


class MessageError(ValueError):
  """A client message is malformed or does not belong to this run.

  The text names the offending field and what was expected, so that a server
  rejecting an upload can tell the operator why.
  """


@dataclasses.dataclass(frozen=True, eq=False)
class ClientMessage:
  """Everything one client uploads, once, to the server.

  Equality is identity (``eq=False``): field-wise ``==`` on numpy arrays is
  ambiguous, compare arrays explicitly instead.

  Attributes:
    client_id: non-negative client index.
    root_key_fingerprint: ``key_fingerprint(root_key)`` of the run's root
      key, from which every psi_t is derived; lets the server refuse
      statistics computed under different random networks.
    config_hash: ``config_hash(config)`` of the settings that shape the
      statistics (architecture, augmentation, iterations, ...).
    means: [T, C, D] float32 mean embedding per iteration and class; rows
      with ``counts == 0`` are all zero.
    counts: [T, C] int32 number of samples embedded at (t, c), >= 0.
    class_counts: [C] int32 local class sizes, >= 0.
    second_moments: optional [T, C, D] float32 mean of squared embeddings,
      >= 0 and zero where ``counts == 0``.
    local_images: optional [M, *input_shape] float32 locally distilled images
      (or table rows [M, F]).
    local_labels: optional [M] int32 labels of ``local_images`` in [0, C).
    protocol_version: format version the message was built for.
  """

  client_id: int
  root_key_fingerprint: str
  config_hash: str
  means: np.ndarray
  counts: np.ndarray
  class_counts: np.ndarray
  second_moments: Optional[np.ndarray] = None
  local_images: Optional[np.ndarray] = None
  local_labels: Optional[np.ndarray] = None
  protocol_version: int = PROTOCOL_VERSION

  def nbytes(self) -> int:
    """Payload size in bytes with every array element counted as 4 bytes.

    This is the float32 upload cost the paper reports (headers excluded);
    int32 arrays are 4 bytes per element as well.
    """
    total = 0
    for name in _ARRAY_FIELDS:
      value = getattr(self, name)
      if value is not None:
        total += 4 * int(np.size(value))
    return total


@dataclasses.dataclass(frozen=True, eq=False)
class MessageSpec:
  """What the server expects of every upload; a field set to None is not checked.

  Equality is identity (``eq=False``): ``embedding_range`` holds arrays.

  Attributes:
    root_key_fingerprint: expected ``key_fingerprint`` of the run's root key.
    config_hash: expected ``config_hash`` of the run's configuration.
    num_iterations: T, the number of server iterations (random networks).
    num_classes: C.
    embed_dim: D, the embedding width of psi_t.
    image_shape: (H, W, Ch) that local images must have, if any are sent.
    requires_second_moments: reject messages without ``second_moments``.
    batch_real: samples a client embeds per (t, c) at most (the run's
      ``stats.batch_real``); ``counts[t, c] <= batch_real``.
    max_class_size: the server's bound on any client's class size;
      ``class_counts[c] <= max_class_size`` (caps a client's count weight).
    embedding_range: ``(lo, hi)`` arrays broadcastable to ``[T, C, D]``:
      every embedding entry of psi_t lies in ``[lo, hi]``, so every mean
      does too and every mean of squares lies in ``[0, max(lo**2, hi**2)]``
      (``embedding_bounds.embedding_ranges``, or a configured bound).
    noised_range: differential privacy (``privacy.noised_mean_range``):
      ``class_counts -> (lo, hi)`` broadcastable to ``[T, C, D]``, the range
      an honest client's noised means lie in, replacing ``embedding_range``
      for the means (they carry Gaussian noise, whose spread depends on the
      class sizes the message claims).
  """

  root_key_fingerprint: Optional[str]
  config_hash: Optional[str]
  num_iterations: Optional[int]
  num_classes: Optional[int]
  embed_dim: Optional[int]
  image_shape: Optional[tuple] = None
  requires_second_moments: bool = False
  batch_real: Optional[int] = None
  max_class_size: Optional[int] = None
  embedding_range: Optional[Tuple[Any, Any]] = None
  noised_range: Optional[Callable[[np.ndarray], Tuple[Any, Any]]] = None


# ----------------------------------------------------------------------------
# Fingerprints.


def key_fingerprint(key) -> str:
  """Stable hex digest identifying a JAX PRNG key.

  Typed keys (``jax.random.key``) and raw uint32 keys
  (``jax.random.PRNGKey``) are both accepted; a raw key is read under the
  default PRNG implementation, so ``key(0)`` and ``PRNGKey(0)`` give the same
  fingerprint. The implementation name, the key array's shape and its data
  all enter the digest.

  Args:
    key: a typed key array or a raw uint32 key array (any batch shape).

  Returns:
    a 64-character lowercase sha256 hex string.

  Raises:
    ValueError: if ``key`` is neither a typed key nor raw uint32 key data
      of the shape the default implementation uses.
  """
  dtype = getattr(key, "dtype", None)
  if dtype is None:
    raise ValueError(f"key must be a JAX PRNG key array, got {type(key).__name__}")
  if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if np.dtype(dtype) != np.uint32:
      raise ValueError(f"key must be a typed PRNG key or raw uint32 key data, "
                       f"got dtype {dtype}")
    try:
      key = jax.random.wrap_key_data(key)
    except (TypeError, ValueError) as e:
      raise ValueError(f"key: raw key data of shape {np.shape(key)} does not fit "
                       f"the default PRNG implementation: {e}") from e
  impl = str(jax.random.key_impl(key))
  data = np.asarray(jax.random.key_data(key)).astype("<u4")
  h = hashlib.sha256()
  h.update(b"collabdm_jax.key_fingerprint.v1\0")
  h.update(impl.encode("utf-8") + b"\0")
  h.update(json.dumps(list(np.shape(key))).encode("ascii") + b"\0")
  h.update(data.tobytes())
  return h.hexdigest()


def _canonical(value: Any, path: str) -> Any:
  """Maps a config value to plain JSON types, the same way for equal values."""
  if hasattr(value, "to_dict") and callable(value.to_dict):
    # ml_collections ConfigDict / FrozenConfigDict; to_dict resolves
    # FieldReferences to their current values.
    value = value.to_dict()
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise ValueError(f"config: key {k!r} at {path or '<root>'} must be a str")
      out[k] = _canonical(v, f"{path}.{k}" if path else k)
    return out
  if isinstance(value, (list, tuple)):
    return [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, np.ndarray):
    return _canonical(value.tolist(), path)
  if value is None or isinstance(value, (bool, np.bool_)):
    return None if value is None else bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    f = float(value)
    # A float equal to an integer hashes like that integer, so `lr=10` in one
    # config and `lr=10.0` in another are not reported as a mismatch.
    if math.isfinite(f) and f == int(f) and abs(f) < 2.0**53:
      return int(f)
    if not math.isfinite(f):
      return {"__float__": repr(f)}
    return f
  if isinstance(value, str):
    return value
  raise ValueError(f"config: value at {path or '<root>'} has unsupported type "
                   f"{type(value).__name__}; use str, numbers, bool, None, "
                   f"lists/tuples or mappings")


def config_hash(config) -> str:
  """Stable sha256 hex digest of a configuration.

  The config is turned into canonical JSON: mapping keys sorted, tuples and
  lists alike, numpy scalars and arrays as Python numbers and lists, floats
  written with Python's shortest round-trip ``repr`` and integral floats
  written as integers. Pass only the settings that shape the uploaded
  statistics; anything per-client (ids, output paths) must be left out or
  every client will disagree.

  Args:
    config: a mapping, an ``ml_collections.ConfigDict``/``FrozenConfigDict``
      or a dataclass instance, nested arbitrarily.

  Returns:
    a 64-character lowercase sha256 hex string.

  Raises:
    ValueError: on a non-str key or a value of unsupported type (names its
      path in the config).
  """
  canonical = _canonical(config, "")
  text = json.dumps(canonical, sort_keys=True, separators=(",", ":"),
                    ensure_ascii=True, allow_nan=False)
  return hashlib.sha256(text.encode("ascii")).hexdigest()


# ----------------------------------------------------------------------------
# Validation.


def _as_array(msg: ClientMessage, name: str) -> Optional[np.ndarray]:
  value = getattr(msg, name)
  if value is None:
    return None
  if not hasattr(value, "dtype") or not hasattr(value, "shape"):
    raise MessageError(f"{name} must be an array, got {type(value).__name__}")
  return np.asarray(value)


def _check_dtype(name: str, arr: np.ndarray, expected) -> None:
  if arr.dtype != np.dtype(expected):
    raise MessageError(f"{name} has wrong dtype {arr.dtype}, expected "
                       f"{np.dtype(expected)}")


def _first(mask: np.ndarray) -> tuple:
  """Index of the first True of a non-empty boolean mask that has one.

  ``argmax`` allocates nothing of the mask's size (``argwhere`` would hold
  every hit's index: 8 bytes per axis per hit).
  """
  return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _check_finite(name: str, arr: np.ndarray) -> None:
  bad = ~np.isfinite(arr)
  if bad.any():
    idx = _first(bad)
    raise MessageError(f"{name} contains {int(bad.sum())} non-finite value(s) "
                       f"(NaN/Inf), first at index {idx}")


def validate_message(msg: ClientMessage, spec: Optional[MessageSpec] = None) -> None:
  """Checks a message for internal consistency and, given a spec, for this run.

  Args:
    msg: the message to check.
    spec: what the server expects; ``None`` checks only internal consistency.

  Raises:
    MessageError: naming the first problem found (version, fingerprint,
      config hash, shapes, dtypes, non-finite values, counts, labels, image
      shape, missing second moments, or statistics no honest client can
      send: counts above the class size or ``batch_real``, class sizes above
      the server's bound, means of squares below squared means, values
      outside psi_t's embedding range).
  """
  if not isinstance(msg, ClientMessage):
    raise MessageError(f"expected a ClientMessage, got {type(msg).__name__}")
  if msg.protocol_version != PROTOCOL_VERSION:
    raise MessageError(f"unsupported protocol version {msg.protocol_version!r}; "
                       f"expected protocol version {PROTOCOL_VERSION}")
  if isinstance(msg.client_id, bool) or not isinstance(msg.client_id, (int, np.integer)):
    raise MessageError(f"client_id must be an int, got {type(msg.client_id).__name__}")
  if not 0 <= int(msg.client_id) < 2**63:
    raise MessageError(f"client_id must be in [0, 2**63), got {msg.client_id}")
  for name in ("root_key_fingerprint", "config_hash"):
    value = getattr(msg, name)
    if not isinstance(value, str) or not value:
      raise MessageError(f"{name} must be a non-empty str, got {value!r}")

  # Identity first: a message from another run is rejected as such, even if
  # its arrays happen to be malformed too.
  if spec is not None:
    if (spec.root_key_fingerprint is not None
        and msg.root_key_fingerprint != spec.root_key_fingerprint):
      raise MessageError(
          f"root_key_fingerprint {msg.root_key_fingerprint[:16]}... differs from "
          f"the server's {spec.root_key_fingerprint[:16]}...: the client used a "
          f"different root key, so its random networks are not the server's")
    if spec.config_hash is not None and msg.config_hash != spec.config_hash:
      raise MessageError(
          f"config_hash {msg.config_hash[:16]}... differs from the server's "
          f"{spec.config_hash[:16]}...: the client ran with a different config")

  arrays = {name: _as_array(msg, name) for name in _ARRAY_FIELDS}
  for name in _REQUIRED_ARRAYS:
    if arrays[name] is None:
      raise MessageError(f"{name} is required but missing")
  for name in _FLOAT_FIELDS:
    if arrays[name] is not None:
      _check_dtype(name, arrays[name], np.float32)
  for name in _INT_FIELDS:
    if arrays[name] is not None:
      _check_dtype(name, arrays[name], np.int32)

  means, counts, class_counts = arrays["means"], arrays["counts"], arrays["class_counts"]
  if means.ndim != 3:
    raise MessageError(f"means must have shape [T, C, D], got {means.shape}")
  t, c, d = means.shape
  if counts.shape != (t, c):
    raise MessageError(f"counts shape {counts.shape} is inconsistent with means "
                       f"shape {means.shape}; expected {(t, c)}")
  if class_counts.shape != (c,):
    raise MessageError(f"class_counts shape {class_counts.shape} is inconsistent "
                       f"with means shape {means.shape}; expected {(c,)}")
  second = arrays["second_moments"]
  if second is not None and second.shape != means.shape:
    raise MessageError(f"second_moments shape {second.shape} is inconsistent "
                       f"with means shape {means.shape}")
  if spec is not None:
    for label, got, want in (("T (num_iterations)", t, spec.num_iterations),
                             ("C (num_classes)", c, spec.num_classes),
                             ("D (embed_dim)", d, spec.embed_dim)):
      if want is not None and got != want:
        raise MessageError(f"means shape {means.shape}: {label} is {got}, "
                           f"the server expects {want}")
    if spec.requires_second_moments and second is None:
      raise MessageError("second_moments are required by the server (std "
                         "targets) but missing from the message")

  images, labels = arrays["local_images"], arrays["local_labels"]
  if (images is None) != (labels is None):
    raise MessageError("local_images and local_labels must be sent together; "
                       f"got local_images={'present' if images is not None else 'None'}, "
                       f"local_labels={'present' if labels is not None else 'None'}")
  if images is not None:
    if images.ndim < 2:
      raise MessageError(f"local_images must have shape [M, *input_shape] "
                         f"(images [M, H, W, Ch] or table rows [M, F]), got "
                         f"{images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
      raise MessageError(f"local_labels shape {labels.shape} does not match "
                         f"local_images length {images.shape[0]}")
    if spec is not None and spec.image_shape is not None:
      if tuple(images.shape[1:]) != tuple(spec.image_shape):
        raise MessageError(f"local_images image shape {tuple(images.shape[1:])} "
                           f"differs from the server's {tuple(spec.image_shape)}")

  for name in _FLOAT_FIELDS:
    if arrays[name] is not None:
      _check_finite(name, arrays[name])

  if (counts < 0).any():
    idx = _first(counts < 0)
    raise MessageError(f"counts must be >= 0, got {int(counts[idx])} at {idx}")
  if (class_counts < 0).any():
    (idx,) = _first(class_counts < 0)
    raise MessageError(f"class_counts must be >= 0, got {int(class_counts[idx])} "
                       f"for class {idx}")
  orphan = (counts > 0) & (class_counts[None, :] == 0)
  if orphan.any():
    ti, ci = _first(orphan)
    raise MessageError(f"counts[{ti}, {ci}] = {int(counts[ti, ci])} > 0 but "
                       f"class_counts[{ci}] == 0: the client has no samples of "
                       f"class {ci}")
  empty = counts == 0
  for name in ("means", "second_moments"):
    arr = arrays[name]
    if arr is not None and empty.any() and (arr[empty] != 0).any():
      ti, ci = _first(empty & (arr != 0).any(-1))
      raise MessageError(f"{name}[{ti}, {ci}] must be all zero because "
                         f"counts[{ti}, {ci}] == 0")
  if second is not None and (second < 0).any():
    idx = _first(second < 0)
    raise MessageError(f"second_moments must be >= 0 (means of squares), got "
                       f"{float(second[idx])} at {idx}")
  if labels is not None and labels.size:
    bad = (labels < 0) | (labels >= c)
    if bad.any():
      (i,) = _first(bad)
      raise MessageError(f"local_labels out of range: local_labels[{i}] = "
                         f"{int(labels[i])}, expected in [0, {c})")
  _check_statistics(means, counts, class_counts, second, spec)


# A mean of squares computed in float32 (and rounded to bfloat16 on the wire,
# relative error <= 2**-8 on each side) may dip below the square of the mean
# by rounding alone; 2**-6 covers both with room. The same slack widens the
# embedding range.
_ROUNDING_SLACK = 2.0**-6


def _check_statistics(means, counts, class_counts, second, spec) -> None:
  """What the statistics themselves imply, whatever the client claims.

  A mean stands on at most as many samples as the client holds of the class
  and, per (t, c), at most ``batch_real``; a mean of squares is never below
  the squared mean; embeddings of psi_t lie in its range.
  """
  over = counts > class_counts[None, :]
  if over.any():
    ti, ci = _first(over)
    raise MessageError(
        f"counts[{ti}, {ci}] = {int(counts[ti, ci])} exceeds class_counts[{ci}] "
        f"= {int(class_counts[ci])}: a mean cannot stand on more samples than "
        f"the client holds")
  if spec is not None and spec.batch_real is not None:
    over = counts > spec.batch_real
    if over.any():
      ti, ci = _first(over)
      raise MessageError(
          f"counts[{ti}, {ci}] = {int(counts[ti, ci])} exceeds batch_real = "
          f"{spec.batch_real}, the samples per (iteration, class) of this run")
  if spec is not None and spec.max_class_size is not None:
    over = class_counts > spec.max_class_size
    if over.any():
      (ci,) = _first(over)
      raise MessageError(
          f"class_counts[{ci}] = {int(class_counts[ci])} exceeds the server's "
          f"bound max_class_size = {spec.max_class_size}")
  if spec is not None and spec.noised_range is not None:
    _check_embedding_range(means, second, *spec.noised_range(class_counts))
  elif spec is not None and spec.embedding_range is not None:
    _check_embedding_range(means, second, *spec.embedding_range)
  if second is not None:
    with np.errstate(over="ignore"):
      low = second < np.square(means) * (1 - _ROUNDING_SLACK) - 1e-30
    if low.any():
      idx = _first(low)
      raise MessageError(
          f"second_moments{list(idx)} = {float(second[idx]):.6g} is below "
          f"means{list(idx)}**2 = {float(means[idx]) ** 2:.6g}: a mean of "
          f"squares is never below the square of the mean")


def _check_embedding_range(means, second, lo, hi) -> None:
  """Means within ``[lo, hi]``, means of squares within ``max(lo**2, hi**2)``.

  The bounds stay in their own (small, broadcastable) shape: only boolean
  masks of the message's size are allocated.
  """
  lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
  try:
    np.broadcast_shapes(lo.shape, hi.shape, means.shape)
  except ValueError as e:
    raise MessageError(f"means shape {means.shape} does not fit the server's "
                       f"embedding range of shape {lo.shape}") from e
  slack = _ROUNDING_SLACK * np.maximum(np.abs(lo), np.abs(hi)) + 1e-6
  low, high = lo - slack, hi + slack
  out = (means < low) | (means > high)
  if out.any():
    idx = _first(out)
    raise MessageError(
        f"means{list(idx)} = {float(means[idx]):.6g} lies outside "
        f"[{float(np.broadcast_to(lo, means.shape)[idx]):.6g}, "
        f"{float(np.broadcast_to(hi, means.shape)[idx]):.6g}], the range of "
        f"every embedding entry of the iteration's network")
  if second is not None:
    top = np.maximum(np.square(lo), np.square(hi)) * (1 + _ROUNDING_SLACK) + 1e-6
    out = second > top
    if out.any():
      idx = _first(out)
      raise MessageError(
          f"second_moments{list(idx)} = {float(second[idx]):.6g} exceeds "
          f"{float(np.broadcast_to(top, second.shape)[idx]):.6g}, the largest "
          f"square of an embedding entry of the iteration's network")


# ----------------------------------------------------------------------------
# Encoding.


def _wire_array(name: str, arr: np.ndarray, transport_dtype: str) -> Tuple[str, bytes]:
  """Returns (wire dtype name, little-endian C-order bytes) of one field."""
  if name in _INT_FIELDS:
    return _WIRE_I32, np.ascontiguousarray(arr, dtype="<i4").tobytes()
  if transport_dtype == "bfloat16":
    rounded = np.ascontiguousarray(arr, dtype=np.float32).astype(ml_dtypes.bfloat16)
    if not np.isfinite(rounded).all():
      # float32 values just below float32 max round up past bfloat16's max.
      raise MessageError(f"{name} overflows bfloat16 (|x| > "
                         f"{float(ml_dtypes.finfo(ml_dtypes.bfloat16).max):.3e}); "
                         f"send it as float32")
    return _WIRE_BF16, rounded.view(np.uint16).astype("<u2").tobytes()
  return _WIRE_F32, np.ascontiguousarray(arr, dtype="<f4").tobytes()


def encode_unchecked(msg: ClientMessage, transport_dtype: str) -> bytes:
  """Serialises ``msg`` without validating it.

  ``encode_message`` validates first; called alone, this writes what a
  forger could send, for tests and attack tables of the server's checks.
  """
  entries: List[Dict[str, Any]] = []
  chunks: List[bytes] = []
  for name in _ARRAY_FIELDS:
    value = getattr(msg, name)
    if value is None:
      continue
    arr = np.asarray(value)
    dtype, raw = _wire_array(name, arr, transport_dtype)
    entries.append({"name": name, "dtype": dtype, "shape": [int(s) for s in arr.shape]})
    chunks.append(raw)
  header = msgpack.packb({
      "protocol_version": int(msg.protocol_version),
      "client_id": int(msg.client_id),
      "root_key_fingerprint": msg.root_key_fingerprint,
      "config_hash": msg.config_hash,
      "transport_dtype": transport_dtype,
      "arrays": entries,
  }, use_bin_type=True)
  body_len = sum(len(c) for c in chunks)
  prefix = _PREFIX.pack(MAGIC, int(msg.protocol_version) & 0xFFFF, len(header), body_len)
  digest = hashlib.sha256()
  for part in (prefix, header, *chunks):
    digest.update(part)
  return b"".join((prefix, header, *chunks, digest.digest()))


def _check_transport_dtype(transport_dtype: str) -> None:
  if transport_dtype not in TRANSPORT_DTYPES:
    raise ValueError(f"transport_dtype must be one of {TRANSPORT_DTYPES}, got "
                     f"{transport_dtype!r}")


def encode_message(msg: ClientMessage, *, transport_dtype: str = "float32") -> bytes:
  """Validates and serialises a message to bytes.

  Args:
    msg: the message; it must pass ``validate_message(msg)``.
    transport_dtype: ``"float32"`` (exact) or ``"bfloat16"``: means,
      second_moments and local_images are rounded to nearest-even bfloat16
      on the wire, halving their size (relative error <= 2**-8); decoding
      returns float32 either way. Integer arrays are always exact int32.

  Returns:
    the encoded message (see the module docstring for the layout).

  Raises:
    ValueError: on an unknown ``transport_dtype``.
    MessageError: if ``msg`` is invalid, or a value overflows bfloat16.
  """
  _check_transport_dtype(transport_dtype)
  validate_message(msg)
  return encode_unchecked(msg, transport_dtype)


# ----------------------------------------------------------------------------
# Decoding.


def _parse_header(raw: bytes) -> Dict[str, Any]:
  try:
    header = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
  except Exception as e:  # msgpack raises several unrelated exception types.
    raise MessageError(f"message header is not valid msgpack: {e}") from e
  if not isinstance(header, dict):
    raise MessageError(f"message header must be a map, got {type(header).__name__}")
  missing = [k for k in _HEADER_KEYS if k not in header]
  if missing:
    raise MessageError(f"message header lacks field(s) {missing}")
  unknown = sorted(set(header) - set(_HEADER_KEYS))
  if unknown:
    raise MessageError(f"message header has unknown field(s) {unknown}")
  if not isinstance(header["arrays"], list):
    raise MessageError("message header field 'arrays' must be a list")
  return header


def _check_declared_shape(name: str, shape: Any) -> None:
  """Rejects a header shape numpy could not represent or that no field has.

  Zero-size shapes allocate nothing, so their other axes are not limited by
  the body length; they are limited here instead (numpy raises its own
  ``ValueError`` on, e.g., ``[2**40, 0, 2**40]``).
  """
  if (not isinstance(shape, list)
      or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
    raise MessageError(f"array {name!r} has an invalid shape {shape!r}: expected "
                       f"a list of non-negative ints")
  if len(shape) > _MAX_NDIM:
    raise MessageError(f"array {name!r} declares {len(shape)} axes, more than the "
                       f"{_MAX_NDIM} any message field can have")
  too_big = [s for s in shape if s > _MAX_DIM]
  if too_big:
    raise MessageError(f"array {name!r} declares an axis of length {too_big[0]}, "
                       f"more than {_MAX_DIM}")
  if math.prod(s for s in shape if s) > _MAX_NONZERO_PRODUCT:
    raise MessageError(f"array {name!r} declares shape {shape}, whose non-zero "
                       f"axes multiply to more than 2**56 elements")


def _read_arrays(header: Dict[str, Any], body: memoryview) -> Dict[str, np.ndarray]:
  transport = header["transport_dtype"]
  if transport not in TRANSPORT_DTYPES:
    raise MessageError(f"unknown transport_dtype {transport!r}, expected one of "
                       f"{TRANSPORT_DTYPES}")
  float_wire = _WIRE_BF16 if transport == "bfloat16" else _WIRE_F32
  arrays: Dict[str, np.ndarray] = {}
  offset = 0
  for entry in header["arrays"]:
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
      raise MessageError(f"array entry {entry!r} must have exactly name, dtype, shape")
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    if name not in _ARRAY_FIELDS:
      raise MessageError(f"unknown array {name!r} in message")
    if name in arrays:
      raise MessageError(f"array {name!r} appears twice in message")
    _check_declared_shape(name, shape)
    expected = _WIRE_I32 if name in _INT_FIELDS else float_wire
    if dtype != expected:
      raise MessageError(f"array {name!r} has wrong dtype {dtype!r} on the wire, "
                         f"expected {expected!r}")
    # The declared size is checked against the bytes actually present before
    # anything is allocated, so no header can make the reader allocate more
    # than a small multiple of the file's size.
    count = math.prod(shape)
    itemsize = 2 if dtype == _WIRE_BF16 else 4
    end = offset + count * itemsize
    if end > len(body):
      raise MessageError(f"array {name!r} runs past the end of the message body "
                         f"(needs {end} bytes, body has {len(body)})")
    chunk = body[offset:end]
    if dtype == _WIRE_BF16:
      # A read-only view, widened to float32 in one copy.
      arr = np.frombuffer(chunk, dtype="<u2").view(ml_dtypes.bfloat16).astype(np.float32)
    elif dtype == _WIRE_F32:
      arr = np.frombuffer(chunk, dtype="<f4").astype(np.float32)
    else:
      arr = np.frombuffer(chunk, dtype="<i4").astype(np.int32)
    arrays[name] = arr.reshape(shape)
    offset = end
  if offset != len(body):
    raise MessageError(f"message body has {len(body) - offset} bytes not "
                       f"described by the header")
  missing = [n for n in _REQUIRED_ARRAYS if n not in arrays]
  if missing:
    raise MessageError(f"required array(s) {missing} missing from message")
  return arrays


def decode_message(data: bytes, spec: Optional[MessageSpec] = None) -> ClientMessage:
  """Parses and validates an encoded message.

  Args:
    data: bytes produced by ``encode_message`` (bytes, bytearray or
      memoryview).
    spec: what the server expects; ``None`` checks only the format and
      internal consistency.

  Returns:
    the message, with float arrays as float32 and integer arrays as int32
    (fresh, writeable arrays).

  Raises:
    MessageError: if the bytes are not a CollabDM message, have another
      protocol version, are truncated or corrupt, or the message is invalid
      or does not match ``spec``.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise MessageError(f"message data must be bytes, got {type(data).__name__}")
  try:
    view = memoryview(data).cast("B")
  except TypeError as e:  # a non-contiguous memoryview cannot be read as bytes
    raise MessageError(f"message data must be contiguous bytes: {e}") from e
  n = len(view)
  head = bytes(view[:len(MAGIC)])
  if head != MAGIC:
    if n < len(MAGIC) and MAGIC.startswith(head):
      raise MessageError(f"message is truncated: {n} bytes, shorter than the "
                         f"{len(MAGIC)}-byte magic")
    raise MessageError(f"not a CollabDM message: bad magic {head!r}, expected {MAGIC!r}")
  if n < _PREFIX.size:
    raise MessageError(f"message is truncated: {n} bytes, shorter than the "
                       f"{_PREFIX.size}-byte fixed prefix")
  _, version, header_len, body_len = _PREFIX.unpack(view[:_PREFIX.size])
  if version != PROTOCOL_VERSION:
    raise MessageError(f"unsupported protocol version {version}; expected "
                       f"protocol version {PROTOCOL_VERSION}")
  expected_len = _PREFIX.size + header_len + body_len + _DIGEST_LEN
  if n < expected_len:
    raise MessageError(f"message is truncated (or its length fields are corrupt): "
                       f"expected {expected_len} bytes, got {n}")
  if n > expected_len:
    raise MessageError(f"message is corrupt: {n - expected_len} unexpected bytes "
                       f"after the declared {expected_len}")
  digest = hashlib.sha256(view[:n - _DIGEST_LEN]).digest()
  if digest != bytes(view[n - _DIGEST_LEN:]):
    raise MessageError("message is corrupt: sha256 checksum mismatch")

  header_end = _PREFIX.size + header_len
  header = _parse_header(bytes(view[_PREFIX.size:header_end]))
  if header["protocol_version"] != version:
    raise MessageError(f"message is corrupt: header protocol version "
                       f"{header['protocol_version']!r} differs from prefix version "
                       f"{version}")
  arrays = _read_arrays(header, view[header_end:header_end + body_len])
  msg = ClientMessage(
      client_id=header["client_id"],
      root_key_fingerprint=header["root_key_fingerprint"],
      config_hash=header["config_hash"],
      protocol_version=header["protocol_version"],
      **arrays)
  validate_message(msg, spec)
  return msg


# ----------------------------------------------------------------------------
# Files.


def write_atomic(path, data: bytes, mode: Optional[int] = None) -> None:
  """Writes ``data`` to ``path`` all at once or not at all.

  The bytes go to a temporary file in the same directory (given ``mode``
  when set), are flushed to disk and renamed over ``path``, so a reader
  never sees half a file; on any failure the temporary file is removed.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    if mode is not None:
      os.chmod(tmp, mode)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    # The temporary file is ours alone; never leave it behind.
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save_message(path, msg: ClientMessage, *, transport_dtype: str = "float32") -> int:
  """Encodes ``msg`` and writes it to ``path`` atomically.

  The bytes go to a temporary file in the same directory, are flushed to
  disk and then renamed over ``path`` with ``os.replace``: a reader sees
  either the old file or the complete new one, never a partial write, and a
  failure (including an invalid message) leaves ``path`` untouched. The
  parent directory must exist.

  Args:
    path: destination file (str or os.PathLike).
    msg: the message; validated as in ``encode_message``.
    transport_dtype: ``"float32"`` or ``"bfloat16"``, see ``encode_message``.

  Returns:
    the number of bytes written.

  Raises:
    ValueError / MessageError: as ``encode_message``; OSError on I/O failure.
  """
  data = encode_message(msg, transport_dtype=transport_dtype)
  write_atomic(path, data)
  return len(data)


def load_message(path, spec: Optional[MessageSpec] = None) -> ClientMessage:
  """Reads and decodes a message written by ``save_message``.

  Args:
    path: file to read (str or os.PathLike).
    spec: what the server expects, see ``decode_message``.

  Returns:
    the validated message.

  Raises:
    MessageError: as ``decode_message``, with the path prepended.
    OSError: if the file cannot be read.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  try:
    return decode_message(data, spec)
  except MessageError as e:
    raise MessageError(f"{path}: {e}") from e
