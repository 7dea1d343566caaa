"""Memory and upload check of the client pass at 1,000 simulated clients.

Issue #5 asks that the client pass scale to many clients: 1,000 simulated
clients on Fashion-MNIST with a peak memory that does not grow with the
number of server iterations T (the pass is streamed over iterations) and
grows at most linearly with the clients' total data, and that the message
size per client and the total upload be reported. This script measures
exactly that and prints ONE JSON document on stdout (progress goes to
stderr)::

  python experiments/scale_check.py --out=experiments/results/scale_check.json
  python experiments/scale_check.py --quick          # tiny sizes (tests)
  python experiments/scale_check.py --clients=100,1000 --iterations=8,32 \
      --width=32 --t-chunk=2

Cases: K clients x T iterations, by default K in {100, 1000} and T in
{8, 32}, on the full 60,000-image Fashion-MNIST training set split by a
label-Dirichlet partition (alpha 0.1, seed 0). The K=100 and K=1000 cases
hold the same total data, so their memory should be about the same.
``min_size`` is searched, not fixed: the largest of ``MIN_SIZE_CANDIDATES``
that the partition reaches within ``PARTITION_TRIES`` draws. At K=1000 and
alpha 0.1 a client gets no sample of a class with probability about 0.7
(its Dir(0.1) share of a class's 6,000 images is below one image), so about
3 % of the clients are empty in every draw and only ``min_size=0`` is
accepted; the number of empty clients is recorded (they still send a
message, of zeros).

Each case runs in a fresh subprocess, so its peak RSS is its own. The
subprocess loads the data, partitions it, builds the per-client arrays,
drops the pooled training set (a client holds only its own samples) and
records the resident set size: that is the *baseline* (data loaded, JAX
initialised). It then resets the kernel's peak-RSS mark (``clear_refs`` 5,
so the set-up's transient peaks do not count) and streams
``client.iter_client_stats`` ``t_chunk`` iterations at a time, consuming
each chunk only by adding its ``losses.class_moment_sums`` into running
``[T, C, D]`` sums (all the server needs) and copying one client's means
to build one real message. The *peak* is ``getrusage(RUSAGE_SELF)
.ru_maxrss`` (KiB on Linux) at the end of the stream; ``peak - baseline``
is what the client pass itself adds. VmRSS after every chunk is kept as a
trace. The persistent XLA compilation cache is off in the subprocesses so
every case compiles its programs itself (a cache hit in one case but not
in another would skew the comparison).

Width: the default ConvNet width 128 costs too much CPU for 1,000 clients
x 32 iterations on this 2-core machine, and memory hardly depends on it
(the network's parameters and one embed batch of activations are small
next to the clients' data), so ``--width`` defaults to 32 (ConvNet-3,
D=512); it is recorded per case.

Messages: one client's real message (the largest client's, without local
images) is encoded with ``protocol.encode_message`` in float32 and in
bfloat16. Without local images every message has the same array shapes
(``means [T, C, D]``, ``counts [T, C]``, ``class_counts [C]``; checked on
every streamed chunk), and the encoding differs between clients only in
the msgpack width of ``client_id`` in the header (1, 2 or 3 bytes here),
so the exact total upload is the sum over client ids of that size; the
per-id formula is checked by actually encoding the message under the
smallest and largest id. ``total_upload_bytes_{f32,bf16}`` is that exact
sum, ``upload_k_times_message_bytes_{f32,bf16}`` K times the real message.

The layout the pass used (``client.plan_layout`` and ``make_blocks``) is
rebuilt after the measurement with one-pixel images to report how many
bytes the padded blocks hold (``padded_block_bytes`` against
``client_data_bytes``) and how many distinct block shapes, hence XLA
compilations, the pass needs (one: every block shares a layout). Before
that layout, blocks were padded per client and had one shape each, and
1,000 clients used 1.7x the memory of 100 clients holding the same data
(31 compiled programs of tens of MiB each, and blocks 3x the data).
"""

import dataclasses
import json
import math
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time
from typing import Optional

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from collabdm_jax import provenance  # noqa: E402  (after the path set-up)

SCHEMA_VERSION = 1
# Peak growth at the largest T may exceed that at the smallest by this
# factor and still count as independent of T (allocator and compilation
# noise; an O(T) buffer would give about T_high / T_low = 4).
T_INDEPENDENCE_TOLERANCE = 1.15
MIN_SIZE_CANDIDATES = (10, 5, 2, 1, 0)
PARTITION_TRIES = 100

FULL = {"dataset": "fashion_mnist", "clients": (100, 1000),
        "iterations": (8, 32), "width": 32}
