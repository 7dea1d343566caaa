"""The ConvNet's first block on the CPU: compiled kernel against XLA, side by side.

``collabdm_jax/cpu_first_block.py`` computes DM's first ConvNet block
(3x3 conv, instance norm, ReLU, 2x2 average pool) as a compiled kernel in
the forward passes that are not differentiated. This times, interleaved in
ONE process so that both variants see the same load, at the reference
config's shapes (28x28x1 images, width 128, depth 3):

* ``block_N``: the block alone on N images (N = 10, 64), the kernel
  (``cpu_first_block.kernel_forward``) against XLA's ops
  (``cpu_first_block.reference``);
* ``embedding_64``: the whole embedding's forward pass on 64 images, the
  client statistics' unit of work (``stats.embed_batch`` on CPU), with the
  kernel and with ``COLLABDM_CPU_KERNELS=0``;
* ``image_gradient_10``: the input gradient of the embedding on 10 images,
  a server or local-DM piece: the kernels' forward and input gradient
  against XLA's ops (``COLLABDM_CPU_KERNELS=0``).

Each case alternates the two variants for ``--rounds`` rounds of
``--calls`` calls and records every round's seconds per call, the minimum
and median, the median of the per-round ratios (XLA / kernel), and the
largest relative difference of the outputs.

  python -m experiments.first_block_bench \\
      --out=experiments/results/first_block/first_block.json

Prints the document and writes it to ``--out``. Takes about a minute. Time it on an otherwise idle machine; the load
average is recorded.
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

from collabdm_jax import cpu_first_block  # pylint: disable=g-import-not-at-top
from collabdm_jax import models  # pylint: disable=g-import-not-at-top
from collabdm_jax import provenance  # pylint: disable=g-import-not-at-top
from experiments.benchlib import measure  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON document.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Alternating rounds per case.")
_CALLS = flags.DEFINE_integer("calls", 10, "Calls per round and variant.")
_QUICK = flags.DEFINE_bool("quick", False, "2 rounds of 2 calls (a test).")

SHAPE = (28, 28, 1)
PADDING = 3  # DM's first conv on 1-channel images


def time_pair(fns, args, rounds, calls):
  """Alternates ``fns`` (name -> jitted function); seconds per call."""
  outs = {name: jax.block_until_ready(f(*args)) for name, f in fns.items()}
  times = {name: [] for name in fns}
  for r in range(rounds):
    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
    for name in order:
      t0 = time.perf_counter()
      for _ in range(calls):
        out = fns[name](*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / calls)
  a, b = (np.asarray(o) for o in outs.values())
  names = list(fns)
  ratios = [x / k for x, k in zip(times[names[1]], times[names[0]])]
  return {
      "seconds_per_call": {n: t for n, t in times.items()},
      "min_s": {n: min(t) for n, t in times.items()},
      "median_s": {n: float(np.median(t)) for n, t in times.items()},
      "median_ratio": float(np.median(ratios)),
      "ratio_is": f"{names[1]} / {names[0]}",
      "max_relative_difference": float(np.abs(a - b).max() /
                                       np.abs(b).max()),
  }


def fresh(fn):
  """A newly jitted ``fn``, traced under the current kernel switch."""
  return jax.jit(lambda *a: fn(*a))


def main(argv):
  del argv
  if not cpu_first_block.enabled():
    raise SystemExit("the CPU first-block kernel is not available here "
                     "(a CPU backend and g++ are needed)")
  record = provenance.start()
  rounds, calls = (2, 2) if _QUICK.value else (_ROUNDS.value, _CALLS.value)
  model = models.make_model("convnet", 10)
  params = models.init_params(model, jax.random.key(0), SHAPE)
  embed = models.embed_fn(model)
  p0, n0 = params["conv0"], params["norm0"]
  cases = {}
  for n in (10, 64):
    x = jax.random.normal(jax.random.key(n), (n,) + SHAPE)
    cases[f"block_{n}"] = time_pair({
        "kernel": fresh(lambda x: cpu_first_block.kernel_forward(
            x, p0["kernel"], n0["scale"], n0["bias"], PADDING)),
        "xla": fresh(lambda x: cpu_first_block.reference(
            x, p0["kernel"], p0["bias"], n0["scale"], n0["bias"], PADDING)),
    }, (x,), rounds, calls)
  x64 = jax.random.normal(jax.random.key(1), (64,) + SHAPE)
  x10 = jax.random.normal(jax.random.key(2), (10,) + SHAPE)
  grad = lambda x: jax.grad(lambda x: jnp.sum(embed(params, x) ** 2))(x)
  with_kernel = {"embed": fresh(lambda x: embed(params, x)),
                 "grad": fresh(grad)}
  os.environ["COLLABDM_CPU_KERNELS"] = "0"
  without = {"embed": fresh(lambda x: embed(params, x)), "grad": fresh(grad)}
  # Trace both now, while the switch says what each variant is.
  jax.block_until_ready(without["embed"](x64))
  jax.block_until_ready(without["grad"](x10))
  os.environ.pop("COLLABDM_CPU_KERNELS")
  jax.block_until_ready(with_kernel["embed"](x64))
  jax.block_until_ready(with_kernel["grad"](x10))
  cases["embedding_64"] = time_pair(
      {"kernel": with_kernel["embed"], "xla": without["embed"]}, (x64,),
      rounds, calls)
  cases["image_gradient_10"] = time_pair(
      {"kernel": with_kernel["grad"], "xla": without["grad"]}, (x10,),
      rounds, calls)
  doc = {
      "what": ("DM's ConvNet first block (width 128, 28x28x1 inputs, "
               "padding 3) by the compiled CPU kernel and by XLA's ops, "
               "alone and inside the embedding, interleaved"),
      "cases": cases,
      "settings": {"rounds": rounds, "calls": calls, "quick": _QUICK.value},
      "environment": dict(
          measure.environment(),
          kernel_library=str(cpu_first_block.library_path())),
      "provenance": provenance.finish(record),
  }
  text = json.dumps(doc, indent=1)
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
  for name, case in cases.items():
    logging.info("%s: %s, median ratio %.2f", name, case["min_s"],
                 case["median_ratio"])
  print(text)


if __name__ == "__main__":
  app.run(main)
