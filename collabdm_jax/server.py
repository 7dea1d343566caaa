"""What the server does: aggregate client statistics, then synthesise.

For every iteration t the server rebuilds psi_t and the Siamese keys from the
shared root key, turns the clients' statistics into per-class targets
(``losses.aggregate_class_moments``) and takes DM's per-class steps on the
synthetic set (``dm.iteration_step``). Targets can arrive all at once (message
files) or streamed a chunk of iterations at a time (simulation), so server
memory does not have to grow with the number of iterations.
"""

import dataclasses
from typing import Callable, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from collabdm_jax import aggregation
from collabdm_jax import augment
from collabdm_jax import dm
from collabdm_jax import losses
from collabdm_jax import models
from collabdm_jax import parallel


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """Server-side synthesis settings.

  Attributes:
    ipc: synthetic images per class.
    lr, momentum: the image optimiser (reference: SGD lr_img 10, momentum 0.5).
    dsa_strategy: Siamese DSA families; must equal the clients'.
    pae: partition-and-expansion of synthetic images in the loss.
    std_weight: weight of the std-matching term (needs second moments).
    weighting: "count" (exact pooled mean) or "uniform" (authors' choice).
    compute_dtype: "float32" or "bfloat16" for the embedding networks
      (``models.embed_fn``); images, targets and the optimiser stay float32.
  """
  ipc: int
  lr: float = 10.0
  momentum: float = 0.5
  dsa_strategy: str = augment.DEFAULT_STRATEGY
  pae: bool = False
  std_weight: float = 0.0
  weighting: str = "count"
  compute_dtype: str = "float32"

  def __post_init__(self):
    models.check_compute_dtype(self.compute_dtype)


def make_step(model, input_shape, num_classes, cfg: ServerConfig):
  """Returns ``(optimizer, step)`` with ``step(state, root, t, targets)``.

  ``targets`` is a ``losses.ClassMoments`` of one iteration (``[C, D]``).
  ``step`` is a ``dm.IterationStep``: one program rebuilds psi_t and the
  Siamese augmentations of iteration t, a second (state donated: updated in
  place) takes the per-class DM steps (``dm.iteration_step``: the class
  gradients, then the C momentum steps in closed form); it returns
  ``(state, losses [C])``.
  """
  embed = models.embed_fn(model, cfg.compute_dtype)
  optimizer = dm.make_optimizer(cfg.lr, cfg.momentum)
  input_shape = tuple(input_shape)

  def update(state, params, aug_draws, targets):
    return dm.iteration_step(
        optimizer, embed, state, params, aug_draws, targets.mean,
        targets.std, targets.valid, dsa_strategy=cfg.dsa_strategy,
        pae=cfg.pae, std_weight=cfg.std_weight)

  return optimizer, dm.IterationStep(
      dm.iteration_inputs_fn(model, input_shape, num_classes,
                             cfg.dsa_strategy),
      jax.jit(update, donate_argnums=0))


def initial_synthetic_set(key, init, num_classes, ipc, input_shape,
                          pool_x=None, pool_y=None, pae=False):
  """Starting images ``[C, ipc, ...]`` of the server's synthetic set.

  Args:
    key: server-private key.
    init: "noise" (standard Gaussian in normalised space), "real" (ipc real
      images per class from ``pool``; 2x2 mosaics of four when ``pae``, as
      IDM does) or "local" (ipc images per class drawn from the pool of the
      clients' locally distilled images, as the reference server does).
    pool_x, pool_y: images and labels to draw from ("real"/"local").

  Classes missing from the pool start from noise, and so do the slots a
  class's pool is too small to fill with distinct images.
  """
  if init not in ("noise", "real", "local"):
    raise ValueError(f"init must be 'noise', 'real' or 'local', got {init!r}")
  if init != "noise" and (pool_x is None or len(pool_x) == 0):
    raise ValueError(f"init={init!r} needs a non-empty pool of images")
  if init == "noise":
    return dm.initial_images(key, np.zeros((0,) + tuple(input_shape)),
                             np.zeros((0,), np.int32), num_classes, ipc,
                             "noise", False)
  return dm.initial_images(key, pool_x, pool_y, num_classes, ipc, "real",
                           pae and init == "real")


