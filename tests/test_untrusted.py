"""A server that does not trust its clients: consistency checks of uploads.

The checks are what the statistics imply whatever the client claims
(``protocol._check_statistics``) plus psi_t's embedding range
(``embedding_bounds``); ``run_server`` rejects, logs and goes on.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collabdm_jax import dm
from collabdm_jax import embedding_bounds
from collabdm_jax import models
from collabdm_jax import pipeline
from collabdm_jax import protocol
from collabdm_jax import setup as setup_lib
from collabdm_jax import stages
from collabdm_jax import wire
from collabdm_jax.protocol import (ClientMessage, MessageError, MessageSpec,
                                   decode_message, encode_message)
from experiments import fuzz_messages
from experiments.configs import smoke

T, C, D = 2, 3, 6
FP = protocol.key_fingerprint(jax.random.key(3))
CH = protocol.config_hash({"x": 1})


def _message(**overrides):
  rng = np.random.default_rng(0)
  class_counts = np.array([40, 0, 7], np.int32)
  counts = np.tile(np.minimum(class_counts, 16), (T, 1)).astype(np.int32)
  means = rng.uniform(0.0, 2.0, size=(T, C, D)).astype(np.float32)
  means[:, 1] = 0
  fields = dict(client_id=0, root_key_fingerprint=FP, config_hash=CH,
                means=means, counts=counts, class_counts=class_counts,
                second_moments=(np.square(means) + 0.25 * (means > 0)
                                ).astype(np.float32))
  fields.update(overrides)
  return ClientMessage(**fields)


def _spec(**overrides):
  fields = dict(root_key_fingerprint=FP, config_hash=CH, num_iterations=T,
                num_classes=C, embed_dim=D, batch_real=16, max_class_size=100,
                embedding_range=(np.float32(0.0), np.float32(3.0)))
  fields.update(overrides)
  return MessageSpec(**fields)


def _edit(name, fn):
  msg = _message()
  arr = getattr(msg, name).copy()
  fn(arr)
  return dataclasses.replace(msg, **{name: arr})


def test_honest_message_passes_and_both_transports_decode():
  for dtype in protocol.TRANSPORT_DTYPES:
    decode_message(encode_message(_message(), transport_dtype=dtype), _spec())


@pytest.mark.parametrize("msg_fn,spec_kw,match", [
    # More samples behind a mean than the client holds of the class.
    (lambda: _edit("counts", lambda a: a.__setitem__((1, 2), 8)), {},
     r"counts\[1, 2\] = 8 exceeds class_counts\[2\] = 7"),
    # The example: counts of 2**31 - 1 for a class of a few dozen.
    (lambda: _edit("counts", lambda a: a.__setitem__((0, 0), 2**31 - 1)), {},
     r"counts\[0, 0\] = 2147483647 exceeds class_counts\[0\] = 40"),
    (lambda: _edit("counts", lambda a: a.__setitem__((0, 0), 17)), {},
     r"counts\[0, 0\] = 17 exceeds batch_real = 16"),
    (lambda: _edit("class_counts", lambda a: a.__setitem__(0, 10**6)), {},
     r"class_counts\[0\] = 1000000 exceeds the server's bound max_class_size = 100"),
    # The example: means of 3e38.
    (lambda: _edit("means", lambda a: a.__setitem__((0, 0, 4), 3e38)), {},
     r"means\[0, 0, 4\] = 3e\+38 lies outside \[0, 3\]"),
    (lambda: _edit("means", lambda a: a.__setitem__((1, 2, 0), -0.5)), {},
     r"means\[1, 2, 0\] = -0.5 lies outside \[0, 3\]"),
    (lambda: _edit("second_moments", lambda a: a.__setitem__((0, 2, 1), 9.5)),
     {}, r"second_moments\[0, 2, 1\] = 9.5 exceeds 9.1"),
    (lambda: _edit("second_moments", lambda a: a.__setitem__((0, 0, 0), 0.0)),
     {}, r"second_moments\[0, 0, 0\] = 0 is below means\[0, 0, 0\]\*\*2"),
    # A per-(t, d) range, as derived from psi_t, in the spec's own shape.
    (lambda: _message(), dict(embedding_range=(np.zeros((T, 1, D), np.float32),
                                               np.full((T, 1, D), 1.0, np.float32))),
     r"lies outside \[0, 1\]"),
    (lambda: _message(), dict(embedding_range=(np.zeros((5, 1, D)), np.ones((5, 1, D))),
                              num_iterations=None),
     r"does not fit the server's embedding range"),
])
def test_statistics_no_honest_client_sends_are_rejected(msg_fn, spec_kw, match):
  msg = msg_fn()
  with pytest.raises(MessageError, match=match):
    protocol.validate_message(msg, _spec(**spec_kw))
  # A hostile client does not run the encoder's checks: re-seal by hand.
  version, header, body = fuzz_messages.split(
      protocol.encode_unchecked(msg, "float32"))
  with pytest.raises(MessageError, match=match):
    decode_message(fuzz_messages.reseal(version, header, body), _spec(**spec_kw))


def test_counts_above_class_size_are_rejected_even_without_a_spec():
  with pytest.raises(MessageError, match="exceeds class_counts"):
    encode_message(_edit("counts", lambda a: a.__setitem__((0, 2), 9)))


def test_bounds_set_to_none_are_not_checked():
  msg = _edit("class_counts", lambda a: a.__setitem__(0, 10**6))
  msg = dataclasses.replace(msg, means=msg.means * 10,
                            second_moments=msg.second_moments * 100)
  protocol.validate_message(msg, _spec(max_class_size=None, embedding_range=None))


@pytest.mark.parametrize("kw,shape", [
    (dict(width=8, depth=2), (28, 28, 1)),
    (dict(width=8, depth=3, activation="leakyrelu"), (32, 32, 3)),
    (dict(width=4, depth=2, pooling="none", activation="gelu"), (12, 12, 3)),
    (dict(width=4, depth=2, pooling="maxpool", activation="sigmoid"), (16, 16, 1)),
])
def test_embedding_range_holds_for_extreme_inputs(kw, shape):
  """Every entry of psi_t's embedding of adversarial inputs is in range,
  and the range is not vacuous: a single hot pixel gets within 3x of it."""
  model = models.make_model("convnet", 10, **kw)
  root = jax.random.key(5)
  lo, hi = embedding_bounds.embedding_ranges(model, shape, root, 3)
  assert lo.shape == hi.shape == (3, models.feature_dim(model, shape))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32,) + shape).astype(np.float32) * 10
  x[:8] = 0
  x[np.arange(8), rng.integers(0, shape[0], 8), rng.integers(0, shape[1], 8)] = 1e4
  x[8:12] = 1e6 * np.sign(x[8:12])
  embed = models.embed_fn(model)
  for t in range(3):
    e = np.asarray(embed(dm.network_params(model, root, t, shape), jnp.asarray(x)))
    assert (e >= lo[t] - 1e-5).all() and (e <= hi[t] + 1e-5).all()
    assert e.max() > hi[t].max() / 3


def test_no_range_for_unsupported_architectures():
  model = models.make_model("convnet", 10, width=4, depth=2, norm="none")
  assert embedding_bounds.embedding_ranges(model, (28, 28, 1),
                                           jax.random.key(0), 2) is None


def test_server_spec_accepts_honest_clients_and_configured_bound():
  config = smoke.get_config()
  config.stats.second_moments = True
  s = setup_lib.setup(config)
  spec = setup_lib.message_spec(s)
  lo, hi = spec.embedding_range
  assert lo.shape == hi.shape == (config.num_iterations, 1, spec.embed_dim)
  assert spec.batch_real == config.stats.batch_real
  msgs = stages.client_messages(s, [0, 1, 2])
  for m in msgs:
    for dtype in protocol.TRANSPORT_DTYPES:
      decode_message(encode_message(m, transport_dtype=dtype), spec)
  config.server.max_abs_embedding = 1e-3
  with pytest.raises(MessageError, match=r"lies outside \[-0.001, 0.001\]"):
    decode_message(encode_message(msgs[0]), setup_lib.message_spec(s))
  config.server.max_abs_embedding = -1.0
  with pytest.raises(ValueError, match="max_abs_embedding must be > 0"):
    setup_lib.message_spec(s)


def test_run_server_rejects_each_bad_upload_and_goes_on(tmp_path, caplog):
  config = smoke.get_config()
  config.partition.num_clients = 5
  config.checkpoint.every = 0
  config.eval.num_nets = 1
  config.server.max_class_size = 20
  s = setup_lib.setup(config)
  msgs = stages.client_messages(s, [0, 1, 2, 3])
  d = tmp_path / "msgs"
  d.mkdir()
  protocol.save_message(wire.message_path(d, 0), msgs[0])

  def hostile(msg, **arrays):
    version, header, body = fuzz_messages.split(
        protocol.encode_unchecked(dataclasses.replace(msg, **arrays), "float32"))
    return fuzz_messages.reseal(version, header, body)

  c = int(np.argmax(msgs[1].class_counts))
  counts = msgs[1].counts.copy()
  counts[0, c] = 10**6
  wire.message_path(d, 1).write_bytes(hostile(msgs[1], counts=counts))
  wire.message_path(d, 2).write_bytes(hostile(msgs[2], means=msgs[2].means * 1e30))
  # The decoder crash of issue 12: a zero-size array of absurd shape.
  version, header, body = fuzz_messages.split(encode_message(msgs[3]))
  header["arrays"].append({"name": "local_labels", "dtype": "<i4",
                           "shape": [2**40, 0, 2**40]})
  header["arrays"] = [e for e in header["arrays"] if e["name"] not in (
      "local_images", "local_labels")] + header["arrays"][-1:]
  wire.message_path(d, 3).write_bytes(fuzz_messages.reseal(version, header, body))
  wire.message_path(d, 4).mkdir()  # unreadable as a file
  results = pipeline.run_server(config, d, tmp_path / "out")
  assert results["clients_used"] == [0]
  rej = results["clients_rejected"]
  assert sorted(rej) == ["1", "2", "3", "4"]
  assert "exceeds class_counts" in rej["1"] or "exceeds batch_real" in rej["1"]
  assert "lies outside" in rej["2"]
  assert "'local_labels' declares" in rej["3"]
  assert "Is a directory" in rej["4"]
  assert caplog.text.count("rejected message of client") == 4