QUICK = {"dataset": "fashion_mnist_embedded", "clients": (4, 12),
         "iterations": (2, 4), "width": 8}


def _log(msg):
  print(f"[scale_check] {msg}", file=sys.stderr, flush=True)


def _proc_status_kib():
  """``{"VmRSS": kib, "VmHWM": kib}`` of this process (empty off Linux)."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
          out[name] = int(value.split()[0])
  except OSError:
    pass
  return out


def _current_rss_kib():
  status = _proc_status_kib()
  if "VmRSS" in status:
    return status["VmRSS"]
  # Without /proc the best available figure is the peak so far.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss():
  """Resets the kernel's peak-RSS mark to the current RSS; True if it did.

  ``ru_maxrss`` of a process is its mm's high-water mark (the mark carried
  over from before ``exec`` is the tiny parent's), so after the reset it
  measures the peak from this point on.
  """
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    return False
  status = _proc_status_kib()
  return bool(status) and status["VmHWM"] <= status["VmRSS"] + 1024


def _msgpack_int_len(value):
  import msgpack  # pylint: disable=import-outside-toplevel
  return len(msgpack.packb(int(value)))


def search_min_size(labels, num_clients, alpha, seed, num_classes):
  """The largest accepted ``min_size`` of ``MIN_SIZE_CANDIDATES``.

  Args:
    labels: ``[N]`` int labels.
    num_clients: K.
    alpha: Dirichlet concentration.
    seed: partition seed.
    num_classes: C.

  Returns:
    ``(partition, min_size, rejected)``: the partition drawn with the
    accepted ``min_size`` and the candidates rejected before it.

  Raises:
    ValueError: if no candidate (not even 0) is accepted.
  """
  from collabdm_jax import partition  # pylint: disable=import-outside-toplevel
  rejected = []
  for min_size in MIN_SIZE_CANDIDATES:
    if min_size * num_clients > len(labels):
      rejected.append(min_size)
      continue
    try:
      # partition_dirichlet is what make_partition("dirichlet") calls; it is
      # called directly to bound the number of draws spent on a hopeless
      # min_size (each draw costs ~20 ms at K=1000).
      part = partition.partition_dirichlet(
          labels, num_clients, alpha=alpha, seed=seed, min_size=min_size,
          num_classes=num_classes, max_tries=PARTITION_TRIES)
    except ValueError:
      rejected.append(min_size)
      continue
    return part, min_size, rejected
  raise ValueError(f"no min_size in {MIN_SIZE_CANDIDATES} gives a Dirichlet "
                   f"partition of {num_clients} clients (alpha={alpha})")


def _layout(spec, client_y, client_ids, num_shards, input_shape):
  """The block layout of the pass, rebuilt with one-pixel images.

  ``iter_client_stats`` plans its blocks from sample and slot counts only,
  so one-pixel stand-ins give the same blocks at 1/(H*W*Ch) of the memory.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from collabdm_jax import client  # pylint: disable=import-outside-toplevel
  tiny = dataclasses.replace(spec, input_shape=(1, 1, 1))
  samples = [len(y) for y in client_y]
  slots = [spec.slots_of(y) for y in client_y]
  layout = client.plan_layout(spec, samples, slots, num_shards)
  xs = [np.zeros((len(y), 1, 1, 1), np.float32) for y in client_y]
  blocks = client.make_blocks(xs, client_y, client_ids, tiny, layout)
  pixels = math.prod(input_shape)
  padded_samples = sum(b.x.shape[0] for b in blocks)
  return {
      "clients_per_device": layout.clients_per_shard,
      "samples_per_device": layout.samples_per_shard,
      "slots_per_device": layout.slots_per_shard,
      "embed_batch": layout.embed_batch,
      "num_blocks": len(blocks),
      "distinct_block_shapes": len({(b.x.shape[0], b.slot_class.size)
                                    for b in blocks}),
      "padded_samples": int(padded_samples),
      "padded_block_bytes": int(padded_samples * pixels * 4),
      "padded_slots_per_iteration": int(sum(b.slot_class.size
                                            for b in blocks)),
  }


