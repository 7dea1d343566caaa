"""Why did DENSE lose to its own FedAvg teachers, and what fixes it?

In the CPU-sized Fashion-MNIST table (``experiments/results/fmnist_table``,
commit of that README) DENSE got 10.1-33.1 % and one-shot FedAvg 19.6-42.1 %,
DENSE below FedAvg in every cell, while DENSE's paper has it far above. This
program runs small controlled studies on a reduced Fashion-MNIST setting
that fits 2 CPU cores, one factor at a time:

  python -m experiments.dense_diagnosis --out_dir=experiments/results/dense_diagnosis

Setting (``base_config``): the first ``--train_per_class`` (200) training and
``--test_per_class`` (200) test images of each class of the full
Fashion-MNIST files, 5 clients, Dirichlet alpha 0.5 (partition seed = root
seed), the project's ConvNet (depth 3, avg pooling) at ``--width`` 32
instead of 128 (4x cheaper; every network here has that width), one model
per run (``eval.num_nets`` 1). Seeds change the root key and the partition
together.

Studies (``--studies``; each writes ``<study>.json`` with one row per run,
every row carrying its own ``provenance``; a rerun skips the rows already
written, so an interrupted study resumes):

* ``teachers``: the clients' models -- the table's local training (3
  epochs at lr 0.01, batch 256, no validation: ``table``), the new one (lr
  from {0.01, 0.03, 0.1} and epochs up to 60 chosen on a stratified 15 %
  validation split, checks every 3 epochs, patience 4, batch 64, then refit
  on all the data: ``selected``) or DENSE's own (200 epochs at lr 0.01,
  batch 128, no weight decay or augmentation: ``reference``), each with the
  instance-norm ConvNet (``in``) and its BatchNorm variant (``bn``). Reports every client's test
  accuracy, FedAvg (size-weighted average of the same models) and the
  ensemble (mean logits, DENSE's teacher and ceiling), the chosen lr and
  epochs and the wall times. The models are cached in ``--cache_dir`` for
  the other studies. ``--teachers`` restricts it to some of them.
* ``teacher_logits``: why the BatchNorm clients make a weaker ensemble and
  FedAvg model than the instance-norm ones although each client is as
  accurate: per client, the scale of its logits on the test images (mean
  of the largest logit, mean standard deviation over classes), and the
  ensemble's accuracy when it averages logits (DENSE's teacher) against
  averaging probabilities; for BatchNorm clients also each client's
  accuracy when it normalises by the test batch's statistics instead of its
  running ones (how far its running statistics, those of its own skewed
  data, are from the test data's). Uses the cached models of ``teachers``.
* ``dense``: DENSE's student from those teachers, varying one thing at a
  time: teacher training, server budget (the table's 5 rounds x 5 generator
  steps x 32 samples against ``--rounds`` x ``--g_steps`` x ``--batch``,
  and ``--long_rounds`` rounds of the latter for one run),
  the generator's loss (DeepInversion's BatchNorm prior ``bn``,
  which needs BatchNorm teachers, against DAFL's entropy term ``div`` that
  the instance-norm implementation used in its place, or neither), and the
  teacher ensemble (``dense.ensemble_of_logits``: mean of the clients'
  logits as DENSE's reference, or, in the runs ending ``_probs``, log of
  the mean of their probabilities; the run's ``ensemble_accuracy``,
  agreement and pool classes are then that ensemble's). Rows
  hold the student's test accuracy after every round, its agreement with
  the ensemble, the classes the ensemble sees in the generated pool, the
  generator loss terms, and the wall time.
* ``real_kd``: a control: the same distillation (same student, KD settings,
  pool growing by ``--batch`` per round for ``--rounds`` rounds) on real
  training images drawn from the pooled clients' data instead of generated
  ones. Not data-free; it bounds what the distillation stage can reach at
  this budget, so the generator's share of the gap can be read off.

``--summarize_only`` rewrites ``summary.md`` from the JSON files.
"""

