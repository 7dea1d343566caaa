"""CollabDM as a Flower app: one round, one message per client.

CollabDM needs exactly one client -> server round, which maps onto Flower's
Message API (flwr >= 1.42) without a strategy:

1. The ``ServerApp`` sends every connected SuperNode one ``query.collabdm``
   instruction carrying the run config as JSON (``ConfigRecord``
   ``"instruction"``: ``config-json``).
2. The ``ClientApp`` on each node computes its one-shot message from its own
   partition (``stages.client_messages``, as ``launch.client`` does),
   encodes it with ``protocol.encode_message`` and replies with those exact
   bytes: ``ArrayRecord`` ``"message"`` holding one 1-D uint8 ``Array``
   (Flower chunks large arrays in transit), plus ``ConfigRecord``
   ``"client"``: ``client-id`` and ``bytes``.
3. The ``ServerApp`` validates every reply with our decoder
   (``wire.accept_messages``: corrupt, truncated, foreign-key or
   foreign-config messages are rejected and logged with their reason; a
   node's error reply is logged and recorded too), tolerates clients that
   never answer, then aggregates, distils and evaluates through
   ``pipeline.serve``: the same outputs as ``launch.server``
   (``results.json`` with ``clients_used``/``clients_rejected``,
   ``synthetic.npz``, ``config.json``, ``metrics.jsonl``, TensorBoard files,
   figures).

Which client a node is: its node config's ``partition-id`` (Flower's
simulation engine sets it; a real SuperNode is started with
``--node-config "partition-id=3"``). The node config may also set
``data-dir`` (where this site's data lives, ``config.data_dir``) and
``workdir`` (where the client's ``config.json`` and local-DM metrics go;
default ``<server workdir>/clients/client_<id>``).

The module-level ``server_app`` and ``client_app`` are what
``flwr run`` loads (``[tool.flwr.app.components]`` in pyproject.toml); they
read the run config keys ``config`` (a config file, ``path[:arg]``),
``config-overrides`` (``"a.b=1 c=x"``), ``workdir``,
``connect-timeout`` and ``reply-timeout`` (seconds). ``launch/flower.py``
builds the same apps around a config object for Flower's simulation engine.
"""

import ast
import importlib.util
import json
import logging
import pathlib
import sys
import time
from typing import Dict, Optional

import ml_collections
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.app import RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from collabdm_jax import outputs
from collabdm_jax import pipeline
from collabdm_jax import plots
from collabdm_jax import protocol
from collabdm_jax import setup as setup_lib
from collabdm_jax import stages
from collabdm_jax import wire

log = logging.getLogger("collabdm_jax")

ACTION = "collabdm"  # message type "query.collabdm"
MESSAGE_TYPE = f"query.{ACTION}"
DEFAULT_WORKDIR = "collabdm_flower"
DEFAULT_CONNECT_TIMEOUT_S = 600.0
DEFAULT_REPLY_TIMEOUT_S = 24 * 3600.0


# ---------------------------------------------------------------------------
# Configs in run configs and messages.


