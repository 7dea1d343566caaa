"""Tests for the one-shot client -> server message (collabdm_jax.protocol)."""

import dataclasses
import hashlib
import os
import pickle
import struct

import jax
import ml_collections
import msgpack
import numpy as np
import pytest

from collabdm_jax import protocol
from collabdm_jax.protocol import (PROTOCOL_VERSION, ClientMessage, MessageError,
                                   MessageSpec, config_hash, decode_message,
                                   encode_message, key_fingerprint, load_message,
                                   save_message, validate_message)

T, C, D = 3, 4, 64
IMAGE_SHAPE = (8, 8, 1)
ROOT_KEY = jax.random.key(7)
CONFIG = {"ipc": 10, "lr_img": 1.0, "dsa": {"strategy": "color_crop", "scale": 1.2}}


def _embed_stats(seed, counts):
  """Per-(t, c) mean and mean-of-squares of random "embeddings", as a client would."""
  rng = np.random.default_rng(seed)
  means = np.zeros((T, C, D), np.float32)
  second = np.zeros((T, C, D), np.float32)
  for t in range(T):
    for c in range(C):
      n = int(counts[t, c])
      if n:
        feats = rng.normal(loc=c, scale=1.0 + t, size=(n, D)).astype(np.float32)
        means[t, c] = feats.mean(0)
        second[t, c] = (feats ** 2).mean(0)
  return means, second


def _message(*, optional=True, seed=0, **overrides):
  class_counts = np.array([30, 0, 12, 5], np.int32)   # class 1 absent locally
  counts = np.tile(np.minimum(class_counts, 10), (T, 1)).astype(np.int32)
  means, second = _embed_stats(seed, counts)
  fields = dict(client_id=3, root_key_fingerprint=key_fingerprint(ROOT_KEY),
                config_hash=config_hash(CONFIG), means=means, counts=counts,
                class_counts=class_counts)
  if optional:
    rng = np.random.default_rng(seed + 1)
    fields.update(second_moments=second,
                  local_images=rng.normal(size=(6,) + IMAGE_SHAPE).astype(np.float32),
                  local_labels=np.array([0, 0, 2, 2, 3, 3], np.int32))
  fields.update(overrides)
  return ClientMessage(**fields)


def _spec(**overrides):
  fields = dict(root_key_fingerprint=key_fingerprint(ROOT_KEY),
                config_hash=config_hash(CONFIG), num_iterations=T, num_classes=C,
                embed_dim=D, image_shape=IMAGE_SHAPE, requires_second_moments=False)
  fields.update(overrides)
  return MessageSpec(**fields)


def _reseal(version, header, body):
  """Builds wire bytes by hand from the documented layout, with a valid checksum."""
  raw_header = msgpack.packb(header, use_bin_type=True)
  prefix = struct.pack("<6sHIQ", b"CDMMSG", version, len(raw_header),
                       len(body))
  payload = prefix + raw_header + body
  return payload + hashlib.sha256(payload).digest()


def _split(data):
  """(version, header dict, body bytes) of an encoded message."""
  _, version, hlen, blen = struct.unpack_from("<6sHIQ", data)
  start = struct.calcsize("<6sHIQ")
  header = msgpack.unpackb(data[start:start + hlen], raw=False)
  return version, header, data[start + hlen:start + hlen + blen]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("optional", [True, False])
def test_float32_round_trip_is_exact(optional):
  msg = _message(optional=optional)
  out = decode_message(encode_message(msg), _spec())
  assert out.client_id == 3
  assert out.root_key_fingerprint == msg.root_key_fingerprint
  assert out.config_hash == msg.config_hash
  assert out.protocol_version == PROTOCOL_VERSION
  for name in ("means", "counts", "class_counts", "second_moments", "local_images",
               "local_labels"):
    a, b = getattr(msg, name), getattr(out, name)
    if a is None:
      assert b is None, name
    else:
      assert b.dtype == a.dtype and b.shape == a.shape, name
      np.testing.assert_array_equal(b, a, err_msg=name)
      assert b.flags.writeable, name


def test_nbytes_counts_four_bytes_per_element():
  full, bare = _message(), _message(optional=False)
  assert bare.nbytes() == 4 * (T * C * D + T * C + C)
  assert full.nbytes() == bare.nbytes() + 4 * (T * C * D + 6 * 8 * 8 + 6)
  # The wire adds only a header and a digest on top of the float32 payload.
  assert 0 < len(encode_message(full)) - full.nbytes() < 1024


