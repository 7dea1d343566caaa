"""The DM iteration step before and after its closed form, side by side.

``dm.iteration_step`` used to take the C class steps of an iteration one
after another in a ``lax.scan`` (a gradient, then an SGD-momentum update of
the whole synthetic tensor, per class); it now computes the C class
gradients independently and applies the C momentum steps in closed form.
``models.conv_matmul_grads`` used to run a differentiated convolution as
im2col matrix products (forward and input gradient); it now keeps XLA's own
forward convolution and writes the input gradient as one too. This script
times, in ONE process with the variants interleaved (every round runs each
variant once), at the reference config's shapes (Fashion-MNIST 28x28x1,
ConvNet width 128 depth 3 with instance norm, 10 classes, DSA, lr 10 and
momentum 0.5 on the server, lr 1 on the clients):

* ``server_ipc{1,10,50}``: the server's jitted, donated step
  (``server.make_step``: psi_t, the Siamese keys and all class steps);
* ``local_dm``: local DM on the shared networks at the reference config (5
  clients, ipc 3, 100 iterations: ``client.shared_local_step``, which
  computes the 50 (client, class) gradients a few units per network pass;
  ``parties_per_class`` is the formulation it replaced, the step vmapped
  over the clients, one class of every client per pass);
* ``eval_gradient``: the parameter gradient of an evaluation network's SGD
  step (100 images in micro-batches of 10, ``evaluate.weighted_loss_and_
  grad``), the other user of ``conv_matmul_grads``.

Variants: ``before`` is the code at ``BASE_COMMIT`` (its ``dm.py`` and
``models.py``, read with ``git show``); ``now`` is this checkout;
``all_classes`` computes every class gradient in one network pass
(``classes_per_piece = C``, the default on accelerators); the ``*_xla_conv``
and ``*_im2col_conv`` variants swap the convolution for XLA's own
(transposed-convolution gradients) or the one at ``BASE_COMMIT`` while
keeping this checkout's step. FLOPs are XLA's count of the ``all_classes``
program (no loop, so counted in full; every variant does this work), and
the matmul peak is measured in the same run.

Each step is timed in wall-clock seconds (the minimum over rounds is the
usual figure) and in this process's CPU seconds (the median over rounds).
On a machine shared with other jobs the wall-clock minimum of one variant
can move by 15 % from run to run; CPU time measures the work itself and
repeats to a few per cent, so ``speedup_*`` give both. Prints ONE JSON
document::

  python experiments/dm_step_bench.py --out=experiments/results/dm_step/dm_step.json
  python experiments/dm_step_bench.py --quick      # tiny sizes (tests)
"""

import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import types

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from collabdm_jax import augment  # noqa: E402
from collabdm_jax import client as client_lib  # noqa: E402
from collabdm_jax import cpu_first_block  # noqa: E402
from collabdm_jax import dm  # noqa: E402
from collabdm_jax import evaluate  # noqa: E402
from collabdm_jax import losses  # noqa: E402
from collabdm_jax import models  # noqa: E402
from collabdm_jax import provenance  # noqa: E402
from collabdm_jax import server as server_lib  # noqa: E402
from experiments.benchlib import measure  # noqa: E402

# The last commit with the per-class scan and the im2col convolution.
BASE_COMMIT = "0a269bf19cf8666bd7afa265049dbb6396d8b4bd"

_QUICK = flags.DEFINE_bool("quick", False, "tiny sizes (a CPU check)")
_OUT = flags.DEFINE_string("out", None, "also write the JSON document here")

C = 10
SHAPE = (28, 28, 1)
FULL = dict(model=dict(width=128, depth=3), dsa_strategy=None,
            server_ipcs=(1, 10, 50),
            conv_variants_ipc=10, local_clients=5, local_ipc=3,
            local_iterations=100, rounds=8, steps_per_round=2,
            matmul_n=2048, matmul_reps=10, eval_images=100)
# Quick: compilation dominates, so one cheap DSA family.
QUICK = dict(model=dict(width=8, depth=2), dsa_strategy="flip",
             server_ipcs=(2,),
             conv_variants_ipc=2, local_clients=2, local_ipc=1,
             local_iterations=3, rounds=2, steps_per_round=1, matmul_n=256,
             matmul_reps=2, eval_images=20)