import dataclasses
import json
import logging
import pathlib
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from collabdm_jax import provenance
from collabdm_jax import setup as setup_lib
from collabdm_jax.baselines import common
from collabdm_jax.baselines import dense
from collabdm_jax.baselines import fedavg
from collabdm_jax.baselines import model_cache
from collabdm_jax.baselines import nets
from experiments.configs import default

STUDIES = ("teachers", "teacher_logits", "dense", "real_kd")
FLAGS = flags.FLAGS

# Client training: the table's (fmnist_table.baseline_settings at the time
# of the table) and the validated one (fedavg's selection).
LOCAL = {
    "table": {"local_lrs": (0.01,), "local_epochs": 3,
              "local_val_fraction": 0.0, "local_batch": 256},
    "selected": {"local_lrs": (0.01, 0.03, 0.1), "local_epochs": 60,
                 "local_val_fraction": 0.15, "local_val_every": 3,
                 "local_patience": 4, "local_batch": 64},
    # DENSE's own local training: 200 epochs at lr 0.01, batch 128, no
    # weight decay, no augmentation on Fashion-MNIST, nothing validated.
    "reference": {"local_lrs": (0.01,), "local_epochs": 200,
                  "local_val_fraction": 0.0, "local_batch": 128,
                  "local_weight_decay": 0.0, "local_dsa": False},
}
NORMS = {"in": None, "bn": "batchnorm"}
# DENSE runs: (name, teachers, budget, generator loss weights, teacher
# ensemble: "logits" = DENSE's reference, "probs" = mean probabilities).
DENSE_RUNS = (
    ("in_table_teachers_table_budget", "in_table", "table",
     {"bn": 0.0, "div": 1.0}, "logits"),
    ("in_selected_table_budget", "in_selected", "table",
     {"bn": 0.0, "div": 1.0}, "logits"),
    ("in_selected_scaled_div", "in_selected", "scaled",
     {"bn": 0.0, "div": 1.0}, "logits"),
    ("in_selected_scaled_nodiv", "in_selected", "scaled",
     {"bn": 0.0, "div": 0.0}, "logits"),
    ("bn_table_teachers_scaled_bn", "bn_table", "scaled",
     {"bn": 1.0, "div": 0.0}, "logits"),
    ("bn_selected_table_budget_bn", "bn_selected", "table",
     {"bn": 1.0, "div": 0.0}, "logits"),
    ("bn_selected_scaled_bn", "bn_selected", "scaled",
     {"bn": 1.0, "div": 0.0}, "logits"),
    ("bn_selected_scaled_nobn", "bn_selected", "scaled",
     {"bn": 0.0, "div": 0.0}, "logits"),
    ("in_selected_long_nodiv", "in_selected", "long",
     {"bn": 0.0, "div": 0.0}, "logits"),
    ("in_reference_scaled_nodiv", "in_reference", "scaled",
     {"bn": 0.0, "div": 0.0}, "logits"),
    # As in_selected_scaled_nodiv, distilling the probability-averaged
    # ensemble (teacher_logits: far more accurate than the logit mean).
    ("in_selected_scaled_nodiv_probs", "in_selected", "scaled",
     {"bn": 0.0, "div": 0.0}, "probs"),
)
TABLE_BUDGET = {"dense_epochs": 5, "dense_g_steps": 5,
                "dense_synthesis_batch": 32, "dense_kd_batch": 32}