def test_bfloat16_round_trip_within_bf16_error_and_half_size():
  msg = _message()
  f32 = encode_message(msg)
  bf16 = encode_message(msg, transport_dtype="bfloat16")
  out = decode_message(bf16, _spec())
  for name in ("means", "second_moments", "local_images"):
    a, b = getattr(msg, name), getattr(out, name)
    assert b.dtype == np.float32
    np.testing.assert_array_less(np.abs(b - a), 2.0**-8 * np.abs(a) + 1e-30)
    assert (b != a).any(), f"{name} was not rounded: not bfloat16 on the wire"
  for name in ("counts", "class_counts", "local_labels"):
    np.testing.assert_array_equal(getattr(out, name), getattr(msg, name))
  # Empty (t, c) rows stay exactly zero after rounding.
  assert (out.means[:, 1] == 0).all()
  assert 0.45 < len(bf16) / len(f32) < 0.55


def test_bfloat16_overflow_is_rejected():
  means = _message().means.copy()
  means[0, 0, 0] = np.finfo(np.float32).max
  # Without second moments, which could not be below this mean's square.
  msg = _message(means=means, second_moments=None)
  encode_message(msg)  # fine as float32
  with pytest.raises(MessageError, match="means overflows bfloat16"):
    encode_message(msg, transport_dtype="bfloat16")


def test_unknown_transport_dtype_rejected():
  with pytest.raises(ValueError, match="transport_dtype"):
    encode_message(_message(), transport_dtype="float16")


def test_save_and_load_round_trip(tmp_path):
  msg = _message()
  path = tmp_path / "client3.cdm"
  written = save_message(path, msg, transport_dtype="bfloat16")
  assert written == os.path.getsize(path)
  out = load_message(path, _spec(requires_second_moments=True))
  np.testing.assert_array_equal(out.counts, msg.counts)
  np.testing.assert_allclose(out.means, msg.means, rtol=2.0**-8)
  assert sorted(os.listdir(tmp_path)) == ["client3.cdm"]


def test_spec_fields_set_to_none_are_not_checked():
  msg = _message(client_id=0)
  spec = MessageSpec(None, None, None, None, None)
  validate_message(msg, spec)
  decode_message(encode_message(msg), spec)


# ---------------------------------------------------------------- wire errors


@pytest.mark.parametrize("data", [b"", b"garbage bytes!" * 4, b"CDMMSX" + bytes(40),
                                  pickle.dumps({"means": 1})])
def test_not_a_collabdm_message(data):
  match = "truncated" if data == b"" else "not a CollabDM message"
  with pytest.raises(MessageError, match=match):
    decode_message(data)


def test_wrong_protocol_version_names_expected_version():
  data = protocol.encode_unchecked(_message(protocol_version=2), "float32")
  with pytest.raises(MessageError, match="protocol version 2.*expected protocol version 1"):
    decode_message(data)
  with pytest.raises(MessageError, match="expected protocol version 1"):
    validate_message(_message(protocol_version=2))
  with pytest.raises(MessageError, match="expected protocol version 1"):
    encode_message(_message(protocol_version=2))


def test_header_version_disagreeing_with_prefix_is_corrupt():
  _, header, body = _split(encode_message(_message()))
  header["protocol_version"] = 5
  with pytest.raises(MessageError, match="corrupt: header protocol version"):
    decode_message(_reseal(PROTOCOL_VERSION, header, body))


def test_truncated_at_many_cut_points():
  data = encode_message(_message())
  hlen = struct.unpack_from("<6sHIQ", data)[2]
  cuts = [1, 3, 6, 9, 15, 20, 20 + hlen // 2, 20 + hlen + 5, len(data) // 2,
          len(data) - 32, len(data) - 1]
  for cut in cuts:
    with pytest.raises(MessageError, match="truncated"):
      decode_message(data[:cut])


