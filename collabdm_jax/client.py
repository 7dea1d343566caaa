"""What a client computes: embedding statistics under the shared random nets.

For every server iteration t and class c, client k embeds its real samples of
class c, augmented with the Siamese key of (t, c), under the random network
psi_t, and keeps their mean (and mean square when a std target is wanted).
This is the whole upload of CollabDM; the optional local distillation below
only provides a better starting point for the server's synthetic set.

Layout (FedJAX's idea of padded client blocks): clients of unequal size are
padded to a common length inside a block of ``G`` clients and ``vmap``ped;
the block's client axis is split over the devices of a ``clients`` mesh axis
with ``shard_map``. Each client's result depends only on its own data, its id
and the root key, so it is the same alone in its own process, in a block, or
on any number of devices (up to float summation order).

Memory stays bounded: the iterations are processed ``t_chunk`` at a time
(``lax.map``, one network alive at a time) and each client's samples are
embedded ``embed_batch`` at a time.
"""

import dataclasses
import functools
import math
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from collabdm_jax import augment
from collabdm_jax import dm
from collabdm_jax import keys as keys_lib
from collabdm_jax import models
from collabdm_jax import parallel


@dataclasses.dataclass(frozen=True)
class StatsSpec:
  """Static description of the statistics every client computes.

  Attributes:
    model: the Flax embedding network (architecture of every psi_t).
    input_shape: one example's shape, e.g. (28, 28, 1).
    num_classes: number of classes C.
    batch_real: real samples per (t, c); ``None`` embeds the whole local class
      (then count-weighted aggregation gives the exact pooled mean), an
      integer draws a fresh random subset of that size per t as the
      reference does (the whole class when it is smaller).
    dsa_strategy: Siamese augmentation: DSA families, "tabular" or "".
    second_moments: also upload the mean of squared embeddings (std targets).
    embed_batch: samples embedded at once (bounds activation memory).
  """
  model: object
  input_shape: Tuple[int, ...]
  num_classes: int
  batch_real: Optional[int] = None
  dsa_strategy: str = augment.DEFAULT_STRATEGY
  second_moments: bool = False
  embed_batch: int = 64

  def slots_per_class(self, class_counts):
    """How many samples client statistics use per class, ``[C]``."""
    class_counts = np.asarray(class_counts)
    if self.batch_real is None:
      return class_counts
    return np.minimum(class_counts, self.batch_real)


class ClientStats(NamedTuple):
  """Statistics of several clients over a range of iterations.

  means, second_moments: ``[K, T, C, D]`` float32 (second_moments may be
  None); counts: ``[K, T, C]`` int32; class_counts: ``[K, C]`` int32.
  """
  means: np.ndarray
  counts: np.ndarray
  class_counts: np.ndarray
  second_moments: Optional[np.ndarray]


class ClientBlock(NamedTuple):
  """``G = num_shards * cpd`` clients laid out for one call of the client pass.

  Per client (``[G, ...]``, shard d holding clients ``d*cpd .. d*cpd+cpd-1``):
  x ``[G, N, ...]`` samples sorted by class; y ``[G, N]`` labels, padding
  labelled C so it sorts last; class_start ``[G, C]`` offset of each class in
  the sorted order; client_ids ``[G]`` (-1 for padding clients).

  Per slot (``[num_shards * L]``, shard d owning ``L`` consecutive slots):
  every sample one shard embeds for one iteration, all its clients' slots in
  one flat list so that embedding batches are full whatever the clients'
  sizes. slot_client is the client's index within its shard (-1 marks
  padding), slot_class and slot_rank say which class and which rank in that
  class's random order the slot takes.

  members: indices into the caller's client list, in block order (-1 for
  padding clients).
  """
  x: np.ndarray
  y: np.ndarray
  class_start: np.ndarray
  client_ids: np.ndarray
  slot_client: np.ndarray
  slot_class: np.ndarray
  slot_rank: np.ndarray
  members: Tuple[int, ...]


def _round_up(n, multiple):
  return max(multiple, int(math.ceil(n / multiple)) * multiple)