def define_flags():
  """This program's absl flags (defined only when it runs as a program)."""
  flags.DEFINE_list("seeds", ["0"], "Root and partition seeds.")
  flags.DEFINE_list("studies", list(STUDIES), f"Any of {list(STUDIES)}.")
  flags.DEFINE_list("runs", [], "dense: only these run names (all if empty).")
  flags.DEFINE_string("out_dir", "experiments/results/dense_diagnosis",
                      "Where the JSON files and summary.md go.")
  flags.DEFINE_string("cache_dir", "/tmp/dense_diagnosis_cache",
                      "Trained client models (reused between studies).")
  flags.DEFINE_integer("width", 32, "ConvNet width of every network.")
  flags.DEFINE_integer("train_per_class", 200, "Training images per class.")
  flags.DEFINE_integer("test_per_class", 200, "Test images per class.")
  flags.DEFINE_integer("rounds", 30, "Scaled DENSE budget: rounds.")
  flags.DEFINE_integer("g_steps", 10, "Scaled DENSE budget: generator steps.")
  flags.DEFINE_integer("batch", 64,
                       "Scaled DENSE budget: synthesis and KD batch.")
  flags.DEFINE_integer("long_rounds", 60,
                       "Long DENSE budget: rounds (steps and batch as the "
                       "scaled one).")
  flags.DEFINE_list("teachers", [],
                    "teachers / teacher_logits: only these client models "
                    "(e.g. in_table,in_selected; all if empty).")
  flags.DEFINE_bool("summarize_only", False, "Only rewrite summary.md.")


def base_config(seed: int, width: int, train_per_class: int,
                test_per_class: int):
  """The reduced setting of every study (module docstring)."""
  c = default.get_config()
  c.dataset = "fashion_mnist"
  c.data_kwargs.max_train_per_class = train_per_class
  c.data_kwargs.max_test_per_class = test_per_class
  c.partition.num_clients = 5
  c.partition.alpha = 0.5
  c.partition.seed = seed
  c.seed = seed
  c.eval.num_nets = 1
  c.eval.model_kwargs.width = width
  return c


def teacher_config(c, teachers: str):
  """``c`` with the client training of ``teachers`` (e.g. ``bn_selected``)."""
  norm, _, local = teachers.partition("_")
  if norm not in NORMS or local not in LOCAL:
    raise ValueError(f"teachers must be <{'|'.join(NORMS)}>_"
                     f"<{'|'.join(LOCAL)}>, got {teachers!r}")
  c = c.copy_and_resolve_references()
  c.baseline.net_norm = NORMS[norm]
  c.baseline.update(LOCAL[local])
  return c


def _acc(pred, y) -> float:
  return float(np.mean(np.asarray(pred) == np.asarray(y)))


def _one(tree):
  return jax.tree.map(lambda a: a[None], tree)


def train_teachers(s, cache_dir: pathlib.Path, name: str, seed: int):
  """Client models ``[1, K, ...]`` and their record, cached per run.

  The cache is an ``.npz`` of the parameters and a JSON file of the
  record (no pickle: a cache file is read back as plain arrays and JSON).
  """
  stem = cache_dir / f"teachers_{name}_seed{seed}_w{FLAGS.width}"
  weights, record = stem.with_suffix(".npz"), stem.with_suffix(".json")
  if weights.exists() and record.exists():
    out = json.loads(record.read_text())
    out["params"] = model_cache.load_params(weights)
    return out
  net = fedavg.baseline_net(s)
  lcfg = fedavg.local_train_config(s)
  xs, ys = fedavg.client_data(s)
  t0 = time.perf_counter()
  params, report = fedavg.train_local_models(
      common.baseline_key(s.root, "fedavg"), net, s.input_shape, xs, ys, 1,
      lcfg, s.dataset.num_classes)
  jax.block_until_ready(params)
  out = {"local": fedavg.local_training_record(lcfg, net, report),
         "wall_s": time.perf_counter() - t0}
  cache_dir.mkdir(parents=True, exist_ok=True)
  record.write_text(json.dumps(out))
  model_cache.save_params(weights, jax.device_get(params))
  out["params"] = jax.device_get(params)
  return out


def teacher_accuracies(s, net, params, ensemble="logits") -> Dict:
  """Every client's, FedAvg's and the ``ensemble``'s test accuracy."""
  xs, ys = fedavg.client_data(s)
  y = s.dataset.test_y
  clients = fedavg.client_accuracies(net, params, s.test_x, y)[0]
  avg = fedavg.average_params(params, [len(v) for v in ys])
  logits = nets.logits_fn(net)
  return {
      "client_accuracies": clients.tolist(),
      "fedavg_accuracy": _acc(common.predict(logits, avg, s.test_x)[0], y),
      "ensemble_accuracy": _acc(common.predict(
          dense.ensemble_logits(net, ensemble), params, s.test_x)[0], y),
  }