def test_flipped_bytes_are_detected_as_corrupt():
  data = encode_message(_message())
  hlen = struct.unpack_from("<6sHIQ", data)[2]
  for pos in [25, 20 + hlen - 1, 20 + hlen + 7, len(data) // 2, len(data) - 40,
              len(data) - 1]:
    bad = bytearray(data)
    bad[pos] ^= 0x01
    with pytest.raises(MessageError, match="corrupt"):
      decode_message(bytes(bad))
  # A flipped length field is caught before anything is read past the end.
  bad = bytearray(data)
  bad[12] ^= 0x01
  with pytest.raises(MessageError, match=r"truncated \(or its length fields are corrupt\)"):
    decode_message(bytes(bad))
  with pytest.raises(MessageError, match="corrupt: 3 unexpected bytes"):
    decode_message(data + b"abc")


def test_wrong_dtype_on_the_wire():
  version, header, body = _split(encode_message(_message(optional=False)))
  entry = next(e for e in header["arrays"] if e["name"] == "counts")
  entry["dtype"] = "<f4"
  with pytest.raises(MessageError, match="'counts' has wrong dtype '<f4'"):
    decode_message(_reseal(version, header, body))


def test_float_dtype_must_match_declared_transport():
  version, header, body = _split(encode_message(_message(optional=False)))
  header["transport_dtype"] = "bfloat16"   # but means are still <f4
  with pytest.raises(MessageError, match="'means' has wrong dtype '<f4'.*'bfloat16'"):
    decode_message(_reseal(version, header, body))


def test_header_describing_too_little_body_is_rejected():
  version, header, body = _split(encode_message(_message(optional=False)))
  with pytest.raises(MessageError, match="not described by the header"):
    decode_message(_reseal(version, header, body + bytes(8)))
  header["arrays"] = [e for e in header["arrays"] if e["name"] != "counts"]
  counts_len = T * C * 4
  means_len = T * C * D * 4
  body = body[:means_len] + body[means_len + counts_len:]
  with pytest.raises(MessageError, match=r"required array\(s\) \['counts'\] missing"):
    decode_message(_reseal(version, header, body))


def test_decoded_header_fields_are_type_checked():
  version, header, body = _split(encode_message(_message(optional=False)))
  header["client_id"] = "three"
  with pytest.raises(MessageError, match="client_id must be an int"):
    decode_message(_reseal(version, header, body))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("spec_field,value,match", [
    ("root_key_fingerprint", key_fingerprint(jax.random.key(8)),
     "root_key_fingerprint .* differs"),
    ("config_hash", config_hash(dict(CONFIG, ipc=50)), "config_hash .* differs"),
    ("num_iterations", T + 1, r"T \(num_iterations\) is 3, the server expects 4"),
    ("num_classes", 10, r"C \(num_classes\) is 4, the server expects 10"),
    ("embed_dim", 2048, r"D \(embed_dim\) is 64, the server expects 2048"),
    ("image_shape", (28, 28, 1), r"image shape \(8, 8, 1\) differs"),
])
def test_spec_mismatch_rejected_on_decode(spec_field, value, match):
  data = encode_message(_message())
  with pytest.raises(MessageError, match=match):
    decode_message(data, _spec(**{spec_field: value}))


def test_missing_second_moments_when_required(tmp_path):
  path = tmp_path / "m.cdm"
  save_message(path, _message(second_moments=None))
  with pytest.raises(MessageError, match="second_moments are required"):
    load_message(path, _spec(requires_second_moments=True))


def test_load_error_names_the_file(tmp_path):
  path = tmp_path / "broken.cdm"
  path.write_bytes(encode_message(_message())[:100])
  with pytest.raises(MessageError, match=r"broken\.cdm: message is truncated"):
    load_message(path)


def _with_array(name, fn):
  msg = _message()
  arr = getattr(msg, name).copy()
  arr = fn(arr)
  return dataclasses.replace(msg, **{name: arr})


def _set(index, value):
  def fn(a):
    a[index] = value
    return a
  return fn


