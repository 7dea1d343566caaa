"""The distribution-matching synthesis step shared by every distiller.

The CollabDM server, a client's local distillation and the central DM
baseline all learn synthetic images the same way: for each class in turn,
embed the (augmented) synthetic images of that class with the current random
network, compare their mean (and optionally spread) with a real-data target,
and take one optimiser step. They differ only in where the target comes from
(aggregated client statistics, or the real data at hand).

Faithfulness note: the reference code keeps ONE SGD-momentum optimiser over
the whole synthetic tensor and calls ``step()`` once per class, so each class
step also moves every other class by its decayed momentum. Summing the class
losses into one step is a different algorithm. ``iteration_step`` gives the
reference's result: the other classes' steps only add a known momentum drift
to a class's images, so the C class gradients are computed independently
and the C sequential steps are applied in closed form.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from collabdm_jax import augment
from collabdm_jax import keys as keys_lib
from collabdm_jax import losses
from collabdm_jax import models


class SynthesisState(NamedTuple):
  """Synthetic images ``[C, ipc, H, W, Ch]`` (class-major) and optimiser state."""
  images: jax.Array
  opt_state: optax.OptState


class ImageOptimizer(NamedTuple):
  """The reference image optimiser: SGD with heavy-ball momentum, no decay.

  ``iteration_step`` applies its C per-class steps in closed form, so it
  needs the two numbers rather than an opaque optax transformation. The
  state is ``optax.sgd(lr, momentum=momentum)``'s (its ``trace`` is the
  momentum buffer), so checkpoints keep their format.
  """
  lr: float
  momentum: float

  def init(self, images):
    return optax.sgd(self.lr, momentum=self.momentum).init(images)


def make_optimizer(lr, momentum=0.5) -> ImageOptimizer:
  """The reference image optimiser (see ``ImageOptimizer``)."""
  return ImageOptimizer(float(lr), float(momentum))


def init_state(images, optimizer):
  return SynthesisState(images, optimizer.init(images))


def synthetic_views(images, aug_draws, dsa_strategy, pae):
  """One class of synthetic images the way the network sees them.

  PAE first splits every image into its 4 upsampled quadrants; the Siamese
  DSA transform is then applied with ``aug_draws``
  (``augment.siamese_draws`` of this (iteration, class)'s key, the key the
  real side used).
  """
  if pae:
    images = augment.pae_expand(images)
  return augment.apply_siamese(aug_draws, images, dsa_strategy)


def synthetic_embeddings(embed, net_params, images, aug_draws, dsa_strategy,
                         pae):
  """Embeds one class of synthetic images the way the loss sees them."""
  return embed(net_params, synthetic_views(images, aug_draws, dsa_strategy,
                                           pae))


def class_matching_loss(embed, net_params, class_images, aug_draws, mean, std,
                        *, dsa_strategy, pae, std_weight, std_ddof=0):
  """DM's loss of one class: ``||mean - mean_i psi(A(s_i))||^2`` (+ std term).

  ``A`` is the Siamese augmentation ``aug_draws`` parameterise and ``psi``
  the network ``net_params``; see ``losses.matching_loss``. ``std_ddof`` is
  the degrees of freedom of the synthetic side's std in the std term
  (``losses.embedding_std``; 1 is the authors' ``torch.std``).
  """
  emb = synthetic_embeddings(embed, net_params, class_images, aug_draws,
                             dsa_strategy, pae)
  return losses.matching_loss(mean, emb, target_std=std,
                              std_weight=std_weight, std_ddof=std_ddof)


def _momentum_tables(lr, momentum, num_classes, dtype):
  """Tables, indexed by a step count ``j = 0..C``, of the closed form.

  ``power[j] = mu^j``, ``drift[j] = lr * (mu + ... + mu^j)`` and
  ``tail[j] = lr * (1 + mu + ... + mu^(j-1))`` with ``mu = momentum``
  (``drift[0] = tail[0] = 0``). Summed in float64 from the Python numbers,
  so no division by ``1 - mu`` is needed (``mu`` may be 0 or 1).
  """
  power = float(momentum) ** np.arange(num_classes + 1, dtype=np.float64)
  drift = float(lr) * np.concatenate([[0.0], np.cumsum(power[1:])])
  tail = float(lr) * np.concatenate([[0.0], np.cumsum(power[:-1])])
  return tuple(jnp.asarray(a, dtype) for a in (power, drift, tail))


# On CPU the class gradients are computed a few classes at a time, about
# this many synthetic images per piece: XLA:CPU's network passes slow down
# sharply once a batch no longer fits in cache (as for the evaluation's
# micro-batches, ``evaluate.MICRO_BATCH_CPU``). At the reference shapes
# (ConvNet-3 width 128, 28x28x1, ipc 10) all 100 images in one pass took
# 1.6x as long as one class of 10 at a time
# (``experiments/results/dm_step/dm_step.json``, ``all_classes``; measured
# before the first block ran as ``cpu_first_block``'s kernels). A piece of
# more than one class also vmaps the augmentation, which then runs every
# DSA family (see ``_piece_losses_and_grads``).
CPU_IMAGES_PER_PIECE = 10


def default_classes_per_piece(num_classes, images_per_class):
  """Classes whose gradients one network pass computes, on this backend.

  All of them at once on an accelerator; on CPU as many as keep a piece
  near ``CPU_IMAGES_PER_PIECE`` images (at least one class), preferring a
  number that divides ``num_classes``.
  """
  if jax.default_backend() != "cpu":
    return num_classes
  k = max(1, min(num_classes, CPU_IMAGES_PER_PIECE // images_per_class))
  # Rather a piece size that divides the classes, when one is at least half
  # as large: the classes left over would be a second piece program to
  # compile, seconds on this CPU, as long as several iterations of a step.
  for d in range(k, (k + 1) // 2 - 1, -1):
    if num_classes % d == 0:
      return d
  return k


def _piece_losses_and_grads(embed, net_params, images, aug_draws, target_mean,
                            target_std, *, dsa_strategy, pae, std_weight,
                            std_ddof):
  """``class_losses_and_grads`` of a piece of k classes, one network pass.

  ``images`` ``[k, U, n, ...]``: U units of n images per class, each unit
  with its own target (``[k, U, D]``). A class's U * n images are
  augmented together with its draws, then the piece's views go through
  ``embed`` as ONE plain batch (vmapping the network over classes instead
  turned the im2col convolution gradients into many small batched
  products: at ipc 1 that step took 1.8x as long as the scan over classes,
  ``experiments/results/dm_step/trials/run3.json``). With one class per
  piece the augmentation is not vmapped either, so only the family drawn
  runs (vmapped, a ``lax.switch`` runs every branch).
  """

  def views(x, draws):  # [U, n, ...] -> [U, n', ...] (n' = 4n with PAE)
    v = synthetic_views(x.reshape((-1,) + x.shape[2:]), draws, dsa_strategy,
                        pae)
    return v.reshape(x.shape[:1] + (-1,) + v.shape[1:])

  def total(x):
    if x.shape[0] == 1:
      v = views(x[0], jax.tree.map(lambda a: a[0], aug_draws))[None]
    else:
      v = jax.vmap(views)(x, aug_draws)
    emb = embed(net_params, v.reshape((-1,) + v.shape[3:]))
    emb = emb.reshape(v.shape[:3] + emb.shape[1:])
    unit_loss = lambda m, e, s: losses.matching_loss(
        m, e, target_std=s, std_weight=std_weight, std_ddof=std_ddof)
    per_unit = jax.vmap(jax.vmap(unit_loss))(target_mean, emb, target_std)
    return per_unit.sum(), per_unit

  (_, per_unit), g = jax.value_and_grad(total, has_aux=True)(images)
  return per_unit, g


def class_losses_and_grads(embed, net_params, images, aug_draws, target_mean,
                           target_std, *, dsa_strategy, pae, std_weight,
                           std_ddof=0, classes_per_piece=None):
  """Every class's loss and its gradient w.r.t. its own images, independently.

  Entry c is ``class_matching_loss`` of ``images[c]`` (draws
  ``aug_draws[c]``, a pytree of ``[C, ...]`` arrays, ``class_aug_draws``)
  and its gradient ``[ipc, ...]``. With targets ``[C, U, D]`` a class has
  U units instead, ``images`` ``[C, U, ipc, ...]``, each unit matched to its
  own target under the class's augmentation (local DM: the clients' images
  of a class); losses are then ``[C, U]``. Classes do not interact, so they
  are computed ``classes_per_piece`` at a time (None:
  ``default_classes_per_piece``), the pieces in a ``lax.map``: the images
  of a piece go through ``embed`` as one batch, which is exact because
  every network here embeds each image on its own (instance or layer norm,
  never batch statistics), so the gradient of a piece's summed losses is
  each unit's own gradient.

  Returns:
    ``(losses [C], grads [C, ipc, ...])`` (``[C, U]``, ``[C, U, ipc, ...]``
    with units).
  """
  units = target_mean.ndim == 3
  if not units:
    images, target_mean, target_std = (a[:, None] for a in
                                       (images, target_mean, target_std))
  num_classes = images.shape[0]
  k = classes_per_piece or default_classes_per_piece(
      num_classes, images.shape[1] * images.shape[2] * (4 if pae else 1))
  k = min(k, num_classes)
  piece = lambda xs: _piece_losses_and_grads(
      embed, net_params, *xs, dsa_strategy=dsa_strategy, pae=pae,
      std_weight=std_weight, std_ddof=std_ddof)
  xs = (images, aug_draws, target_mean, target_std)
  if k == num_classes:
    out = piece(xs)
  else:
    # Whole pieces in a loop, then the classes left over as one more piece.
    full = num_classes // k * k
    out = jax.lax.map(piece, jax.tree.map(
        lambda a: a[:full].reshape((-1, k) + a.shape[1:]), xs))
    out = jax.tree.map(lambda a: a.reshape((full,) + a.shape[2:]), out)
    if full < num_classes:
      rest = piece(jax.tree.map(lambda a: a[full:], xs))
      out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)
  return out if units else jax.tree.map(lambda a: a[:, 0], out)


def iteration_step(optimizer, embed, state, net_params, aug_draws,
                   target_mean, target_std, valid, *, dsa_strategy, pae,
                   std_weight, std_ddof=0, classes_per_piece=None):
  """One DM iteration: a loss and an optimiser step per class, in class order.

  The reference semantics: one SGD-momentum optimiser (learning rate
  ``lr``, heavy-ball momentum ``mu``) over the whole synthetic tensor
  ``S`` [C, ipc, ...], stepped once per class in class order. Step ``c``
  takes the gradient of class c's loss at the current ``S[c]`` (zero for
  every other class) and updates all of ``S`` with the shared momentum
  buffer ``b``:

    g = d loss_c / dS (zero outside class c);  b <- mu * b + g;
    S <- S - lr * b,

  so every class step also moves the other classes by their decayed
  momentum. A class with no target (``valid`` False) is skipped: no loss,
  no step, no momentum decay.

  Computed in closed form rather than as C sequential steps. A class's
  gradient depends on the other classes only through the momentum drift,
  which is known beforehand: with ``n`` valid classes and class c the k-th
  valid one (k = 0..n-1), its images when its own step comes are

    X_c = S0_c - lr (mu + ... + mu^k) b0_c,

  (k earlier steps, each decaying b_c and moving S_c by it), so all the
  gradients ``g_c = d loss_c / dX_c`` can be computed independently, as
  many classes per network pass as suits the backend
  (``class_losses_and_grads``). After its own step
  b_c = mu^(k+1) b0_c + g_c, which the n - 1 - k later steps decay, so the
  iteration ends at

    b_c = mu^n b0_c + mu^(n-1-k) g_c,
    S_c = S0_c - lr (mu + ... + mu^n) b0_c - lr (1 + ... + mu^(n-1-k)) g_c,

  and for a skipped class (no own step, g_c = 0 above) at b_c = mu^n b0_c,
  S_c = S0_c - lr (mu + ... + mu^n) b0_c. The result is that of the
  sequential steps up to float rounding (``tests/test_core.py`` checks it
  against them, to 1e-10 in float64), without C updates of the whole
  tensor between the class gradients and with the freedom to batch classes
  (all of them in one pass off-CPU). Measured against the ``lax.scan`` over
  classes it replaced: ``experiments/results/dm_step/``.

  Args:
    optimizer: the image optimiser (``make_optimizer``).
    embed: ``embed(params, images) -> [N, D]``, each image embedded on its
      own (no batch statistics).
    state: ``SynthesisState`` with images ``[C, ipc, H, W, Ch]``.
    net_params: parameters of this iteration's random network.
    aug_draws: the Siamese augmentations of the C classes
      (``class_aug_draws``: a pytree of ``[C, ...]`` arrays).
    target_mean, target_std: ``[C, D]`` real-data targets.
    valid: ``[C]`` bool.
    std_ddof: see ``class_matching_loss``.
    classes_per_piece: see ``class_losses_and_grads`` (None: this
      backend's default; the result does not depend on it beyond float
      rounding).

  Returns:
    ``(new_state, losses [C])`` (loss 0 for skipped classes).
  """
  at_step = class_step_points(optimizer, state, valid)
  class_losses, g = class_losses_and_grads(
      embed, net_params, at_step, aug_draws, target_mean, target_std,
      dsa_strategy=dsa_strategy, pae=pae, std_weight=std_weight,
      std_ddof=std_ddof, classes_per_piece=classes_per_piece)
  return (apply_class_steps(optimizer, state, g, valid),
          jnp.where(jnp.asarray(valid, bool), class_losses, 0.0))


def _step_positions(valid):
  """``(k [C], n)``: each class's position among the valid classes, and n."""
  valid = jnp.asarray(valid, bool)
  num_classes = valid.shape[0]
  n = jnp.sum(valid.astype(jnp.int32))
  # Clipped for skipped classes, whose gradient is zeroed and never used.
  k = jnp.clip(jnp.cumsum(valid.astype(jnp.int32)) - 1, 0, num_classes)
  return k, n


