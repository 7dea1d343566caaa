"""What a client computes: embedding statistics under the shared random nets.

For every server iteration t and class c, client k embeds its real samples of
class c, augmented with the Siamese key of (t, c), under the random network
psi_t, and keeps their mean (and mean square when a std target is wanted).
This is the whole upload of CollabDM; the optional local distillation below
only provides a better starting point for the server's synthetic set.

Layout (FedJAX's padded client blocks, refined): clients are packed into
equally shaped blocks (``BlockLayout``, ``make_blocks``), split over the
devices of a ``clients`` mesh axis with ``shard_map``. On each device, the
samples of its clients lie one after another and the samples to embed
("slots") form one flat list, scanned ``embed_batch`` at a time and summed
per (client, class); so embedding batches are full whatever the clients'
sizes, padding is at most the tail of a shard, and one program compiles for
the whole pass. Each client's result depends only on its own data, its id
and the root key, so it is the same alone in its own process, in a block, or
on any number of devices (up to float summation order).

Memory stays bounded: the iterations are processed ``t_chunk`` at a time
(``lax.map``, one network alive at a time), samples are embedded
``embed_batch`` at a time, and the padded blocks hold about the clients'
own data (no per-client padding).
"""

import dataclasses
import functools
import math
from typing import (Callable, Iterator, List, NamedTuple, Optional, Sequence,
                    Tuple)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from collabdm_jax import augment
from collabdm_jax import dm
from collabdm_jax import keys as keys_lib
from collabdm_jax import losses
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
    compute_dtype: "float32" or "bfloat16" (mixed precision, see
      ``models.embed_fn``); statistics are float32 either way.
  """
  model: object
  input_shape: Tuple[int, ...]
  num_classes: int
  batch_real: Optional[int] = None
  dsa_strategy: str = augment.DEFAULT_STRATEGY
  second_moments: bool = False
  embed_batch: int = 64
  compute_dtype: str = "float32"

  def __post_init__(self):
    models.check_compute_dtype(self.compute_dtype)

  def slots_per_class(self, class_counts):
    """How many samples client statistics use per class, ``[C]``."""
    class_counts = np.asarray(class_counts)
    if self.batch_real is None:
      return class_counts
    return np.minimum(class_counts, self.batch_real)

  def slots_of(self, labels) -> int:
    """Samples a client with these labels embeds per iteration."""
    counts = np.bincount(np.asarray(labels, np.int64).reshape(-1),
                         minlength=self.num_classes)
    return int(self.slots_per_class(counts).sum())


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
  """Clients laid out for one call of the client pass (``S`` shards).

  Every block of a pass has the same shapes (one compilation), given by a
  ``BlockLayout``: each shard (device) holds up to ``G`` clients, ``N``
  samples and ``L`` slots.

  Per sample (``[S * N, ...]``): x, the shard's clients' samples stored one
  client after another, each client's sorted by class; y their labels (C on
  padding); sample_client the owning client's index within the shard (G on
  padding, so padding sorts last).
  Per client (``[S * G, ...]``): client_offset, where its samples start in
  the shard; class_start, offset of each class within the client's samples;
  client_ids, global ids (-1 for padding).
  Per slot (``[S * L]``): every sample one shard embeds for one iteration,
  all its clients' slots in one flat list so that embedding batches are
  full whatever the clients' sizes: slot_client (the client's index within
  its shard, -1 on padding), slot_class, and slot_rank (which rank in that
  class's random order the slot takes).
  members: indices into the caller's client list, in block order (-1 for
  padding clients).
  """
  x: np.ndarray
  y: np.ndarray
  sample_client: np.ndarray
  client_offset: np.ndarray
  class_start: np.ndarray
  client_ids: np.ndarray
  slot_client: np.ndarray
  slot_class: np.ndarray
  slot_rank: np.ndarray
  members: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Shapes shared by every block of a pass (hence a single compilation).

  Attributes:
    num_shards: S, devices of this process on the ``clients`` mesh axis.
    clients_per_shard: G, most clients one shard embeds per call.
    samples_per_shard: N, room for their samples.
    slots_per_shard: L, slots (samples embedded) per shard and iteration, a
      multiple of ``embed_batch``.
    embed_batch: samples embedded at once.
  """
  num_shards: int
  clients_per_shard: int
  samples_per_shard: int
  slots_per_shard: int
  embed_batch: int


def _round_up(n, multiple):
  return max(multiple, int(math.ceil(n / multiple)) * multiple)


