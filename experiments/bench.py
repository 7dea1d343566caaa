"""Throughput benchmark of CollabDM's client pass, and of the rest of a run.

The client pass (every client embeds its real samples under every random
network psi_t) is almost all of CollabDM's compute, so this script measures
it against the practical peak of the same machine: a jitted float32 matmul
timed in the same run. It prints ONE JSON document on stdout (progress goes
to stderr) with, per case, images x networks embedded per second, achieved
GFLOP/s, the matmul peak and their ratio; the server step time; the phases of
an end-to-end run of ``experiments/configs/default.py`` (reduced budget);
peak RSS and the JAX backend and devices.

  python experiments/bench.py                 # full run, ~15 min on 2 cores
  python experiments/bench.py --quick         # tiny sizes (tests, CI)
  python experiments/bench.py --cases='fmnist_k100_*,server_*' \
      --out=experiments/results/bench.json

Case names: ``{fmnist,cifar10}_k{K}_t{T}_d{1,4}`` (client pass on K clients
for T iterations on 1 or 4 CPU devices; 4 devices run in a subprocess with
``--xla_force_host_platform_device_count=4``), ``server_{fmnist,cifar10}``
and ``e2e_default``. ``--cases`` takes comma-separated shell patterns.

On a GPU (skipped, and recorded as such, without one):
``{fmnist,cifar10}_k{K}_t{T}_gpu{,_fp32,_bf16}`` is the client pass in
float32 at XLA's default precision (which lets the GPU's matrix units use
TF32), in strict float32 (``precision="highest"``) and with
``compute_dtype="bfloat16"``; each is compared with a matmul of the same
precision timed on the same GPU. ``server_{ds}_gpu{,_bf16}`` times the server
step and ``e2e_default_gpu{,_fp32,_bf16}`` runs the *full* default config
(evaluation included) on the GPU in the three precisions, so that they give
bfloat16's (and TF32's) effect on accuracy. The GPU's copy bandwidth and
the bare embedding are measured too: on a GPU the pass is memory-bound. GPU cases use ``ACCEL`` sizes: larger embedding batches and
``t_chunk`` iterations per call, as a GPU wants.

  python experiments/bench.py --cases='*_gpu*' --out=bench_gpu.json

The measurement itself is documented in ``experiments/benchlib/`` (this
file is its command line).
"""

import json
import pathlib
import sys

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments.benchlib import driver  # noqa: E402  (after the path set-up)

_QUICK = flags.DEFINE_bool("quick", False, "tiny sizes, for tests and CI")
_CASES = flags.DEFINE_string(
    "cases", "*", "comma-separated shell patterns of case names")
_EMBED_BATCH = flags.DEFINE_integer(
    "embed-batch", None, "samples embedded at once in the client pass "
    "(default: the default config's, 64; quick: 16)")
_OUT = flags.DEFINE_string(
    "out", None, "also write the JSON document to this path (GPU runs also "
    "save it after every case)")
_ACCEL_EMBED_BATCH = flags.DEFINE_integer(
    "accel-embed-batch", None, "embed batch of the GPU cases (default 1024)")
# For tests and the multi-device child; not for users.
_ACCELERATOR = flags.DEFINE_string(
    "accelerator", "gpu", "platform of the GPU cases (tests: cpu dry-runs "
    "them)")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "internal: the 4-device child's device count")
_MATMUL_GFLOPS = flags.DEFINE_float(
    "matmul-gflops", None, "internal: the parent's matmul peak")
_FLOPS_PER_IMAGE = flags.DEFINE_string(
    "flops-per-image", None, "internal: the parent's FLOP counts (JSON)")


def main(argv):
  del argv  # every argument is a flag
  doc = driver.run(driver.Options(
      quick=_QUICK.value, cases=_CASES.value, embed_batch=_EMBED_BATCH.value,
      out=_OUT.value, accel_embed_batch=_ACCEL_EMBED_BATCH.value,
      accelerator=_ACCELERATOR.value, devices=_DEVICES.value,
      matmul_gflops=_MATMUL_GFLOPS.value,
      flops_per_image=_FLOPS_PER_IMAGE.value,
      command=["experiments/bench.py"] + sys.argv[1:]))
  if _DEVICES.value is not None:
    json.dump(doc, sys.stdout)  # the child's part, read by the parent
  else:
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
  app.run(main)