@pytest.mark.parametrize("msg_fn,match", [
    (lambda: _with_array("counts", lambda a: a[:, :3].copy()),
     r"counts shape \(3, 3\) is inconsistent with means shape \(3, 4, 64\)"),
    (lambda: _with_array("class_counts", lambda a: a[:2].copy()),
     r"class_counts shape \(2,\) is inconsistent"),
    (lambda: _with_array("second_moments", lambda a: a[:, :, :8].copy()),
     r"second_moments shape \(3, 4, 8\) is inconsistent"),
    (lambda: _with_array("means", lambda a: a[0].copy()),
     r"means must have shape \[T, C, D\]"),
    (lambda: _with_array("means", lambda a: a.astype(np.float64)),
     "means has wrong dtype float64, expected float32"),
    (lambda: _with_array("counts", lambda a: a.astype(np.int64)),
     "counts has wrong dtype int64, expected int32"),
    (lambda: _with_array("local_labels", lambda a: a.astype(np.float32)),
     "local_labels has wrong dtype float32, expected int32"),
    (lambda: _with_array("local_images", lambda a: a.astype(np.float16)),
     "local_images has wrong dtype float16"),
    (lambda: _with_array("means", _set((1, 2, 3), np.nan)),
     r"means contains 1 non-finite value\(s\) \(NaN/Inf\), first at index \(1, 2, 3\)"),
    (lambda: _with_array("second_moments", _set((0, 0, 5), np.inf)),
     r"second_moments contains 1 non-finite"),
    (lambda: _with_array("local_images", _set((2, 1, 1, 0), -np.inf)),
     r"local_images contains 1 non-finite"),
    (lambda: _with_array("counts", _set((2, 0), -1)),
     r"counts must be >= 0, got -1 at \(2, 0\)"),
    (lambda: _with_array("class_counts", _set(3, -5)),
     "class_counts must be >= 0, got -5 for class 3"),
    (lambda: _with_array("counts", _set((1, 1), 4)),
     r"counts\[1, 1\] = 4 > 0 but class_counts\[1\] == 0"),
    (lambda: _with_array("means", _set((0, 1, 0), 0.5)),
     r"means\[0, 1\] must be all zero because counts\[0, 1\] == 0"),
    (lambda: _with_array("second_moments", _set((0, 0, 0), -0.25)),
     "second_moments must be >= 0"),
    (lambda: _with_array("local_labels", _set(4, C)),
     r"local_labels out of range: local_labels\[4\] = 4, expected in \[0, 4\)"),
    (lambda: _with_array("local_labels", _set(0, -1)),
     r"local_labels out of range: local_labels\[0\] = -1"),
    (lambda: _with_array("local_labels", lambda a: a[:5].copy()),
     r"local_labels shape \(5,\) does not match local_images length 6"),
    (lambda: _with_array("local_images", lambda a: a[:, 0, 0, 0].copy()),
     r"local_images must have shape \[M, \*input_shape\]"),
    (lambda: _message(local_labels=None),
     "local_images and local_labels must be sent together"),
    (lambda: _message(client_id=-1), "client_id must be in"),
    (lambda: _message(config_hash=""), "config_hash must be a non-empty str"),
])
def test_invalid_messages_rejected_by_validate_encode_and_decode(msg_fn, match):
  msg = msg_fn()
  with pytest.raises(MessageError, match=match):
    validate_message(msg)
  with pytest.raises(MessageError, match=match):
    encode_message(msg)
  # A peer that skips validation when encoding is still caught on decode.
  # (float16/float64/int64 arrays are converted on the wire, so their dtype
  # problem is the sender's and only shows up before encoding.)
  if "wrong dtype" not in match:
    with pytest.raises(MessageError, match=match):
      decode_message(protocol.encode_unchecked(msg, "float32"))


def test_the_valid_message_passes_every_check():
  # The malformed cases above are one change away from this message.
  msg = _message()
  validate_message(msg, _spec(requires_second_moments=True))
  assert (msg.counts[:, 1] == 0).all() and msg.class_counts[1] == 0


# ---------------------------------------------------------------- no pickle


def test_no_pickle_is_used(monkeypatch):
  data = encode_message(_message())
  assert data.startswith(b"CDMMSG")
  assert data[:1] != b"\x80"  # the PROTO opcode every modern pickle starts with

  def refuse(*args, **kwargs):
    raise AssertionError("pickle must not be used")

  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)
  monkeypatch.setattr(pickle, "dumps", refuse)
  monkeypatch.setattr(pickle, "dump", refuse)
  out = decode_message(data)
  np.testing.assert_array_equal(out.means, _message().means)
  assert encode_message(out) == data
  assert not hasattr(protocol, "pickle")


def test_encoding_is_deterministic():
  assert encode_message(_message()) == encode_message(_message())
  assert encode_message(_message()) != encode_message(_message(seed=1))


# ---------------------------------------------------------------- fingerprints