def _bucket(n):
  """Rounds a length up to 2^k or 1.5*2^k, so few distinct shapes compile."""
  if n <= 8:
    return 8
  p = 1 << (int(n - 1).bit_length() - 1)
  return p + p // 2 if n <= p + p // 2 else 2 * p


def _bucket_fine(n):
  """Rounds n >= 1 up to 3 significant bits (at most 12.5 % padding).

  For the number of embedding batches per call: every padded batch is
  wasted compute, so this trades fewer compilations against less waste more
  finely than ``_bucket``.
  """
  step = 1 << max(0, int(n).bit_length() - 3)
  return _round_up(n, step)


def class_slots(class_counts, per_class):
  """Slot layout: ``per_class[c]`` consecutive slots for each class c.

  Returns ``(slot_class, slot_rank)``, both ``[sum(per_class)]`` int32.
  """
  per_class = np.asarray(per_class, np.int64)
  slot_class = np.repeat(np.arange(len(per_class)), per_class)
  starts = np.concatenate([[0], np.cumsum(per_class)[:-1]])
  slot_rank = np.arange(slot_class.size) - np.repeat(starts, per_class)
  return slot_class.astype(np.int32), slot_rank.astype(np.int32)


def default_embed_batch(spec, slots_per_client, clients_per_shard):
  """Samples per embedding batch: ``spec.embed_batch``, less for tiny lists.

  Bounded by the longest slot list a shard can get (its largest clients),
  so tiny problems are not padded up to a full embed batch.
  """
  longest = sum(sorted(slots_per_client, reverse=True)[:clients_per_shard])
  return min(spec.embed_batch, _bucket(max(longest, 1)))


def _padded_slots(class_counts, per_class, embed_batch=64):
  """``class_slots`` padded (class -1) to a whole number of embed batches."""
  sc, sr = class_slots(class_counts, per_class)
  eb = min(embed_batch, _bucket(max(sc.size, 1)))
  n = _round_up(max(sc.size, 1), eb)
  pad = n - sc.size
  return (np.concatenate([sc, np.full(pad, -1, np.int32)]),
          np.concatenate([sr, np.zeros(pad, np.int32)]))


def _shard_assignment(loads, num_shards, cpd):
  """Client positions ``[num_shards * cpd]`` (-1 empty) balancing total load.

  Greedy longest-first: each client goes to the least loaded shard that
  still has room, so the shards' slot lists (padded to the longest) waste
  little.
  """
  slots = [[] for _ in range(num_shards)]
  total = [0] * num_shards
  for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
    d = min((d for d in range(num_shards) if len(slots[d]) < cpd),
            key=lambda d: (total[d], d))
    slots[d].append(i)
    total[d] += loads[i]
  out = np.full((num_shards, cpd), -1, np.int64)
  for d, members in enumerate(slots):
    out[d, :len(members)] = sorted(members)
  return out.reshape(-1)