def _bucket(n):
  """Rounds a length up to 2^k or 1.5*2^k, so few distinct shapes compile."""
  if n <= 8:
    return 8
  p = 1 << (int(n - 1).bit_length() - 1)
  return p + p // 2 if n <= p + p // 2 else 2 * p


def class_slots(class_counts, per_class):
  """Slot layout: ``per_class[c]`` consecutive slots for each class c.

  Returns ``(slot_class, slot_rank)``, both ``[sum(per_class)]`` int32.
  """
  per_class = np.asarray(per_class, np.int64)
  slot_class = np.repeat(np.arange(len(per_class)), per_class)
  starts = np.concatenate([[0], np.cumsum(per_class)[:-1]])
  slot_rank = np.arange(slot_class.size) - np.repeat(starts, per_class)
  return slot_class.astype(np.int32), slot_rank.astype(np.int32)


# Most slots one shard embeds per call: a call then takes a few seconds on a
# CPU core, and much longer lists would only delay the first progress report.
MAX_SLOTS_PER_SHARD = 4096


def plan_layout(spec: StatsSpec, sample_counts: Sequence[int],
                slot_counts: Sequence[int], num_shards: int = 1,
                clients_per_shard: Optional[int] = None) -> BlockLayout:
  """Block shapes for clients of the given sizes (see ``BlockLayout``).

  Plans how many shard-calls the clients need (enough for the clients per
  shard, and for at most ``MAX_SLOTS_PER_SHARD`` slots each, a multiple of
  ``num_shards``), then gives each shard room for its share of the slots
  and samples plus the least slack (from ``_SLACKS``) with which the
  clients pack into that many shards, and at least the largest client; a
  few larger shard counts are tried too and the layout embedding the
  fewest padded slots wins.
  Padding is thus a small fraction of the data, whatever the spread of
  client sizes.

  Args:
    spec: what the clients compute (its ``embed_batch`` caps the batch).
    sample_counts, slot_counts: per-client samples held and embedded.
    num_shards: devices of this process.
    clients_per_shard: most clients per shard and call (default 32).
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  if clients_per_shard is not None and clients_per_shard < 1:
    raise ValueError(
        f"clients_per_shard must be >= 1, got {clients_per_shard}")
  sample_counts = np.asarray(sample_counts, np.int64).reshape(-1)
  slot_counts = np.asarray(slot_counts, np.int64).reshape(-1)
  G = int(clients_per_shard or 32)
  total_slots = max(int(slot_counts.sum()), 1)
  total_samples = max(int(sample_counts.sum()), 1)
  shards = max(num_shards, -(-len(slot_counts) // G),
               -(-total_slots // MAX_SLOTS_PER_SHARD))
  base = _round_up(shards, num_shards)

  def layout_for(shards, slack):
    L = max(int(slot_counts.max(initial=1)),
            int(math.ceil(slack * total_slots / shards)))
    N = max(int(sample_counts.max(initial=1)),
            int(math.ceil(slack * total_samples / shards)))
    eb = _even_batch(L, spec.embed_batch)
    return BlockLayout(num_shards, G, _round_up(N, 8), _round_up(L, eb), eb)

  # A few shard counts, each with the least slack that packs: keep the one
  # that embeds the fewest padded slots (then holds the fewest samples).
  # More shards can win when a few large clients would otherwise each need
  # a shard's worth of room.
  best = None
  for shards in sorted({_round_up(int(base * f), num_shards)
                        for f in (1.0, 1.25, 1.5, 2.0)}):
    for slack in _SLACKS:
      layout = layout_for(shards, slack)
      used = len(pack_shards(sample_counts, slot_counts, layout))
      if used <= shards:
        cost = (shards * layout.slots_per_shard,
                shards * layout.samples_per_shard)
        if best is None or cost < best[0]:
          best = (cost, layout)
        break
  return best[1] if best is not None else layout


def _even_batch(slots, cap):
  """Embed batch for ``slots`` slots: equal batches of at most ``cap``.

  The fewest batches that fit, each as long as needed rounded up to 8, so a
  list is padded by at most 7 slots per batch (a batch of exactly ``cap``
  could pad 3,200 slots to 4,096).
  """
  batches = -(-max(slots, 1) // cap)
  return min(cap, _round_up(-(-max(slots, 1) // batches), 8))


# Room per shard over an even share of the slots and samples, tried in turn
# until the clients pack into the planned number of shards: every extra
# percent is padding that is embedded and thrown away.
_SLACKS = (1.0, 1.03, 1.06, 1.1, 1.15, 1.25, 1.5, 2.0)


def _padded_slots(class_counts, per_class, embed_batch=64, min_slots=0):
  """``class_slots`` padded (class -1) to a whole number of embed batches.

  ``min_slots`` pads further, as if there were that many slots, so that
  parties with different class counts share one shape.
  """
  sc, sr = class_slots(class_counts, per_class)
  size = max(sc.size, min_slots, 1)
  eb = min(embed_batch, _bucket(size))
  n = _round_up(size, eb)
  pad = n - sc.size
  return (np.concatenate([sc, np.full(pad, -1, np.int32)]),
          np.concatenate([sr, np.zeros(pad, np.int32)]))


def pack_shards(sample_counts, slot_counts, layout: BlockLayout):
  """Packs clients into shards of ``layout``: first-fit decreasing.

  A shard holds at most ``layout.clients_per_shard`` clients,
  ``layout.samples_per_shard`` samples and ``layout.slots_per_shard`` slots;
  clients go in order of decreasing slots (then samples, then index).
  ``make_blocks`` places shards on devices in this order.

  Returns:
    lists of client indices (positions in ``sample_counts``), one per shard.
  """
  shards, room = [], []
  order = sorted(range(len(slot_counts)),
                 key=lambda i: (-slot_counts[i], -sample_counts[i], i))
  for i in order:
    need = (1, sample_counts[i], slot_counts[i])
    for d, r in enumerate(room):
      if all(n <= left for n, left in zip(need, r)):
        shards[d].append(i)
        room[d] = tuple(left - n for n, left in zip(need, r))
        break
    else:
      shards.append([i])
      room.append((layout.clients_per_shard - 1,
                   layout.samples_per_shard - sample_counts[i],
                   layout.slots_per_shard - slot_counts[i]))
  return [sorted(members) for members in shards]


def make_blocks(client_x: Sequence[np.ndarray], client_y: Sequence[np.ndarray],
                client_ids: Sequence[int], spec: StatsSpec,
                layout: BlockLayout,
                num_blocks: Optional[int] = None) -> List[ClientBlock]:
  """Packs clients into equally shaped blocks of ``layout.num_shards`` shards.

  Clients are packed into shards first-fit decreasing (by slots), within the
  layout's room for clients, samples and slots; consecutive groups of
  ``num_shards`` shards form a block. ``num_blocks`` pads with empty blocks
  (a multi-process pass makes the same number of calls everywhere).
  """
  if not (len(client_x) == len(client_y) == len(client_ids)):
    raise ValueError("client_x, client_y and client_ids must have equal length")
  C, S = spec.num_classes, layout.num_shards
  G, N, L = (layout.clients_per_shard, layout.samples_per_shard,
             layout.slots_per_shard)
  prepared = []
  for x, y in zip(client_x, client_y):
    y = np.asarray(y, np.int32)
    if y.size and (y.min() < 0 or y.max() >= C):
      raise ValueError(f"labels must lie in [0, {C}), got [{y.min()}, {y.max()}]")
    counts = np.bincount(y, minlength=C)
    sc, sr = class_slots(counts, spec.slots_per_class(counts))
    prepared.append((x, y, counts, sc, sr))
  samples = [p[1].size for p in prepared]
  slots = [p[3].size for p in prepared]
  for i in range(len(prepared)):
    if samples[i] > N or slots[i] > L:
      raise ValueError(
          f"client {client_ids[i]} has {samples[i]} samples and {slots[i]} "
          f"slots, more than the layout's {N} and {L} per shard")
  shards = pack_shards(samples, slots, layout)
  shards += [[]] * (-len(shards) % S)
  if num_blocks is not None:
    if num_blocks * S < len(shards):
      raise ValueError(f"num_blocks={num_blocks} is fewer than the "
                       f"{len(shards) // S} blocks these clients need")
    shards += [[]] * (num_blocks * S - len(shards))
  blocks = []
  for b in range(0, len(shards), S):
    x = np.zeros((S, N) + tuple(spec.input_shape), np.float32)
    y = np.full((S, N), C, np.int32)
    sample_client = np.full((S, N), G, np.int32)
    offset = np.zeros((S, G), np.int32)
    cs = np.zeros((S, G, C), np.int32)
    ids = np.full((S, G), -1, np.int32)
    slot_client = np.full((S, L), -1, np.int32)
    slot_class = np.full((S, L), -1, np.int32)
    slot_rank = np.zeros((S, L), np.int32)
    members = np.full((S, G), -1, np.int64)
    for d, shard in enumerate(shards[b:b + S]):
      at_sample = at_slot = 0
      for g, i in enumerate(shard):
        xi, yi, counts, sc, sr = prepared[i]
        order = np.argsort(yi, kind="stable")
        n = yi.size
        x[d, at_sample:at_sample + n] = np.asarray(xi, np.float32)[order]
        y[d, at_sample:at_sample + n] = yi[order]
        sample_client[d, at_sample:at_sample + n] = g
        offset[d, g] = at_sample
        cs[d, g] = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ids[d, g] = client_ids[i]
        members[d, g] = i
        slot_client[d, at_slot:at_slot + sc.size] = g
        slot_class[d, at_slot:at_slot + sc.size] = sc
        slot_rank[d, at_slot:at_slot + sc.size] = sr
        at_sample += n
        at_slot += sc.size
    flat = lambda a: a.reshape((S * a.shape[1],) + a.shape[2:])
    blocks.append(ClientBlock(
        flat(x), flat(y), flat(sample_client), flat(offset), flat(cs),
        flat(ids), flat(slot_client), flat(slot_class), flat(slot_rank),
        tuple(int(m) for m in members.reshape(-1))))
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


def augment_per_slot(class_draws, images, slot_class, dsa_strategy):
  """Applies to every sample the Siamese DSA transform of its class.

  ``class_draws`` are the classes' Siamese augmentations
  (``dm.class_aug_draws``, ``[C, ...]``); a sample of class c gets exactly
  the transform the synthetic images of class c get. They are drawn once
  per class (not once per sample) and gathered for each sample.
  """
  if not dsa_strategy or dsa_strategy == "none":
    return images
  slot_draws = jax.tree.map(lambda a: a[jnp.maximum(slot_class, 0)],
                            class_draws)
  one = lambda d, im: augment.apply_siamese(d, im[None], dsa_strategy)[0]
  return jax.vmap(one)(slot_draws, images)


def slot_moments(spec, embed, params, class_draws, images, slot_group,
                 slot_class, num_groups, embed_batch):
  """Per (group, class) sums, squared sums and counts of embedded slots.

  ``images`` ``[S, ...]`` are the slots' samples (S a multiple of
  ``embed_batch``), ``slot_group`` ``[S]`` which group (client) each belongs
  to and ``slot_class`` ``[S]`` its class, -1 for padding. Slots are
  augmented with their class's draws and embedded ``embed_batch`` at a time in
  a loop: one flat list keeps every embedding batch full, and small
  batches (32-64 samples) stay in cache where XLA:CPU convolutions run
  fastest. The loop stops after the last batch holding a real slot, so
  padding at the end of the list (a shard's tail, or a party padded to
  share a compiled shape with larger ones) costs nothing. Returns
  ``[G, C, D], [G, C, D] (or a scalar 0 without spec.second_moments),
  [G, C]``.
  """
  C = spec.num_classes
  S = slot_class.shape[0]
  eb = embed_batch
  segment = jnp.where((slot_class >= 0) & (slot_group >= 0),
                      slot_group * C + slot_class, -1)

  def chunk(i, carry):
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * eb, eb)
    xs = augment_per_slot(class_draws, sl(images), sl(slot_class),
                          spec.dsa_strategy)
    emb = embed(params, xs)
    # Per-segment sums as one small matmul; padding (-1) is a zero row.
    onehot = jax.nn.one_hot(sl(segment), num_groups * C, dtype=emb.dtype)
    s, q, n = carry
    s = s + onehot.T @ emb
    q = q + onehot.T @ jnp.square(emb) if spec.second_moments else q
    return s, q, n + onehot.sum(0)

  D = models.feature_dim(spec.model, spec.input_shape)
  init = (jnp.zeros((num_groups * C, D)),
          jnp.zeros((num_groups * C, D) if spec.second_moments else ()),
          jnp.zeros((num_groups * C,)))
  # Batches up to the last real slot (a dynamic trip count: a while loop).
  used = jnp.max(jnp.where(segment >= 0, jnp.arange(S) + 1, 0))
  s, q, n = jax.lax.fori_loop(0, (used + eb - 1) // eb, chunk, init)
  s = s.reshape(num_groups, C, D)
  q = q.reshape(num_groups, C, D) if spec.second_moments else q
  return s, q, n.reshape(num_groups, C)


def class_moments(spec, embed, params, class_draws, sample_key, x, y,
                  class_start, slot_class, slot_rank):
  """One party's per-class sums, squared sums and counts ``[C, D], [C, D], [C]``.

  Draws the samples of every slot (``sample_class_slots``), augments them
  with their class's draws and embeds them (``slot_moments``). ``slot_class``
  must be padded to a multiple of the embed batch (``_padded_slots``).
  Squared sums are a scalar 0 unless ``spec.second_moments``.
  """
  idx = sample_class_slots(sample_key, y, class_start, slot_class, slot_rank)
  eb = min(spec.embed_batch, slot_class.shape[0])
  s, q, n = slot_moments(spec, embed, params, class_draws, x[idx],
                         jnp.zeros_like(slot_class), slot_class, 1, eb)
  return s[0], (q[0] if spec.second_moments else q), n[0]


def block_priorities(root, t, sample_client, client_offset, client_ids):
  """Every sample's priority at iteration ``t`` in one shard of a block.

  Each client's own draw, exactly as ``sample_class_slots`` makes it on the
  client's samples alone: a priority per sample from the client's key for
  ``t`` and the sample's index within the client.
  """
  G = client_ids.shape[0]
  owner = jnp.minimum(sample_client, G - 1)
  local_index = jnp.arange(sample_client.shape[0]) - client_offset[owner]
  sample_keys = jax.vmap(lambda cid: jax.random.fold_in(
      keys_lib.client_key(root, cid), t))(client_ids)
  return jax.vmap(lambda k, i: jax.random.uniform(jax.random.fold_in(k, i)))(
      sample_keys[owner], local_index)


def block_slot_indices(prio, y, sample_client, client_offset, class_start,
                       slot_client, slot_class, slot_rank):
  """Which sample fills each slot: order by (client, class, priority)."""
  order = jnp.lexsort((prio, y, sample_client))
  g = jnp.maximum(slot_client, 0)
  c = jnp.maximum(slot_class, 0)
  return order[client_offset[g] + class_start[g, c] + slot_rank]


@dataclasses.dataclass(frozen=True)
class BlockStatsFn:
  """``(root, t0, block arrays) -> per-client stats of t0..t0+t_chunk``.

  ``inputs`` is the process's shared ``dm.iteration_inputs_fn`` (psi_t and
  the classes' Siamese augmentations of one t, the very program local DM
  and the server run, so it compiles once per process); ``program`` is the
  jitted, client-sharded ``(root, t0, params [Tc, ...], draws [Tc, ...],
  block arrays)``.
  """
  inputs: Callable
  program: Callable
  t_chunk: int

  def __call__(self, root, t0: int, *arrays):
    t0 = int(t0)  # a Python int: no wait on a device value
    per_t = [self.inputs(root, jnp.int32(t0 + i)) for i in range(self.t_chunk)]
    # Host arrays: replicated inputs of the sharded program on any mesh,
    # multi-process included.
    params, draws = jax.tree.map(
        lambda *a: np.stack([np.asarray(v) for v in a]), *per_t)
    return self.program(root, jnp.int32(t0), params, draws, *arrays)


def block_stats_fn(spec: StatsSpec, mesh, t_chunk: int,
                   embed_batch: int) -> BlockStatsFn:
  """The client pass's compute, one block of clients at a time.

  ``iter_client_stats`` calls it once per block of clients
  (``make_blocks``, sharded over ``mesh``) and chunk of ``t_chunk``
  iterations; benchmarks call it alone to time the pass. The block arrays
  are the fields of a ``ClientBlock`` but ``members``.
  """
  embed = models.embed_fn(spec.model, spec.compute_dtype)

  def local(root, t0, params_t, draws_t, x, y, sample_client, client_offset,
            class_start, client_ids, slot_client, slot_class, slot_rank):
    def per_t(args):
      t, params, class_draws = args
      prio = block_priorities(root, t, sample_client, client_offset,
                              client_ids)
      idx = block_slot_indices(prio, y, sample_client, client_offset,
                               class_start, slot_client, slot_class,
                               slot_rank)
      return slot_moments(spec, embed, params, class_draws, x[idx],
                          slot_client, slot_class, client_ids.shape[0],
                          embed_batch)

    s, q, n = jax.lax.map(per_t, (t0 + jnp.arange(t_chunk), params_t,
                                  draws_t))
    # [T, G, ...] -> [G, T, ...]; means are what the protocol carries.
    safe = jnp.maximum(n, 1.0)[..., None]
    means = jnp.moveaxis(s / safe, 0, 1)
    sq = jnp.moveaxis(q / safe, 0, 1) if spec.second_moments else q
    return means, sq, jnp.moveaxis(n, 0, 1).astype(jnp.int32)

  clients = P(parallel.CLIENT_AXIS)
  sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(P(),) * 4 + (clients,) * 9,
      out_specs=(clients, clients if spec.second_moments else P(), clients),
      # Clients never communicate; skip tracking which values vary per device.
      check_vma=False)
  return BlockStatsFn(
      dm.iteration_inputs_fn(spec.model, tuple(spec.input_shape),
                             spec.num_classes, spec.dsa_strategy),
      jax.jit(sharded), t_chunk)


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
    clients_per_device: most clients one device embeds per call (default
      32); ``plan_layout`` sizes the calls.

  Yields:
    ``(t0, ClientStats)`` for iterations ``t0 .. t0 + len - 1``, clients in
    the order given.
  """
  if num_iterations < 1:
    raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
  mesh = mesh if mesh is not None else parallel.client_mesh()
  local_devices = parallel.local_device_count(mesh)
  samples = [int(np.asarray(y).size) for y in client_y]
  slots = [spec.slots_of(y) for y in client_y]
  layout = plan_layout(spec, samples, slots, local_devices,
                       clients_per_device)
  # Every process must lay out blocks alike (same shapes and number of
  # blocks): agree on the largest.
  agreed = parallel.max_over_processes(
      [layout.clients_per_shard, layout.samples_per_shard,
       layout.slots_per_shard, layout.embed_batch])
  eb = int(agreed[3])
  layout = BlockLayout(local_devices, int(agreed[0]), int(agreed[1]),
                       _round_up(int(agreed[2]), eb), eb)
  blocks = make_blocks(client_x, client_y, client_ids, spec, layout)
  (num_blocks,) = parallel.max_over_processes([len(blocks)])
  # Empty blocks, so that every process makes the same collective calls.
  blocks += make_blocks([], [], [], spec, layout,
                        num_blocks=int(num_blocks) - len(blocks))
  t_chunk = max(1, min(t_chunk, num_iterations))
  fn = block_stats_fn(spec, mesh, t_chunk, layout.embed_batch)
  K, C = len(client_x), spec.num_classes
  class_counts = np.zeros((K, C), np.int32)
  for k, y in enumerate(client_y):
    class_counts[k] = np.bincount(np.asarray(y, np.int64), minlength=C)
  # A pass of one block keeps it on the devices between calls: copying it
  # in again for every chunk of iterations cost a CPU 0.35 s per call for
  # CIFAR-10 in 10 clients, and the copy made for a call is as large as the
  # block kept. With several blocks only the block in use is copied in, so
  # memory stays at one block whatever the number of clients.
  resident = (parallel.to_global(mesh, blocks[0][:9]) if len(blocks) == 1
              else None)
  for t0 in range(0, num_iterations, t_chunk):
    tn = min(t_chunk, num_iterations - t0)
    means = counts = sq = None
    for blk in blocks:
      arrays = resident or parallel.to_global(mesh, blk[:9])
      out = fn(root, t0, *arrays)
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
  # Degrees of freedom of both stds of the std term: 0 population, 1 the
  # authors' torch.std (unbiased variance).
  std_ddof: int = 0
  init: str = "real"  # "real" (mosaic of 4 real images when pae) or "noise"
  compute_dtype: str = "float32"  # or "bfloat16" (models.embed_fn)

  def __post_init__(self):
    models.check_compute_dtype(self.compute_dtype)
    if self.std_ddof not in (0, 1):
      raise ValueError(f"std_ddof must be 0 or 1, got {self.std_ddof!r}")


