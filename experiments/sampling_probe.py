"""Where a one-block client pass spends the time it does not spend embedding.

With 10 clients every sample sits in one block, and each iteration draws a
priority for every sample, sorts all of them by (client, class, priority)
and gathers the slots it embeds. This times each of those steps alone
(the client module's own functions; "sort" includes looking up each slot's
sample), and the whole block function, on the blocks the benchmark builds,
``t_chunk`` iterations per call. Prints one JSON document.

  python experiments/sampling_probe.py --out=experiments/results/sampling_probe_gpu.json
  python experiments/sampling_probe.py --quick     # tiny sizes (CPU check)
"""

import pathlib
import sys

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from collabdm_jax import client as client_lib  # noqa: E402
from collabdm_jax import parallel  # noqa: E402
from collabdm_jax import provenance  # noqa: E402
from experiments.benchlib import cases  # noqa: E402
from experiments.benchlib import measure  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "tiny sizes (a CPU check)")
_OUT = flags.DEFINE_string("out", None, "also write the JSON document here")


def best_time(f, args, reps):
  return min(measure.call_times(f, args, reps))


def probe(dataset, num_clients, sizes, t_chunk, reps):
  spec = cases.make_spec(dataset, sizes)
  shape, train, _ = cases.DATASETS[dataset]
  train = sizes["train_size"] or train
  n = train // num_clients
  rng = np.random.default_rng(0)
  ys = [rng.integers(0, cases.NUM_CLASSES, n).astype(np.int32)
        for _ in range(num_clients)]
  xs = [rng.standard_normal((n,) + shape, np.float32) for _ in ys]
  slots = [spec.slots_of(y) for y in ys]
  layout = client_lib.plan_layout(spec, [n] * num_clients, slots, 1)
  blocks = client_lib.make_blocks(xs, ys, list(range(num_clients)), spec,
                                  layout)
  assert len(blocks) == 1, "the probe is for one-block passes"
  mesh = parallel.client_mesh(devices=jax.devices()[:1])
  arrays = parallel.to_global(mesh, blocks[0][:9])
  root = jax.random.key(0)
  (x, y, sample_client, client_offset, class_start, client_ids, slot_client,
   slot_class, slot_rank) = arrays

  # The block function's own steps (client.block_stats_fn), one at a time.
  def priorities(t):
    return client_lib.block_priorities(root, t, sample_client,
                                       client_offset, client_ids)

  def slot_index(prio):  # the 3-key sort, then each slot's sample
    return client_lib.block_slot_indices(prio, y, sample_client,
                                         client_offset, class_start,
                                         slot_client, slot_class, slot_rank)

  ts = jnp.arange(t_chunk)
  prio0 = priorities(0)
  idx0 = slot_index(prio0)
  steps = {
      "priorities": (jax.jit(lambda: jax.lax.map(priorities, ts)), ()),
      "sort": (jax.jit(lambda p: jax.lax.map(
          lambda t: slot_index(p + t), ts)), (prio0,)),
      "gather": (jax.jit(lambda i: jax.lax.map(
          lambda t: x[(i + t) % x.shape[0]], ts)), (idx0,)),
      "draw_and_gather": (jax.jit(lambda: jax.lax.map(
          lambda t: x[slot_index(priorities(t))], ts)), ()),
  }
  out = {"dataset": dataset, "num_clients": num_clients, "t_chunk": t_chunk,
         "samples_in_block": int(y.shape[0]),
         "slots_per_iteration": int(slot_class.shape[0]),
         "block_bytes": int(x.size * x.dtype.itemsize),
         "seconds_per_call": {}}
  for name, (f, args) in steps.items():
    out["seconds_per_call"][name] = best_time(f, args, reps)
  fn = client_lib.block_stats_fn(spec, mesh, t_chunk, layout.embed_batch)
  out["seconds_per_call"]["block_function"] = best_time(
      lambda: fn(root, 0, *arrays), (), reps)
  share = out["seconds_per_call"]["draw_and_gather"] / out[
      "seconds_per_call"]["block_function"]
  out["draw_and_gather_share_of_block_function"] = share
  return out


def main(argv):
  del argv  # every argument is a flag
  if _QUICK.value:
    sizes, probes, t_chunk, reps = dict(cases.QUICK), [("fmnist", 3)], 2, 2
  else:
    sizes = dict(cases.FULL, embed_batch=cases.ACCEL["embed_batch"])
    probes = [("fmnist", 10), ("cifar10", 10)]
    t_chunk, reps = cases.ACCEL["t_chunk"], 10
  record = provenance.start(["experiments/sampling_probe.py"] + sys.argv[1:])
  doc = {"environment": measure.environment(),
         "cases": [probe(ds, k, sizes, t_chunk, reps) for ds, k in probes]}
  doc["provenance"] = provenance.finish(record)
  measure.write_document(doc, _OUT.value)


if __name__ == "__main__":
  app.run(main)