def make_blocks(client_x: Sequence[np.ndarray], client_y: Sequence[np.ndarray],
                client_ids: Sequence[int], spec: StatsSpec,
                clients_per_shard: int, num_shards: int = 1,
                embed_batch: Optional[int] = None) -> List[ClientBlock]:
  """Packs clients into blocks of ``num_shards * clients_per_shard``.

  Clients are sorted by how many samples they embed, so a block holds
  clients of similar size; inside a block they are spread over the shards
  (devices) to balance the shards' slot lists. Padded lengths are bucketed
  to limit recompilation (sample axis coarsely, it only costs memory; slot
  axis finely, padding slots cost compute). Slot lists are a whole number
  of ``embed_batch`` (default: ``default_embed_batch``).
  """
  if not (len(client_x) == len(client_y) == len(client_ids)):
    raise ValueError("client_x, client_y and client_ids must have equal length")
  if clients_per_shard < 1:
    raise ValueError(
        f"clients_per_shard must be >= 1, got {clients_per_shard}")
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  C = spec.num_classes
  prepared = []
  for x, y in zip(client_x, client_y):
    y = np.asarray(y, np.int32)
    if y.size and (y.min() < 0 or y.max() >= C):
      raise ValueError(f"labels must lie in [0, {C}), got [{y.min()}, {y.max()}]")
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=C)
    sc, sr = class_slots(counts, spec.slots_per_class(counts))
    prepared.append((np.asarray(x, np.float32)[order], y[order], counts, sc, sr))
  sizes = [p[3].size for p in prepared]
  order = sorted(range(len(prepared)), key=lambda i: (sizes[i], i))
  G = num_shards * clients_per_shard
  eb = embed_batch or default_embed_batch(spec, sizes, clients_per_shard)
  blocks = []
  for b in range(0, len(order), G):
    chosen = order[b:b + G]
    position = _shard_assignment([sizes[i] for i in chosen], num_shards,
                                 clients_per_shard)
    members = tuple(chosen[p] if p >= 0 else -1 for p in position)
    n_max = _bucket(max(max(prepared[i][0].shape[0] for i in chosen), 1))
    shard_slots = [sum(sizes[i] for i in members[d * clients_per_shard:
                                                 (d + 1) * clients_per_shard]
                       if i >= 0) for d in range(num_shards)]
    L = eb * _bucket_fine(-(-max(max(shard_slots), 1) // eb))
    x = np.zeros((G, n_max) + tuple(spec.input_shape), np.float32)
    y = np.full((G, n_max), C, np.int32)
    cs = np.zeros((G, C), np.int32)
    ids = np.full((G,), -1, np.int32)
    slot_client = np.full((num_shards, L), -1, np.int32)
    slot_class = np.full((num_shards, L), -1, np.int32)
    slot_rank = np.zeros((num_shards, L), np.int32)
    fill = [0] * num_shards
    for g, i in enumerate(members):
      if i < 0:
        continue
      xi, yi, counts, sc, sr = prepared[i]
      x[g, :len(yi)] = xi
      y[g, :len(yi)] = yi
      cs[g] = np.concatenate([[0], np.cumsum(counts)[:-1]])
      ids[g] = client_ids[i]
      d, local = divmod(g, clients_per_shard)
      at = slice(fill[d], fill[d] + sc.size)
      slot_client[d, at] = local
      slot_class[d, at] = sc
      slot_rank[d, at] = sr
      fill[d] += sc.size
    blocks.append(ClientBlock(x, y, cs, ids, slot_client.reshape(-1),
                              slot_class.reshape(-1), slot_rank.reshape(-1),
                              members))
  return blocks


def _sample_priorities(key, n):
  """A uniform priority per sample, each from its own folded key.

  Folding by sample index makes the draw independent of how much padding
  follows the client's samples.
  """
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(
      jnp.arange(n))


def sample_class_slots(key, y, class_start, slot_class, slot_rank):
  """Indices of the samples that fill each slot, drawn without replacement.

  Every sample gets a uniform priority from its own folded key (so the draw
  does not depend on padding), samples are ordered by (class, priority), and
  slot (c, r) takes the r-th sample of class c in that order. Padding slots
  (class -1) point at index 0 and must be masked by the caller.
  """
  order = jnp.lexsort((_sample_priorities(key, y.shape[0]), y))
  cls = jnp.maximum(slot_class, 0)
  return jnp.where(slot_class >= 0, order[class_start[cls] + slot_rank], 0)


def augment_per_slot(class_keys, images, slot_class, dsa_strategy):
  """Applies to every sample the Siamese DSA transform of its class.

  ``class_keys[c]`` is the augmentation key of class c; a sample of class c
  gets exactly the transform the synthetic images of class c get.
  """
  if not dsa_strategy or dsa_strategy == "none":
    return images
  slot_keys = class_keys[jnp.maximum(slot_class, 0)]
  one = lambda k, im: augment.siamese_augment(k, im[None], dsa_strategy)[0]
  return jax.vmap(one)(slot_keys, images)


def slot_moments(spec, embed, params, class_keys, images, slot_group,
                 slot_class, num_groups, embed_batch):
  """Per (group, class) sums, squared sums and counts of embedded slots.

  ``images`` ``[S, ...]`` are the slots' samples (S a multiple of
  ``embed_batch``), ``slot_group`` ``[S]`` which group (client) each belongs
  to and ``slot_class`` ``[S]`` its class, -1 for padding. Slots are
  augmented with their class's key and embedded ``embed_batch`` at a time in
  a ``scan``: one flat list keeps every embedding batch full, and small
  batches (32-64 samples) stay in cache where XLA:CPU convolutions run
  fastest. Returns ``[G, C, D], [G, C, D] (or a scalar 0 without
  spec.second_moments), [G, C]``.
  """
  C = spec.num_classes
  S = slot_class.shape[0]
  eb = embed_batch
  segment = jnp.where((slot_class >= 0) & (slot_group >= 0),
                      slot_group * C + slot_class, -1)

  def chunk(carry, i):
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * eb, eb)
    xs = augment_per_slot(class_keys, sl(images), sl(slot_class),
                          spec.dsa_strategy)
    emb = embed(params, xs)
    # Per-segment sums as one small matmul; padding (-1) is a zero row.
    onehot = jax.nn.one_hot(sl(segment), num_groups * C, dtype=emb.dtype)
    s, q, n = carry
    s = s + onehot.T @ emb
    q = q + onehot.T @ jnp.square(emb) if spec.second_moments else q
    return (s, q, n + onehot.sum(0)), None

  D = models.feature_dim(spec.model, spec.input_shape)
  init = (jnp.zeros((num_groups * C, D)),
          jnp.zeros((num_groups * C, D) if spec.second_moments else ()),
          jnp.zeros((num_groups * C,)))
  (s, q, n), _ = jax.lax.scan(chunk, init, jnp.arange(S // eb))
  s = s.reshape(num_groups, C, D)
  q = q.reshape(num_groups, C, D) if spec.second_moments else q
  return s, q, n.reshape(num_groups, C)


def class_moments(spec, embed, params, class_keys, sample_key, x, y,
                  class_start, slot_class, slot_rank):
  """One party's per-class sums, squared sums and counts ``[C, D], [C, D], [C]``.

  Draws the samples of every slot (``sample_class_slots``), augments them
  with their class's key and embeds them (``slot_moments``). ``slot_class``
  must be padded to a multiple of the embed batch (``_padded_slots``).
  Squared sums are a scalar 0 unless ``spec.second_moments``.
  """
  idx = sample_class_slots(sample_key, y, class_start, slot_class, slot_rank)
  eb = min(spec.embed_batch, slot_class.shape[0])
  s, q, n = slot_moments(spec, embed, params, class_keys, x[idx],
                         jnp.zeros_like(slot_class), slot_class, 1, eb)
  return s[0], (q[0] if spec.second_moments else q), n[0]


def _block_stats_fn(spec: StatsSpec, mesh, t_chunk: int, embed_batch: int):
  """Jitted ``(root, t0, block arrays) -> per-client stats of t0..t0+t_chunk``."""
  embed = models.embed_fn(spec.model)

  def local(root, t0, x, y, class_start, client_ids, slot_client, slot_class,
            slot_rank):
    cpd = x.shape[0]

    def per_t(t):
      params = dm.network_params(spec.model, root, t, spec.input_shape)
      class_keys = dm.class_aug_keys(root, t, spec.num_classes)
      # Each client's own draw (as ``sample_class_slots``), looked up for
      # the shard's flat slot list.
      sample_keys = jax.vmap(lambda cid: jax.random.fold_in(
          keys_lib.client_key(root, cid), t))(client_ids)
      prio = jax.vmap(_sample_priorities, in_axes=(0, None))(
          sample_keys, y.shape[1])
      order = jax.vmap(lambda u, yy: jnp.lexsort((u, yy)))(prio, y)
      g = jnp.maximum(slot_client, 0)
      c = jnp.maximum(slot_class, 0)
      idx = order[g, class_start[g, c] + slot_rank]
      return slot_moments(spec, embed, params, class_keys, x[g, idx],
                          slot_client, slot_class, cpd, embed_batch)

    s, q, n = jax.lax.map(per_t, t0 + jnp.arange(t_chunk))
    # [T, G, ...] -> [G, T, ...]; means are what the protocol carries.
    safe = jnp.maximum(n, 1.0)[..., None]
    means = jnp.moveaxis(s / safe, 0, 1)
    sq = jnp.moveaxis(q / safe, 0, 1) if spec.second_moments else q
    return means, sq, jnp.moveaxis(n, 0, 1).astype(jnp.int32)

  clients = P(parallel.CLIENT_AXIS)
  sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P()) + (clients,) * 7,
      out_specs=(clients, clients if spec.second_moments else P(), clients),
      # Clients never communicate; skip tracking which values vary per device.
      check_vma=False)
  return jax.jit(sharded)


def _pad_block(blk: ClientBlock, spec, n, L, num_shards) -> ClientBlock:
  """``blk`` with its sample axis padded to ``n`` and slot lists to ``L``."""
  G, C = blk.x.shape[0], spec.num_classes
  x = np.zeros((G, n) + blk.x.shape[2:], np.float32)
  x[:, :blk.x.shape[1]] = blk.x
  y = np.full((G, n), C, np.int32)
  y[:, :blk.y.shape[1]] = blk.y

  def slots(a, fill):
    a = a.reshape(num_shards, -1)
    out = np.full((num_shards, L), fill, np.int32)
    out[:, :a.shape[1]] = a
    return out.reshape(-1)

  return blk._replace(x=x, y=y, slot_client=slots(blk.slot_client, -1),
                      slot_class=slots(blk.slot_class, -1),
                      slot_rank=slots(blk.slot_rank, 0))


def _common_layout(blocks, spec, clients_per_shard, num_shards):
  """Pads every process's blocks to one agreed count and shapes.

  A block is one collective call over all processes' devices, so each
  process must make the same number of calls with equally shaped local
  parts; a process with fewer blocks adds empty ones (padding clients only).
  Single-process: returns ``blocks`` unchanged.
  """
  if jax.process_count() == 1:
    return blocks
  (num_blocks,) = parallel.max_over_processes([len(blocks)])
  shape_of = lambda b: [b.x.shape[1], b.slot_class.size // num_shards]
  agreed = parallel.max_over_processes(
      [v for b in blocks for v in shape_of(b)]
      + [0, 0] * (num_blocks - len(blocks)))
  G, C = num_shards * clients_per_shard, spec.num_classes
  while len(blocks) < num_blocks:
    blocks.append(ClientBlock(
        np.zeros((G, 1) + tuple(spec.input_shape), np.float32),
        np.full((G, 1), C, np.int32), np.zeros((G, C), np.int32),
        np.full((G,), -1, np.int32), *(np.full((0,), -1, np.int32),) * 3,
        (-1,) * G))
  return [_pad_block(b, spec, int(agreed[2 * i]), int(agreed[2 * i + 1]),
                     num_shards) for i, b in enumerate(blocks)]


def _local_rows(array):
  """This process's rows of a client-sharded array, in mesh order."""
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
  return np.concatenate([np.asarray(s.data) for s in shards])


def iter_client_stats(root, client_x, client_y, client_ids, spec: StatsSpec,
                      num_iterations: int, *, t_chunk: int = 8, mesh=None,
                      clients_per_device: Optional[int] = None
                      ) -> Iterator[Tuple[int, ClientStats]]:
  """Streams the statistics of many clients, ``t_chunk`` iterations at a time.

  In a multi-process run every process calls this with its own clients (and
  the same other arguments); the client axis spans the devices of all
  processes, and each process gets back the statistics of its clients.

  Args:
    root: the shared root PRNG key.
    client_x, client_y: per-client samples (NHWC or [N, F]) and labels.
    client_ids: each client's global id (its private randomness is folded
      from it, so results do not depend on which clients run together).
    spec: what to compute.
    num_iterations: T, the number of server iterations / random networks.
    t_chunk: iterations computed per device call; memory is independent of T.
    mesh: a mesh with a ``clients`` axis (default: all devices).
    clients_per_device: clients whose slots each device embeds per call;
      default spreads this process's clients evenly over its devices (at
      most 16 per device), so there are few blocks and hence few
      compilations.

  Yields:
    ``(t0, ClientStats)`` for iterations ``t0 .. t0 + len - 1``, clients in
    the order given.
  """
  if num_iterations < 1:
    raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
  mesh = mesh if mesh is not None else parallel.client_mesh()
  local_devices = parallel.local_device_count(mesh)
  if clients_per_device is None:
    clients_per_device = min(16, max(1, -(-len(client_x) // local_devices)))
  slots = [int(spec.slots_per_class(np.bincount(np.asarray(y, np.int64),
                                                minlength=spec.num_classes)
                                    ).sum()) for y in client_y]
  # Every process must lay out blocks alike (same clients per device, embed
  # batch, number of blocks and padded shapes): agree on the largest.
  clients_per_device, eb = parallel.max_over_processes(
      [clients_per_device,
       default_embed_batch(spec, slots, clients_per_device)])
  blocks = make_blocks(client_x, client_y, client_ids, spec,
                       clients_per_device, local_devices, embed_batch=eb)
  blocks = _common_layout(blocks, spec, clients_per_device, local_devices)
  t_chunk = max(1, min(t_chunk, num_iterations))
  fn = _block_stats_fn(spec, mesh, t_chunk, int(eb))
  K, C = len(client_x), spec.num_classes
  class_counts = np.zeros((K, C), np.int32)
  for k, y in enumerate(client_y):
    class_counts[k] = np.bincount(np.asarray(y, np.int64), minlength=C)
  for t0 in range(0, num_iterations, t_chunk):
    tn = min(t_chunk, num_iterations - t0)
    means = counts = sq = None
    for blk in blocks:
      arrays = parallel.to_global(mesh, blk[:7])
      out = fn(root, jnp.int32(t0), *arrays)
      m, n = _local_rows(out[0]), _local_rows(out[2])
      q = _local_rows(out[1]) if spec.second_moments else None
      if means is None:
        D = m.shape[-1]
        means = np.zeros((K, tn, C, D), np.float32)
        counts = np.zeros((K, tn, C), np.int32)
        sq = np.zeros((K, tn, C, D), np.float32) if spec.second_moments else None
      for g, i in enumerate(blk.members):
        if i < 0:
          continue
        means[i] = m[g, :tn]
        counts[i] = n[g, :tn]
        if sq is not None:
          sq[i] = q[g, :tn]
    yield t0, ClientStats(means, counts, class_counts, sq)


def client_stats(root, client_x, client_y, client_ids, spec, num_iterations,
                 **kwargs) -> ClientStats:
  """All iterations at once: ``iter_client_stats`` concatenated over t."""
  parts = list(iter_client_stats(root, client_x, client_y, client_ids, spec,
                                 num_iterations, **kwargs))
  cat = lambda xs: np.concatenate(xs, axis=1)
  sq = None if parts[0][1].second_moments is None else cat(
      [p.second_moments for _, p in parts])
  return ClientStats(cat([p.means for _, p in parts]),
                     cat([p.counts for _, p in parts]),
                     parts[0][1].class_counts, sq)


# --------------------------------------------------------------------------
# Local distillation (optional): DM on the client's own data. The images it
# produces only initialise the server's synthetic set.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalDMConfig:
  """DM run on one party's data (reference: fixed 400 its, lr 1, batch 256)."""
  ipc: int
  iterations: int = 400
  lr: float = 1.0
  momentum: float = 0.5
  batch_real: int = 256
  dsa_strategy: str = augment.DEFAULT_STRATEGY
  pae: bool = False
  std_weight: float = 0.0
  init: str = "real"  # "real" (mosaic of 4 real images when pae) or "noise"


@functools.lru_cache(maxsize=16)
def _local_dm_fns(model, input_shape, num_classes, cfg: LocalDMConfig):
  embed = models.embed_fn(model)
  optimizer = dm.make_optimizer(cfg.lr, cfg.momentum)
  need_std = cfg.std_weight > 0
  spec = StatsSpec(model=model, input_shape=input_shape,
                   num_classes=num_classes, batch_real=cfg.batch_real,
                   dsa_strategy=cfg.dsa_strategy, second_moments=need_std)

  def targets(it, key, x, y, class_start, slot_class, slot_rank):
    # Everything here is private to the party: its own random network and
    # augmentations, unrelated to the shared psi_t.
    k_it = jax.random.fold_in(key, it)
    params = models.init_params(model, jax.random.fold_in(k_it, 0), input_shape)
    aug_keys = jax.vmap(lambda c: jax.random.fold_in(
        jax.random.fold_in(k_it, 1), c))(jnp.arange(num_classes))
    s, q, n = class_moments(spec, embed, params, aug_keys,
                            jax.random.fold_in(k_it, 2), x, y, class_start,
                            slot_class, slot_rank)
    n = jnp.maximum(n, 1.0)[:, None]
    mean = s / n
    std = (jnp.sqrt(jnp.maximum(q / n - jnp.square(mean), 0.0)) if need_std
           else jnp.zeros_like(mean))
    return params, aug_keys, mean, std

  class_step = dm.make_class_step(optimizer, embed,
                                  dsa_strategy=cfg.dsa_strategy, pae=cfg.pae,
                                  std_weight=cfg.std_weight)
  return optimizer, jax.jit(targets), class_step


def initial_images(key, x, y, num_classes, ipc, init, pae):
  """Per-class starting images ``[C, ipc, ...]`` drawn from ``(x, y)``.

  ``real`` draws ipc distinct real images per class; when the class has
  fewer, the remaining slots start from Gaussian noise. With ``pae`` each
  starting image is a 2x2 mosaic of four real images, as IDM initialises.
  Classes absent from ``y`` start from noise.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y)
  shape = x.shape[1:]
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  out = rng.standard_normal((num_classes, ipc) + shape).astype(np.float32)
  if init == "noise":
    return out
  if init != "real":
    raise ValueError(f"init must be 'real' or 'noise', got {init!r}")
  per = 4 * ipc if pae else ipc
  for c in range(num_classes):
    pool = np.flatnonzero(y == c)
    if pool.size == 0:
      continue
    if pae:  # mosaics of 4: tiles may repeat, whole mosaics rarely do
      pick = rng.choice(pool, per, replace=pool.size < per)
      out[c] = np.asarray(augment.mosaic_init(jnp.asarray(x[pick])))
    else:
      # Distinct images only: a duplicate would get the same gradient as its
      # twin (the augmentation is Siamese) and never separate from it, so
      # slots the pool cannot fill keep their noise start.
      pick = rng.permutation(pool)[:per]
      out[c, :len(pick)] = x[pick]
  return out


def local_distill(key, x, y, num_classes, model, input_shape,
                  cfg: LocalDMConfig, progress=None):
  """Distils ``cfg.ipc`` images per class from one party's data with DM.

  Each iteration draws a fresh random network and fresh augmentations from
  ``key`` (private to the party), embeds a random ``batch_real`` subset of
  every class and takes one SGD step per class. Used for CollabDM's local
  initialisation, the merged-local-DM baseline and central DM.

  Returns:
    ``(images [M, ...], labels [M])`` for the classes present in ``y``.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  counts = np.bincount(y, minlength=num_classes)
  order = np.argsort(y, kind="stable")
  images = initial_images(jax.random.fold_in(key, 0), x[order], y[order],
                          num_classes, cfg.ipc, cfg.init, cfg.pae)
  # Pad to a bucketed length (labels C sort last) so parties of similar
  # size share one compiled step.
  n = _bucket(len(y))
  xs = np.zeros((n,) + x.shape[1:], np.float32)
  xs[:len(y)] = x[order]
  ys = np.full((n,), num_classes, np.int32)
  ys[:len(y)] = y[order]
  class_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  slot_class, slot_rank = _padded_slots(counts,
                                        np.minimum(counts, cfg.batch_real))
  valid = counts > 0
  optimizer, targets, class_step = _local_dm_fns(model, tuple(input_shape),
                                                  num_classes, cfg)
  state = dm.init_state(jnp.asarray(images), optimizer)
  train_key = jax.random.fold_in(key, 1)
  args = tuple(jnp.asarray(a) for a in (xs, ys, class_start, slot_class,
                                        slot_rank))
  valid_dev = jnp.asarray(valid)
  for it in range(cfg.iterations):
    params, aug_keys, mean, std = targets(it, train_key, *args)
    state, loss = dm.match_classes(state, class_step, params, aug_keys, mean,
                                   std, valid_dev)
    if progress is not None:
      progress(it, loss)
  imgs = np.asarray(state.images)[valid]
  labels = np.repeat(np.flatnonzero(valid), cfg.ipc).astype(np.int32)
  return imgs.reshape((-1,) + imgs.shape[2:]), labels
