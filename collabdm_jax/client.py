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
  embed_batch: int = 256

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
  """``G`` clients padded to common sizes so they can be vmapped.

  x: ``[G, N, ...]`` samples sorted by class; y: ``[G, N]`` labels, padding
  labelled C so it sorts last; class_start: ``[G, C]`` offset of each class
  in the sorted order; slot_class, slot_rank: ``[G, S]`` which class and
  which rank within that class's random order each embedded slot takes
  (class -1 marks padding); client_ids: ``[G]`` (-1 for padding clients);
  members: indices into the caller's client list, in block order.
  """
  x: np.ndarray
  y: np.ndarray
  class_start: np.ndarray
  slot_class: np.ndarray
  slot_rank: np.ndarray
  client_ids: np.ndarray
  members: Tuple[int, ...]


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


def _padded_slots(class_counts, per_class, embed_batch=256):
  """``class_slots`` padded (class -1) to a whole number of embed batches."""
  sc, sr = class_slots(class_counts, per_class)
  eb = min(embed_batch, _bucket(max(sc.size, 1)))
  n = _round_up(max(sc.size, 1), eb)
  pad = n - sc.size
  return (np.concatenate([sc, np.full(pad, -1, np.int32)]),
          np.concatenate([sr, np.zeros(pad, np.int32)]))


def make_blocks(client_x: Sequence[np.ndarray], client_y: Sequence[np.ndarray],
                client_ids: Sequence[int], spec: StatsSpec,
                block_size: int) -> List[ClientBlock]:
  """Packs clients into padded blocks of ``block_size`` (FedJAX-style).

  Clients are sorted by how many samples they embed so that each block pads
  to a similar size; padded lengths are bucketed to limit recompilation.
  ``block_size`` should be a multiple of the device count.
  """
  if not (len(client_x) == len(client_y) == len(client_ids)):
    raise ValueError("client_x, client_y and client_ids must have equal length")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
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
  blocks = []
  for b in range(0, len(order), block_size):
    members = tuple(order[b:b + block_size])
    n_max = _bucket(max(max(prepared[i][0].shape[0] for i in members), 1))
    s_max = max(sizes[i] for i in members)
    eb = min(spec.embed_batch, _bucket(max(s_max, 1)))
    s_max = _round_up(s_max, eb)
    G = block_size
    x = np.zeros((G, n_max) + tuple(spec.input_shape), np.float32)
    y = np.full((G, n_max), C, np.int32)
    cs = np.zeros((G, C), np.int32)
    slot_class = np.full((G, s_max), -1, np.int32)
    slot_rank = np.zeros((G, s_max), np.int32)
    ids = np.full((G,), -1, np.int32)
    for g, i in enumerate(members):
      xi, yi, counts, sc, sr = prepared[i]
      x[g, :len(yi)] = xi
      y[g, :len(yi)] = yi
      cs[g] = np.concatenate([[0], np.cumsum(counts)[:-1]])
      slot_class[g, :sc.size] = sc
      slot_rank[g, :sr.size] = sr
      ids[g] = client_ids[i]
    blocks.append(ClientBlock(x, y, cs, slot_class, slot_rank, ids, members))
  return blocks


def sample_class_slots(key, y, class_start, slot_class, slot_rank):
  """Indices of the samples that fill each slot, drawn without replacement.

  Every sample gets a uniform priority from its own folded key (so the draw
  does not depend on padding), samples are ordered by (class, priority), and
  slot (c, r) takes the r-th sample of class c in that order. Padding slots
  (class -1) point at index 0 and must be masked by the caller.
  """
  n = y.shape[0]
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(
      jnp.arange(n))
  order = jnp.lexsort((u, y))
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


