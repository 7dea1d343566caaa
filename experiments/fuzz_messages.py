"""Fuzzes the server's message decoder with mutated real client messages.

Builds real one-shot messages (a tiny real client pass: the smoke config on
the embedded Fashion-MNIST subset), then decodes many mutated copies under
the server's ``MessageSpec``:

* ``byte_flip``: a few random bits flipped anywhere (the digest must catch it);
* ``truncate`` / ``extend``: the file cut short or padded with random bytes;
* ``structural``: header fields, array entries (shape, dtype, name, order),
  array values (huge counts, scaled or non-finite means, inflated class
  sizes, ...) or the body length changed, then re-sealed with a valid sha256
  digest, as a malicious client would.

Each decode must either return a message or raise ``protocol.MessageError``;
anything else is a *crash*. An accepted message is then checked by an
independent oracle (plain numpy, written separately from the validator) for
the invariants every honest message satisfies; a violation counts as
*accepted_inconsistent*. The peak Python/numpy allocation of every decode is
measured with ``tracemalloc`` against the input's size. Prints and writes one
JSON document.

  nice -n 15 python -m experiments.fuzz_messages --num_mutations=10000 \
      --out=experiments/results/fuzz_messages.json
"""

import collections
import hashlib
import json
import math
import struct
import sys
import time
import tracemalloc

from absl import app
from absl import flags
import jax
import msgpack
import numpy as np
from ml_collections import config_flags

from collabdm_jax import models
from collabdm_jax import protocol
from collabdm_jax import provenance
from collabdm_jax import setup as setup_lib
from collabdm_jax import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/smoke.py", "Config of the real client pass.",
    lock_config=True)
_NUM = flags.DEFINE_integer("num_mutations", 10000, "Mutated messages to decode.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the mutations.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON document here.")

_PREFIX = struct.Struct("<6sHIQ")
_RATIO_MIN_BYTES = 4096
# Values a hostile header or body is likely to carry.
_INTS = [0, 1, -1, 2, 255, 2**15, 2**31 - 1, 2**31, -2**31, 2**32, 2**40,
         2**53 + 1, 2**63 - 1, -2**63, 2**64 - 1]
_FLOATS = [0.0, -0.0, 1e-45, 1.0, -1.0, 1e5, 3e38, -3e38, 3.4028235e38,
           float("inf"), float("-inf"), float("nan")]
_STRS = ["", "x", "means", "counts", "<f4", "<i4", "bfloat16", "float32",
         "\x00", "é" * 40]


def split(data):
  """``(version, header dict, body bytes)`` of a well-formed encoding."""
  _, version, hlen, blen = _PREFIX.unpack_from(data)
  start = _PREFIX.size
  header = msgpack.unpackb(data[start:start + hlen], raw=False)
  return version, header, data[start + hlen:start + hlen + blen]


def reseal(version, header, body):
  """Wire bytes from parts, with consistent lengths and a valid digest."""
  raw = msgpack.packb(header, use_bin_type=True)
  payload = _PREFIX.pack(b"CDMMSG", version & 0xFFFF, len(raw),
                         len(body)) + raw + body
  return payload + hashlib.sha256(payload).digest()


def _random_value(rng, depth=0):
  """A random msgpack-able value: scalars, strings, bytes, lists, maps."""
  kind = rng.integers(0, 8 if depth < 2 else 5)
  if kind == 0:
    return _INTS[rng.integers(len(_INTS))]
  if kind == 1:
    return _FLOATS[rng.integers(len(_FLOATS))]
  if kind == 2:
    return _STRS[rng.integers(len(_STRS))]
  if kind == 3:
    return [None, True, False][rng.integers(3)]
  if kind == 4:
    return rng.bytes(int(rng.integers(0, 16)))
  if kind == 5:
    return [_random_value(rng, depth + 1) for _ in range(rng.integers(0, 5))]
  if kind == 6:
    return [_INTS[rng.integers(len(_INTS))] for _ in range(rng.integers(0, 10))]
  return {_STRS[rng.integers(len(_STRS))]: _random_value(rng, depth + 1)
          for _ in range(rng.integers(0, 4))}


def _entry_layout(header):
  """``[(entry, start, end)]`` byte ranges of each array in the body."""
  out, offset = [], 0
  for e in header["arrays"]:
    size = (2 if e["dtype"] == "bfloat16" else 4) * math.prod(e["shape"])
    out.append((e, offset, offset + size))
    offset += size
  return out


def _wire_dtype(entry):
  return {"<f4": np.dtype("<f4"), "<i4": np.dtype("<i4"),
          "bfloat16": np.dtype("<u2")}[entry["dtype"]]