def run_case(dataset_name, num_clients, num_iterations, width, t_chunk,
             alpha, seed):
  """One measured case, in this process (meant to be a fresh subprocess).

  Returns:
    A JSON-ready dict: set-up, baseline and peak RSS (KiB), wall times,
    slots, message sizes, layout and checks of the streamed statistics.
  """
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  from collabdm_jax import augment
  from collabdm_jax import client
  from collabdm_jax import data
  from collabdm_jax import losses
  from collabdm_jax import models
  from collabdm_jax import protocol
  # pylint: enable=import-outside-toplevel

  jax.config.update("jax_enable_compilation_cache", False)
  t_setup = time.perf_counter()
  devices = jax.devices()  # initialise the backend before the baseline
  ds = data.load_dataset(dataset_name)
  C = ds.num_classes
  input_shape = tuple(ds.train_x.shape[1:])
  part, min_size, rejected = search_min_size(ds.train_y, num_clients, alpha,
                                             seed, C)
  client_x = [ds.train_x[idx] for idx in part.client_indices]
  client_y = [ds.train_y[idx] for idx in part.client_indices]
  client_ids = list(range(num_clients))
  class_totals = np.bincount(ds.train_y, minlength=C)
  del ds  # a client holds only its own samples: drop the pooled set
  sizes = np.array([len(y) for y in client_y])
  model = models.make_model("convnet", C, width=width, depth=3)
  spec = client.StatsSpec(
      model=model, input_shape=input_shape, num_classes=C, batch_real=32,
      dsa_strategy=augment.dsa_strategy_for(dataset_name), embed_batch=64)
  D = models.feature_dim(model, input_shape)
  root = jax.random.key(seed)
  setup_s = time.perf_counter() - t_setup
  baseline = _current_rss_kib()
  setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak_reset = _reset_peak_rss()
  _log(f"K={num_clients} T={num_iterations}: set-up {setup_s:.1f}s, "
       f"baseline RSS {baseline / 1024:.0f} MiB, min_size={min_size}")

  num_shards = len(devices)
  keep = int(np.argmax(sizes))  # the message encoded for real
  mean_sum = np.zeros((num_iterations, C, D), np.float32)
  weight = np.zeros((num_iterations, C), np.float32)
  keep_means = np.zeros((num_iterations, C, D), np.float32)
  keep_counts = np.zeros((num_iterations, C), np.int32)
  slots_per_iteration = []
  shapes_ok = True
  covered = 0
  rss_trace = []
  t_stream = time.perf_counter()
  class_counts = None
  for t0, st in client.iter_client_stats(
      root, client_x, client_y, client_ids, spec, num_iterations,
      t_chunk=t_chunk):
    tn = st.means.shape[1]
    shapes_ok &= (st.means.shape == (num_clients, tn, C, D)
                  and st.counts.shape == (num_clients, tn, C)
                  and st.class_counts.shape == (num_clients, C))
    sums = losses.class_moment_sums(st.means, st.counts, st.class_counts,
                                    weighting="count")
    mean_sum[t0:t0 + tn] += np.asarray(sums.mean_sum)
    weight[t0:t0 + tn] += np.asarray(sums.weight)
    keep_means[t0:t0 + tn] = st.means[keep]
    keep_counts[t0:t0 + tn] = st.counts[keep]
    class_counts = st.class_counts[keep].copy()
    slots_per_iteration.extend(int(v) for v in st.counts.sum(axis=(0, 2)))
    covered += tn
    rss_trace.append([t0, _current_rss_kib()])
    _log(f"  t {t0 + tn}/{num_iterations}  "
         f"{time.perf_counter() - t_stream:.1f}s  "
         f"RSS {rss_trace[-1][1] / 1024:.0f} MiB")
    del st, sums
  stream_s = time.perf_counter() - t_stream
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  shapes_ok &= covered == num_iterations

  targets = losses.moments_from_sums(
      losses.MomentSums(jnp.asarray(mean_sum), None, jnp.asarray(weight)))
  fields = {"dataset": dataset_name, "model": {"arch": "convnet",
                                               "width": width, "depth": 3},
            "num_iterations": num_iterations, "batch_real": 32,
            "dsa_strategy": spec.dsa_strategy, "seed": seed}
  msg = protocol.ClientMessage(
      client_id=keep, root_key_fingerprint=protocol.key_fingerprint(root),
      config_hash=protocol.config_hash(fields), means=keep_means,
      counts=keep_counts, class_counts=class_counts)
  f32 = len(protocol.encode_message(msg))
  bf16 = len(protocol.encode_message(msg, transport_dtype="bfloat16"))
  id_len = lambda k: f32 + _msgpack_int_len(k) - _msgpack_int_len(keep)
  for k in (0, num_clients - 1):
    assert len(protocol.encode_message(
        dataclasses.replace(msg, client_id=k))) == id_len(k)
  per_id = [id_len(k) for k in client_ids]
  id_len_bf16 = lambda k: bf16 + _msgpack_int_len(k) - _msgpack_int_len(keep)

  data_bytes = int(sum(x.nbytes for x in client_x))
  layout = _layout(spec, client_y, client_ids, num_shards,
                   input_shape)
  return {
      "clients": num_clients,
      "iterations": num_iterations,
      "width": width,
      "embed_dim": D,
      "t_chunk": t_chunk,
      "dataset": dataset_name,
      "alpha": alpha,
      "partition_seed": seed,
      "min_size": min_size,
      "min_size_rejected": rejected,
      "empty_clients": int((sizes == 0).sum()),
      "client_size_min": int(sizes.min()),
      "client_size_median": float(np.median(sizes)),
      "client_size_max": int(sizes.max()),
      "total_client_samples": int(sizes.sum()),
      "client_data_bytes": data_bytes,
      "baseline_rss_kib": int(baseline),
      "setup_peak_rss_kib": int(setup_peak),
      "peak_reset_after_setup": peak_reset,
      "peak_rss_kib": int(peak),
      "peak_minus_baseline_kib": int(peak - baseline),
      "rss_trace_kib": rss_trace,
      "setup_s": round(setup_s, 3),
      "stream_s": round(stream_s, 3),
      "slots_per_iteration": slots_per_iteration[0],
      "slots_constant_over_t": len(set(slots_per_iteration)) == 1,
      "message_client_id": keep,
      "message_array_shapes": {"means": list(keep_means.shape),
                               "counts": list(keep_counts.shape),
                               "class_counts": list(class_counts.shape)},
      "all_clients_same_shapes": bool(shapes_ok),
      "message_payload_bytes_nbytes": msg.nbytes(),
      "message_bytes_f32": f32,
      "message_bytes_bf16": bf16,
      "message_bytes_f32_min_max": [min(per_id), max(per_id)],
      "total_upload_bytes_f32": int(sum(per_id)),
      "total_upload_bytes_bf16": int(sum(id_len_bf16(k) for k in client_ids)),
      "upload_k_times_message_bytes_f32": num_clients * f32,
      "upload_k_times_message_bytes_bf16": num_clients * bf16,
      "server_target_sums_bytes": int(mean_sum.nbytes + weight.nbytes),
      "target_cells_valid": int(np.asarray(targets.valid).sum()),
      "targets_finite": bool(np.isfinite(np.asarray(targets.mean)).all()),
      # Count weighting: every (t, c) weighs the clients' whole class sizes,
      # so the summed weight is the class's size in the training set.
      "weights_equal_class_totals": bool(
          np.array_equal(weight, np.broadcast_to(
              class_totals.astype(np.float32), weight.shape))),
      "layout": layout,
      "backend": jax.default_backend(),
      "num_devices": num_shards,
  }


