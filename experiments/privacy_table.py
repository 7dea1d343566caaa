"""Accuracy against the privacy budget epsilon (collabdm_jax/privacy.py).

For every epsilon the clients' private pass runs (clipped embeddings, Poisson
batches, calibrated Gaussian noise; no local images), the messages cross the
real wire format and the server's checks, the server distils from noise and
the synthetic set is evaluated. ``inf`` is the ordinary non-private run (local
images, fixed-size batches); ``--noise_init_baseline`` adds the non-private run
with the server started from noise, so the table separates what the noise
costs from what losing the local images costs. Writes one JSON document
(rows with the accountant's epsilon and noise multipliers, provenance) and a
Markdown table next to it.

Issue 12's table (Fashion-MNIST, the default config, CPU-sized budgets):

  nice -n 15 python -m experiments.privacy_table \
      --config=experiments/configs/default.py --config.eval.num_nets=2 \
      --epsilons=1,4,16,inf \
      --out=experiments/results/privacy_table/privacy_table.json

A tiny check of the script itself: ``--config=experiments/configs/smoke.py``.
"""

import json
import math
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags

from collabdm_jax import protocol
from collabdm_jax import provenance
from collabdm_jax import server as server_lib
from collabdm_jax import setup as setup_lib
from collabdm_jax import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config file.",
    lock_config=True)
_EPSILONS = flags.DEFINE_list("epsilons", ["1", "4", "16", "inf"],
                              "Privacy budgets; inf is the non-private run.")
_NOISE_INIT = flags.DEFINE_bool(
    "noise_init_baseline", True, "Add the non-private run with "
    "server.init='noise' and no local images.")
_SEED = flags.DEFINE_integer("privacy_seed", 0, "The clients' secret seed "
                             "(fixed here so that the table can be remade).")
_OUT = flags.DEFINE_string("out", None, "JSON output path (a .md table is "
                           "written beside it).", required=True)


def receive(s, msgs):
  """Messages through the wire format and the server's checks."""
  spec = setup_lib.message_spec(s)
  accepted, rejected = [], {}
  for m in msgs:
    try:
      blob = protocol.encode_message(
          m, transport_dtype=s.config.message.transport_dtype)
      accepted.append(protocol.decode_message(blob, spec))
    except protocol.MessageError as e:
      rejected[str(m.client_id)] = str(e)
  return accepted, rejected


def row(s, label, epsilon, init):
  """One run at ``epsilon`` (None: non-private) from server init ``init``."""
  cfg = s.config
  local = cfg.local.enabled
  cfg.privacy.epsilon = epsilon
  cfg.server.init = init
  # Nothing would use local images: do not spend the time making them.
  cfg.local.enabled = local and init == "local"
  K = cfg.partition.num_clients
  timings = {}
  t0 = time.perf_counter()
  msgs = stages.client_messages(s, list(range(K)), timings=timings)
  accepted, rejected = receive(s, msgs)
  record = setup_lib.privacy_record(s, dict(enumerate(s.partition.counts)))
  images = stages.synthesize_from_messages(s, accepted, timings)
  x, y = server_lib.synthetic_dataset(images)
  res = stages.evaluate_images(s, x, y, timings)
  # Under privacy the server always starts from noise (no local images).
  out = {"label": label, "epsilon_target": epsilon,
         "server_init": init if epsilon is None else "noise",
         "accuracy_mean": res.mean, "accuracy_std": res.std,
         "accuracies": [float(a) for a in res.accuracies],
         "rejected": rejected, "wall_s": {k: round(v, 1) for k, v in
                                          timings.items()}}
  out["wall_s"]["row"] = round(time.perf_counter() - t0, 1)
  cfg.local.enabled = local
  if record:
    rep = record["privacy"]
    sigmas = [v for c in rep["clients"].values()
              for v in c["noise_multipliers"] if v is not None]
    out.update(epsilon_spent=rep["epsilon"], delta=rep["delta"],
               clip_norm=rep["clip_norm"],
               noise_multiplier_min=min(sigmas),
               noise_multiplier_max=max(sigmas),
               noise_multiplier_median=float(np.median(sigmas)),
               accounting=rep)
  return out


def markdown(rows):
  lines = ["| epsilon (target) | epsilon spent | server init | noise multipliers "
           "(min / median / max) | accuracy (%) |", "|---|---|---|---|---|"]
  for r in rows:
    eps = "∞" if r["epsilon_target"] is None else f"{r['epsilon_target']:g}"
    spent = (f"{r['epsilon_spent']:.3f}" if "epsilon_spent" in r else "—")
    sig = (f"{r['noise_multiplier_min']:.2f} / "
           f"{r['noise_multiplier_median']:.2f} / "
           f"{r['noise_multiplier_max']:.2f}" if "epsilon_spent" in r else "—")
    lines.append(f"| {eps} | {spent} | {r['server_init']} | {sig} | "
                 f"{100 * r['accuracy_mean']:.1f} ± "
                 f"{100 * r['accuracy_std']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  config.checkpoint.every = 0
  config.privacy.seed = _SEED.value
  epsilons = []
  for e in _EPSILONS.value:
    v = float(e)
    if not v > 0:
      raise app.UsageError(f"--epsilons: {e!r} is not > 0")
    epsilons.append(None if math.isinf(v) else v)
  init = config.server.init
  # Taken first: the code that made the rows, whatever happens meanwhile.
  record = provenance.start(
      ["python", "-m", "experiments.privacy_table", *sys.argv[1:]])
  t0 = time.perf_counter()
  s = setup_lib.setup(config)
  rows = []
  for eps in epsilons:
    rows.append(row(s, "private" if eps is not None else "non-private",
                    eps, init))
    logging.warning("epsilon %s: %.4f", eps, rows[-1]["accuracy_mean"])
  if _NOISE_INIT.value:
    rows.append(row(s, "non-private, server from noise", None, "noise"))
  config.privacy.epsilon, config.server.init = None, init
  doc = {
      "what": "test accuracy against the privacy budget epsilon per example "
              "(client-side DP: clipping, Poisson batches, Gaussian noise)",
      "provenance": provenance.finish(record),
      "config": config.to_dict(),
      "total_s": round(time.perf_counter() - t0, 1),
      "rows": rows,
  }
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
  out.with_suffix(".md").write_text(
      f"Command: `{doc['provenance']['command']}`\n\n" + markdown(rows))
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