def config_to_json(config) -> str:
  """The config as JSON: what the server sends, what a client rebuilds."""
  return json.dumps(config.to_dict(), sort_keys=True, default=str)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` from a config file ``path[:arg]``.

  A relative path is looked up from the working directory, then from each
  ``sys.path`` entry (a Flower app's own directory is on it, so the
  repository's ``experiments/configs/*.py`` resolve inside a FAB).
  """
  path, _, arg = spec.partition(":")
  candidates = [pathlib.Path(path)]
  if not pathlib.Path(path).is_absolute():
    candidates += [pathlib.Path(p) / path for p in sys.path if p]
  found = next((c for c in candidates if c.is_file()), None)
  if found is None:
    raise ValueError(f"config file {path!r} not found (looked in the working "
                     "directory and on sys.path)")
  module_spec = importlib.util.spec_from_file_location(
      f"collabdm_flower_config_{abs(hash(str(found.resolve())))}", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config, overrides: str):
  """``config`` with each ``dotted.path=value`` of a space-separated string
  set (``setup.with_overrides``).

  Values are Python literals where they parse as one (``3``, ``0.5``,
  ``True``, ``None``, ``'(1, 2)'``), else strings.

  Raises:
    ValueError: on an entry without ``=``, a path that names no field, or a
      value the field's type refuses.
  """
  pairs = []
  for item in overrides.split():
    path, eq, raw = item.partition("=")
    if not eq:
      raise ValueError(f"config override {item!r} is not path=value")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    pairs.append((path, value))
  return setup_lib.with_overrides(config, pairs)


# ---------------------------------------------------------------------------
# The client.


def client_reply(config, client_id: int, workdir=None) -> RecordDict:
  """A client's whole job: its encoded one-shot message as a Flower record.

  Writes ``config.json`` and the local-DM ``metrics.jsonl`` to ``workdir``
  when given (see ``outputs.run_outputs``).
  """
  K = config.partition.num_clients
  if not 0 <= client_id < K:
    raise ValueError(f"partition-id must be in [0, {K}), got {client_id}")
  if workdir is None:
    s = setup_lib.setup(config)
    (msg,) = stages.client_messages(s, [client_id])
  else:
    with outputs.run_outputs(config, workdir) as metrics:
      s = setup_lib.setup(config)
      (msg,) = stages.client_messages(s, [client_id], metrics=metrics)
  blob = protocol.encode_message(
      msg, transport_dtype=config.message.transport_dtype)
  log.info("client %d: message of %d bytes", client_id, len(blob))
  return RecordDict({
      "message": ArrayRecord({"message": Array(np.frombuffer(blob, np.uint8))}),
      "client": ConfigRecord({"client-id": int(client_id),
                              "bytes": len(blob)}),
  })


def _client_workdir(context: Context, server_workdir: str, client_id: int):
  node_dir = context.node_config.get("workdir")
  if node_dir:
    return pathlib.Path(str(node_dir))
  return pathlib.Path(server_workdir) / "clients" / f"client_{client_id:05d}"


def make_client_app() -> ClientApp:
  """The ``ClientApp``: answers the server's one instruction."""
  app = ClientApp()

  @app.query(ACTION)
  def one_shot(message: Message, context: Context) -> Message:
    instruction = message.content["instruction"]
    config = config_from_json(str(instruction["config-json"]))
    if "partition-id" not in context.node_config:
      raise ValueError("this SuperNode has no 'partition-id' in its node "
                       "config (start it with --node-config "
                       "\"partition-id=<client id>\")")
    client_id = int(context.node_config["partition-id"])
    data_dir = context.node_config.get("data-dir")
    if data_dir:
      config.data_dir = str(data_dir)
    workdir = _client_workdir(context, str(instruction["workdir"]), client_id)
    return Message(client_reply(config, client_id, workdir),
                   reply_to=message)

  return app


# ---------------------------------------------------------------------------
# The server.


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float,
                   poll_s: float = 1.0):
  """Node ids once ``expected`` nodes are connected or ``timeout_s`` passed."""
  deadline = time.monotonic() + timeout_s
  while True:
    nodes = sorted(grid.get_node_ids())
    if len(nodes) >= expected or time.monotonic() >= deadline:
      return nodes
    time.sleep(poll_s)


def collect_round(grid: Grid, config, workdir, connect_timeout_s: float,
                  reply_timeout_s: float, spec: protocol.MessageSpec
                  ) -> wire.Received:
  """The one round: instruct every node, validate what comes back.

  Nodes that fail (error replies) or send a message that does not validate
  are recorded in ``Received.rejected`` with the reason (keyed by client id,
  or ``node <id>`` when the node never said which client it is); clients
  that do not answer within ``reply_timeout_s`` are skipped with a warning.

  Raises:
    ValueError: if no connected node, or no valid message.
  """
  K = config.partition.num_clients
  nodes = wait_for_nodes(grid, K, connect_timeout_s)
  if not nodes:
    raise ValueError(f"no SuperNode connected within {connect_timeout_s:g} s")
  if len(nodes) < K:
    log.warning("%d of %d expected nodes connected; going on with them",
                len(nodes), K)
  instruction = RecordDict({"instruction": ConfigRecord({
      "config-json": config_to_json(config), "workdir": str(workdir)})})
  messages = [Message(instruction, dst_node_id=n, message_type=MESSAGE_TYPE,
                      group_id="1") for n in nodes]
  log.info("sent the instruction to %d nodes; waiting for replies", len(nodes))
  replies = list(grid.send_and_receive(messages, timeout=reply_timeout_s))
  blobs: Dict[int, bytes] = {}
  rejected: Dict[str, str] = {}
  node_of: Dict[int, int] = {}
  for reply in replies:
    node = reply.metadata.src_node_id
    if reply.has_error():
      reason = f"node {node} failed: {reply.error.reason}"
      log.error("rejected the reply of node %d: %s", node, reply.error.reason)
      rejected[f"node {node}"] = reason
      continue
    try:
      k = int(reply.content["client"]["client-id"])
      blob = reply.content["message"]["message"].numpy().tobytes()
    except (KeyError, TypeError, ValueError) as e:
      log.error("rejected the reply of node %d: not a CollabDM reply (%s)",
                node, e)
      rejected[f"node {node}"] = f"not a CollabDM reply ({e!r})"
      continue
    if k in blobs:
      log.error("rejected the reply of node %d: client %d already answered "
                "from node %d", node, k, node_of[k])
      rejected[f"node {node}"] = (f"duplicate client id {k} (already sent "
                                  f"by node {node_of[k]})")
      continue
    blobs[k], node_of[k] = blob, node
  for k in range(K):
    if k not in blobs:
      log.warning("no message from client %d: continuing without it", k)
  received = wire.accept_messages(
      blobs, spec, source=lambda k: f"node {node_of[k]}")
  received.rejected.update(rejected)
  if not received.messages:
    raise ValueError(f"no valid client message from {len(nodes)} nodes: "
                     f"{received.rejected}")
  return received


def serve_round(grid: Grid, config, workdir,
                connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S) -> Dict:
  """The ``ServerApp``'s job: one round, then distil, evaluate and write.

  Same outputs as ``pipeline.run_server`` in ``workdir``, plus the figures.
  """
  workdir = pathlib.Path(workdir).resolve()

  def receive(s):
    return collect_round(grid, config, workdir, connect_timeout_s,
                         reply_timeout_s, setup_lib.message_spec(s))

  results = pipeline.serve(config, workdir, receive)
  plots.run_figures(workdir, overwrite=True)
  log.info("test accuracy %.4f +- %.4f from clients %s",
           results["accuracy_mean"], results["accuracy_std"],
           results["clients_used"])
  return results


def make_server_app(config=None, workdir=None,
                    connect_timeout_s: Optional[float] = None,
                    reply_timeout_s: Optional[float] = None) -> ServerApp:
  """The ``ServerApp``; unset arguments come from the run config.

  Run config keys: ``config`` (``path[:arg]``), ``config-overrides``,
  ``workdir``, ``connect-timeout``, ``reply-timeout``.
  """
  app = ServerApp()

  @app.main()
  def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = config
    if cfg is None:
      if "config" not in rc:
        raise ValueError("the run config needs 'config' (an experiment "
                         "config file, path[:arg])")
      cfg = apply_overrides(load_config_file(str(rc["config"])),
                            str(rc.get("config-overrides", "")))
    serve_round(
        grid, cfg, workdir or str(rc.get("workdir", DEFAULT_WORKDIR)),
        connect_timeout_s if connect_timeout_s is not None else float(
            rc.get("connect-timeout", DEFAULT_CONNECT_TIMEOUT_S)),
        reply_timeout_s if reply_timeout_s is not None else float(
            rc.get("reply-timeout", DEFAULT_REPLY_TIMEOUT_S)))

  return app


# What ``flwr run`` loads ([tool.flwr.app.components] in pyproject.toml).
server_app = make_server_app()
client_app = make_client_app()