@functools.lru_cache(maxsize=16)
def _local_dm_step(model, input_shape, num_classes, cfg: LocalDMConfig):
  """Jitted ``(state, it, key, party data, valid) -> (state, losses)``.

  One program per iteration: the party's private network and augmentation
  keys, its real-data targets and the per-class DM steps.
  """
  embed = models.embed_fn(model, cfg.compute_dtype)
  optimizer = dm.make_optimizer(cfg.lr, cfg.momentum)
  need_std = cfg.std_weight > 0
  spec = StatsSpec(model=model, input_shape=input_shape,
                   num_classes=num_classes, batch_real=cfg.batch_real,
                   dsa_strategy=cfg.dsa_strategy, second_moments=need_std)

  def step(state, it, key, x, y, class_start, slot_class, slot_rank, valid):
    # Everything here is private to the party: its own random network and
    # augmentations, unrelated to the shared psi_t.
    k_it = jax.random.fold_in(key, it)
    params = models.init_params(model, jax.random.fold_in(k_it, 0), input_shape)
    aug_keys = jax.vmap(lambda c: jax.random.fold_in(
        jax.random.fold_in(k_it, 1), c))(jnp.arange(num_classes))
    aug_draws = dm.aug_draws_of_keys(aug_keys, cfg.dsa_strategy, input_shape)
    s, q, n = class_moments(spec, embed, params, aug_draws,
                            jax.random.fold_in(k_it, 2), x, y, class_start,
                            slot_class, slot_rank)
    n = jnp.maximum(n, 1.0)[:, None]
    mean = s / n
    std = (losses.std_from_moments(mean, q / n, n, cfg.std_ddof) if need_std
           else jnp.zeros_like(mean))
    return dm.iteration_step(optimizer, embed, state, params, aug_draws, mean,
                             std, valid, dsa_strategy=cfg.dsa_strategy,
                             pae=cfg.pae, std_weight=cfg.std_weight,
                             std_ddof=cfg.std_ddof)

  return optimizer, jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def shared_local_step(model, input_shape, num_classes, cfg: LocalDMConfig,
                      classes_per_piece=None):
  """A ``dm.IterationStep``: ``(states, root, t, means, stds, valid) ->
  (states, losses)``.

  The per-class DM steps of P parties at iteration t. They share psi_t and
  the Siamese augmentations, and a party's class loss involves only its
  own images, so a class's P (party, class) losses are the units of one
  class of one problem (``dm.class_losses_and_grads`` with units): the
  parties' images of a class are augmented together with the class's
  draws and their gradients computed in one network pass,
  ``classes_per_piece`` classes per pass (None: ``dm.default_classes_per_
  piece``, one class of P * ipc images at the reference config). Each
  party's C sequential steps are then applied in closed form
  (``dm.apply_class_steps``), exactly as ``dm.iteration_step`` would per
  party.
  """
  embed = models.embed_fn(model, cfg.compute_dtype)
  optimizer = dm.make_optimizer(cfg.lr, cfg.momentum)

  def update(states, params, aug_draws, means, stds, valid):
    at_step = jax.vmap(lambda st, v: dm.class_step_points(optimizer, st, v))(
        states, valid)
    # Party-major [P, C, ...] <-> class-major [C, P, ...].
    swap = lambda a: jnp.swapaxes(a, 0, 1)
    unit_losses, grads = dm.class_losses_and_grads(
        embed, params, swap(at_step), aug_draws, swap(means), swap(stds),
        dsa_strategy=cfg.dsa_strategy, pae=cfg.pae,
        std_weight=cfg.std_weight, std_ddof=cfg.std_ddof,
        classes_per_piece=classes_per_piece)
    new_states = jax.vmap(
        lambda st, g, v: dm.apply_class_steps(optimizer, st, g, v))(
            states, swap(grads), valid)
    return new_states, jnp.where(valid, swap(unit_losses), 0.0)

  return optimizer, dm.IterationStep(
      dm.iteration_inputs_fn(model, tuple(input_shape), num_classes,
                             cfg.dsa_strategy),
      jax.jit(update, donate_argnums=0))