def aggregate_messages(messages, weighting="count", with_std=False,
                       aggregator: Optional[aggregation.AggregatorConfig] = None,
                       shape: Optional[Tuple[int, int, int]] = None
                       ) -> losses.ClassMoments:
  """Server targets from decoded messages, over all processes' messages.

  In a multi-process run each process passes the messages of its own
  clients. With the mean aggregator their weighted sums are added up across
  processes, so no one gathers the per-client statistics; a robust
  aggregator needs every client's statistics, so those are gathered (all
  processes' messages, in process order) and each process aggregates them.
  A process may have no message (all its clients missing or rejected) when
  ``shape`` = (T, C, D) says what the others' look like.
  """
  means, counts, class_counts, sq = messages_to_stats(messages, shape,
                                                      with_std)
  sq = sq if with_std else None
  if aggregator is not None and aggregator.name != "mean":
    if jax.process_count() > 1:
      means, counts, class_counts = (parallel.concat_over_processes(a) for a in
                                     (means, counts, class_counts))
      sq = None if sq is None else parallel.concat_over_processes(sq)
    return aggregation.robust_class_moments(means, counts, class_counts, sq,
                                            weighting, aggregator)
  sums = losses.class_moment_sums(means, counts, class_counts, sq, weighting)
  if jax.process_count() > 1:
    sums = jax.tree.map(parallel.sum_over_processes, sums)  # None stays None
  return losses.moments_from_sums(sums)


def messages_to_stats(messages, shape=None, with_second_moments=False):
  """Stacks decoded ``protocol.ClientMessage``s into arrays ``[K, ...]``.

  No message and a ``shape`` (T, C, D): empty ``[0, ...]`` arrays (second
  moments too when ``with_second_moments``).
  """
  if not messages and shape is not None:
    T, C, D = shape
    return (np.zeros((0, T, C, D), np.float32), np.zeros((0, T, C), np.int32),
            np.zeros((0, C), np.int32),
            np.zeros((0, T, C, D), np.float32) if with_second_moments else None)
  means = np.stack([m.means for m in messages])
  counts = np.stack([m.counts for m in messages])
  class_counts = np.stack([m.class_counts for m in messages])
  sq = None
  if all(m.second_moments is not None for m in messages):
    sq = np.stack([m.second_moments for m in messages])
  return means, counts, class_counts, sq


def synthesize(root, target_chunks: Iterable[Tuple[int, losses.ClassMoments]],
               model, input_shape, num_classes, cfg: ServerConfig,
               init_images, state=None, on_iteration: Optional[Callable] = None):
  """Runs the server iterations over streamed targets.

  Args:
    root: shared root key.
    target_chunks: yields ``(t0, ClassMoments with [Tc, C, ...] arrays)`` in
      increasing t.
    init_images: ``[C, ipc, ...]`` starting synthetic set (ignored when a
      ``state`` is given, e.g. from a checkpoint).
    on_iteration: called as ``on_iteration(t, state, losses)`` after each
      iteration (logging, checkpoints).

  Returns:
    The final ``dm.SynthesisState``.
  """
  optimizer, step = make_step(model, tuple(input_shape), num_classes, cfg)
  if state is None:
    # A copy: the steps donate the state, which must not free the caller's array.
    state = dm.init_state(jnp.array(init_images, jnp.float32), optimizer)
  for t0, chunk in target_chunks:
    n = chunk.mean.shape[0]
    inputs = step.inputs(root, jnp.int32(t0))
    for i in range(n):
      t = t0 + i
      targets = jax.tree.map(lambda a: jnp.asarray(a[i]), chunk)
      state, class_losses = step.update(state, *inputs, targets)
      if i + 1 < n:
        # Iteration t + 1's network and augmentations are queued before
        # on_iteration waits for t's losses, so they are computed while the
        # host handles them.
        inputs = step.inputs(root, jnp.int32(t + 1))
      if on_iteration is not None:
        on_iteration(t, state, class_losses)
  return state


def synthetic_dataset(images):
  """Flattens ``[C, ipc, ...]`` into ``(images [C*ipc, ...], labels)``."""
  images = np.asarray(images)
  C, ipc = images.shape[:2]
  return (images.reshape((C * ipc,) + images.shape[2:]),
          np.repeat(np.arange(C, dtype=np.int32), ipc))
