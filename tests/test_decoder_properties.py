"""Property-based tests of the message decoder (hypothesis).

Whatever bytes arrive, ``decode_message`` either returns a message that
passes validation or raises ``MessageError``; nothing else escapes, and no
input makes it allocate more than a small multiple of its own size.
"""

import hashlib
import struct
import tracemalloc

import jax
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collabdm_jax import protocol
from collabdm_jax.protocol import (ClientMessage, MessageError, MessageSpec,
                                   decode_message, encode_message)
from experiments import fuzz_messages

T, C, D = 2, 3, 8
FINGERPRINT = protocol.key_fingerprint(jax.random.key(1))
CONFIG_HASH = protocol.config_hash({"t": T})
SPEC = MessageSpec(root_key_fingerprint=FINGERPRINT, config_hash=CONFIG_HASH,
                   num_iterations=T, num_classes=C, embed_dim=D,
                   image_shape=(4, 4, 1))
# Peak allocation allowed while decoding an input of n bytes: a few copies
# of the payload (the float32 arrays, a bfloat16 body widened to float32,
# validation's boolean masks) plus a fixed allowance for Python objects.
ALLOC_FACTOR, ALLOC_SLACK = 8, 256 * 1024


def _message():
  rng = np.random.default_rng(0)
  class_counts = np.array([5, 0, 9], np.int32)
  counts = np.tile(np.minimum(class_counts, 4), (T, 1)).astype(np.int32)
  means = np.abs(rng.normal(size=(T, C, D))).astype(np.float32)
  means[:, 1] = 0
  second = (np.square(means) * 1.5).astype(np.float32)
  return ClientMessage(
      client_id=2, root_key_fingerprint=FINGERPRINT, config_hash=CONFIG_HASH,
      means=means, counts=counts, class_counts=class_counts,
      second_moments=second,
      local_images=rng.normal(size=(2, 4, 4, 1)).astype(np.float32),
      local_labels=np.array([0, 2], np.int32))


BLOBS = [encode_message(_message(), transport_dtype=d)
         for d in protocol.TRANSPORT_DTYPES]


def _decode_checked(data):
  """Decodes; asserts the outcome is a valid message or a MessageError.

  Returns the message, or the MessageError raised.
  """
  tracemalloc.start()
  try:
    try:
      msg = decode_message(data, SPEC)
    except MessageError as e:
      assert str(e), "a rejection must name its reason"
      msg = e
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak <= ALLOC_FACTOR * len(data) + ALLOC_SLACK, (peak, len(data))
  if not isinstance(msg, MessageError):
    protocol.validate_message(msg, SPEC)  # what was accepted is valid
  return msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_escape_message_error(data):
  _decode_checked(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(BLOBS), st.data())
def test_mutated_bytes_never_escape_message_error(blob, data):
  out = bytearray(blob)
  op = data.draw(st.sampled_from(["flip", "cut", "extend", "prefix"]))
  if op == "flip":
    for pos in data.draw(st.lists(st.integers(0, len(out) - 1), min_size=1,
                                  max_size=8)):
      out[pos] ^= data.draw(st.integers(1, 255))
  elif op == "cut":
    out = out[:data.draw(st.integers(0, len(out) - 1))]
  elif op == "extend":
    out += data.draw(st.binary(min_size=1, max_size=64))
  else:  # rewrite the fixed prefix's lengths and version
    struct.pack_into("<HIQ", out, 6, data.draw(st.integers(0, 2**16 - 1)),
                     data.draw(st.integers(0, 2**32 - 1)),
                     data.draw(st.integers(0, 2**64 - 1)))
  _decode_checked(bytes(out))


_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
            | st.floats(allow_nan=True) | st.text(max_size=12)
            | st.binary(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(st.text(max_size=8), inner, max_size=4),
                       max_leaves=12)
_dims = st.one_of(st.integers(0, 16), st.sampled_from(
    [2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1, 2**64 - 1]))


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BLOBS), st.data())
def test_resealed_structural_mutations_never_escape_message_error(blob, data):
  """A hostile client re-seals its edits with a valid digest."""
  version, header, body = fuzz_messages.split(blob)
  op = data.draw(st.sampled_from(
      ["header_value", "shape", "entry", "entries", "body", "values"]))
  if op == "header_value":
    header[data.draw(st.sampled_from(sorted(header) + ["extra"]))] = data.draw(_values)
  elif op == "shape":
    i = data.draw(st.integers(0, len(header["arrays"]) - 1))
    header["arrays"][i]["shape"] = data.draw(st.lists(_dims, max_size=70))
  elif op == "entry":
    i = data.draw(st.integers(0, len(header["arrays"]) - 1))
    header["arrays"][i][data.draw(st.sampled_from(["name", "dtype", "shape",
                                                   "x"]))] = data.draw(_values)
  elif op == "entries":
    header["arrays"] = data.draw(st.lists(st.sampled_from(header["arrays"]),
                                          max_size=8))
  elif op == "body":
    cut = data.draw(st.integers(0, len(body)))
    body = body[:cut] + data.draw(st.binary(max_size=64))
  else:  # overwrite a run of body bytes with arbitrary ones
    start = data.draw(st.integers(0, len(body) - 1))
    patch = data.draw(st.binary(min_size=1, max_size=64))
    body = body[:start] + patch + body[start + len(patch):]
    body = body[:len(blob)]
  try:
    raw = fuzz_messages.reseal(version, header, body)
  except (TypeError, ValueError, OverflowError):
    return  # msgpack cannot encode this header; nothing to send
  _decode_checked(raw)


@pytest.mark.parametrize("shape", [[2**40, 0, 2**40], [0] * 70, [2**64 - 1],
                                   [2**31, 0], [2**29, 2**29, 0, 2**29]])
def test_huge_declared_zero_size_shapes_are_message_errors(shape):
  """numpy raised its own ValueError ("array is too big") on these."""
  version, header, body = fuzz_messages.split(BLOBS[0])
  header["arrays"].append({"name": "local_labels", "dtype": "<i4",
                           "shape": shape})
  header["arrays"] = [e for e in header["arrays"][:-2]] + header["arrays"][-1:]
  with pytest.raises(MessageError, match="array 'local_labels' declares"):
    decode_message(fuzz_messages.reseal(version, header, body))


def test_declared_size_is_checked_before_allocating():
  """A header claiming a huge array is refused before any allocation."""
  version, header, body = fuzz_messages.split(BLOBS[0])
  next(e for e in header["arrays"] if e["name"] == "means")["shape"] = [
      2**20, 2**20, 8]
  error = _decode_checked(fuzz_messages.reseal(version, header, body))
  assert isinstance(error, MessageError)
  assert "'means' runs past the end" in str(error)


def test_non_contiguous_memoryview_is_a_message_error():
  strided = memoryview(bytes(BLOBS[0]) * 2)[::2]
  with pytest.raises(MessageError, match="contiguous"):
    decode_message(strided)


def test_fuzz_driver_counts_crashes_and_accepted_inconsistent():
  """The fuzz script's driver, on this file's message: a decoder that
  crashes or accepts an inconsistent message is counted as such."""
  calls = []

  def oracle(msg):
    calls.append(msg)
    return ["flagged"] if len(calls) % 2 else []

  res = fuzz_messages.fuzz(BLOBS, SPEC, 300, 0, oracle)
  assert res["crashes"] == 0
  assert res["accepted"] == len(calls) > 0
  assert res["accepted_inconsistent"] == (len(calls) + 1) // 2
  assert sum(f["total"] for f in res["by_family"].values()) == 300
  assert res["accepted"] + res["rejected"] == 300