def class_step_points(optimizer, state, valid):
  """``[C, ipc, ...]``: each class's images when its own step comes.

  ``X_c = S0_c - lr (mu + ... + mu^k) b0_c`` for the k-th valid class (see
  ``iteration_step``); the gradients of an iteration are taken there.
  """
  images = state.images
  num_classes = images.shape[0]
  _, drift, _ = _momentum_tables(optimizer.lr, optimizer.momentum,
                                 num_classes, images.dtype)
  k, _ = _step_positions(valid)
  per_class = drift[k].reshape((num_classes,) + (1,) * (images.ndim - 1))
  return images - per_class * state.opt_state[0].trace


def apply_class_steps(optimizer, state, grads, valid):
  """The iteration's C sequential class steps, in closed form.

  ``grads [C, ipc, ...]`` are the class gradients at ``class_step_points``;
  a class that is not ``valid`` takes no step (its gradient is ignored).
  Returns the new ``SynthesisState`` (see ``iteration_step`` for the
  algebra).
  """
  images = state.images
  num_classes = images.shape[0]
  trace_state, *rest = state.opt_state
  b0 = trace_state.trace
  power, drift, tail = _momentum_tables(optimizer.lr, optimizer.momentum,
                                        num_classes, images.dtype)
  valid = jnp.asarray(valid, bool)
  k, n = _step_positions(valid)
  per_class = lambda v: v.reshape((num_classes,) + (1,) * (images.ndim - 1))
  # A class no client holds has no target: it must not move by its own
  # gradient (pulled towards a zero vector), only by its decayed momentum.
  g = jnp.where(per_class(valid), grads, 0.0)
  left = jnp.clip(n - 1 - k, 0, num_classes - 1)  # valid steps after c's
  new_b = power[n] * b0 + per_class(power[left]) * g
  new_images = images - drift[n] * b0 - per_class(tail[left + 1]) * g
  opt_state = (trace_state._replace(trace=new_b), *rest)
  return SynthesisState(new_images, opt_state)


