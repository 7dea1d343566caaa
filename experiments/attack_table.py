"""Accuracy under malicious clients: f x attack x aggregator.

The honest client pass runs once; then for every number f of malicious
clients (clients 0 .. f-1), every attack (``collabdm_jax.attacks``) and
every server aggregator (``server.aggregator``), the forged messages cross
the real wire format and the server's checks (a rejected forgery costs the
run that client, as in ``launch.server``), the server synthesises from the
messages it accepted and the synthetic set is evaluated. Writes one JSON
document (rows, provenance) and a Markdown table next to it.

Issue 12's table (Fashion-MNIST, K = 10, alpha = 0.5; CPU-sized budgets):

  nice -n 15 python -m experiments.attack_table \
      --config=experiments/configs/default.py \
      --config.partition.num_clients=10 --config.partition.alpha=0.5 \
      --f=0,1,3 --attacks=scaled,sign_flip,noise,label_swap \
      --aggregators=mean,median,trimmed_mean,geometric_median,clipped_mean \
      --out=experiments/results/attack_table/attack_table.json

A tiny check of the script itself: ``--config=experiments/configs/smoke.py``.
"""

import json
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from collabdm_jax import aggregation
from collabdm_jax import attacks
from collabdm_jax import protocol
from collabdm_jax import provenance
from collabdm_jax import server as server_lib
from collabdm_jax import setup as setup_lib
from collabdm_jax import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config file.",
    lock_config=True)
_F = flags.DEFINE_list("f", ["0", "1", "3"], "Numbers of malicious clients.")
_ATTACKS = flags.DEFINE_list("attacks", ["scaled", "sign_flip", "noise",
                                         "label_swap"], "Attacks to run.")
_AGGREGATORS = flags.DEFINE_list("aggregators", list(aggregation.AGGREGATORS),
                                 "Server aggregators to run.")
_FACTOR = flags.DEFINE_float("factor", 10.0, "scaled: factor on the means.")
_STD = flags.DEFINE_float("std", 1.0, "noise: standard deviation of forged means.")
_CLAIM = flags.DEFINE_integer(
    "claim_class_size", None, "scaled: class size the attackers claim "
    "(default: server.max_class_size if set, else none claimed).")
_SEED = flags.DEFINE_integer("attack_seed", 0, "Seed of the attacks' randomness.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (a .md table is "
                           "written beside it).", required=True)


def forge(s, honest, f, name, key, claim):
  """Messages the server receives: clients < f replaced by forgeries."""
  cfg = s.config
  out = []
  for m in honest:
    if m.client_id < f:
      m = attacks.attack(name, jax.random.fold_in(key, m.client_id), m,
                         honest[f:], factor=_FACTOR.value, std=_STD.value,
                         claim_class_size=claim,
                         batch_real=cfg.stats.batch_real)
    out.append(m)
  return out


def receive(s, msgs):
  """What the server accepts of ``msgs``: (decoded messages, {id: reason})."""
  spec = setup_lib.message_spec(s)
  accepted, rejected = [], {}
  for m in msgs:
    try:
      # A forger skips the encoder's own checks; the server's decode is the gate.
      blob = protocol.encode_unchecked(m, s.config.message.transport_dtype)
      accepted.append(protocol.decode_message(blob, spec))
    except protocol.MessageError as e:
      rejected[str(m.client_id)] = str(e)
  return accepted, rejected


def cell(s, msgs, aggregator):
  """Accuracy of the server run on ``msgs`` with ``aggregator``."""
  s.config.server.aggregator = aggregator
  t0 = time.perf_counter()
  images = stages.synthesize_from_messages(s, msgs)
  x, y = server_lib.synthetic_dataset(images)
  res = stages.evaluate_images(s, x, y)
  return {"accuracy_mean": res.mean, "accuracy_std": res.std,
          "accuracies": [float(a) for a in res.accuracies],
          "wall_s": round(time.perf_counter() - t0, 1)}


def markdown(rows, aggregators):
  """One line per (f, attack), one column per aggregator: accuracy in %."""
  head = "| f | attack | " + " | ".join(aggregators) + " |"
  lines = [head, "|" + "---|" * (2 + len(aggregators))]
  keys = sorted({(r["f"], r["attack"]) for r in rows})
  for f, attack in keys:
    cells = []
    for a in aggregators:
      r = next((r for r in rows if (r["f"], r["attack"], r["aggregator"])
                == (f, attack, a)), None)
      cells.append("" if r is None else
                   f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}"
                   + (f" (rej {len(r['rejected'])})" if r["rejected"] else ""))
    lines.append(f"| {f} | {attack} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  record = provenance.start(
      ["python", "-m", "experiments.attack_table", *sys.argv[1:]])
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  config.checkpoint.every = 0
  fs = sorted({int(f) for f in _F.value})
  for name in _ATTACKS.value:
    if name not in attacks.ATTACKS:
      raise app.UsageError(f"--attacks: {name!r} is not one of {attacks.ATTACKS}")
  for name in _AGGREGATORS.value:
    aggregation.AggregatorConfig(name=name)  # fails on an unknown name
  K = config.partition.num_clients
  if fs and not 0 <= fs[-1] < K:
    raise app.UsageError(f"--f must be in [0, {K}), got {fs}")
  claim = _CLAIM.value
  if claim is None:
    claim = config.server.max_class_size
  t0 = time.perf_counter()
  s = setup_lib.setup(config)
  honest = stages.client_messages(s, list(range(K)))
  client_s = time.perf_counter() - t0
  key = jax.random.key(_SEED.value)
  rows = []
  for f in fs:
    for attack in (["none"] if f == 0 else _ATTACKS.value):
      msgs = honest if f == 0 else forge(s, honest, f, attack, key, claim)
      accepted, rejected = receive(s, msgs)
      for aggregator in _AGGREGATORS.value:
        row = {"f": f, "attack": attack, "aggregator": aggregator,
               "rejected": rejected,
               "clients_used": [m.client_id for m in accepted]}
        row.update(cell(s, accepted, aggregator))
        logging.warning("f=%d %s %s: %.4f", f, attack, aggregator,
                        row["accuracy_mean"])
        rows.append(row)
  doc = {
      "what": "test accuracy under f malicious clients (0..f-1) per attack "
              "and server aggregator",
      "provenance": provenance.finish(record),
      "attack_params": {"factor": _FACTOR.value, "std": _STD.value,
                        "claim_class_size": claim, "seed": _SEED.value},
      "config": config.to_dict(),
      "client_pass_s": round(client_s, 1),
      "rows": rows,
  }
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
  out.with_suffix(".md").write_text(
      f"Command: `{doc['provenance']['command']}`\n\n"
      + markdown(rows, _AGGREGATORS.value))
  print(markdown(rows, _AGGREGATORS.value))


if __name__ == "__main__":
  app.run(main)