def _mutate_values(rng, header, body):
  """Overwrites a few elements of one array with hostile values."""
  entry, start, end = _entry_layout(header)[rng.integers(len(header["arrays"]))]
  arr = np.frombuffer(body[start:end], _wire_dtype(entry)).copy()
  if arr.size == 0:
    return body, f"values:{entry['name']}:empty"
  n = int(rng.integers(1, min(arr.size, 8) + 1))
  idx = rng.choice(arr.size, n, replace=False)
  if entry["dtype"] == "<i4":
    choice = rng.integers(4)
    if choice == 0:
      arr[idx] = np.array([_INTS[rng.integers(len(_INTS))] for _ in idx],
                          np.int64).astype("<i4")
    elif choice == 1:
      arr[idx] = arr[idx] + 1      # one more than an honest client could have
    elif choice == 2:
      arr[idx] = 10**6
    else:
      arr[:] = arr * int(rng.integers(2, 1000))
    what = ["interesting", "plus_one", "million", "scaled"][choice]
  else:
    floats = (arr.astype(np.float32) if entry["dtype"] == "<f4" else
              (arr.astype(np.uint32) << 16).view(np.float32))
    choice = rng.integers(5)
    if choice == 0:
      floats[idx] = np.array([_FLOATS[rng.integers(len(_FLOATS))] for _ in idx],
                             np.float32)
    elif choice == 1:
      floats[:] = floats * np.float32(10.0 ** rng.integers(1, 39))
    elif choice == 2:
      floats[:] = -floats
    elif choice == 3:
      floats[idx] = rng.normal(scale=100.0, size=n).astype(np.float32)
    else:
      floats[idx] = floats[idx] * np.float32(1.0 + 1e-3)  # small, honest-looking
    what = ["interesting", "scaled", "sign_flip", "noise", "nudge"][choice]
    with np.errstate(over="ignore", invalid="ignore"):
      arr = (floats.astype("<f4") if entry["dtype"] == "<f4" else
             (floats.view(np.uint32) >> 16).astype("<u2"))
  return (body[:start] + arr.tobytes() + body[end:],
          f"values:{entry['name']}:{what}")


def mutate_structure(rng, data):
  """One structural mutation of an encoded message, re-sealed validly."""
  version, header, body = split(data)
  kind = rng.integers(9)
  if kind == 0:
    key = list(header)[rng.integers(len(header))]
    header[key] = _random_value(rng)
    what = f"header_value:{key}"
  elif kind == 1:
    key = list(header)[rng.integers(len(header))]
    del header[key]
    what = f"header_drop:{key}"
  elif kind == 2:
    header[_STRS[rng.integers(len(_STRS))] + "_extra"] = _random_value(rng)
    what = "header_add"
  elif kind == 3:
    e = header["arrays"][rng.integers(len(header["arrays"]))]
    shape = list(e["shape"])
    op = rng.integers(4)
    if op == 0 and shape:
      shape[rng.integers(len(shape))] = _INTS[rng.integers(len(_INTS))]
    elif op == 1:
      shape = shape + [int(rng.integers(0, 3))]
    elif op == 2 and shape:
      shape = shape[:-1]
    else:
      shape = [_INTS[rng.integers(len(_INTS))] for _ in range(rng.integers(0, 70))]
    e["shape"] = shape
    what = f"shape:{e['name']}"
  elif kind == 4:
    e = header["arrays"][rng.integers(len(header["arrays"]))]
    field = ["name", "dtype"][rng.integers(2)]
    e[field] = (_STRS + [_random_value(rng)])[rng.integers(len(_STRS) + 1)]
    what = f"entry_{field}"
  elif kind == 5:
    arrays = header["arrays"]
    op = rng.integers(3)
    if op == 0:
      arrays.append(dict(arrays[rng.integers(len(arrays))]))
    elif op == 1:
      del arrays[rng.integers(len(arrays))]
    else:
      rng.shuffle(arrays)
    what = ["entry_duplicate", "entry_drop", "entry_reorder"][op]
  elif kind == 6:
    cut = int(rng.integers(0, len(body) + 1))
    body = body[:cut] if rng.integers(2) else body + rng.bytes(int(rng.integers(1, 64)))
    what = "body_length"
  elif kind == 7:
    version = [0, 2, 255, 65535][rng.integers(4)]
    what = "prefix_version"
  else:
    body, what = _mutate_values(rng, header, body)
  return "structural", what, reseal(version, header, body)