SERVER_LR, LOCAL_LR, MOMENTUM = 10.0, 1.0, 0.5
VARIANTS = {
    "before": "the code at base_commit: a lax.scan over classes, each step a "
              "gradient and an optax update of the whole tensor; im2col "
              "convolution gradients",
    "now": "this checkout: independent class gradients (one class of ipc "
           "images per piece on CPU at ipc >= 10), the momentum steps in "
           "closed form; XLA forward convolutions in the gradients",
    "all_classes": "now, with every class gradient in one network pass "
                   "(classes_per_piece = C, the default off-CPU)",
    "parties_per_class": "local DM only: dm.iteration_step vmapped over the "
                         "clients, each network pass one class of every "
                         "client (15 images at the reference config), as "
                         "client.shared_local_step did before 77f54e4",
    "*_xla_conv": "that step with XLA's own convolution gradients "
                  "(transposed convolutions)",
    "*_im2col_conv": "that step with base_commit's convolution (im2col "
                     "products for the differentiated forward and the "
                     "input gradient)",
    "eval_gradient": "before / now / xla_conv: the parameter gradient of "
                     "evaluate.weighted_loss_and_grad under each convolution",
}


def log(*args):
  print(*args, file=sys.stderr, flush=True)


def module_at(commit, path, name):
  """The module ``path`` as it was at ``commit`` (``git show``), imported
  under ``name``; its own imports resolve to this checkout's modules."""
  source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
  module = types.ModuleType(name)
  module.__file__ = f"{commit}:{path}"
  exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
  return module


@contextlib.contextmanager
def convolution(conv):
  """Traces the networks with ``conv`` as their convolution (None: as is).

  ``models._conv`` looks ``conv_matmul_grads`` up when a network is traced,
  so a program compiled inside this block keeps ``conv`` for good.
  """
  if conv is None:
    yield
    return
  saved = models.conv_matmul_grads
  models.conv_matmul_grads = conv
  try:
    yield
  finally:
    models.conv_matmul_grads = saved


def compiled(f, args, conv=None):
  """``(f lowered and compiled for args under conv, seconds it took)``."""
  start = time.perf_counter()
  with convolution(conv):
    out = one_program(f).lower(*args).compile()
  return out, time.perf_counter() - start


