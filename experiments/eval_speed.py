"""Evaluation speed: the models' kernels against fast_convnet's, side by side.

Times DM's evaluation protocol at the reference config's size, once with the
ConvNet kernels of ``models.py`` (what evaluation used before) and once with
``fast_convnet``'s (what it uses on CPU now), interleaved in ONE process so
that both see the same machine load:

* a fresh ConvNet (width 128, depth 3, instance norm, ReLU, average pooling)
  trained 300 epochs on 100 Fashion-MNIST images (the first 10 training
  images of every class, standing in for a distilled set of ipc 10) with
  DM's protocol (SGD, momentum 0.9, weight decay 5e-4, batch 256, DSA per
  batch, learning rate x0.1 after half the epochs), gradients in
  micro-batches of ``evaluate.MICRO_BATCH_CPU``;
* then tested on the 10,000 test images.

Per repeat and kernel it records the compile time of the training and test
programs (caches cleared first), the training time (300 epochs), the test
time, the test accuracy and final training loss, and the load average. Both
kernels train the network of the same key in a repeat, so their accuracies
can be compared; repeats alternate which kernel goes first. The summary
takes each time's minimum over repeats and gives per network

  per_net_s = (compile_train_s + compile_predict_s) / nets + train_s
              + predict_s

for an evaluation of ``--nets`` networks (the reference config has 3; the
programs compile once per evaluation), ``s_per_epoch = train_s / epochs``,
and old/new ratios. On a shared machine the load drifts over minutes, so
``interleaved_epochs`` also alternates short trainings of the two kernels
(``--pair_epochs`` epochs per call, ``--pairs`` pairs, compiled once) and
gives the median of the per-pair time ratios, which a slow drift of the load
does not bias. ``predict_chunks_s`` times the test pass of the fast
kernels with the test set cut into chunks of 10 (the CPU default, the
micro-batch), 100 and 1,000 images. XLA's FLOP counts of one training step (its cost
analysis of a one-epoch program) are given for both kernels: Winograd
convolutions do fewer multiplications, so the same training has fewer FLOPs.

  python -m experiments.eval_speed \\
      --out=experiments/results/eval_speed/eval_speed.json

Takes about 10 minutes on an idle 2-core machine (2 repeats, 10 pairs).
Time it on an otherwise idle machine and say so; the load average is
recorded.
"""

import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from collabdm_jax import augment  # noqa: E402
from collabdm_jax import cpu_first_block  # noqa: E402
from collabdm_jax import evaluate  # noqa: E402
from collabdm_jax import models  # noqa: E402
from collabdm_jax import provenance  # noqa: E402
from collabdm_jax.data import images  # noqa: E402
from experiments.benchlib import measure  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON document.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Tiny sizes (width 8, depth 2, 2 epochs, 100 test "
    "images of the embedded Fashion-MNIST subset, 1 repeat): tests, CI.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Repeats of each kernel.")
_EPOCHS = flags.DEFINE_integer("epochs", 300, "Training epochs per network.")
_NETS = flags.DEFINE_integer(
    "nets", 3, "Networks per evaluation (they share one compilation).")
_WIDTH = flags.DEFINE_integer("width", 128, "ConvNet width.")
_DEPTH = flags.DEFINE_integer("depth", 3, "ConvNet depth.")
_IPC = flags.DEFINE_integer("ipc", 10, "Training images per class.")
_TEST_IMAGES = flags.DEFINE_integer(
    "test_images", 0, "Test images (0: the whole test split).")
_DATASET = flags.DEFINE_string(
    "dataset", "fashion_mnist",
    "Image dataset (fashion_mnist_embedded needs no download).")
_PAIRS = flags.DEFINE_integer(
    "pairs", 10, "Alternating short trainings of the two kernels.")
_PAIR_EPOCHS = flags.DEFINE_integer(
    "pair_epochs", 20, "Epochs per short training.")
_MATMUL_N = flags.DEFINE_integer(
    "matmul_n", 2048, "Side of the float32 matmul timed for the peak.")

KERNELS = {"models": False, "fast_convnet": True}
LR, MOMENTUM, WEIGHT_DECAY, BATCH, TEST_BATCH = 0.01, 0.9, 5e-4, 256, 1000


def _programs(kwargs, epochs, use_fast):
  return evaluate.compiled_programs(
      "convnet", 10, kwargs, augment.DEFAULT_STRATEGY, BATCH, epochs,
      TEST_BATCH, evaluate.default_micro_batch(), use_fast)


def _hyper():
  return (np.float32(LR), np.float32(MOMENTUM), np.float32(WEIGHT_DECAY))


