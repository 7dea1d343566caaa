"""Why do distilled NSL-KDD sets lose to 10 random real rows per class?

The intrusion-detection table (``experiments/results/ids_5g``) has CollabDM at
59.7 % and merged local DM at 58.1 % balanced accuracy on NSL-KDD, below 10
random real rows per class (67.1 %). This program runs controlled, paired
studies on the table's set-up (``experiments/configs/nsl_kdd.py``: 5 sites,
Dirichlet alpha 0.1, partition seed 0, MLP 128x2 random networks, 10 rows per
class, 5 evaluation MLPs x 300 epochs). Per root seed everything that is not
the varied factor is identical (same client statistics, same networks psi_t,
same starting rows, same evaluation keys), so differences are paired.

  python -m experiments.nsl_kdd_diagnosis --out_dir=experiments/results/nsl_kdd

Studies (``--studies``, each writes ``<study>.json`` and ``<study>.csv``):

* ``trajectory``: the server (targets from the clients' uploaded means,
  count weighting) from three starting sets -- ``local`` (CollabDM: the
  pooled locally distilled rows, noise where the pool is short), ``real``
  (exactly the table's ``real_subset`` rows: not federated, a diagnostic)
  and ``noise`` -- at server lr 0.1, 1 and 10, evaluated at the iterations
  in ``--snapshots``. Iteration 0 of ``real`` is the table's real_subset and
  iteration 200 of ``local`` at lr 1 is the table's CollabDM run. Each set is
  also scored by the matching objective itself on held-out random networks
  (``embedding_gap``), against the training and the test class means.
* ``embedding_net``: width/depth of the random MLPs psi_t (client pass, local
  DM and server recomputed), starts ``local`` and ``real``.
* ``server_start``: what CollabDM's start is made of and what it aims at:
  the pooled local rows alone (merged local DM's set, no noise slots), the
  noise slots filled with real rows, local DM off (the sites' own real rows
  are the pool), 10 local rows per class and site instead of
  ipc // K + 1 = 3, and uniform instead of count weighting of the targets;
  each before and after 200 server iterations.
* ``eval_protocol``: the evaluation MLP's epochs and lr on the real subset,
  on CollabDM's start and on its result.
* ``scaling``: features min-max scaled to [0, 1] instead of standardised
  (one-hot columns of rare categories standardise to values of 30 and more).
* ``real_draws``: balanced accuracy of many random 10-row-per-class real
  sets (the spread of the reference itself).

Every JSON carries ``collabdm_jax.provenance`` and the flags.
"""

import csv
import dataclasses
import json
import logging
import pathlib
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from scipy import stats as scipy_stats

from collabdm_jax import client as client_lib
from collabdm_jax import evaluate
from collabdm_jax import keys as keys_lib
from collabdm_jax import models
from collabdm_jax import provenance
from collabdm_jax import server as server_lib
from collabdm_jax import setup as setup_lib
from collabdm_jax import stages
from collabdm_jax.baselines.common import baseline_key
from collabdm_jax.data import tabular
from experiments.configs import nsl_kdd

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDIES = ("trajectory", "mechanism", "server_passes", "best_server",
           "embedding_net", "server_start", "eval_protocol", "scaling",
           "real_draws")
CLASS_NAMES = ("normal", "DoS", "Probe", "R2L", "U2R")
# Held-out random networks for the embedding gap: a stream no run uses.
_HELD_OUT_STREAM = 1_000_003

FLAGS = flags.FLAGS


def define_flags():
  """This program's absl flags (defined only when it runs as a program)."""
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Root seeds (paired).")
  flags.DEFINE_list("studies", list(STUDIES), f"Any of {list(STUDIES)}.")
  flags.DEFINE_string("out_dir",
                      str(REPO_ROOT / "experiments" / "results" / "nsl_kdd"),
                      "Where the JSON/CSV files go.")
  flags.DEFINE_list("snapshots", ["0", "25", "50", "100", "200", "400",
                                  "1000"],
                    "Server iterations at which the set is evaluated.")
  flags.DEFINE_list("server_lrs", ["0.1", "1", "10"], "trajectory: lrs.")
  flags.DEFINE_integer("held_out_nets", 20,
                       "Random networks the embedding gap averages over.")
  flags.DEFINE_integer("real_draws", 10, "real_draws: sets per seed.")
  flags.DEFINE_bool("summarize_only", False,
                    "Only rewrite summary.md from the JSONs in --out_dir.")


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


def base_config(seed: int, iterations: int, width=128, depth=2):
  """The table's NSL-KDD config with ``seed`` and T = ``iterations``.

  Client statistics of iteration t depend only on (root, t), so a run with
  T >= 200 holds the table's T = 200 statistics as its prefix, and local DM
  (100 iterations on the shared networks) is the table's.
  """
  c = nsl_kdd.get_config()
  c.seed = int(seed)
  c.num_iterations = int(iterations)
  c.model.width = int(width)
  c.model.depth = int(depth)
  return c


@dataclasses.dataclass
class Clients:
  """What the server receives from the sites, in arrays."""
  targets: object  # losses.ClassMoments over T iterations
  pool_x: np.ndarray  # pooled locally distilled rows
  pool_y: np.ndarray
  pool_site: np.ndarray  # which site distilled each pooled row