def interleaved_times(runners, rounds, steps):
  """Wall and CPU seconds per step of each runner, ``rounds`` rounds.

  ``runners[name]()`` runs ``steps`` steps and waits for them; one warm-up
  call each first. CPU time is this process's (all its threads): on a
  machine shared with other jobs it measures the work a variant does,
  where wall time also measures how much of the machine it got.
  """
  for run in runners.values():
    run()
  times = {name: ([], []) for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      wall, cpu = time.perf_counter(), time.process_time()
      run()
      times[name][0].append((time.perf_counter() - wall) / steps)
      times[name][1].append((time.process_time() - cpu) / steps)
  return times


def summary(times, compile_s, flops=None, peak=None):
  wall, cpu = times
  best = min(wall)
  out = {"seconds_per_step": wall, "min_s": best,
         "median_s": statistics.median(wall),
         "cpu_seconds_per_step": cpu, "cpu_min_s": min(cpu),
         "cpu_median_s": statistics.median(cpu), "compile_s": compile_s}
  if flops:
    out["gflops_per_s"] = flops / best / 1e9
    out["fraction_of_matmul_peak"] = flops / best / 1e9 / peak
  return out


def speedups(variants, slow, fast):
  """``slow`` over ``fast``: minimum wall time and median CPU time."""
  return {"wall_min": variants[slow]["min_s"] / variants[fast]["min_s"],
          "cpu_median": (variants[slow]["cpu_median_s"]
                         / variants[fast]["cpu_median_s"])}


def stepper(step, state, *args, steps, first_t=1):
  """A runner of ``steps`` donated steps ``state <- step(state, root, t,
  *args)`` (t counts on from ``first_t``)."""
  box = {"state": state, "t": first_t}

  def run():
    for _ in range(steps):
      box["state"], out = step(box["state"], jax.random.key(0),
                               jnp.int32(box["t"]), *args)
      box["t"] += 1
    jax.block_until_ready(out)
  return run


def dsa_strategy(sizes):
  return sizes["dsa_strategy"] or augment.dsa_strategy_for("fashion_mnist")


def server_case(model, ipc, before, im2col_conv, sizes, peak, with_convs):
  """The server step at ``ipc``: every variant from the same state."""
  strategy = dsa_strategy(sizes)
  cfg = server_lib.ServerConfig(ipc=ipc, lr=SERVER_LR, momentum=MOMENTUM,
                                dsa_strategy=strategy)
  embed = models.embed_fn(model)
  d = models.feature_dim(model, SHAPE)
  rng = np.random.default_rng(ipc)
  images = rng.standard_normal((C, ipc) + SHAPE, np.float32)
  targets = losses.ClassMoments(
      jnp.asarray(rng.standard_normal((C, d), np.float32)),
      jnp.zeros((C, d)), jnp.ones((C,), bool))

  def now_step(classes_per_piece):
    optimizer = dm.make_optimizer(cfg.lr, cfg.momentum)

    def step(state, root, t, targets):
      return dm.iteration_step(
          optimizer, embed, state, dm.network_params(model, root, t, SHAPE),
          dm.class_aug_draws(root, t, C, strategy, SHAPE), targets.mean,
          targets.std, targets.valid, dsa_strategy=strategy, pae=False,
          std_weight=0.0, classes_per_piece=classes_per_piece)
    return optimizer, jax.jit(step, donate_argnums=0)

  def before_step():
    optimizer = optax.sgd(cfg.lr, momentum=cfg.momentum)

    def step(state, root, t, targets):
      return before.iteration_step(
          optimizer, embed, state, dm.network_params(model, root, t, SHAPE),
          dm.class_aug_keys(root, t, C), targets.mean, targets.std,
          targets.valid, dsa_strategy=strategy, pae=False, std_weight=0.0)
    return optimizer, jax.jit(step, donate_argnums=0)

  variants = {  # name: (step builder, state type, convolution)
      "before": (before_step, before.SynthesisState, im2col_conv),
      "now": (lambda: server_lib.make_step(model, SHAPE, C, cfg),
              dm.SynthesisState, None),
      "all_classes": (lambda: now_step(C), dm.SynthesisState, None)}
  if with_convs:
    variants.update({
        "now_xla_conv": (lambda: now_step(None), dm.SynthesisState,
                         jax.lax.conv_general_dilated),
        "now_im2col_conv": (lambda: now_step(None), dm.SynthesisState,
                            im2col_conv),
        "all_classes_xla_conv": (lambda: now_step(C), dm.SynthesisState,
                                 jax.lax.conv_general_dilated),
        "all_classes_im2col_conv": (lambda: now_step(C), dm.SynthesisState,
                                    im2col_conv)})
  runners, compile_s, first = {}, {}, {}
  flops = None
  for name, (build, state_type, conv) in variants.items():
    optimizer, step = build()
    fresh = lambda: state_type(jnp.array(images),
                               optimizer.init(jnp.asarray(images)))
    exe, compile_s[name] = compiled(
        step, (fresh(), jax.random.key(0), jnp.int32(0), targets), conv)
    if name == "all_classes":
      flops = xla_ops_flops(build, fresh(), jax.random.key(0), jnp.int32(0),
                            targets)
    state, _ = exe(fresh(), jax.random.key(0), jnp.int32(0), targets)
    first[name] = np.asarray(state.images)
    runners[name] = stepper(exe, state, targets,
                               steps=sizes["steps_per_round"])
    log(f"server ipc {ipc}: {name} compiled in {compile_s[name]:.1f} s")
  load = list(os.getloadavg())
  times = interleaved_times(runners, sizes["rounds"], sizes["steps_per_round"])
  out = {"ipc": ipc, "classes": C, "lr": cfg.lr, "momentum": cfg.momentum,
         "dsa_strategy": strategy, "flops_per_iteration": flops,
         "load_average_before": load, "load_average_after":
         list(os.getloadavg()),
         # One step from the same state: the closed form against the scan.
         "first_step_max_abs_diff_vs_before": {
             name: float(np.abs(a - first["before"]).max())
             for name, a in first.items()},
         "variants": {name: summary(t, compile_s[name], flops, peak)
                      for name, t in times.items()}}
  out["speedup_now_over_before"] = speedups(out["variants"], "before", "now")
  if with_convs:
    out["speedup_of_xla_forward_conv"] = speedups(
        out["variants"], "now_im2col_conv", "now")
  return out


def one_program(step):
  """A ``dm.IterationStep`` (random inputs, then the update) as one jitted
  program, the form every variant here has; other steps unchanged."""
  if isinstance(step, dm.IterationStep):
    return jax.jit(lambda *args: step(*args), donate_argnums=0)
  return step


def xla_ops_flops(build, *args):
  """XLA's FLOPs of a freshly built step with the ConvNet's first block as
  XLA's ops (the CPU kernel is a custom call, which XLA counts as 0)."""
  with cpu_first_block.xla_ops():
    _, step = build()
    return measure.flops_of(one_program(step).lower(*args).compile())


def local_case(model, before, im2col_conv, sizes, peak):
  """Local DM on the shared networks, all clients in one vmapped step."""
  strategy = dsa_strategy(sizes)
  k, ipc = sizes["local_clients"], sizes["local_ipc"]
  cfg = client_lib.LocalDMConfig(ipc=ipc, iterations=sizes["local_iterations"],
                                 lr=LOCAL_LR, momentum=MOMENTUM,
                                 dsa_strategy=strategy)
  embed = models.embed_fn(model)
  d = models.feature_dim(model, SHAPE)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((k, C, ipc) + SHAPE, np.float32)
  means = jnp.asarray(rng.standard_normal((k, C, d), np.float32))
  stds = jnp.zeros((k, C, d))
  valid = jnp.asarray(rng.random((k, C)) < 0.9)

  def vmapped(iteration_step, optimizer, **kw):
    def step(states, root, t, means, stds, valid):
      params = dm.network_params(model, root, t, SHAPE)
      # base_commit's step takes the classes' keys, this checkout's their
      # draws.
      aug = (dm.class_aug_keys(root, t, C) if iteration_step is
             before.iteration_step else
             dm.class_aug_draws(root, t, C, strategy, SHAPE))
      return jax.vmap(lambda st, m, s, v: iteration_step(
          optimizer, embed, st, params, aug, m, s, v,
          dsa_strategy=strategy, pae=False, std_weight=0.0, **kw))(
              states, means, stds, valid)
    return optimizer, jax.jit(step, donate_argnums=0)

  now_opt = dm.make_optimizer(cfg.lr, cfg.momentum)
  variants = {
      "before": (vmapped(before.iteration_step,
                         optax.sgd(cfg.lr, momentum=cfg.momentum)),
                 before.SynthesisState, im2col_conv),
      "now": (client_lib.shared_local_step(model, SHAPE, C, cfg),
              dm.SynthesisState, None),
      "all_classes": (vmapped(dm.iteration_step, now_opt,
                              classes_per_piece=C), dm.SynthesisState, None),
      "parties_per_class": (vmapped(dm.iteration_step, now_opt,
                                    classes_per_piece=1),
                            dm.SynthesisState, None)}
  runners, compile_s = {}, {}
  flops = None
  for name, ((optimizer, step), state_type, conv) in variants.items():
    fresh = lambda: jax.vmap(lambda im: state_type(
        im, optimizer.init(im)))(jnp.array(images))
    exe, compile_s[name] = compiled(
        step, (fresh(), jax.random.key(0), jnp.int32(0), means, stds, valid),
        conv)
    if name == "all_classes":
      flops = xla_ops_flops(
          lambda: vmapped(dm.iteration_step, now_opt, classes_per_piece=C),
          fresh(), jax.random.key(0), jnp.int32(0), means, stds, valid)
    runners[name] = stepper(exe, fresh(), means, stds, valid,
                               steps=sizes["steps_per_round"])
    log(f"local DM: {name} compiled in {compile_s[name]:.1f} s")
  load = list(os.getloadavg())
  times = interleaved_times(runners, sizes["rounds"], sizes["steps_per_round"])
  out = {"clients": k, "ipc": ipc, "lr": cfg.lr, "momentum": cfg.momentum,
         "dsa_strategy": strategy,
         "iterations": cfg.iterations, "flops_per_iteration": flops,
         "load_average_before": load,
         "load_average_after": list(os.getloadavg()),
         "variants": {name: summary(t, compile_s[name], flops, peak)
                      for name, t in times.items()}}
  for v in out["variants"].values():
    v["projected_total_s"] = v["min_s"] * cfg.iterations
  out["speedup_now_over_before"] = speedups(out["variants"], "before", "now")
  out["speedup_now_over_parties_per_class"] = speedups(
      out["variants"], "parties_per_class", "now")
  return out


def eval_case(model, im2col_conv, sizes):
  """An evaluation SGD step's parameter gradient under each convolution."""
  n = sizes["eval_images"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n,) + SHAPE, np.float32))
  y = jnp.asarray(rng.integers(0, C, n).astype(np.int32))
  w = jnp.ones((n,), jnp.float32)
  params = models.init_params(model, jax.random.key(0), SHAPE)
  logits = models.logits_fn(model)

  def loss_sum(p, x, y, w):
    return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(
        logits(p, x), y))

  runners, compile_s, grads = {}, {}, {}
  for name, conv in (("before", im2col_conv), ("now", None),
                     ("xla_conv", jax.lax.conv_general_dilated)):
    f = jax.jit(lambda p: evaluate.weighted_loss_and_grad(
        loss_sum, p, x, y, w, micro_batch=evaluate.MICRO_BATCH_CPU))
    exe, compile_s[name] = compiled(f, (params,), conv)
    grads[name] = exe(params)
    runners[name] = (lambda exe=exe: jax.block_until_ready(exe(params)))
  times = interleaved_times(runners, sizes["rounds"], 1)
  diff = {name: jax.tree.reduce(max, jax.tree.map(
      lambda a, b: float(jnp.abs(a - b).max()), g, grads["now"]))
          for name, g in grads.items()}
  variants = {name: summary(t, compile_s[name]) for name, t in times.items()}
  return {"images": n, "micro_batch": evaluate.MICRO_BATCH_CPU,
          "max_abs_diff_vs_now": diff, "variants": variants,
          "speedup_now_over_before": speedups(variants, "before", "now")}


