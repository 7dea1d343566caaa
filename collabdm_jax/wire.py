"""Messages on the wire: encode, write, read, authenticate and accept them.

A run sends every client message through the same encode / validate /
decode (``protocol``), whether it stays in memory (``round_trip``, the
single-process simulation), goes through files (``save_client_message`` and
``receive_files``, ``launch.client`` / ``launch.server``) or through Flower
(``flower_app``): the simulation measures exactly what a deployment sends.
``accept_messages`` is the server's gate for untrusted uploads.
"""

import dataclasses
import logging
import pathlib
from typing import Dict, List, Sequence

import jax
import numpy as np

from collabdm_jax import parallel
from collabdm_jax import protocol
from collabdm_jax import setup as setup_lib
from collabdm_jax import signing

log = logging.getLogger("collabdm_jax")


def message_path(message_dir, client_id) -> pathlib.Path:
  """Where client ``client_id`` writes its message: ``client_NNNNN.cdm``."""
  return pathlib.Path(message_dir) / f"client_{client_id:05d}.cdm"


def client_workdir(message_dir, client_id) -> pathlib.Path:
  """Where a client run keeps its config and metrics by default."""
  return pathlib.Path(message_dir) / f"client_{client_id:05d}_run"


@dataclasses.dataclass
class Received:
  """The messages a server accepted, and the record of what it refused."""
  messages: List[protocol.ClientMessage]
  upload: Dict[str, int]  # client id -> bytes received
  rejected: Dict[str, str]  # client id -> reason


def round_trip(s: setup_lib.Setup, msgs: Sequence[protocol.ClientMessage],
               client_ids: Sequence[int]):
  """Encodes and decodes this process's messages, as a server receives them.

  Returns:
    ``(decoded messages, {client id: bytes})``; with several processes the
    byte counts cover every process's clients (``client_ids`` are this
    process's).
  """
  spec = setup_lib.message_spec(s)
  upload, received = {}, []
  for m in msgs:
    blob = protocol.encode_message(
        m, transport_dtype=s.config.message.transport_dtype)
    upload[str(m.client_id)] = len(blob)
    received.append(protocol.decode_message(blob, spec))
  if jax.process_count() > 1:
    sizes = np.zeros(s.config.partition.num_clients, np.int64)
    sizes[list(client_ids)] = [upload[str(k)] for k in client_ids]
    upload = {str(k): int(n) for k, n in
              enumerate(parallel.sum_over_processes(sizes))}
  return received, upload


def save_client_message(s: setup_lib.Setup, msg: protocol.ClientMessage,
                        message_dir, key=None) -> pathlib.Path:
  """Writes ``msg`` to ``message_path`` (signed into ``<path>.sig``, if asked).

  ``key`` is the client's Ed25519 private key
  (``signing.load_private_key``); the signature binds the message to this
  run.
  """
  path = message_path(message_dir, msg.client_id)
  path.parent.mkdir(parents=True, exist_ok=True)
  sig = signing.signature_path(path)
  if sig.exists():
    sig.unlink()  # a stale signature must not vouch for the new message
  n = protocol.save_message(path, msg,
                            transport_dtype=s.config.message.transport_dtype)
  if key is not None:
    signing.sign_file(path, key, msg.client_id, setup_lib.run_id(s))
  log.info("client %d wrote %s (%d bytes%s)", msg.client_id, path, n,
           ", signed" if key is not None else "")
  return path


def _read_upload(path):
  """``(message bytes, signature record or None)`` of one client's files."""
  data = path.read_bytes()
  sig = signing.signature_path(path)
  return data, (sig.read_bytes() if sig.exists() else None)


def receive_files(s: setup_lib.Setup, message_dir,
                  public_key_dir=None) -> Received:
  """Reads and accepts every client's message file in ``message_dir``.

  Missing clients are tolerated with a warning. With ``public_key_dir``
  (``client_NNNNN.pub`` files) only messages signed for this run by the
  slot's client are accepted.

  Raises:
    ValueError: if no message is valid.
  """
  verifier = signing.Verifier(public_key_dir, setup_lib.run_id(s))
  blobs, records = {}, {}
  # Several processes share the clients: each reads only its own.
  ids = parallel.process_clients(s.config.partition.num_clients)
  if jax.process_count() > 1:
    log.info("process %d of %d reads the messages of clients %s",
             jax.process_index(), jax.process_count(), ids)
  for k in ids:
    path = message_path(message_dir, k)
    if not path.exists():
      log.warning("no message from client %d (%s): continuing without it",
                  k, path)
      continue
    try:
      blobs[k], records[k] = _read_upload(path)
    except OSError as e:
      blobs[k], records[k] = e, None
  received = accept_messages(
      blobs, setup_lib.message_spec(s),
      source=lambda k: str(message_path(message_dir, k)),
      verifier=verifier, signatures=records)
  (total,) = parallel.sum_over_processes([len(received.messages)])
  if not total:
    raise ValueError(f"no valid client message in {message_dir}")
  return received


def accept_messages(blobs: Dict[int, bytes], spec: protocol.MessageSpec,
                    source=str, verifier=None, signatures=None) -> Received:
  """Decodes and validates each client's encoded message.

  ``blobs`` maps the client id a message arrived from to its bytes (or the
  ``OSError`` that reading them raised). With a ``signing.Verifier``, each
  message is authenticated against ``signatures[k]`` before anything it
  holds is parsed. A message that fails a check, or that claims another
  client's id, is rejected (logged with its reason, ``source(k)`` naming
  where it came from) and the rest go on: an untrusted upload costs the run
  that client, never the run.
  """
  msgs, upload, rejected = [], {}, {}
  for k, blob in sorted(blobs.items()):
    try:
      if isinstance(blob, OSError):
        raise blob
      if verifier is not None:
        verifier.check(k, blob, (signatures or {}).get(k))
      m = protocol.decode_message(blob, spec)
    except (protocol.MessageError, OSError) as e:
      log.error("rejected message of client %d (%s): %s", k, source(k), e)
      rejected[str(k)] = str(e)
      continue
    if m.client_id != k:
      log.error("rejected message of client %d (%s): it claims client id %d",
                k, source(k), m.client_id)
      rejected[str(k)] = (f"message of client {k} claims client id "
                          f"{m.client_id}")
      continue
    msgs.append(m)
    upload[str(k)] = len(blob)
  return Received(msgs, upload, rejected)