def client_side(s: setup_lib.Setup) -> Clients:
  """Every site's message (client pass + local DM), aggregated (count)."""
  K = s.config.partition.num_clients
  msgs = stages.client_messages(s, list(range(K)))
  targets = server_lib.aggregate_messages(msgs, s.config.server.weighting)
  return Clients(
      targets,
      np.concatenate([m.local_images for m in msgs]),
      np.concatenate([m.local_labels for m in msgs]),
      np.concatenate([np.full(len(m.local_labels), m.client_id)
                      for m in msgs]))


def real_subset_rows(s: setup_lib.Setup) -> np.ndarray:
  """``[C, ipc, F]``: the table's ``real_subset`` rows for this seed.

  ``real_subset`` is central DM with 0 iterations, i.e. the first draw of
  ``client.local_distill`` under the central-DM key.
  """
  key = jax.random.fold_in(baseline_key(s.root, "central_dm"), 0)
  y = s.dataset.train_y
  order = np.argsort(y, kind="stable")
  return client_lib.initial_images(key, s.train_x[order], y[order],
                                   s.dataset.num_classes, s.config.server.ipc,
                                   "real", False)


def local_start(s: setup_lib.Setup, clients: Clients) -> np.ndarray:
  """CollabDM's starting set (server init ``local``), ``[C, ipc, F]``."""
  return server_lib.initial_synthetic_set(
      keys_lib.server_key(s.root), "local", s.dataset.num_classes,
      s.config.server.ipc, s.input_shape, clients.pool_x, clients.pool_y)


def noise_start(s: setup_lib.Setup) -> np.ndarray:
  return server_lib.initial_synthetic_set(
      keys_lib.server_key(s.root), "noise", s.dataset.num_classes,
      s.config.server.ipc, s.input_shape)