def study_teachers(c, seed, cache_dir) -> List[Dict]:
  rows = []
  for norm in NORMS:
    for local in LOCAL:
      name = f"{norm}_{local}"
      if FLAGS.teachers and name not in FLAGS.teachers:
        continue
      s = setup_lib.setup(teacher_config(c, name))
      t = train_teachers(s, cache_dir, name, seed)
      row = {"study": "teachers", "seed": seed, "name": name,
             "client_sizes": [int(v) for v in s.partition.counts.sum(1)],
             "client_class_counts": s.partition.counts.tolist(),
             "local_training": t["local"],
             "train_wall_s": round(t["wall_s"], 1)}
      row.update(teacher_accuracies(s, fedavg.baseline_net(s), t["params"]))
      rows.append(row)
  return rows


def study_teacher_logits(c, seed, cache_dir) -> List[Dict]:
  rows = []
  for norm in NORMS:
    for local in LOCAL:
      name = f"{norm}_{local}"
      if FLAGS.teachers and name not in FLAGS.teachers:
        continue
      s = setup_lib.setup(teacher_config(c, name))
      net = fedavg.baseline_net(s)
      params = jax.tree.map(jnp.asarray, train_teachers(
          s, cache_dir, name, seed)["params"])
      x, y = jnp.asarray(s.test_x), np.asarray(s.dataset.test_y)
      K = jax.tree.leaves(params)[0].shape[1]
      logits = [np.asarray(jax.jit(net.logits)(
          jax.tree.map(lambda a, k=k: a[0, k], params), x)) for k in range(K)]
      probs = [np.asarray(jax.nn.softmax(v)) for v in logits]
      row = {"study": "teacher_logits", "seed": seed, "name": name,
             "client_max_logit": [float(v.max(1).mean()) for v in logits],
             "client_logit_std": [float(v.std(1).mean()) for v in logits],
             "ensemble_mean_logits_accuracy": _acc(
                 np.mean(logits, 0).argmax(1), y),
             "ensemble_mean_probs_accuracy": _acc(
                 np.mean(probs, 0).argmax(1), y),
             "client_accuracies": [_acc(v.argmax(1), y) for v in logits]}
      if net.has_batchnorm:
        batch_stats = jax.jit(lambda v: net.train_logits(v, x)[0])
        row["client_accuracies_test_batch_stats"] = [
            _acc(np.asarray(batch_stats(jax.tree.map(
                lambda a, k=k: a[0, k], params))).argmax(1), y)
            for k in range(K)]
      rows.append(row)
  return rows


def dense_setup(c, teachers: str, budget: str, weights: Dict,
                ensemble: str = "logits"):
  """Setup of one DENSE run: its teachers' config plus the server's."""
  c = teacher_config(c, teachers)
  if budget == "table":
    c.baseline.update(TABLE_BUDGET)
  else:
    c.baseline.update({"dense_epochs": FLAGS.long_rounds if budget == "long"
                       else FLAGS.rounds,
                       "dense_g_steps": FLAGS.g_steps,
                       "dense_synthesis_batch": FLAGS.batch,
                       "dense_kd_batch": FLAGS.batch})
  c.baseline.dense_bn = weights["bn"]
  c.baseline.dense_div = weights["div"]
  c.baseline.dense_ensemble = ensemble
  return setup_lib.setup(c)