def shared_local_distill(root, client_x, client_y, client_ids, stats,
                         num_classes, model, input_shape, cfg: LocalDMConfig,
                         progress=None):
  """Local DM of several parties under the shared networks (one real pass).

  Iteration t of party k's local DM uses psi_t and the Siamese keys of
  (t, c), the very network and augmentation of its uploaded statistics, and
  its target for class c is its own uploaded mean ``stats.means[k, t, c]``
  (and the std from its second moments when ``cfg.std_weight > 0``). The
  real images are therefore augmented and embedded once, in the client
  pass, and local DM only pays for its synthetic images. Its real batch is
  the statistics' ``batch_real``; ``cfg.batch_real`` is not used.

  Args:
    root: the shared root key.
    client_x, client_y: the parties' data (initial images only).
    client_ids: their global ids (each party's private key).
    stats: ``ClientStats`` of these parties over T iterations. With
      ``cfg.iterations > T`` local iteration i uses the statistics of
      ``t = i mod T`` (the same networks again).
    cfg: local DM settings.

  Returns:
    Per party ``(images [M, ...], labels [M])`` for the classes it holds,
    as ``local_distill`` returns them.
  """
  num_its = stats.means.shape[1]
  if cfg.std_weight > 0 and stats.second_moments is None:
    raise ValueError("local.std_weight > 0 on the shared networks needs "
                     "stats.second_moments=True (the std target comes from "
                     "the uploaded second moments)")
  inits = []
  for k, x, y in zip(client_ids, client_x, client_y):
    y = np.asarray(y, np.int32)
    order = np.argsort(y, kind="stable")
    key = jax.random.fold_in(keys_lib.local_distill_key(root, k), 0)
    inits.append(dm.initial_images(key, np.asarray(x, np.float32)[order],
                                   y[order], num_classes, cfg.ipc, cfg.init,
                                   cfg.pae))
  optimizer, step = shared_local_step(model, tuple(input_shape), num_classes,
                                      cfg)
  states = jax.vmap(lambda im: dm.init_state(im, optimizer))(
      jnp.asarray(np.stack(inits)))
  inputs = step.inputs(root, jnp.int32(0))
  for it in range(cfg.iterations):
    t = it % num_its
    mean = stats.means[:, t]
    if cfg.std_weight > 0:
      n = np.maximum(stats.counts[:, t], 1)[..., None].astype(np.float32)
      std = np.asarray(losses.std_from_moments(
          mean, stats.second_moments[:, t], n, cfg.std_ddof))
    else:
      std = np.zeros_like(mean)
    states, loss = step.update(states, *inputs, jnp.asarray(mean),
                               jnp.asarray(std),
                               jnp.asarray(stats.counts[:, t] > 0))
    if it + 1 < cfg.iterations:
      # The next iteration's network and augmentations, queued before the
      # progress callback waits for this one's losses (as server.synthesize).
      inputs = step.inputs(root, jnp.int32((it + 1) % num_its))
    if progress is not None:
      progress(it, loss)
  images = np.asarray(states.images)
  out = []
  for k, cc in enumerate(stats.class_counts):
    valid = np.asarray(cc) > 0
    imgs = images[k][valid]
    out.append((imgs.reshape((-1,) + imgs.shape[2:]),
                np.repeat(np.flatnonzero(valid), cfg.ipc).astype(np.int32)))
  return out