def class_aug_keys(root, t, num_classes):
  """``[C]`` Siamese augmentation keys of iteration ``t``."""
  return jax.vmap(lambda c: keys_lib.augment_key(root, t, c))(
      jnp.arange(num_classes))


def network_params(model, root, t, input_shape):
  """Parameters of the random network psi_t shared by clients and server."""
  return models.init_params(model, keys_lib.network_key(root, t), input_shape)


def class_aug_draws(root, t, num_classes, dsa_strategy, sample_shape):
  """The Siamese augmentations of iteration ``t``'s classes.

  ``augment.siamese_draws`` of every class's key (``class_aug_keys``, the
  keys the clients' real side augments with), stacked: a pytree of
  ``[C, ...]`` arrays for ``iteration_step``. ``sample_shape`` is one
  image's (or table row's) shape.
  """
  return aug_draws_of_keys(class_aug_keys(root, t, num_classes), dsa_strategy,
                           sample_shape)


def aug_draws_of_keys(aug_keys, dsa_strategy, sample_shape):
  """``augment.siamese_draws`` of every key in ``aug_keys [C]``, stacked."""
  return jax.vmap(lambda k: augment.siamese_draws(k, dsa_strategy,
                                                  tuple(sample_shape)))(
      aug_keys)


@functools.lru_cache(maxsize=None)
def iteration_inputs_fn(model, input_shape, num_classes, dsa_strategy):
  """Jitted ``(root, t) -> (params of psi_t, class_aug_draws)``.

  Every random number of a synthesis iteration, as a program of its own.
  The steps that differentiate through the network (``IterationStep``)
  take them as inputs and so compile no random-number code: at the
  reference config the server's first iteration (its compilation) took
  1.87 s instead of 3.23 s, local DM 0.92x and the server 0.94x as long
  (``experiments/results/reference/phase_pair_1b4e656_dcced0c.json``).
  Cached, so the client pass, local DM and the server of one process (same
  network, same strategy) share one compiled program.
  """

  def f(root, t):
    return (network_params(model, root, t, input_shape),
            class_aug_draws(root, t, num_classes, dsa_strategy, input_shape))

  return jax.jit(f)


@dataclasses.dataclass(frozen=True)
class IterationStep:
  """A synthesis iteration as two compiled programs.

  ``inputs(root, t) -> (net_params, aug_draws)`` draws psi_t and the
  Siamese augmentations (``iteration_inputs_fn``); ``update(state,
  net_params, aug_draws, *targets) -> (state, losses)`` takes the DM steps
  (its state donated: updated in place). Calling the step runs both:
  ``step(state, root, t, *targets)``.
  """
  inputs: Callable
  update: Callable

  def __call__(self, state, root, t, *targets):
    return self.update(state, *self.inputs(root, t), *targets)


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
