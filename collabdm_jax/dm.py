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
losses into one step is a different algorithm; ``match_classes`` steps the
classes in order with the full-tensor optimiser state to reproduce it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
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


def make_class_step(optimizer, embed, *, dsa_strategy, pae, std_weight,
                    std_ddof=0):
  """Jitted ``class_step(state, net_params, aug_key, mean, std, valid, c)``.

  ``std_ddof``: degrees of freedom of the synthetic side's std in the std
  term (``losses.embedding_std``; 1 is the authors' ``torch.std``).

  One DM step for class ``c`` (a traced index, so one compilation serves
  every class): the loss of the class's synthetic images against its target
  and an update of the whole synthetic tensor with the shared optimiser.
  A class without a target (``valid`` False) leaves everything untouched.
  The state is donated. Returns ``(state, loss)``.

  Classes are stepped from Python rather than with ``lax.scan``: XLA:CPU
  compiles convolution gradients inside a while loop to slow generic code
  (measured 3x slower here), and unrolling multiplies compile time.
  """

  def class_loss(images, c, net_params, aug_key, mean, std):
    emb = synthetic_embeddings(embed, net_params, images[c], aug_key,
                               dsa_strategy, pae)
    return losses.matching_loss(mean, emb, target_std=std,
                                std_weight=std_weight, std_ddof=std_ddof)

  def class_step(state, net_params, aug_key, mean, std, valid, c):
    loss, grads = jax.value_and_grad(class_loss)(state.images, c, net_params,
                                                 aug_key, mean, std)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.images)
    stepped = SynthesisState(optax.apply_updates(state.images, updates),
                             opt_state)
    # A class no client holds has no target: leave everything untouched
    # rather than pull its images towards a zero vector.
    new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), stepped, state)
    return new, jnp.where(valid, loss, 0.0)

  return jax.jit(class_step, donate_argnums=0)


def match_classes(state, class_step, net_params, aug_keys, target_mean,
                  target_std, valid):
  """One DM iteration: a loss and an optimiser step per class, in class order.

  Args:
    state: ``SynthesisState`` with images ``[C, ipc, H, W, Ch]``.
    class_step: from ``make_class_step``.
    net_params: parameters of this iteration's random network.
    aug_keys: ``[C]`` Siamese augmentation keys, one per class.
    target_mean, target_std: ``[C, D]`` real-data targets.
    valid: ``[C]`` bool; classes without a target are skipped (no step).

  Returns:
    ``(new_state, losses [C])``.
  """
  class_losses = []
  for c in range(state.images.shape[0]):
    state, loss = class_step(state, net_params, aug_keys[c], target_mean[c],
                             target_std[c], valid[c], jnp.int32(c))
    class_losses.append(loss)
  return state, jnp.stack(class_losses)


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