def run_server(s: setup_lib.Setup, clients: Clients, init, lr: float,
               snapshots: Sequence[int], passes: int = 1
               ) -> Dict[int, np.ndarray]:
  """The CollabDM server from ``init``; the set after each snapshot count.

  With ``passes`` > 1 the server cycles ``passes`` times over the first
  ``max(snapshots) // passes`` iterations' targets and networks (step i
  uses psi_{i mod T}), so it takes more steps than the clients uploaded
  statistics for. Returns ``{steps: images [C, ipc, F]}`` (0 = init).
  """
  last = max(snapshots)
  if last % passes:
    raise ValueError(f"max snapshot {last} is not a multiple of passes "
                     f"{passes}")
  cfg = dataclasses.replace(setup_lib.server_config(s), lr=float(lr))
  out = {0: np.array(init)} if 0 in snapshots else {}
  targets = jax.tree.map(lambda a: a[:last // passes], clients.targets)
  done = [0]

  def on_iteration(t, state, _):
    done[0] += 1
    if done[0] in snapshots:
      out[done[0]] = np.asarray(state.images)

  if last > 0:
    server_lib.synthesize(s.root, [(0, targets)] * passes, s.model,
                          s.input_shape, s.dataset.num_classes, cfg, init,
                          on_iteration=on_iteration)
  return out


def flat(images):
  """``[C, n, F]`` (or a list of per-class arrays) to ``(x [M, F], y)``."""
  if isinstance(images, np.ndarray):
    return server_lib.synthetic_dataset(images)
  xs = [np.asarray(a, np.float32) for a in images]
  ys = [np.full(len(a), c, np.int32) for c, a in enumerate(images)]
  return np.concatenate(xs), np.concatenate(ys)


def predict(s: setup_lib.Setup, x, y, epochs=None, lr=None):
  """Trains the table's 5 evaluation MLPs (root's eval key) on ``(x, y)``.

  Returns ``evaluate.EvalResult`` (test predictions ``[5, N]`` included).
  """
  e = s.config.eval
  cfg = evaluate.EvalConfig(
      arch=e.arch, num_nets=e.num_nets,
      epochs=int(e.epochs if epochs is None else epochs),
      lr=float(e.lr if lr is None else lr), momentum=e.momentum,
      weight_decay=e.weight_decay, batch_size=e.batch_size,
      dsa_strategy="", pae=False,
      model_kwargs=tuple(sorted(e.model_kwargs.to_dict().items())))
  return evaluate.evaluate_synthetic(
      keys_lib.eval_key(s.root), x, y, s.test_x, s.dataset.test_y,
      num_classes=s.dataset.num_classes, config=cfg)


def score(s: setup_lib.Setup, x, y, epochs=None, lr=None) -> Dict:
  """The table's evaluation of a set: detection metrics over the 5 nets."""
  res = predict(s, x, y, epochs, lr)
  m = evaluate.classification_metrics(res.predictions, s.dataset.test_y,
                                      s.dataset.num_classes, benign_class=0)
  return {
      "accuracy": float(np.mean(m["accuracy"])),
      "balanced_accuracy": float(np.mean(m["balanced_accuracy"])),
      "balanced_accuracy_nets_std": float(np.std(m["balanced_accuracy"])),
      "false_positive_rate": float(np.mean(m["false_positive_rate"])),
      "per_class_recall": np.nanmean(m["per_class_recall"], 0).tolist(),
      "train_loss": float(np.mean(res.train_loss)),
  }


class EmbeddingGap:
  """DM's objective on held-out random networks, for any candidate set.

  For held-out networks psi_j (the run's architecture, keys no run uses),
  ``gap_c = mean_j ||mu_j(real rows of c) - mu_j(set rows of c)||^2`` with
  ``mu_j`` the mean embedding; reported relative to
  ``mean_j ||mu_j(real rows of c)||^2`` and averaged over the classes, once
  against the training rows (what distillation matches) and once against
  the test rows (what the detector is scored on).
  """

  def __init__(self, s: setup_lib.Setup, num_nets: int):
    embed = jax.jit(models.embed_fn(s.model))
    held = jax.random.fold_in(s.root, _HELD_OUT_STREAM)
    self.params = [models.init_params(s.model, jax.random.fold_in(held, j),
                                      s.input_shape) for j in range(num_nets)]
    self.embed = embed
    C = s.dataset.num_classes

    def class_means(x, y):
      return np.stack([np.stack([
          np.asarray(embed(p, jnp.asarray(x[y == c]))).mean(0)
          for c in range(C)]) for p in self.params])  # [J, C, D]

    self.class_means = class_means
    self.train = class_means(s.train_x, s.dataset.train_y)
    self.test = class_means(s.test_x, s.dataset.test_y)

  def __call__(self, x, y) -> Dict:
    mu = self.class_means(x, y)
    out = {}
    for name, ref in (("train", self.train), ("test", self.test)):
      rel = (((ref - mu) ** 2).sum(-1).mean(0)
             / (ref ** 2).sum(-1).mean(0))  # [C]
      out[f"gap_{name}"] = float(rel.mean())
      out[f"gap_{name}_per_class"] = rel.tolist()
    return out


def set_stats(x, y, real_x) -> Dict:
  """How far the set's rows sit from real rows (feature-space scale).

  ``row_norm``: mean L2 norm of the set's rows (real rows: ``real_norm``);
  ``nn_dist``: mean distance of each row to its nearest training row.
  """
  x = np.asarray(x, np.float64)
  sub = np.asarray(real_x, np.float64)
  d2 = ((x ** 2).sum(1)[:, None] - 2 * x @ sub.T + (sub ** 2).sum(1)[None])
  return {"row_norm": float(np.linalg.norm(x, axis=1).mean()),
          "real_norm": float(np.linalg.norm(sub, axis=1).mean()),
          "nn_dist": float(np.sqrt(np.maximum(d2.min(1), 0)).mean())}


# --------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------


def _row(study, seed, **fields):
  return {"study": study, "seed": int(seed), **fields}


def _log(row):
  keep = {k: v for k, v in row.items()
          if not isinstance(v, list) and k != "study"}
  logging.warning("%s %s", row["study"], json.dumps(keep))


def study_trajectory(seed, snapshots, lrs, held_out_nets) -> List[Dict]:
  s = setup_lib.setup(base_config(seed, max(snapshots)))
  clients = client_side(s)
  gap = EmbeddingGap(s, held_out_nets)
  starts = {"local": local_start(s, clients), "real": real_subset_rows(s),
            "noise": noise_start(s)}
  rows = []
  for init, images0 in starts.items():
    for lr in lrs:
      sets = run_server(s, clients, images0, lr, snapshots)
      for t in sorted(sets):
        if t == 0 and lr != lrs[0]:
          continue  # the start does not depend on lr
        x, y = flat(sets[t])
        row = _row("trajectory", seed, init=init, lr=float(lr) if t else None,
                   t=int(t), **score(s, x, y), **gap(x, y),
                   **set_stats(x, y, s.train_x))
        _log(row)
        rows.append(row)
  return rows


def study_server_passes(seed, held_out_nets) -> List[Dict]:
  """lr 10, 1000 server steps from T = 200 uploaded iterations (5 passes)
  against 1000 uploaded iterations (1 pass) and 200 steps, from the
  CollabDM start and from the real subset. Upload grows with T (T x C x D
  floats per site), so passes are the cheap way to more steps."""
  s = setup_lib.setup(base_config(seed, 1000))
  clients = client_side(s)
  gap = EmbeddingGap(s, held_out_nets)
  rows = []
  for init, images0 in (("local", local_start(s, clients)),
                        ("real", real_subset_rows(s))):
    for steps, passes in ((200, 1), (1000, 1), (1000, 5), (2000, 10)):
      images = run_server(s, clients, images0, 10.0, (steps,), passes)[steps]
      x, y = flat(images)
      row = _row("server_passes", seed, init=init, lr=10.0, t=steps,
                 uploaded_iterations=steps // passes, passes=passes,
                 **score(s, x, y), **gap(x, y))
      _log(row)
      rows.append(row)
  return rows


# (width, depth, lr scale) of the random MLPs psi_t. DM's loss sums D
# squared differences, so its gradient grows with the width D: at lr 1 a
# 2048-wide net diverged (non-finite rows); the scaled rows multiply the
# local and server lr by 128 / width.
EMBEDDING_NETS = ((128, 2, 1.0), (128, 1, 1.0), (128, 4, 1.0),
                  (512, 2, 1.0), (512, 2, 0.25), (1024, 1, 0.125))


def study_embedding_net(seed, held_out_nets) -> List[Dict]:
  rows = []
  for width, depth, scale in EMBEDDING_NETS:
    config = base_config(seed, 200, width, depth)
    config.local.lr *= scale
    s = setup_lib.setup(config)
    clients = client_side(s)
    gap = EmbeddingGap(s, held_out_nets)
    for init, images0 in (("local", local_start(s, clients)),
                          ("real", real_subset_rows(s))):
      sets = run_server(s, clients, images0, 1.0 * scale, (0, 200))
      for t, images in sorted(sets.items()):
        if t == 0 and init == "real":
          continue  # the real subset does not depend on the net
        x, y = flat(images)
        fields = dict(width=width, depth=depth, lr_scale=scale, init=init,
                      t=int(t))
        if not np.isfinite(x).all():
          row = _row("embedding_net", seed, **fields, diverged=True)
        else:
          row = _row("embedding_net", seed, **fields, diverged=False,
                     **score(s, x, y), **gap(x, y))
        _log(row)
        rows.append(row)
  return rows


# Variants of what the server starts from and aims at: (name, config
# overrides, start). Starts: "local" (CollabDM's), "local_only" (the pooled
# local rows alone, no noise slots: merged local DM's set), "fill_real" (the
# noise slots filled with real rows of the class).
START_VARIANTS = (
    ("collabdm", {}, "local"),
    ("pool_only", {}, "local_only"),
    ("noise_slots_real", {}, "fill_real"),
    ("local_dm_off", {"local.iterations": 0}, "local"),
    ("local_ipc10", {"local.ipc": 10}, "local"),
    ("local_ipc10_dm_off", {"local.ipc": 10, "local.iterations": 0}, "local"),
    ("uniform_weighting", {"server.weighting": "uniform"}, "local"),
)


def study_server_start(seed) -> List[Dict]:
  """CollabDM's start and targets dissected (see ``START_VARIANTS``)."""
  rows = []
  for name, overrides, start_kind in START_VARIANTS:
    config = base_config(seed, 200)
    for path, value in overrides.items():
      section, field = path.split(".")
      config[section][field] = value
    s = setup_lib.setup(config)
    clients = client_side(s)
    C, ipc = s.dataset.num_classes, s.config.server.ipc
    start = local_start(s, clients)
    pooled = np.bincount(clients.pool_y, minlength=C)
    if start_kind == "local_only":
      # As the server cuts: classes with more than ipc pooled rows keep its
      # ipc draws, the others keep every pooled row and no noise slot.
      start = [start[c][:min(ipc, pooled[c])] for c in range(C)]
    elif start_kind == "fill_real":
      rng = np.random.default_rng(seed)
      for c in range(C):
        n = min(ipc, pooled[c])
        idx = np.flatnonzero(s.dataset.train_y == c)
        start[c, n:] = s.train_x[rng.choice(idx, ipc - n, replace=False)]
    counts = {"pooled_rows_per_class": pooled.tolist(),
              "noise_slots_per_class": np.maximum(ipc - pooled, 0).tolist()}
    x, y = flat(start)
    rows.append(_row("server_start", seed, variant=name, t=0,
                     n_rows=int(len(y)), **counts, **score(s, x, y)))
    _log(rows[-1])
    if start_kind == "local_only":
      continue  # a ragged set: the server needs ipc rows of every class
    sets = run_server(s, clients, start, 1.0, (200,))
    x, y = flat(sets[200])
    rows.append(_row("server_start", seed, variant=name, t=200,
                     n_rows=int(len(y)), **counts, **score(s, x, y)))
    _log(rows[-1])
  return rows


def fill_slots(start, pooled, fill, rng, train_x=None, train_y=None,
               jitter=0.1):
  """CollabDM's start with the slots its pool cannot fill refilled.

  ``start`` is ``[C, ipc, F]`` whose first ``min(ipc, pooled[c])`` rows of
  class c come from the pool; ``fill`` is ``"real"`` (rows of the class from
  ``train_x``: not federated, a diagnostic) or ``"copies"`` (the class's
  pooled rows again, cycled, plus Gaussian jitter of std ``jitter`` so that
  copies do not receive identical gradients; uses only uploaded rows).
  Classes with no pooled row keep their noise.
  """
  out = np.array(start)
  ipc = out.shape[1]
  for c in range(out.shape[0]):
    n = int(min(ipc, pooled[c]))
    if n == ipc or (fill == "copies" and n == 0):
      continue
    if fill == "real":
      idx = np.flatnonzero(train_y == c)
      out[c, n:] = train_x[rng.choice(idx, ipc - n, replace=False)]
    elif fill == "copies":
      src = out[c, np.arange(n, ipc) % n]
      out[c, n:] = src + jitter * rng.standard_normal(src.shape)
    else:
      raise ValueError(f"fill must be 'real' or 'copies', got {fill!r}")
  return out


def study_best_server(seed) -> List[Dict]:
  """The levers together: filled slots and lr 10 for 1000 steps (5 passes
  over the 200 uploaded iterations), against the table's server."""
  s = setup_lib.setup(base_config(seed, 200))
  clients = client_side(s)
  C = s.dataset.num_classes
  pooled = np.bincount(clients.pool_y, minlength=C)
  start = local_start(s, clients)
  rng = np.random.default_rng(seed)
  starts = {"local": start,
            "fill_copies": fill_slots(start, pooled, "copies", rng),
            "fill_real": fill_slots(start, pooled, "real", rng, s.train_x,
                                    s.dataset.train_y)}
  rows = []
  for name, images0 in starts.items():
    for lr, steps, passes in ((1.0, 200, 1), (10.0, 1000, 5)):
      sets = run_server(s, clients, images0, lr, (0, steps), passes)
      for t, images in sorted(sets.items()):
        if t == 0 and lr != 1.0:
          continue
        x, y = flat(images)
        row = _row("best_server", seed, start=name, lr=lr if t else None,
                   t=int(t), passes=passes if t else None, **score(s, x, y))
        _log(row)
        rows.append(row)
  return rows


def study_eval_protocol(seed) -> List[Dict]:
  s = setup_lib.setup(base_config(seed, 200))
  clients = client_side(s)
  sets = {"real_subset": real_subset_rows(s)}
  local = run_server(s, clients, local_start(s, clients), 1.0, (0, 200))
  sets["collabdm_start"], sets["collabdm"] = local[0], local[200]
  rows = []
  for name, images in sets.items():
    x, y = flat(images)
    for epochs, lr in ((300, 0.01), (1000, 0.01), (300, 0.1), (3000, 0.01),
                       (100, 0.01)):
      row = _row("eval_protocol", seed, set=name, epochs=epochs, lr=lr,
                 **score(s, x, y, epochs=epochs, lr=lr))
      _log(row)
      rows.append(row)
  return rows


def minmax_dataset(dataset):
  """The dataset with raw (log1p'd) features scaled to [0, 1] on train."""
  raw_tr = dataset.denormalize(dataset.train_x)
  raw_te = dataset.denormalize(dataset.test_x)
  lo, hi = raw_tr.min(0), raw_tr.max(0)
  span = np.where(hi > lo, hi - lo, 1.0)
  return dataclasses.replace(
      dataset, train_x=((raw_tr - lo) / span).astype(np.float32),
      test_x=((raw_te - lo) / span).astype(np.float32),
      mean=lo.astype(np.float32), std=span.astype(np.float32))


def study_scaling(seed) -> List[Dict]:
  rows = []
  for scaling in ("standard", "minmax"):
    config = base_config(seed, 200)
    dataset = setup_lib.load_data(config)
    if scaling == "minmax":
      dataset = minmax_dataset(dataset)
    s = setup_lib.setup(config, dataset=dataset)
    clients = client_side(s)
    for init, images0 in (("local", local_start(s, clients)),
                          ("real", real_subset_rows(s))):
      sets = run_server(s, clients, images0, 1.0, (0, 200))
      for t, images in sorted(sets.items()):
        x, y = flat(images)
        row = _row("scaling", seed, scaling=scaling, init=init, t=int(t),
                   **score(s, x, y))
        _log(row)
        rows.append(row)
  return rows


def study_real_draws(seed, draws) -> List[Dict]:
  s = setup_lib.setup(base_config(seed, 200))
  rows = []
  for d in range(draws):
    key = jax.random.fold_in(jax.random.key(10_000 + seed), d)
    y = s.dataset.train_y
    images = client_lib.initial_images(key, s.train_x, y,
                                       s.dataset.num_classes, 10, "real", False)
    x, yy = flat(images)
    row = _row("real_draws", seed, draw=d, **score(s, x, yy))
    _log(row)
    rows.append(row)
  return rows


# DoS attack names of KDDTest+ that never occur in the training file.
NOVEL_DOS = ("apache2", "processtable", "mailbomb", "udpstorm")


def _opt_dir(config):
  return None if config.data_dir is None else config.data_dir


def study_mechanism(seed) -> List[Dict]:
  """Where the distilled sets lose: confusions, and what their rows are.

  For the real subset, CollabDM's start and result, and the real subset
  after 200 server iterations: the recall of DoS test rows split into
  neptune (62 % of test DoS, 90 % of train DoS), other seen DoS attacks and
  the attacks absent from training; the row-normalised confusion matrix;
  and, per synthetic row, the attack name of its nearest training row and
  its distance to it (vs. the median nearest-neighbour distance between
  real training rows of its class).
  """
  s = setup_lib.setup(base_config(seed, 200))
  clients = client_side(s)
  train_names, test_names = tabular.load_nsl_kdd_attack_names(
      _opt_dir(s.config))
  local = run_server(s, clients, local_start(s, clients), 1.0, (0, 200))
  real = run_server(s, clients, real_subset_rows(s), 1.0, (0, 200))
  sets = {"real_subset": real[0], "real_t200": real[200],
          "collabdm_start": local[0], "collabdm": local[200]}
  C = s.dataset.num_classes
  test_y = s.dataset.test_y
  dos = test_y == 1
  groups = {"neptune": dos & (test_names == "neptune"),
            "novel_dos": dos & np.isin(test_names, NOVEL_DOS),
            "other_seen_dos": dos & (test_names != "neptune")
                              & ~np.isin(test_names, NOVEL_DOS)}
  tx = s.train_x.astype(np.float64)
  tsq = (tx ** 2).sum(1)
  rows = []
  for name, images in sets.items():
    x, y = flat(images)
    res = predict(s, x, y)
    p = res.predictions  # [nets, N]
    m = evaluate.classification_metrics(p, test_y, C, benign_class=0)
    conf = np.mean(m["confusion_matrix"], 0)
    conf = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    d2 = tsq[None] - 2 * x.astype(np.float64) @ tx.T + (x ** 2).sum(1)[:, None]
    nn = np.argmin(d2, 1)
    row = _row("mechanism", seed, set=name,
               balanced_accuracy=float(np.mean(m["balanced_accuracy"])),
               confusion=conf.tolist(),
               nn_dist=np.sqrt(np.maximum(d2[np.arange(len(x)), nn], 0)
                               ).tolist(),
               nn_attack=train_names[nn].tolist(),
               nn_class_agrees=(s.dataset.train_y[nn] == y).tolist(),
               labels=y.tolist())
    for g, mask in groups.items():
      row[f"dos_recall_{g}"] = float(np.mean(p[:, mask] == 1))
      row[f"dos_share_{g}"] = float(mask.sum() / dos.sum())
    _log(row)
    rows.append(row)
  return rows


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _cell(value):
  """A CSV cell: lists of numbers joined by ';', nested lists as JSON."""
  if not isinstance(value, list):
    return value
  if all(isinstance(v, (int, float)) and not isinstance(v, bool)
         for v in value):
    return ";".join(f"{v:.6g}" for v in value)
  if any(isinstance(v, list) for v in value):
    return json.dumps(value)
  return ";".join(str(v) for v in value)


def write(out_dir: pathlib.Path, study: str, rows: List[Dict], record,
          flag_values) -> None:
  """``<study>.json`` (rows + provenance + flags) and ``<study>.csv``."""
  out_dir.mkdir(parents=True, exist_ok=True)
  doc = {"study": study, "class_names": list(CLASS_NAMES),
         "flags": flag_values, "rows": rows,
         "provenance": provenance.finish(record)}
  (out_dir / f"{study}.json").write_text(json.dumps(doc, indent=1))
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(out_dir / f"{study}.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: _cell(x) for k, x in r.items()})


def _pick(rows, **where):
  """Rows matching every ``key=value`` of ``where``, by seed."""
  out = {}
  for r in rows:
    if all(r.get(k) == v for k, v in where.items()):
      if r["seed"] in out:
        raise ValueError(f"two rows for seed {r['seed']} match {where}")
      out[r["seed"]] = r
  return out


def paired(a: Dict[int, Dict], b: Dict[int, Dict],
           metric="balanced_accuracy") -> Optional[Dict]:
  """Per-seed ``a - b``: mean, sample std and the 95 % Student t interval.

  ``d_s = metric(a_s) - metric(b_s)`` over the seeds both hold;
  ``mean ± t_{0.975, n-1} * std(d, ddof=1) / sqrt(n)``.
  """
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return None
  d = np.asarray([a[k][metric] - b[k][metric] for k in seeds], np.float64)
  out = {"n": len(d), "mean": float(d.mean()), "differences": d.tolist()}
  if len(d) > 1:
    half = (float(scipy_stats.t.ppf(0.975, len(d) - 1))
            * d.std(ddof=1) / np.sqrt(len(d)))
    out.update(std=float(d.std(ddof=1)), ci=(out["mean"] - half,
                                              out["mean"] + half))
  return out


def _pct(values):
  v = 100 * np.asarray(values, np.float64)
  return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}"


def _diff(p):
  if p is None:
    return "–"
  if "ci" not in p:
    return f"{100 * p['mean']:+.1f}"
  return (f"{100 * p['mean']:+.1f} [{100 * p['ci'][0]:+.1f}, "
          f"{100 * p['ci'][1]:+.1f}]")


def _recall(rows):
  r = np.mean([x["per_class_recall"] for x in rows], 0)
  return " / ".join(f"{100 * v:.0f}" for v in r)


def summary_table(rows, entries, reference, title) -> List[str]:
  """Markdown: one line per ``(label, where)`` with paired differences.

  Differences are against ``reference`` (a ``where`` dict) and against the
  entry's own start when the entry has ``t > 0``.
  """
  ref = _pick(rows, **reference)
  lines = [f"#### {title}", "",
           "| set | seeds | balanced acc. % | − reference (95 % CI) | "
           "− own start (95 % CI) | recall % (normal / DoS / Probe / R2L / "
           "U2R) | gap train / test |", "|---|---|---|---|---|---|---|"]
  for label, where in entries:
    got = _pick(rows, **where)
    if not got:
      continue
    vals = [got[k]["balanced_accuracy"] for k in sorted(got)]
    own = None
    if where.get("t"):
      start = {k: v for k, v in where.items() if k not in ("t", "lr")}
      own = paired(got, _pick(rows, **start, t=0))
    rs = list(got.values())
    gap = ("–" if "gap_train" not in rs[0] else
           f"{np.mean([r['gap_train'] for r in rs]):.3f} / "
           f"{np.mean([r['gap_test'] for r in rs]):.3f}")
    lines.append(f"| {label} | {len(got)} | {_pct(vals)} | "
                 f"{_diff(paired(got, ref))} | {_diff(own)} | "
                 f"{_recall(rs)} | {gap} |")
  return lines + [""]


def against_real_subset(out_dir, rows, entries) -> List[str]:
  """Markdown lines: each entry's rows paired with the real subset (the
  trajectory study's iteration 0 of the real start, same seeds)."""
  ref = _pick(load_rows(out_dir, "trajectory"), init="real", t=0)
  if not ref:
    return []
  out = ["Against the real subset (trajectory rows, same seeds):", ""]
  for label, where in entries:
    out.append(f"* {label}: {_diff(paired(_pick(rows, **where), ref))}")
  return out + [""]


def load_rows(out_dir: pathlib.Path, study: str) -> List[Dict]:
  path = out_dir / f"{study}.json"
  return json.loads(path.read_text())["rows"] if path.exists() else []


def summarize(out_dir: pathlib.Path, snapshots, lrs) -> str:
  """``summary.md``: every study's sets against their paired references."""
  out = ["# NSL-KDD diagnosis: summary tables", "",
         "Written by `experiments/nsl_kdd_diagnosis.py` from the study JSONs "
         "in this folder. Balanced accuracy: mean ± std (ddof 1) over seeds "
         "of each run's mean over its 5 evaluation MLPs; differences are "
         "paired by seed, in points, with a 95 % Student t interval. "
         "'gap' is DM's objective on 20 held-out random MLPs, relative to "
         "the class means' squared norm (see `EmbeddingGap`).", ""]
  rows = load_rows(out_dir, "trajectory")
  if rows:
    real = {"init": "real", "t": 0}
    entries = [("real_subset (init real, t 0)", real)]
    for init in ("local", "real", "noise"):
      if init != "real":
        entries.append((f"{init} start (t 0)", {"init": init, "t": 0}))
      for lr in lrs:
        for t in snapshots:
          if t:
            entries.append((f"{init}, lr {lr:g}, t {t}",
                            {"init": init, "lr": lr, "t": t}))
    out += summary_table(rows, entries, real,
                         "trajectory (reference: real_subset)")
    gaps = np.asarray([r["gap_train"] for r in rows])
    tests = np.asarray([r["gap_test"] for r in rows])
    accs = np.asarray([r["balanced_accuracy"] for r in rows])
    keep = np.asarray([not (r["init"] == "noise" and r["t"] == 0)
                       for r in rows])
    out += [f"Spearman rank correlation over the {int(keep.sum())} trajectory "
            "sets (noise starts excluded) of balanced accuracy with the "
            f"gap to the training class means: "
            f"{scipy_stats.spearmanr(gaps[keep], accs[keep])[0]:+.2f}; "
            f"with the gap to the test class means: "
            f"{scipy_stats.spearmanr(tests[keep], accs[keep])[0]:+.2f}.", ""]
  rows = load_rows(out_dir, "mechanism")
  if rows:
    out += ["#### mechanism", "",
            "DoS recall split by test attack (neptune is 62 % of test DoS; "
            "'novel' = apache2, processtable, mailbomb, udpstorm, absent "
            "from training), the share of DoS test rows predicted Probe, "
            "and per synthetic class the share of rows whose nearest "
            "training row belongs to another class (normal / DoS / Probe / "
            "R2L / U2R) and the mean distance to that nearest row "
            "(standardised units; real rows have norm ≈ 8.6).", "",
            "| set | seeds | balanced acc. % | DoS recall: neptune / novel / "
            "other % | DoS → Probe % | off-class nearest row % | nearest-row "
            "distance |", "|---|---|---|---|---|---|---|"]
    for name in ("real_subset", "real_t200", "collabdm_start", "collabdm"):
      got = list(_pick(rows, set=name).values())
      if not got:
        continue
      rec = [np.mean([r[f"dos_recall_{g}"] for r in got]) for g in
             ("neptune", "novel_dos", "other_seen_dos")]
      to_probe = np.mean([r["confusion"][1][2] for r in got])
      off = []
      for c in range(len(CLASS_NAMES)):
        off.append(np.mean([1 - np.mean(np.asarray(r["nn_class_agrees"])[
            np.asarray(r["labels"]) == c]) for r in got]))
      dist = np.mean([np.mean(r["nn_dist"]) for r in got])
      out.append(
          f"| {name} | {len(got)} | "
          f"{_pct([r['balanced_accuracy'] for r in got])} | "
          + " / ".join(f"{100 * v:.0f}" for v in rec)
          + f" | {100 * to_probe:.0f} | "
          + " / ".join(f"{100 * v:.0f}" for v in off)
          + f" | {dist:.1f} |")
    out.append("")
  rows = load_rows(out_dir, "server_passes")
  if rows:
    entries = []
    for init in ("local", "real"):
      for steps, passes in ((200, 1), (1000, 1), (1000, 5), (2000, 10)):
        entries.append((f"{init}, lr 10, {steps} steps over "
                        f"{steps // passes} uploaded iterations",
                        {"init": init, "t": steps, "passes": passes}))
    out += summary_table(rows, entries,
                         {"init": "local", "t": 200, "passes": 1},
                         "server_passes (reference: CollabDM start, lr 10, "
                         "200 steps)")
    out += against_real_subset(out_dir, rows, entries)
  rows = load_rows(out_dir, "best_server")
  if rows:
    entries = []
    for name in ("local", "fill_copies", "fill_real"):
      entries += [(f"{name}, t 0", {"start": name, "t": 0}),
                  (f"{name}, lr 1, 200 steps", {"start": name, "t": 200}),
                  (f"{name}, lr 10, 1000 steps (5 passes)",
                   {"start": name, "t": 1000})]
    out += summary_table(rows, entries, {"start": "local", "t": 200},
                         "best_server (reference: CollabDM, lr 1, 200 "
                         "steps)")
    out += against_real_subset(out_dir, rows, entries)
  rows = load_rows(out_dir, "server_start")
  if rows:
    names = [v[0] for v in START_VARIANTS]
    entries = []
    for name in names:
      entries += [(f"{name}, t 0", {"variant": name, "t": 0}),
                  (f"{name}, t 200", {"variant": name, "t": 200})]
    out += summary_table(rows, entries, {"variant": "collabdm", "t": 200},
                         "server_start (reference: CollabDM, t 200)")
  rows = load_rows(out_dir, "embedding_net")
  if rows:
    entries = []
    for w, d, sc in EMBEDDING_NETS:
      for init, t in (("local", 0), ("local", 200), ("real", 200)):
        entries.append((f"MLP {w}x{d}, lr x{sc:g}, {init}, t {t}",
                        {"width": w, "depth": d, "lr_scale": sc,
                         "init": init, "t": t, "diverged": False}))
    out += summary_table(rows, entries,
                         {"width": 128, "depth": 2, "lr_scale": 1.0,
                          "init": "local", "t": 200},
                         "embedding_net (reference: MLP 128x2, local, t 200)")
  rows = load_rows(out_dir, "eval_protocol")
  if rows:
    entries = [(f"{n}, {e} epochs, lr {lr:g}",
                {"set": n, "epochs": e, "lr": lr})
               for n in ("real_subset", "collabdm_start", "collabdm")
               for e, lr in sorted({(r["epochs"], r["lr"]) for r in rows})]
    out += summary_table(rows, entries,
                         {"set": "real_subset", "epochs": 300, "lr": 0.01},
                         "eval_protocol (reference: real_subset, 300 "
                         "epochs, lr 0.01)")
  rows = load_rows(out_dir, "scaling")
  if rows:
    entries = [(f"{sc}, {i}, t {t}", {"scaling": sc, "init": i, "t": t})
               for sc in ("standard", "minmax")
               for i, t in (("real", 0), ("real", 200), ("local", 0),
                            ("local", 200))]
    out += summary_table(rows, entries,
                         {"scaling": "standard", "init": "real", "t": 0},
                         "scaling (reference: standardised real_subset)")
  rows = load_rows(out_dir, "real_draws")
  if rows:
    by_seed = {}
    for r in rows:
      by_seed.setdefault(r["seed"], []).append(r["balanced_accuracy"])
    allv = [v for vs in by_seed.values() for v in vs]
    out += ["#### real_draws", "",
            f"{len(allv)} random 10-row-per-class real sets: balanced "
            f"accuracy {_pct(allv)} % (min {100 * min(allv):.1f}, max "
            f"{100 * max(allv):.1f}).", ""]
  text = "\n".join(out)
  (out_dir / "summary.md").write_text(text)
  return text


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.studies) - set(STUDIES))
  if unknown:
    raise ValueError(f"--studies {unknown} unknown; allowed {list(STUDIES)}")
  seeds = [int(v) for v in FLAGS.seeds]
  snapshots = sorted({int(v) for v in FLAGS.snapshots})
  lrs = [float(v) for v in FLAGS.server_lrs]
  out_dir = pathlib.Path(FLAGS.out_dir)
  flag_values = {"seeds": seeds, "studies": list(FLAGS.studies),
                 "snapshots": snapshots, "server_lrs": lrs,
                 "held_out_nets": FLAGS.held_out_nets,
                 "real_draws": FLAGS.real_draws}
  if FLAGS.summarize_only:
    print(summarize(out_dir, snapshots, lrs))
    return
  for study in FLAGS.studies:
    record = provenance.start()
    t0 = time.perf_counter()
    rows = []
    for seed in seeds:
      if study == "trajectory":
        rows += study_trajectory(seed, snapshots, lrs, FLAGS.held_out_nets)
      elif study == "mechanism":
        rows += study_mechanism(seed)
      elif study == "server_passes":
        rows += study_server_passes(seed, FLAGS.held_out_nets)
      elif study == "best_server":
        rows += study_best_server(seed)
      elif study == "embedding_net":
        rows += study_embedding_net(seed, FLAGS.held_out_nets)
      elif study == "server_start":
        rows += study_server_start(seed)
      elif study == "eval_protocol":
        rows += study_eval_protocol(seed)
      elif study == "scaling":
        rows += study_scaling(seed)
      else:
        rows += study_real_draws(seed, FLAGS.real_draws)
      # Written after every seed: an interrupted study keeps what it has.
      write(out_dir, study, rows, record, flag_values)
    print(f"{study}: {len(rows)} rows in {time.perf_counter() - t0:.0f}s",
          flush=True)
  summarize(out_dir, snapshots, lrs)


if __name__ == "__main__":
  define_flags()
  app.run(main)