def run_dense(c, seed, cache_dir, name, teachers, budget, weights,
              ensemble) -> Dict:
  s = dense_setup(c, teachers, budget, weights, ensemble)
  net = fedavg.baseline_net(s)
  dcfg = dense.dense_config(s, net)
  t = train_teachers(s, cache_dir, teachers, seed)
  tparams = jax.tree.map(lambda a: jnp.asarray(a[0]), t["params"])
  logits = nets.logits_fn(net)
  y = s.dataset.test_y
  curve = []

  def on_round(e, student):
    curve.append(_acc(common.predict(logits, _one(student), s.test_x)[0], y))

  t0 = time.perf_counter()
  student, _, hist = dense.distill(
      jax.random.fold_in(common.baseline_key(s.root, "dense"), 0), tparams,
      net, s.input_shape, s.dataset.num_classes, dcfg, s.dataset.mean,
      s.dataset.std, on_round)
  jax.block_until_ready(student)
  wall = time.perf_counter() - t0
  pred = common.predict(logits, _one(student), s.test_x)[0]
  teacher = dense.ensemble_logits(net, dcfg.ensemble)
  ens = common.predict(teacher, _one(tparams), s.test_x)[0]
  pool_classes = common.predict(teacher, _one(tparams), hist["pool"])[0]
  gen = hist["gen"]  # [rounds, steps, (total, ce, adv, div, bn)]
  row = {"study": "dense", "seed": seed, "name": name, "teachers": teachers,
         "budget": budget, "weights": weights, "ensemble": dcfg.ensemble,
         "settings": dataclasses.asdict(dcfg),
         "server_budget": dense.server_budget(dcfg),
         "student_accuracy": _acc(pred, y),
         "student_accuracy_by_round": curve,
         "agreement_with_ensemble": _acc(pred, ens),
         "pool_class_counts": np.bincount(
             pool_classes, minlength=s.dataset.num_classes).tolist(),
         "generator_loss_first_step": gen[:, 0].mean(0).round(4).tolist(),
         "generator_loss_last_step": gen[:, -1].mean(0).round(4).tolist(),
         "generator_loss_terms": ["total", "ce", "adv", "div", "bn"],
         "kd_loss_by_round": np.round(hist["kd"], 4).tolist(),
         "server_wall_s": round(wall, 1)}
  row.update(teacher_accuracies(s, net, t["params"], dcfg.ensemble))
  return row