def main(argv):
  del argv
  record = provenance.start()
  sizes = QUICK if _QUICK.value else FULL
  before = module_at(BASE_COMMIT, "collabdm_jax/dm.py", "dm_before")
  im2col_conv = module_at(BASE_COMMIT, "collabdm_jax/models.py",
                          "models_before").conv_matmul_grads
  model = models.make_model("convnet", C, **sizes["model"])
  peak = measure.matmul_peak(jax.devices()[0], sizes["matmul_n"],
                             sizes["matmul_reps"])
  log(f"matmul peak {peak['gflops']:.0f} GFLOP/s")
  doc = {"base_commit": BASE_COMMIT, "quick": _QUICK.value,
         "variants": VARIANTS,
         "model": dict(arch="convnet", **sizes["model"],
                       norm="instancenorm"),
         "input_shape": SHAPE, "rounds": sizes["rounds"],
         "steps_per_round": sizes["steps_per_round"],
         "matmul_peak": peak, "environment": measure.environment(),
         "cases": {}}
  for ipc in sizes["server_ipcs"]:
    doc["cases"][f"server_ipc{ipc}"] = server_case(
        model, ipc, before, im2col_conv, sizes, peak["gflops"],
        with_convs=ipc == sizes["conv_variants_ipc"])
  doc["cases"]["local_dm"] = local_case(model, before, im2col_conv, sizes,
                                        peak["gflops"])
  doc["cases"]["eval_gradient"] = eval_case(model, im2col_conv, sizes)
  doc["provenance"] = provenance.finish(record)
  text = json.dumps(doc, indent=1)
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