def step_flops(kwargs, train_x, train_y, use_fast):
  """XLA's FLOPs of one epoch (one SGD step on <= 256 images), init excluded.

  XLA's cost analysis counts a loop body once, so the step's gradient is
  taken in one piece here (no micro-batch loop; the same FLOPs).
  """
  def programs(epochs):
    return evaluate.compiled_programs(
        "convnet", 10, kwargs, augment.DEFAULT_STRATEGY, BATCH, epochs,
        TEST_BATCH, None, use_fast)

  key = jax.random.key(0)
  # The first block as XLA's ops: where models.py's ConvNet runs it as the
  # CPU kernel (a custom call), XLA's cost analysis would count it as 0.
  with cpu_first_block.xla_ops():
    one = measure.flops_of(programs(1).train_net.lower(
        key, train_x, train_y, *_hyper()).compile())
    # The initialisation runs once per network, not per epoch: take it out
    # with a zero-epoch program.
    zero = measure.flops_of(programs(0).train_net.lower(
        key, train_x, train_y, *_hyper()).compile())
  # Programs traced for counting must not be reused for timing.
  evaluate.compiled_programs.cache_clear()
  return one - zero


def time_kernel(kwargs, key, train_x, train_y, test_x, test_y, epochs,
                use_fast):
  """Compiles from scratch, trains one network, tests it; seconds of each."""
  evaluate.compiled_programs.cache_clear()
  jax.clear_caches()
  out = {"load_average": provenance.load_average()}
  programs = _programs(kwargs, epochs, use_fast)
  t = time.perf_counter()
  train = programs.train_net.lower(key, train_x, train_y, *_hyper()).compile()
  out["compile_train_s"] = time.perf_counter() - t
  params_shape = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((1,) + a.shape, a.dtype),
      jax.eval_shape(programs.train_net, key, train_x, train_y, *_hyper())[0])
  t = time.perf_counter()
  predict = programs.predict.lower(params_shape, test_x).compile()
  out["compile_predict_s"] = time.perf_counter() - t
  t = time.perf_counter()
  params, losses = jax.block_until_ready(
      train(key, train_x, train_y, *_hyper()))
  out["train_s"] = time.perf_counter() - t
  stacked = jax.tree.map(lambda a: a[None], params)
  t = time.perf_counter()
  predictions = np.asarray(jax.block_until_ready(predict(stacked, test_x)))[0]
  out["predict_s"] = time.perf_counter() - t
  out["accuracy"] = float(np.mean(predictions == test_y))
  out["final_train_loss"] = float(np.asarray(losses)[-1])
  return out, predictions


def time_predict_chunks(kwargs, params, test_x, chunks, repeats):
  """Best-of-``repeats`` seconds of the fast kernels' test pass per chunk size."""
  out = {}
  stacked = jax.tree.map(lambda a: a[None], params)
  for chunk in chunks:
    # Without a micro-batch the test pass uses test_batch_size as its chunk.
    programs = evaluate.compiled_programs(
        "convnet", 10, kwargs, augment.DEFAULT_STRATEGY, BATCH, 1, chunk,
        None, True)
    out[str(chunk)] = min(measure.call_times(programs.predict,
                                             (stacked, test_x), repeats))
  return out


def time_interleaved(kwargs, train_x, train_y, epochs, pairs):
  """Alternating ``epochs``-epoch trainings of both kernels, ``pairs`` times.

  Returns each kernel's seconds per call and the per-pair ratios
  models / fast_convnet (adjacent calls see nearly the same load).
  """
  key = jax.random.key(0)
  compiled = {name: _programs(kwargs, epochs, fast).train_net.lower(
      key, train_x, train_y, *_hyper()).compile()
              for name, fast in KERNELS.items()}
  times = {name: [] for name in KERNELS}
  for i in range(pairs):
    order = list(KERNELS) if i % 2 == 0 else list(KERNELS)[::-1]
    for name in order:
      t = time.perf_counter()
      jax.block_until_ready(compiled[name](key, train_x, train_y, *_hyper()))
      times[name].append(time.perf_counter() - t)
  ratios = [a / b for a, b in zip(times["models"], times["fast_convnet"])]
  return {"epochs_per_call": epochs, "pairs": pairs, "seconds": times,
          "s_per_epoch_min": {k: min(v) / epochs for k, v in times.items()},
          "ratio_per_pair": ratios,
          "ratio_median": float(np.median(ratios)),
          "load_average_end": provenance.load_average()}


def summarize(runs, epochs, nets):
  """Minimum of each time over repeats, per-network and per-epoch times."""
  out = {}
  for name in KERNELS:
    mine = [r for r in runs if r["kernel"] == name]
    best = {k: min(r[k] for r in mine) for k in
            ("compile_train_s", "compile_predict_s", "train_s", "predict_s")}
    best["s_per_epoch"] = best["train_s"] / epochs
    best["per_net_s"] = ((best["compile_train_s"] + best["compile_predict_s"])
                         / nets + best["train_s"] + best["predict_s"])
    best["accuracies"] = [r["accuracy"] for r in mine]
    out[name] = best
  old, new = out["models"], out["fast_convnet"]
  out["speedup"] = {k: old[k] / new[k] for k in
                    ("s_per_epoch", "per_net_s", "predict_s",
                     "compile_train_s", "compile_predict_s")}
  return out