def run_real_kd(c, seed, cache_dir, teachers) -> Dict:
  """Distillation on real images (control; module docstring)."""
  s = dense_setup(c, teachers, "scaled", {"bn": 0.0, "div": 0.0})
  net = fedavg.baseline_net(s)
  dcfg = dense.dense_config(s, net)
  t = train_teachers(s, cache_dir, teachers, seed)
  tparams = jax.tree.map(lambda a: jnp.asarray(a[0]), t["params"])
  logits = nets.logits_fn(net)
  y = s.dataset.test_y
  B, rounds = dcfg.synthesis_batch, dcfg.epochs
  key = jax.random.fold_in(common.baseline_key(s.root, "dense"), 0)
  train_x = np.concatenate(fedavg.client_data(s)[0])
  pick = np.asarray(jax.random.permutation(jax.random.fold_in(key, 99),
                                           len(train_x)))
  if len(pick) < rounds * B:
    raise ValueError(f"real_kd needs {rounds * B} real images, the clients "
                     f"hold {len(pick)}")
  pool = jnp.asarray(train_x[pick[:rounds * B]])
  b = min(dcfg.kd_batch, rounds * B)
  kd_order, kd_step, kd_opt = dense.kd_programs(
      net, rounds * B, b, dcfg.kd_lr, dcfg.kd_momentum, dcfg.temperature,
      dcfg.aug_strategy)
  student = net.init(jax.random.fold_in(key, 0), s.input_shape)
  opt_state = kd_opt.init(net.split(student)[0])
  curve = []
  t0 = time.perf_counter()
  for e in range(rounds):
    ekey = jax.random.fold_in(jax.random.fold_in(key, 1), e)
    kkey = jax.random.fold_in(ekey, 1)
    n = np.int32((e + 1) * B)
    order = kd_order(jax.random.fold_in(kkey, 0), n)
    for i in range(-(-int(n) // b)):
      student, opt_state, _ = kd_step(student, opt_state, tparams, pool,
                                      order, np.int32(i), n,
                                      jax.random.fold_in(
                                          jax.random.fold_in(kkey, 1), i))
    curve.append(_acc(common.predict(logits, _one(student), s.test_x)[0], y))
  row = {"study": "real_kd", "seed": seed, "name": f"real_kd_{teachers}",
         "teachers": teachers, "pool_size": rounds * B,
         "student_accuracy": curve[-1], "student_accuracy_by_round": curve,
         "server_wall_s": round(time.perf_counter() - t0, 1)}
  row.update(teacher_accuracies(s, net, t["params"]))
  return row


def load_rows(out_dir: pathlib.Path, study: str) -> List[Dict]:
  path = out_dir / f"{study}.json"
  if not path.exists():
    return []
  return json.loads(path.read_text())["rows"]


def write(out_dir: pathlib.Path, study: str, rows: List[Dict],
          flag_values) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  doc = {"study": study, "flags": flag_values, "rows": rows}
  (out_dir / f"{study}.json").write_text(json.dumps(doc, indent=1))


def _pct(v):
  return "–" if v is None else f"{100 * v:.1f}"


def summarize(out_dir: pathlib.Path) -> str:
  """``summary.md``: the tables of the README, from the JSON files."""
  lines = ["# DENSE diagnosis: summary (generated from the JSON files)", ""]
  t_rows = load_rows(out_dir, "teachers")
  if t_rows:
    lines += ["## Client models (test accuracy %)", "",
              "| seed | teachers | clients | FedAvg | ensemble | lr / epochs "
              "chosen | train wall (s) |", "|---|---|---|---|---|---|---|"]
    for r in t_rows:
      cl = r["local_training"]["clients"]
      chosen = ", ".join(f"{c['lr']:g}/{c['epochs']}" for c in cl)
      lines.append(
          f"| {r['seed']} | {r['name']} | "
          f"{' '.join(_pct(a) for a in r['client_accuracies'])} | "
          f"{_pct(r['fedavg_accuracy'])} | {_pct(r['ensemble_accuracy'])} | "
          f"{chosen} | {r['train_wall_s']} |")
    lines.append("")
  l_rows = load_rows(out_dir, "teacher_logits")
  if l_rows:
    lines += ["## Client logits on the test images", "",
              "| seed | teachers | mean largest logit per client | ensemble "
              "of logits / of probabilities (%) | clients with test-batch "
              "BatchNorm statistics (%) |", "|---|---|---|---|---|"]
    for r in l_rows:
      bs = r.get("client_accuracies_test_batch_stats")
      lines.append(
          f"| {r['seed']} | {r['name']} | "
          f"{' '.join(f'{v:.1f}' for v in r['client_max_logit'])} | "
          f"{_pct(r['ensemble_mean_logits_accuracy'])} / "
          f"{_pct(r['ensemble_mean_probs_accuracy'])} | "
          f"{' '.join(_pct(v) for v in bs) if bs else '–'} |")
    lines.append("")
  d_rows = load_rows(out_dir, "dense") + load_rows(out_dir, "real_kd")
  if d_rows:
    lines += ["## DENSE students (test accuracy %)", "",
              "| seed | run | teachers | budget (rounds x steps x batch) | "
              "bn / div | ensemble of | student | FedAvg | ensemble | "
              "agree w/ ensemble | server wall (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d_rows:
      if r["study"] == "dense":
        st = r["settings"]
        budget = (f"{st['epochs']} x {st['g_steps']} x "
                  f"{st['synthesis_batch']}")
        w = f"{r['weights']['bn']:g} / {r['weights']['div']:g}"
        agree = _pct(r["agreement_with_ensemble"])
      else:
        budget, w, agree = f"real images, pool {r['pool_size']}", "–", "–"
      # Rows from before the choice existed distilled the logit mean.
      ens_of = r.get("ensemble", "logits")
      lines.append(
          f"| {r['seed']} | {r['name']} | {r['teachers']} | {budget} | {w} | "
          f"{ens_of} | "
          f"{_pct(r['student_accuracy'])} | {_pct(r['fedavg_accuracy'])} | "
          f"{_pct(r['ensemble_accuracy'])} | {agree} | "
          f"{r['server_wall_s']} |")
    lines.append("")
  if d_rows:
    lines += ["## Student minus FedAvg, per run (points; mean over seeds)",
              "", "| run | seeds | student − FedAvg per seed | mean | "
              "student / ensemble (mean) |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in d_rows):
      rs = sorted((r for r in d_rows if r["name"] == name),
                  key=lambda r: r["seed"])
      diffs = [100 * (r["student_accuracy"] - r["fedavg_accuracy"])
               for r in rs]
      ratio = np.mean([r["student_accuracy"] / r["ensemble_accuracy"]
                       for r in rs])
      lines.append(
          f"| {name} | {', '.join(str(r['seed']) for r in rs)} | "
          f"{' '.join(f'{d:+.1f}' for d in diffs)} | "
          f"{np.mean(diffs):+.1f} | {ratio:.2f} |")
    lines.append("")
  text = "\n".join(lines)
  (out_dir / "summary.md").write_text(text)
  return text


def main(argv):
  del argv
  logging.getLogger("collabdm_jax").setLevel(logging.WARNING)
  unknown = sorted(set(FLAGS.studies) - set(STUDIES))
  if unknown:
    raise ValueError(f"--studies {unknown} unknown; allowed {list(STUDIES)}")
  names = [r[0] for r in DENSE_RUNS]
  bad = sorted(set(FLAGS.runs) - set(names))
  if bad:
    raise ValueError(f"--runs {bad} unknown; allowed {names}")
  out_dir, cache_dir = pathlib.Path(FLAGS.out_dir), pathlib.Path(
      FLAGS.cache_dir)
  flag_values = {k: FLAGS[k].value for k in (
      "width", "train_per_class", "test_per_class", "rounds", "g_steps",
      "batch", "long_rounds")}
  if FLAGS.summarize_only:
    print(summarize(out_dir))
    return
  for study in FLAGS.studies:
    rows = load_rows(out_dir, study)
    done = {(r["seed"], r["name"]) for r in rows}
    for seed in (int(v) for v in FLAGS.seeds):
      c = base_config(seed, FLAGS.width, FLAGS.train_per_class,
                      FLAGS.test_per_class)
      if study in ("teachers", "teacher_logits"):
        fn = study_teachers if study == "teachers" else study_teacher_logits
        jobs = [(study, lambda fn=fn: fn(c, seed, cache_dir))]
      elif study == "dense":
        jobs = [(run[0], lambda a=run: [run_dense(c, seed, cache_dir, *a)])
                for run in DENSE_RUNS if not FLAGS.runs or run[0] in FLAGS.runs]
      else:
        jobs = [(f"real_kd_{t}", lambda t=t: [run_real_kd(c, seed, cache_dir,
                                                          t)])
                for t in ("in_selected", "bn_selected")]
      for name, job in jobs:
        if (seed, name) in done or (name == study and any(
            r["seed"] == seed and (not FLAGS.teachers
                                   or r["name"] in FLAGS.teachers)
            for r in rows)):
          continue
        record = provenance.start()
        new = job()
        for r in new:
          r["flags"] = flag_values
          r["provenance"] = provenance.finish(record)
        # Written after every run: an interrupted study keeps what it has.
        # Re-read first: another process (e.g. one per seed) may have
        # appended rows to the same file since this one started.
        rows = load_rows(out_dir, study) + new
        write(out_dir, study, rows, flag_values)
        print(f"{study} seed {seed} {name}: " + ", ".join(
            f"{r['name']} student/fedavg/ensemble "
            f"{r.get('student_accuracy')}/{r.get('fedavg_accuracy')}/"
            f"{r.get('ensemble_accuracy')}" for r in new), flush=True)
  print(summarize(out_dir))


if __name__ == "__main__":
  define_flags()
  app.run(main)