def mutate(rng, data):
  """``(family, detail, bytes)``: one random mutation of ``data``."""
  family = rng.integers(4)
  if family == 0:
    out = bytearray(data)
    for pos in rng.integers(0, len(out), int(rng.integers(1, 9))):
      out[pos] ^= 1 << int(rng.integers(8))
    return "byte_flip", "", bytes(out)
  if family == 1:
    cut = int(rng.integers(0, len(data)))
    return "truncate", "", data[:cut]
  if family == 2:
    extra = rng.bytes(int(rng.integers(1, 256)))
    return "extend", "", data + extra
  try:
    return mutate_structure(rng, data)
  except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
    # A header mutated into something msgpack cannot pack: flip bits instead.
    return "byte_flip", f"unpackable:{type(e).__name__}", bytes(
        b ^ 1 if i == len(data) // 2 else b for i, b in enumerate(data))


# ---------------------------------------------------------------- oracle


def embedding_range_oracle(model, input_shape):
  """``(lo, hi)`` every embedding entry of a ConvNet-IN-ReLU lies in, or None.

  Instance norm makes each channel's H*W values zero-mean with unit (biased)
  variance, so none exceeds sqrt(H*W - 1); the random networks' norm has
  scale 1 and bias 0, ReLU keeps [0, that], pooling averages or picks. H*W
  is over-estimated from the final map's size (pooling floors odd sizes).
  """
  if not (isinstance(model, models.ConvNet) and model.norm == "instancenorm"
          and model.activation == "relu"):
    return None
  def feature_map(x):
    params = models.init_params(model, jax.random.key(0), input_shape)
    return model.apply({"params": params}, x, method=model.feature_map)

  out = jax.eval_shape(feature_map, jax.ShapeDtypeStruct(
      (1,) + tuple(input_shape), np.float32))
  h, w = out.shape[1:3]
  if model.pooling != "none":
    h, w = 2 * h + 1, 2 * w + 1
  return 0.0, math.sqrt(h * w - 1)


def inconsistencies(msg, spec, max_class_size, batch_real, emb_range):
  """What is wrong with an accepted message, by the invariants of honest ones.

  Independent of ``protocol.validate_message``: plain numpy over the
  decoded arrays. Empty when the message could have come from an honest
  client of this run.
  """
  bad = []
  T, C, D = spec.num_iterations, spec.num_classes, spec.embed_dim
  if msg.root_key_fingerprint != spec.root_key_fingerprint:
    bad.append("root_key_fingerprint")
  if msg.config_hash != spec.config_hash:
    bad.append("config_hash")
  means, counts, cc = msg.means, msg.counts, msg.class_counts
  if means.shape != (T, C, D) or counts.shape != (T, C) or cc.shape != (C,):
    return bad + ["shapes"]
  sq = msg.second_moments
  floats = [means] + ([sq] if sq is not None else [])
  if msg.local_images is not None:
    floats.append(msg.local_images)
  if not all(np.isfinite(a).all() for a in floats):
    bad.append("non_finite")
  if (cc < 0).any() or (max_class_size is not None and (cc > max_class_size).any()):
    bad.append("class_counts_range")
  cap = cc if batch_real is None else np.minimum(cc, batch_real)
  if (counts < 0).any() or (counts > cap[None, :]).any():
    bad.append("counts_range")
  empty = counts == 0
  if (means[empty] != 0).any() or (sq is not None and (sq[empty] != 0).any()):
    bad.append("nonzero_empty_rows")
  if emb_range is not None:
    lo, hi = emb_range
    slack = 1e-2 * max(abs(lo), abs(hi)) + 1e-6
    with np.errstate(invalid="ignore"):
      if (means < lo - slack).any() or (means > hi + slack).any():
        bad.append("means_out_of_range")
      if sq is not None and ((sq < 0).any()
                             or (sq > max(lo * lo, hi * hi) + slack * hi).any()):
        bad.append("second_moments_out_of_range")
  if sq is not None:
    with np.errstate(over="ignore", invalid="ignore"):
      if (sq < np.square(means) * (1 - 2**-6) - 1e-6).any():
        bad.append("second_moment_below_mean_square")
  if msg.local_labels is not None and msg.local_labels.size and (
      (msg.local_labels < 0).any() or (msg.local_labels >= C).any()):
    bad.append("local_labels_range")
  if msg.local_images is not None and spec.image_shape is not None and (
      tuple(msg.local_images.shape[1:]) != tuple(spec.image_shape)):
    bad.append("local_images_shape")
  return bad


# ---------------------------------------------------------------- driver


def real_messages(config):
  """The run's setup, server spec and encoded messages of every client.

  Each client's message is encoded in both transport dtypes.
  """
  s = setup_lib.setup(config)
  msgs = stages.client_messages(s, list(range(config.partition.num_clients)))
  blobs = [protocol.encode_message(m, transport_dtype=d)
           for m in msgs for d in protocol.TRANSPORT_DTYPES]
  return s, blobs


def decode_peak(data, spec):
  """``(message or exception, peak bytes allocated while decoding)``."""
  tracemalloc.reset_peak()
  base = tracemalloc.get_traced_memory()[0]
  try:
    out = protocol.decode_message(data, spec)
  except Exception as e:  # classified by the caller: anything but MessageError crashes
    out = e
  return out, tracemalloc.get_traced_memory()[1] - base


def fuzz(blobs, spec, num, seed, check):
  """Decodes ``num`` mutations of ``blobs``; returns the summary dict.

  ``check(msg) -> list`` is the oracle applied to accepted messages.
  """
  rng = np.random.default_rng(seed)
  stats = collections.Counter()
  by_family = collections.defaultdict(collections.Counter)
  crashes, accepted_bad, reasons = [], [], collections.Counter()
  worst_ratio, worst_small = 0.0, 0
  tracemalloc.start()
  try:
    for i in range(num):
      base = blobs[rng.integers(len(blobs))]
      family, detail, data = mutate(rng, base)
      out, peak = decode_peak(data, spec)
      if len(data) >= _RATIO_MIN_BYTES:
        worst_ratio = max(worst_ratio, peak / len(data))
      else:
        worst_small = max(worst_small, peak)
      fam = by_family[family]
      fam["total"] += 1
      if isinstance(out, protocol.MessageError):
        fam["rejected"] += 1
        # The reason's first words, without numbers, as a coarse histogram.
        reasons[" ".join(str(out).split()[:3])] += 1
      elif isinstance(out, BaseException):
        fam["crashes"] += 1
        crashes.append({"index": i, "family": family, "detail": detail,
                        "error": f"{type(out).__name__}: {out}"[:300]})
      else:
        bad = check(out)
        fam["accepted"] += 1
        if bad:
          fam["accepted_inconsistent"] += 1
          accepted_bad.append({"index": i, "family": family, "detail": detail,
                               "violations": bad})
        elif data == base:
          fam["unchanged"] += 1
  finally:
    tracemalloc.stop()
  for fam in by_family.values():
    stats.update(fam)
  return {
      "num_mutations": num,
      "crashes": len(crashes),
      "accepted_inconsistent": len(accepted_bad),
      "accepted": stats["accepted"],
      "rejected": stats["rejected"],
      "by_family": {k: dict(v) for k, v in sorted(by_family.items())},
      # Python objects cost a fixed few KiB whatever the input, so the ratio
      # is taken over inputs of at least _RATIO_MIN_BYTES.
      "max_peak_alloc_over_input_size": round(worst_ratio, 3),
      "ratio_min_input_bytes": _RATIO_MIN_BYTES,
      "max_peak_alloc_bytes_smaller_inputs": worst_small,
      "crash_examples": crashes[:20],
      "accepted_inconsistent_examples": accepted_bad[:20],
      "top_rejection_reasons": dict(reasons.most_common(25)),
  }


def main(argv):
  del argv
  record = provenance.start(
      ["python", "-m", "experiments.fuzz_messages", *sys.argv[1:]])
  t0 = time.perf_counter()
  config = _CONFIG.value
  s, blobs = real_messages(config)
  max_class_size = config.server.max_class_size
  if max_class_size is None:
    # The server's bound on a client's class size; unset, the largest class
    # of the training set (no client can hold more).
    max_class_size = int(np.bincount(s.dataset.train_y).max())
    config.server.max_class_size = max_class_size
  spec = setup_lib.message_spec(s)
  batch_real = config.stats.batch_real
  emb_range = embedding_range_oracle(s.model, s.input_shape)
  # Every honest message passes the oracle (else it would flag noise).
  for b in blobs:
    honest = protocol.decode_message(b, spec)
    assert not inconsistencies(honest, spec, max_class_size, batch_real,
                               emb_range), "oracle rejects an honest message"
  result = fuzz(blobs, spec, _NUM.value, _SEED.value,
                lambda m: inconsistencies(m, spec, max_class_size, batch_real,
                                          emb_range))
  doc = {
      "what": "decoder fuzzing with mutated real client messages",
      "provenance": provenance.finish(record),
      "base_messages": len(blobs),
      "base_message_bytes": sorted({len(b) for b in blobs}),
      "oracle": {"max_class_size": max_class_size, "batch_real": batch_real,
                 "embedding_range": emb_range},
      "spec": {"num_iterations": spec.num_iterations,
               "num_classes": spec.num_classes, "embed_dim": spec.embed_dim},
      **result,
      "wall_s": round(time.perf_counter() - t0, 1),
  }
  text = json.dumps(doc, indent=2, default=str)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