def local_padding(client_y, num_classes, cfg: LocalDMConfig):
  """``pad_to`` for ``local_distill`` that gives all these parties one shape.

  Local DM compiles one step per shape of a party's (padded) data, and a
  compilation costs more than a whole local run on a GPU: with ten clients
  of different sizes, the default run's local phase was almost all
  compilation. Padding every party to the largest costs no FLOPs (only the
  ``batch_real`` drawn samples per class are embedded).
  """
  samples = max((len(y) for y in client_y), default=0)
  slots = max((int(np.minimum(np.bincount(np.asarray(y, np.int64),
                                          minlength=num_classes),
                              cfg.batch_real).sum()) for y in client_y),
              default=0)
  return samples, slots


def local_distill(key, x, y, num_classes, model, input_shape,
                  cfg: LocalDMConfig, progress=None, pad_to=(0, 0)):
  """Distils ``cfg.ipc`` images per class from one party's data with DM.

  Each iteration draws a fresh random network and fresh augmentations from
  ``key`` (private to the party), embeds a random ``batch_real`` subset of
  every class and takes one SGD step per class. Used for CollabDM's local
  initialisation, the merged-local-DM baseline and central DM.

  ``pad_to`` (samples, slots), from ``local_padding``, pads the party's data
  so that several parties share one compiled step; the result does not
  depend on it (up to float summation order).

  Returns:
    ``(images [M, ...], labels [M])`` for the classes present in ``y``.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  counts = np.bincount(y, minlength=num_classes)
  order = np.argsort(y, kind="stable")
  images = dm.initial_images(jax.random.fold_in(key, 0), x[order], y[order],
                             num_classes, cfg.ipc, cfg.init, cfg.pae)
  # Pad to a bucketed length (labels C sort last) so parties of similar
  # size share one compiled step.
  n = _bucket(max(len(y), pad_to[0]))
  xs = np.zeros((n,) + x.shape[1:], np.float32)
  xs[:len(y)] = x[order]
  ys = np.full((n,), num_classes, np.int32)
  ys[:len(y)] = y[order]
  class_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  slot_class, slot_rank = _padded_slots(
      counts, np.minimum(counts, cfg.batch_real), min_slots=pad_to[1])
  valid = counts > 0
  optimizer, step = _local_dm_step(model, tuple(input_shape), num_classes,
                                   cfg)
  state = dm.init_state(jnp.asarray(images), optimizer)
  train_key = jax.random.fold_in(key, 1)
  args = tuple(jnp.asarray(a) for a in (xs, ys, class_start, slot_class,
                                        slot_rank))
  valid_dev = jnp.asarray(valid)
  for it in range(cfg.iterations):
    state, loss = step(state, jnp.int32(it), train_key, *args, valid_dev)
    if progress is not None:
      progress(it, loss)
  imgs = np.asarray(state.images)[valid]
  labels = np.repeat(np.flatnonzero(valid), cfg.ipc).astype(np.int32)
  return imgs.reshape((-1,) + imgs.shape[2:]), labels