def class_moments(spec, embed, params, class_keys, sample_key, x, y,
                  class_start, slot_class, slot_rank):
  """Per-class sums, squared sums and counts ``[C, D], [C, D], [C]``.

  Draws the samples of every slot (``sample_class_slots``), augments them
  with their class's key and embeds them ``spec.embed_batch`` at a time.
  Squared sums are a scalar 0 unless ``spec.second_moments``.
  """
  idx = sample_class_slots(sample_key, y, class_start, slot_class, slot_rank)
  S = slot_class.shape[0]
  eb = min(spec.embed_batch, S)
  C = spec.num_classes

  def chunk(carry, i):
    sl = jax.lax.dynamic_slice_in_dim
    sc = sl(slot_class, i * eb, eb)
    xs = x[sl(idx, i * eb, eb)]
    xs = augment_per_slot(class_keys, xs, sc, spec.dsa_strategy)
    emb = embed(params, xs)
    onehot = jax.nn.one_hot(sc, C, dtype=emb.dtype)  # padding (-1) -> zeros
    s, q, n = carry
    s = s + onehot.T @ emb
    q = q + onehot.T @ jnp.square(emb) if spec.second_moments else q
    return (s, q, n + onehot.sum(0)), None

  D = models.feature_dim(spec.model, spec.input_shape)
  init = (jnp.zeros((C, D)), jnp.zeros((C, D) if spec.second_moments else ()),
          jnp.zeros((C,)))
  (s, q, n), _ = jax.lax.scan(chunk, init, jnp.arange(S // eb))
  return s, q, n


def _block_stats_fn(spec: StatsSpec, mesh, t_chunk: int):
  """Jitted ``(root, t0, block arrays) -> per-client stats of t0..t0+t_chunk``."""
  embed = models.embed_fn(spec.model)

  def local(root, t0, x, y, class_start, slot_class, slot_rank, client_ids):
    def per_t(t):
      params = dm.network_params(spec.model, root, t, spec.input_shape)
      class_keys = dm.class_aug_keys(root, t, spec.num_classes)

      def per_client(cid, *arrays):
        sample_key = jax.random.fold_in(keys_lib.client_key(root, cid), t)
        return class_moments(spec, embed, params, class_keys, sample_key,
                             *arrays)

      return jax.vmap(per_client)(client_ids, x, y, class_start, slot_class,
                                  slot_rank)

    s, q, n = jax.lax.map(per_t, t0 + jnp.arange(t_chunk))
    # [T, G, ...] -> [G, T, ...]; means are what the protocol carries.
    safe = jnp.maximum(n, 1.0)[..., None]
    means = jnp.moveaxis(s / safe, 0, 1)
    sq = jnp.moveaxis(q / safe, 0, 1) if spec.second_moments else q
    return means, sq, jnp.moveaxis(n, 0, 1).astype(jnp.int32)

  clients = P(parallel.CLIENT_AXIS)
  sharded = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(), P(), clients, clients, clients, clients, clients, clients),
      out_specs=(clients, clients if spec.second_moments else P(), clients),
      # Clients never communicate; skip tracking which values vary per device.
      check_vma=False)
  return jax.jit(sharded)


def iter_client_stats(root, client_x, client_y, client_ids, spec: StatsSpec,
                      num_iterations: int, *, t_chunk: int = 8, mesh=None,
                      clients_per_device: Optional[int] = None
                      ) -> Iterator[Tuple[int, ClientStats]]:
  """Streams the statistics of many clients, ``t_chunk`` iterations at a time.

  Args:
    root: the shared root PRNG key.
    client_x, client_y: per-client samples (NHWC or [N, F]) and labels.
    client_ids: each client's global id (its private randomness is folded
      from it, so results do not depend on which clients run together).
    spec: what to compute.
    num_iterations: T, the number of server iterations / random networks.
    t_chunk: iterations computed per device call; memory is independent of T.
    mesh: a mesh with a ``clients`` axis (default: all local devices).
    clients_per_device: clients vmapped together on each device; default
      spreads all clients evenly over the devices (at most 16 per device),
      so there are few blocks and hence few compilations.

  Yields:
    ``(t0, ClientStats)`` for iterations ``t0 .. t0 + len - 1``, clients in
    the order given.
  """
  if num_iterations < 1:
    raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
  mesh = mesh if mesh is not None else parallel.client_mesh()
  n_dev = mesh.shape[parallel.CLIENT_AXIS]
  if clients_per_device is None:
    clients_per_device = min(16, -(-len(client_x) // n_dev))
  blocks = make_blocks(client_x, client_y, client_ids, spec,
                       n_dev * clients_per_device)
  t_chunk = max(1, min(t_chunk, num_iterations))
  fn = _block_stats_fn(spec, mesh, t_chunk)
  K, C = len(client_x), spec.num_classes
  class_counts = np.stack([np.bincount(np.asarray(y, np.int64), minlength=C)
                           for y in client_y]).astype(np.int32)
  for t0 in range(0, num_iterations, t_chunk):
    tn = min(t_chunk, num_iterations - t0)
    means = counts = sq = None
    for blk in blocks:
      out = fn(root, jnp.int32(t0), blk.x, blk.y, blk.class_start,
               blk.slot_class, blk.slot_rank, blk.client_ids)
      m, q, n = jax.device_get(out)
      if means is None:
        D = m.shape[-1]
        means = np.zeros((K, tn, C, D), np.float32)
        counts = np.zeros((K, tn, C), np.int32)
        sq = np.zeros((K, tn, C, D), np.float32) if spec.second_moments else None
      for g, i in enumerate(blk.members):
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
