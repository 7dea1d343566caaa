"""Signed uploads (collabdm_jax.signing, launch.keygen, run_server)."""

import os
import pathlib
import stat
import subprocess
import sys

import jax
import pytest

from collabdm_jax import pipeline
from collabdm_jax import protocol
from collabdm_jax import setup as setup_lib
from collabdm_jax import signing
from collabdm_jax.signing import SignatureError
from collabdm_jax import stages
from collabdm_jax import wire
from experiments.configs import smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = signing.run_id("a" * 64, "b" * 64)
OTHER_RUN = signing.run_id("c" * 64, "b" * 64)
MSG = b"CDMMSG some message bytes"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
  d = tmp_path_factory.mktemp("keys")
  paths = signing.generate_keys(d, [0, 1])
  return d, {k: (signing.load_private_key(p), signing.load_public_key(q))
             for k, (p, q) in paths.items()}


def test_keygen_files_and_no_overwrite(keys):
  d, _ = keys
  priv = d / "client_00000.key"
  assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
  assert b"PRIVATE KEY" in priv.read_bytes()
  assert b"PUBLIC KEY" in (d / "client_00001.pub").read_bytes()
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    signing.generate_keys(d, [1])


def test_run_id_binds_root_key_and_config():
  assert RUN != OTHER_RUN != signing.run_id("a" * 64, "d" * 64)
  assert len(RUN) == 64 and RUN == signing.run_id("a" * 64, "b" * 64)


def test_signed_message_verifies(keys):
  _, k = keys
  rec = signing.sign(k[1][0], MSG, 1, RUN)
  signing.verify(k[1][1], MSG, rec, 1, RUN)


@pytest.mark.parametrize("case,match", [
    ("unsigned", "client 1's message is unsigned"),
    ("wrong_key", "does not verify with client 1's public key"),
    ("tampered", "does not verify with client 1's public key"),
    ("replayed", "for run .*, not this run .*: replayed from another run"),
    ("other_client", "signature is by client 0, not client 1"),
    ("malformed", "signature record is not valid msgpack"),
    ("bad_fields", "malformed fields"),
])
def test_each_bad_signature_is_rejected_with_its_reason(keys, case, match):
  _, k = keys
  msg, rec = MSG, signing.sign(k[1][0], MSG, 1, RUN)
  if case == "unsigned":
    rec = None
  elif case == "wrong_key":
    rec = signing.sign(k[0][0], MSG, 1, RUN)
  elif case == "tampered":
    msg = MSG + b"!"
  elif case == "replayed":
    rec = signing.sign(k[1][0], MSG, 1, OTHER_RUN)
  elif case == "other_client":
    rec = signing.sign(k[0][0], MSG, 0, RUN)
  elif case == "malformed":
    rec = b"\xc1garbage"
  else:
    import msgpack
    rec = msgpack.packb({"version": 1, "client_id": 1, "run_id": RUN,
                         "signature": b"short"}, use_bin_type=True)
  with pytest.raises(SignatureError, match=match):
    signing.verify(k[1][1], msg, rec, 1, RUN)
  assert issubclass(SignatureError, protocol.MessageError)


def test_verifier_rejects_duplicates_signed_or_not(keys):
  d, k = keys
  v = signing.Verifier(None, RUN)
  v.check(0, MSG, None)
  with pytest.raises(SignatureError, match="duplicate.*from client 0"):
    v.check(1, MSG, None)
  v = signing.Verifier(d, RUN)
  with pytest.raises(SignatureError, match="no usable public key for client 7"):
    v.check(7, MSG, signing.sign(k[0][0], MSG, 7, RUN))


def test_keygen_command(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.keygen",
                         "--client_ids=0-2,5", f"--out_dir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      f"client_0000{k}.{e}" for k in (0, 1, 2, 5) for e in ("key", "pub")]
  proc = subprocess.run([sys.executable, "-m", "launch.keygen",
                         "--client_ids=1-x", f"--out_dir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "neither an id nor a range" in proc.stderr


def test_server_accepts_only_signed_fresh_uploads(tmp_path, caplog):
  config = smoke.get_config()
  config.partition.num_clients = 5
  config.checkpoint.every = 0
  config.eval.num_nets = 1
  s = setup_lib.setup(config)
  keydir, pubdir, d = tmp_path / "keys", tmp_path / "pub", tmp_path / "msgs"
  signing.generate_keys(keydir, range(5))
  pubdir.mkdir()
  for k in range(5):
    name = signing.key_filename(k, private=False)
    (pubdir / name).write_bytes((keydir / name).read_bytes())
  priv = lambda k: signing.load_private_key(keydir / signing.key_filename(k, True))
  run = setup_lib.run_id(s)
  other = config.copy_and_resolve_references()
  other.seed = 1
  other_run = setup_lib.run_id(setup_lib.setup(other))
  assert other_run != run
  msgs = stages.client_messages(s, range(4))
  d.mkdir()
  paths = [wire.message_path(d, k) for k in range(5)]
  for k in range(4):
    protocol.save_message(paths[k], msgs[k])
  signing.sign_file(paths[0], priv(0), 0, run)              # honest
  # client 1 sends unsigned
  signing.sign_file(paths[2], priv(0), 2, run)              # someone else's key
  signing.sign_file(paths[3], priv(3), 3, other_run)        # another run's
  paths[4].write_bytes(paths[0].read_bytes())               # client 0's, again
  signing.signature_path(paths[4]).write_bytes(
      signing.signature_path(paths[0]).read_bytes())
  results = pipeline.run_server(config, d, tmp_path / "out", public_key_dir=pubdir)
  assert results["clients_used"] == [0]
  rej = results["clients_rejected"]
  assert "unsigned" in rej["1"]
  assert "does not verify with client 2's public key" in rej["2"]
  assert "replayed from another run" in rej["3"]
  assert "duplicate" in rej["4"] and "client 0" in rej["4"]
  # Unsigned mode (simulations) accepts clients 0, 1 (the duplicate still not).
  results = pipeline.run_server(config, d, tmp_path / "out2")
  assert results["clients_used"] == [0, 1, 2, 3]
  assert "duplicate" in results["clients_rejected"]["4"]


def test_run_client_signs_for_this_run(tmp_path):
  config = smoke.get_config()
  signing.generate_keys(tmp_path / "k", [2])
  path = pipeline.run_client(config, 2, tmp_path / "m",
                             signing_key=tmp_path / "k" / "client_00002.key")
  s = setup_lib.setup(config)
  pub = signing.load_public_key(tmp_path / "k" / "client_00002.pub")
  signing.verify(pub, path.read_bytes(),
                 signing.signature_path(path).read_bytes(), 2, setup_lib.run_id(s))
