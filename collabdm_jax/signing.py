"""Signed uploads: per-client Ed25519 keys, signatures bound to the run.

sha256 in a message detects accidents, not forgery: anyone can write a file
claiming to be client 3. With signing, each client holds a private Ed25519
key and the server a directory of the clients' public keys
(``launch.keygen`` makes both). A client signs

    b"collabdm_jax.signature.v1\\0" || run_id (32 bytes) ||
    client_id (uint64 little-endian) || sha256(message file bytes)

and writes the signature beside its message as ``<message>.sig`` (msgpack:
version, client_id, run_id, signature). The run id is derived from the root
key's fingerprint and the protocol config hash (``run_id``), so a signature
made for another run does not verify for this one: a replayed upload is
rejected even where its statistics would otherwise pass. (Two runs with the
same root key and protocol config have the same run id; their honest
messages are identical, so a replay between them changes nothing.)

The server rejects, with the reason: a missing or malformed signature
(unsigned), a signature for another run (replay), one that does not verify
under the slot's public key (wrong key or tampered message), and a message
whose bytes were already received in another slot (duplicate).
"""

import hashlib
import pathlib
from typing import Dict, Optional, Tuple

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from collabdm_jax import protocol
from collabdm_jax.protocol import MessageError

SIGNATURE_VERSION = 1
_DOMAIN = b"collabdm_jax.signature.v1\0"
_SIG_FIELDS = ("version", "client_id", "run_id", "signature")


class SignatureError(MessageError):
  """An upload's signature is missing, invalid, replayed or duplicated."""


def run_id(root_key_fingerprint: str, config_hash: str) -> str:
  """64-hex-digit id of a run: sha256 of the root key and protocol config."""
  h = hashlib.sha256(b"collabdm_jax.run_id.v1\0")
  h.update(root_key_fingerprint.encode("ascii") + b"\0")
  h.update(config_hash.encode("ascii"))
  return h.hexdigest()


def key_filename(client_id: int, private: bool) -> str:
  """``client_00003.key`` (private) or ``client_00003.pub`` (public)."""
  return f"client_{client_id:05d}.{'key' if private else 'pub'}"


def signature_path(message_path) -> pathlib.Path:
  """Where the signature of ``message_path`` lives: ``<message>.sig``."""
  p = pathlib.Path(message_path)
  return p.with_name(p.name + ".sig")