def test_key_fingerprint_equal_for_equal_keys():
  a = key_fingerprint(jax.random.key(0))
  assert a == key_fingerprint(jax.random.key(0))
  assert a == key_fingerprint(jax.random.PRNGKey(0))        # raw uint32 key data
  assert a == key_fingerprint(np.zeros(2, np.uint32))
  assert key_fingerprint(jax.random.fold_in(jax.random.key(0), 3)) == \
      key_fingerprint(jax.random.fold_in(jax.random.key(0), 3))
  # Pinned so a change to the digest (which would orphan saved uploads) is seen.
  assert a == "7b357e0363bb40f5ac0cc9ed4ddb5a32ab865c74136068dab1fd08314c6d6e30"


def test_key_fingerprint_differs_for_different_keys():
  base = jax.random.key(0)
  prints = {key_fingerprint(base), key_fingerprint(jax.random.key(1)),
            key_fingerprint(jax.random.fold_in(base, 1)),
            key_fingerprint(jax.random.split(base)[0]),
            key_fingerprint(jax.random.split(base, 2))}
  assert len(prints) == 5


def test_key_fingerprint_rejects_non_keys():
  with pytest.raises(ValueError, match="uint32"):
    key_fingerprint(np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="shape"):
    key_fingerprint(np.zeros(3, np.uint32))
  with pytest.raises(ValueError, match="key must be"):
    key_fingerprint(7)


def test_config_hash_insensitive_to_key_order_and_container_type():
  a = {"ipc": 10, "net": {"depth": 3, "width": 128}, "sizes": (32, 32), "lr": 1.0}
  b = {"lr": 1.0, "sizes": [32, 32], "net": {"width": 128, "depth": 3}, "ipc": 10}
  assert config_hash(a) == config_hash(b)
  assert config_hash(a) == config_hash(ml_collections.ConfigDict(b))
  assert config_hash(a) == config_hash(ml_collections.FrozenConfigDict(a))
  assert config_hash(dict(a, ipc=np.int64(10), lr=np.float32(1.0))) == config_hash(a)
  # Numerically equal ints and floats agree; bools stay distinct from ints.
  assert config_hash({"lr": 10}) == config_hash({"lr": 10.0})
  assert config_hash({"flag": True}) != config_hash({"flag": 1})
  # Pinned: canonical JSON '{"a":1,"b":[1,2.5]}'.
  assert config_hash({"b": (1, 2.5), "a": 1}) == hashlib.sha256(
      b'{"a":1,"b":[1,2.5]}').hexdigest()


def test_config_hash_sensitive_to_changed_values():
  base = {"ipc": 10, "net": {"depth": 3, "width": 128}, "lr": 1.0, "dsa": "color_crop"}
  h = config_hash(base)
  assert h != config_hash(dict(base, ipc=50))
  assert h != config_hash(dict(base, lr=1.0 + 1e-12))
  assert h != config_hash(dict(base, net={"depth": 3, "width": 64}))
  assert h != config_hash(dict(base, dsa="color"))
  assert h != config_hash(dict(base, extra=None))
  assert config_hash({"x": float("nan")}) != config_hash({"x": float("inf")})


def test_config_hash_rejects_unsupported_values():
  with pytest.raises(ValueError, match=r"net\.act has unsupported type function"):
    config_hash({"net": {"act": lambda x: x}})
  with pytest.raises(ValueError, match="key 1 .* must be a str"):
    config_hash({1: "a"})


# ---------------------------------------------------------------- atomic save


def test_save_is_atomic_when_encoding_fails(tmp_path):
  bad = _with_array("means", _set((0, 0, 0), np.nan))
  target = tmp_path / "upload.cdm"
  with pytest.raises(MessageError, match="means contains"):
    save_message(target, bad)
  assert not target.exists()
  assert os.listdir(tmp_path) == []
  # An existing upload survives a failed overwrite untouched.
  size = save_message(target, _message())
  before = target.read_bytes()
  with pytest.raises(MessageError):
    save_message(target, bad)
  assert target.read_bytes() == before and len(before) == size
  assert os.listdir(tmp_path) == ["upload.cdm"]


def test_save_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
  target = tmp_path / "upload.cdm"
  save_message(target, _message())
  before = target.read_bytes()

  def broken_replace(src, dst):
    raise OSError("disk gone")

  monkeypatch.setattr(os, "replace", broken_replace)
  with pytest.raises(OSError, match="disk gone"):
    save_message(target, _message(seed=5))
  assert target.read_bytes() == before
  assert os.listdir(tmp_path) == ["upload.cdm"]