QUICK = {"repeats": 1, "epochs": 2, "width": 8, "depth": 2,
         "test_images": 100, "dataset": "fashion_mnist_embedded",
         "pairs": 2, "pair_epochs": 1, "matmul_n": 256}


def _settings():
  values = {name: flag.value for name, flag in (
      ("repeats", _REPEATS), ("epochs", _EPOCHS), ("nets", _NETS),
      ("width", _WIDTH), ("depth", _DEPTH), ("ipc", _IPC),
      ("test_images", _TEST_IMAGES), ("dataset", _DATASET),
      ("pairs", _PAIRS), ("pair_epochs", _PAIR_EPOCHS),
      ("matmul_n", _MATMUL_N))}
  if _QUICK.value:
    values.update(QUICK)
  return values


def main(argv):
  del argv
  cfg = _settings()
  record = provenance.start()
  logging.info("load average at start: %s", record["load_average_start"])
  peak = measure.matmul_peak(jax.devices()[0], cfg["matmul_n"], 10)
  data = images.load_dataset(cfg["dataset"])
  pick = images.class_balanced_indices(data.train_y, cfg["ipc"])
  train_x = jnp.asarray(data.train_x[pick])
  train_y = jnp.asarray(data.train_y[pick].astype(np.int32))
  n_test = cfg["test_images"] or len(data.test_y)
  test_x = jnp.asarray(data.test_x[:n_test])
  test_y = np.asarray(data.test_y[:n_test])
  kwargs = (("width", cfg["width"]), ("depth", cfg["depth"]))
  epochs = cfg["epochs"]

  flops = {name: step_flops(kwargs, train_x, train_y, fast)
           for name, fast in KERNELS.items()}
  runs = []
  agreement = []
  for rep in range(cfg["repeats"]):
    key = jax.random.fold_in(jax.random.key(0), rep)
    order = list(KERNELS) if rep % 2 == 0 else list(KERNELS)[::-1]
    preds = {}
    for name in order:
      result, preds[name] = time_kernel(kwargs, key, train_x, train_y, test_x,
                                        test_y, epochs, KERNELS[name])
      result.update(kernel=name, repeat=rep)
      runs.append(result)
      logging.info("%s", result)
    agreement.append(float(np.mean(preds["models"] == preds["fast_convnet"])))
  interleaved = time_interleaved(kwargs, train_x, train_y,
                                 cfg["pair_epochs"], cfg["pairs"])
  logging.info("interleaved: %s", interleaved)
  model = models.make_model("convnet", 10, **dict(kwargs))
  chunks = time_predict_chunks(
      kwargs, models.init_params(model, jax.random.key(0), train_x.shape[1:]),
      test_x, (10, 100, 1000), cfg["repeats"])

  summary = summarize(runs, epochs, cfg["nets"])
  for name in KERNELS:
    summary[name]["step_flops"] = flops[name]
    summary[name]["step_gflops_per_s"] = (
        flops[name] / summary[name]["s_per_epoch"] / 1e9)
    summary[name]["fraction_of_matmul_peak"] = (
        summary[name]["step_gflops_per_s"] / peak["gflops"])
  doc = {
      "what": ("DM's evaluation of one ConvNet (width %d, depth %d) trained "
               "%d epochs on %d %s images with DSA and tested on %d, with "
               "the models' kernels and with fast_convnet's"
               % (cfg["width"], cfg["depth"], epochs, len(pick),
                  cfg["dataset"], n_test)),
      "summary": summary,
      "runs": runs,
      "prediction_agreement": agreement,
      "interleaved_epochs": interleaved,
      "predict_chunks_s": chunks,
      "matmul_peak_gflops": peak["gflops"],
      "settings": {"epochs": epochs, "nets_per_evaluation": cfg["nets"],
                   "repeats": cfg["repeats"], "pairs": cfg["pairs"],
                   "pair_epochs": cfg["pair_epochs"], "width": cfg["width"],
                   "depth": cfg["depth"], "ipc": cfg["ipc"],
                   "dataset": cfg["dataset"], "test_images": n_test,
                   "micro_batch": evaluate.default_micro_batch(),
                   "lr": LR, "momentum": MOMENTUM,
                   "weight_decay": WEIGHT_DECAY, "batch_size": BATCH,
                   "test_batch_size": TEST_BATCH,
                   "dsa_strategy": augment.DEFAULT_STRATEGY,
                   "quick": _QUICK.value,
                   "jax_compilation_cache_dir": os.environ.get(
                       "JAX_COMPILATION_CACHE_DIR")},
      "provenance": provenance.finish(record),
  }
  text = json.dumps(doc, indent=1)
  print(text)
  if _OUT.value:
    path = pathlib.Path(_OUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


if __name__ == "__main__":
  app.run(main)