def generate_keys(out_dir, client_ids) -> Dict[int, Tuple[pathlib.Path, pathlib.Path]]:
  """Writes a fresh Ed25519 key pair per client into ``out_dir``.

  Private keys are PKCS8 PEM files readable by their owner only (0600),
  public keys SubjectPublicKeyInfo PEM. Existing key files are never
  overwritten (a ``FileExistsError`` names the first one).

  Returns:
    ``{client_id: (private_path, public_path)}``.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  ids = [int(k) for k in client_ids]
  for k in ids:
    if k < 0:
      raise ValueError(f"client ids must be >= 0, got {k}")
    for private in (True, False):
      if (out / key_filename(k, private)).exists():
        raise FileExistsError(f"{out / key_filename(k, private)} exists; "
                              f"refusing to overwrite a key")
  paths = {}
  for k in ids:
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)
    pp, qp = out / key_filename(k, True), out / key_filename(k, False)
    protocol.write_atomic(pp, priv, 0o600)
    protocol.write_atomic(qp, pub, 0o644)
    paths[k] = (pp, qp)
  return paths


def load_private_key(path) -> ed25519.Ed25519PrivateKey:
  """Reads a PEM Ed25519 private key (ValueError if it is not one)."""
  key = serialization.load_pem_private_key(pathlib.Path(path).read_bytes(),
                                           password=None)
  if not isinstance(key, ed25519.Ed25519PrivateKey):
    raise ValueError(f"{path}: not an Ed25519 private key")
  return key


def load_public_key(path) -> ed25519.Ed25519PublicKey:
  """Reads a PEM Ed25519 public key (ValueError if it is not one)."""
  key = serialization.load_pem_public_key(pathlib.Path(path).read_bytes())
  if not isinstance(key, ed25519.Ed25519PublicKey):
    raise ValueError(f"{path}: not an Ed25519 public key")
  return key


def _signed_bytes(run: str, client_id: int, message: bytes) -> bytes:
  return (_DOMAIN + bytes.fromhex(run) + int(client_id).to_bytes(8, "little")
          + hashlib.sha256(message).digest())


def sign(private_key, message: bytes, client_id: int, run: str) -> bytes:
  """The encoded signature record of ``message`` by client ``client_id``."""
  sig = private_key.sign(_signed_bytes(run, client_id, message))
  return msgpack.packb({"version": SIGNATURE_VERSION, "client_id": int(client_id),
                        "run_id": run, "signature": sig}, use_bin_type=True)


def sign_file(message_path, private_key, client_id: int, run: str) -> pathlib.Path:
  """Signs the message file and writes ``<message>.sig`` atomically."""
  data = pathlib.Path(message_path).read_bytes()
  out = signature_path(message_path)
  protocol.write_atomic(out, sign(private_key, data, client_id, run), 0o644)
  return out


def _parse_record(record: bytes) -> dict:
  try:
    rec = msgpack.unpackb(record, raw=False, strict_map_key=True)
  except Exception as e:  # msgpack raises several unrelated types
    raise SignatureError(f"signature record is not valid msgpack: {e}") from e
  if not isinstance(rec, dict) or sorted(rec) != sorted(_SIG_FIELDS):
    raise SignatureError(f"signature record must have exactly the fields "
                         f"{list(_SIG_FIELDS)}")
  if rec["version"] != SIGNATURE_VERSION:
    raise SignatureError(f"unsupported signature version {rec['version']!r}; "
                         f"expected {SIGNATURE_VERSION}")
  if (isinstance(rec["client_id"], bool) or not isinstance(rec["client_id"], int)
      or not isinstance(rec["run_id"], str) or len(rec["run_id"]) != 64
      or not isinstance(rec["signature"], bytes) or len(rec["signature"]) != 64):
    raise SignatureError("signature record has malformed fields (client_id "
                         "int, run_id 64 hex digits, signature 64 bytes)")
  try:
    bytes.fromhex(rec["run_id"])
  except ValueError as e:
    raise SignatureError("signature record's run_id is not hex") from e
  return rec


def verify(public_key, message: bytes, record: Optional[bytes], client_id: int,
           run: str) -> None:
  """Checks that client ``client_id`` signed ``message`` for run ``run``.

  Raises:
    SignatureError: naming why: no signature, a malformed record, a record
      for another client or another run (replay), or a signature that does
      not verify under ``public_key`` (wrong key or altered message).
  """
  if record is None:
    raise SignatureError(f"client {client_id}'s message is unsigned; this "
                         f"server accepts only signed messages")
  rec = _parse_record(record)
  if rec["client_id"] != client_id:
    raise SignatureError(f"signature is by client {rec['client_id']}, not "
                         f"client {client_id}")
  if rec["run_id"] != run:
    raise SignatureError(f"signature is for run {rec['run_id'][:16]}..., not "
                         f"this run {run[:16]}...: replayed from another run")
  try:
    public_key.verify(rec["signature"], _signed_bytes(run, client_id, message))
  except InvalidSignature as e:
    raise SignatureError(f"signature does not verify with client {client_id}'s "
                         f"public key: signed with another key, or the message "
                         f"was altered") from e


class Verifier:
  """The server's gate: signatures per slot, and no message received twice.

  Args:
    public_key_dir: directory of ``client_NNNNN.pub`` files; None accepts
      unsigned uploads (simulations), still refusing duplicates.
    run: this run's ``run_id``.
  """

  def __init__(self, public_key_dir, run: str):
    self.dir = None if public_key_dir is None else pathlib.Path(public_key_dir)
    self.run = run
    self._seen: Dict[bytes, int] = {}

  def check(self, client_id: int, message: bytes, record: Optional[bytes]) -> None:
    """Raises ``SignatureError`` if client ``client_id``'s upload is refused."""
    digest = hashlib.sha256(message).digest()
    if digest in self._seen:
      raise SignatureError(f"duplicate: the same message bytes were already "
                           f"received from client {self._seen[digest]}")
    if self.dir is not None:
      path = self.dir / key_filename(client_id, private=False)
      try:
        key = load_public_key(path)
      except (OSError, ValueError) as e:
        raise SignatureError(f"no usable public key for client {client_id} "
                             f"({path}): {e}") from e
      verify(key, message, record, client_id, self.run)
    self._seen[digest] = client_id
