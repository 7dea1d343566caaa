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
losses into one step is a different algorithm; ``iteration_step`` steps the
classes in order with the full-tensor optimiser state to reproduce it.
"""

from typing import NamedTuple

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


def make_optimizer(lr, momentum=0.5):
  """The reference image optimiser: SGD with heavy-ball momentum, no decay."""
  return optax.sgd(lr, momentum=momentum)


def init_state(images, optimizer):
  return SynthesisState(images, optimizer.init(images))


def synthetic_embeddings(embed, net_params, images, aug_key, dsa_strategy,
                         pae):
  """Embeds one class of synthetic images the way the loss sees them.

  PAE first splits every image into its 4 upsampled quadrants; the Siamese
  DSA transform is then drawn from ``aug_key``, the same key the real side
  used for this (iteration, class).
  """
  if pae:
    images = augment.pae_expand(images)
  images = augment.siamese_augment(aug_key, images, dsa_strategy)
  return embed(net_params, images)


def class_matching_loss(embed, net_params, class_images, aug_key, mean, std,
                        *, dsa_strategy, pae, std_weight, std_ddof=0):
  """DM's loss of one class: ``||mean - mean_i psi(A(s_i))||^2`` (+ std term).

  ``A`` is the Siamese augmentation drawn from ``aug_key`` and ``psi`` the
  network ``net_params``; see ``losses.matching_loss``. ``std_ddof`` is the
  degrees of freedom of the synthetic side's std in the std term
  (``losses.embedding_std``; 1 is the authors' ``torch.std``).
  """
  emb = synthetic_embeddings(embed, net_params, class_images, aug_key,
                             dsa_strategy, pae)
  return losses.matching_loss(mean, emb, target_std=std,
                              std_weight=std_weight, std_ddof=std_ddof)


def iteration_step(optimizer, embed, state, net_params, aug_keys,
                   target_mean, target_std, valid, *, dsa_strategy, pae,
                   std_weight, std_ddof=0):
  """One DM iteration: a loss and an optimiser step per class, in class order.

  The reference semantics, as one traced program: one optimiser over the
  whole synthetic tensor ``S`` [C, ipc, ...], stepped once per class. Step
  ``c`` takes the gradient of class c's loss at the current ``S[c]`` (zero
  for every other class) and updates all of ``S`` with the shared momentum
  buffer ``b``:

    g = d loss_c / dS (zero outside class c);  b <- momentum * b + g;
    S <- S - lr * b,

  so every class step also moves the other classes by their decayed
  momentum. A class with no target (``valid`` False) is skipped: no loss,
  no step, no momentum decay. The classes are a ``lax.scan`` (their
  convolution gradients are matrix products, ``models.conv_matmul_grads``,
  which XLA:CPU runs well inside loops).

  Args:
    optimizer: the image optimiser (``make_optimizer``).
    embed: ``embed(params, images) -> [N, D]``.
    state: ``SynthesisState`` with images ``[C, ipc, H, W, Ch]``.
    net_params: parameters of this iteration's random network.
    aug_keys: ``[C]`` Siamese augmentation keys, one per class.
    target_mean, target_std: ``[C, D]`` real-data targets.
    valid: ``[C]`` bool.
    std_ddof: see ``class_matching_loss``.

  Returns:
    ``(new_state, losses [C])`` (loss 0 for skipped classes).
  """

  def class_step(state, c):
    loss, g = jax.value_and_grad(class_matching_loss, argnums=2)(
        embed, net_params, state.images[c], aug_keys[c], target_mean[c],
        target_std[c], dsa_strategy=dsa_strategy, pae=pae,
        std_weight=std_weight, std_ddof=std_ddof)
    grads = jnp.zeros_like(state.images).at[c].set(g)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.images)
    stepped = SynthesisState(optax.apply_updates(state.images, updates),
                             opt_state)
    # A class no client holds has no target: leave everything untouched
    # rather than pull its images towards a zero vector.
    new = jax.tree.map(lambda a, b: jnp.where(valid[c], a, b), stepped, state)
    return new, jnp.where(valid[c], loss, 0.0)

  return jax.lax.scan(class_step, state, jnp.arange(state.images.shape[0]))


def class_aug_keys(root, t, num_classes):
  """``[C]`` Siamese augmentation keys of iteration ``t``."""
  return jax.vmap(lambda c: keys_lib.augment_key(root, t, c))(
      jnp.arange(num_classes))


def network_params(model, root, t, input_shape):
  """Parameters of the random network psi_t shared by clients and server."""
  return models.init_params(model, keys_lib.network_key(root, t), input_shape)


def iteration_inputs_fn(model, input_shape, num_classes):
  """Jitted ``(root, t) -> (params of psi_t, [C] Siamese keys)``."""

  def f(root, t):
    return (network_params(model, root, t, input_shape),
            class_aug_keys(root, t, num_classes))

  return jax.jit(f)


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