def summarize(cases):
  """Ratios across cases: growth over T per K, and K=max vs K=min per T."""
  ks = sorted({c["clients"] for c in cases})
  ts = sorted({c["iterations"] for c in cases})
  at = {(c["clients"], c["iterations"]): c for c in cases}
  growth = lambda k, t: at[(k, t)]["peak_minus_baseline_kib"]
  lo, hi = ts[0], ts[-1]
  by_clients = {}
  for k in ks:
    ratio = growth(k, hi) / max(growth(k, lo), 1)
    by_clients[str(k)] = {
        "peak_minus_baseline_kib": {str(t): growth(k, t) for t in ts},
        f"rss_growth_T{hi}_over_T{lo}": round(ratio, 4),
        "independent_of_T": ratio <= T_INDEPENDENCE_TOLERANCE,
    }
  by_iterations = {}
  for t in ts:
    by_iterations[str(t)] = {
        "peak_minus_baseline_kib": {str(k): growth(k, t) for k in ks},
        f"growth_K{ks[-1]}_over_K{ks[0]}": round(
            growth(ks[-1], t) / max(growth(ks[0], t), 1), 4),
        "client_data_bytes": {str(k): at[(k, t)]["client_data_bytes"]
                              for k in ks},
        "total_upload_bytes_f32": {str(k): at[(k, t)]["total_upload_bytes_f32"]
                                   for k in ks},
    }
  return {"t_independence_tolerance": T_INDEPENDENCE_TOLERANCE,
          "by_clients": by_clients, "by_iterations": by_iterations}


def define_flags(flag_values=flags.FLAGS):
  """This script's flags (defined only when it runs as a program, so that
  importing it for its functions leaves the global flags alone)."""
  f = flag_values
  flags.DEFINE_bool(
      "quick", False, "tiny sizes: embedded dataset, K 4,12, T 2,4, width 8",
      flag_values=f)
  flags.DEFINE_list("clients", None, "comma-separated K values "
                    "(default 100,1000)", flag_values=f)
  flags.DEFINE_list("iterations", None, "comma-separated T values "
                    "(default 8,32)", flag_values=f)
  flags.DEFINE_integer("width", None, "ConvNet width (default 32; 8 with "
                       "--quick)", lower_bound=1, flag_values=f)
  flags.DEFINE_string("dataset", None, "dataset name (default fashion_mnist)",
                      flag_values=f)
  flags.DEFINE_integer("t-chunk", 2, "iterations per streamed chunk",
                       lower_bound=1, flag_values=f)
  flags.DEFINE_float("alpha", 0.1, "Dirichlet concentration", flag_values=f)
  flags.DEFINE_integer("seed", 0, "partition seed", flag_values=f)
  flags.DEFINE_string("out", None, "also write the JSON here", flag_values=f)
  flags.DEFINE_string("case", None, "internal: K,T of one child case",
                      flag_values=f)
  for name in ("clients", "iterations"):
    flags.register_validator(
        name, lambda v: v is None or _positive_ints(v),
        message=f"--{name} takes comma-separated integers >= 1",
        flag_values=f)
  flags.register_validator("alpha", lambda v: v > 0,
                           message="--alpha must be > 0", flag_values=f)


def _positive_ints(values):
  try:
    ints = [int(v) for v in values]
  except ValueError:
    return False
  return bool(ints) and min(ints) >= 1


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags, with the sizes' defaults filled in."""
  quick: bool
  clients: tuple
  iterations: tuple
  width: int
  dataset: str
  t_chunk: int
  alpha: float
  seed: int
  out: Optional[str]
  case: Optional[str]


def settings(f=flags.FLAGS) -> Settings:
  base = QUICK if f.quick else FULL
  return Settings(
      quick=f.quick,
      clients=tuple(int(v) for v in f.clients) if f.clients
      else base["clients"],
      iterations=tuple(int(v) for v in f.iterations) if f.iterations
      else base["iterations"],
      width=f.width if f.width is not None else base["width"],
      dataset=f.dataset or base["dataset"], t_chunk=f["t-chunk"].value,
      alpha=f.alpha, seed=f.seed, out=f.out, case=f.case)


def _child_command(args, k, t):
  return [sys.executable, str(pathlib.Path(__file__).resolve()),
          f"--case={k},{t}", f"--dataset={args.dataset}",
          f"--width={args.width}", f"--t-chunk={args.t_chunk}",
          f"--alpha={args.alpha}", f"--seed={args.seed}"]


def main(argv):
  del argv  # every argument is a flag
  args = settings()
  if args.case is not None:
    k, t = (int(v) for v in args.case.split(","))
    print(json.dumps(run_case(args.dataset, k, t, args.width, args.t_chunk,
                              args.alpha, args.seed)))
    return 0
  record = provenance.start(["experiments/scale_check.py"] + sys.argv[1:])
  cases = []
  start = time.perf_counter()
  for k in args.clients:
    for t in args.iterations:
      _log(f"case K={k} T={t} (fresh subprocess)")
      t_case = time.perf_counter()
      proc = subprocess.run(_child_command(args, k, t), cwd=REPO,
                            stdout=subprocess.PIPE, text=True, check=False)
      if proc.returncode != 0:
        _log(f"case K={k} T={t} failed with exit code {proc.returncode}")
        return proc.returncode
      case = json.loads(proc.stdout)
      # The whole subprocess: interpreter and JAX start-up, set-up, stream.
      case["wall_s"] = round(time.perf_counter() - t_case, 3)
      cases.append(case)
      _log(f"case K={k} T={t}: peak-baseline "
           f"{case['peak_minus_baseline_kib'] / 1024:.0f} MiB, "
           f"stream {case['stream_s']:.1f}s")
  import jax  # pylint: disable=import-outside-toplevel
  doc = {
      "schema_version": SCHEMA_VERSION,
      "sizes": "quick" if args.quick else "full",
      "command": " ".join(["python", "experiments/scale_check.py"]
                          + sys.argv[1:]),
      "dataset": args.dataset,
      "clients": list(args.clients),
      "iterations": list(args.iterations),
      "width": args.width,
      "t_chunk": args.t_chunk,
      "alpha": args.alpha,
      "jax_version": jax.__version__,
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "total_wall_s": round(time.perf_counter() - start, 3),
      "cases": cases,
      "summary": summarize(cases),
      # Peak RSS of the children is the largest case's (each ran alone).
      "provenance": provenance.finish(record),
  }
  text = json.dumps(doc, indent=1)
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
