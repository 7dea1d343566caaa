"""Evaluation protocol: train fresh networks on a (synthetic) set, report test accuracy.

This is DM's protocol (Zhao & Bilen), which CollabDM reuses: ``num_nets``
freshly initialised networks are trained from scratch on the training set
with SGD (momentum 0.9, weight decay 5e-4 coupled to the gradient like
PyTorch's SGD), the learning rate drops ×0.1 after half the epochs, each
training batch is augmented with DSA (per-image parameters, one family per
batch), and the accuracy of each network at the final epoch on the full test
split is reported with its mean and population standard deviation.

The whole training of a network is one XLA program (a ``scan`` over epochs
around a ``scan`` over steps, with no host work between steps). On
accelerators all networks train side by side in one program (``vmap`` over
their keys); on CPU they train one after another, each in its own program
(``EvalConfig.loop``), every step computes its gradient in small pieces that
stay in cache (``weighted_loss_and_grad``), and DM's ConvNet trains and
predicts with the kernels of ``fast_convnet`` (Winograd convolutions: the
same network up to float rounding, about twice as fast). Learning rate,
momentum and weight decay are traced arguments, so sweeping them does not
recompile; shapes, epochs, architecture, batch size and DSA strategy are
static.

The same function trains on a large real dataset for the full-data upper
bound. The training set is moved to the device once and batches are gathered
by index inside the program, so nothing is re-uploaded per step; with e.g.
50,000 images an epoch is ~200 steps per network, so keep ``epochs`` small
(tens, not the 1000 used for a few hundred synthetic images) and
``num_nets`` modest, since all networks train side by side in device memory.

Deliberate differences from the authors' loop (``range(Epoch + 1)`` with the
decay after epoch ``Epoch // 2 + 1``): we run exactly ``epochs`` epochs and
decay after ``epochs // 2`` of them. As in their code, the decay restarts the
momentum buffer (they build a new optimiser at that point).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from collabdm_jax import augment
from collabdm_jax import fast_convnet
from collabdm_jax import models


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How evaluation networks are trained (defaults: DM / CollabDM).

  Attributes:
    arch: architecture for ``models.make_model`` (convnet, alexnet, vgg11,
      resnet18, mlp).
    num_nets: number of independently initialised networks (>= 1).
    epochs: training epochs (>= 0; 0 evaluates untrained networks, a
      chance-level sanity check).
    lr: initial SGD learning rate (> 0); ×0.1 from epoch ``epochs // 2``.
    momentum: SGD momentum in [0, 1).
    weight_decay: L2 coefficient added to the gradient (>= 0).
    batch_size: training batch size (>= 1); a set no larger than this is
      trained as one full batch.
    dsa_strategy: DSA families joined by "_" (see
      ``augment.dsa_strategy_for``), or "" / "none" for no augmentation
      (required for tabular data).
    pae: expand the training set 4× with partition-and-expansion first.
    model_kwargs: extra ``make_model`` keyword arguments as hashable
      ``(name, value)`` pairs, e.g. ``(("width", 16), ("depth", 2))``.
    test_batch_size: test images per inference chunk (bounds memory; on CPU
      a ConvNet that ``fast_convnet`` runs is tested in chunks of at most
      ``MICRO_BATCH_CPU`` images, which run faster).
    loop: "fused" trains all nets in one XLA program (vmapped over their
      keys); "per_net" trains them one after another, one program each
      (same keys, same arithmetic); "auto" (default) picks "per_net" on
      CPU, where XLA turns convolutions vmapped over weights into slow
      grouped convolutions, and "fused" elsewhere.
  """

  arch: str = "convnet"
  num_nets: int = 5
  epochs: int = 1000
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 256
  dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
  pae: bool = False
  model_kwargs: tuple = ()
  test_batch_size: int = 1000
  loop: str = "auto"


_LOOPS = ("auto", "fused", "per_net")


def _resolve_loop(loop: str) -> str:
  if loop == "auto":
    return "per_net" if jax.default_backend() == "cpu" else "fused"
  return loop


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Outcome of ``evaluate_synthetic``.

  Attributes:
    accuracies: ``[num_nets]`` final-epoch test accuracy of each network.
    mean: mean of ``accuracies``.
    std: population standard deviation (ddof=0) of ``accuracies``, as the
      reference code reports it.
    train_loss: ``[num_nets]`` mean training cross-entropy of the final
      epoch (on augmented batches, before each step's update; NaN when
      ``epochs == 0``).
    train_loss_per_epoch: ``[num_nets, epochs]`` the same for every epoch.
    per_class_recall: ``[num_nets, C]`` test recall per class (NaN for a
      class absent from the test split).
    predictions: ``[num_nets, N_test]`` int32 predicted classes, for extra
      metrics (``classification_metrics``); may be None.
  """

  accuracies: np.ndarray
  mean: float
  std: float
  train_loss: np.ndarray
  per_class_recall: np.ndarray
  predictions: Optional[np.ndarray]
  train_loss_per_epoch: Optional[np.ndarray] = None

  def as_dict(self) -> dict:
    """JSON-ready summary (plain Python types); predictions are left out."""
    return {
        "num_nets": int(len(self.accuracies)),
        "accuracies": [float(a) for a in self.accuracies],
        "mean": float(self.mean),
        "std": float(self.std),
        "train_loss": [float(v) for v in self.train_loss],
        "per_class_recall": np.asarray(self.per_class_recall,
                                       np.float64).tolist(),
    }


def learning_rate_at(epoch, epochs, lr):
  """Learning rate used during ``epoch`` (0-based) of an ``epochs``-epoch run.

  Args:
    epoch: int or int array of epoch indices.
    epochs: total number of epochs.
    lr: initial learning rate.

  Returns:
    ``lr`` for ``epoch < epochs // 2`` and ``0.1 * lr`` afterwards (float32,
    same shape as ``epoch``). Traceable, so it runs inside the jitted loop.
  """
  epoch = jnp.asarray(epoch)
  lr = jnp.asarray(lr, jnp.float32)
  return jnp.where(epoch < jnp.asarray(epochs) // 2, lr, lr * 0.1)


def epoch_batches(key, num_examples: int, batch_size: int):
  """Shuffled minibatch indices of one epoch, ragged last batch padded + masked.

  Args:
    key: PRNG key of this epoch's shuffle.
    num_examples: size of the training set (static, >= 1).
    batch_size: requested batch size (static, >= 1); the effective batch is
      ``b = min(batch_size, num_examples)`` so a small set is one full batch.

  Returns:
    ``(indices, mask)``, both ``[steps, b]`` with ``steps = ceil(N / b)``:
    int32 indices into the training set and a bool mask that is False only
    on the padding of the last batch. Every example appears exactly once
    among the True entries, so no sample is dropped.
  """
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  b = min(batch_size, num_examples)
  steps = -(-num_examples // b)
  pad = steps * b - num_examples
  perm = jax.random.permutation(key, num_examples).astype(jnp.int32)
  # Padding repeats real indices (pad < b <= N) so gathers stay in range;
  # the mask keeps them out of the loss.
  indices = jnp.concatenate([perm, perm[:pad]])
  mask = jnp.arange(steps * b) < num_examples
  return indices.reshape(steps, b), mask.reshape(steps, b)


def _make_optimizer(momentum, weight_decay):
  # PyTorch SGD adds wd * param to the gradient before the momentum buffer.
  # The learning rate is applied by the caller each step (unit lr here) so
  # the per-epoch schedule can be a traced value.
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate=1.0, momentum=momentum))


# On CPU, each SGD step computes its gradient MICRO_BATCH_CPU samples at a
# time in a ``lax.scan`` (summing per-piece gradients): XLA:CPU's
# convolutions slow down sharply once a batch no longer fits in cache.
# Measured on this project's 2-core CPU, ConvNet-3 on 100 Fashion-MNIST
# images: 0.68 s for the whole batch, 0.23-0.26 s in pieces of 5-10 (with
# the matmul gradients of ``models.conv_matmul_grads``, which also make the
# loop itself cheap). Samples are independent (instance norm), so only the
# summation order of the weight gradients changes.
MICRO_BATCH_CPU = 10


def default_micro_batch() -> Optional[int]:
  """Samples per gradient piece on this backend (None: the whole batch)."""
  return MICRO_BATCH_CPU if jax.default_backend() == "cpu" else None


def default_fast_convnet() -> bool:
  """Whether ConvNets train with ``fast_convnet``'s kernels on this backend.

  True on CPU, where they were measured (``experiments/results/eval_speed``);
  elsewhere the models' own kernels, which the GPU compiles well.
  """
  return jax.default_backend() == "cpu"


def weighted_loss_and_grad(loss_sum, params, x, y, w,
                           micro_batch: Optional[int] = None):
  """``(L, dL/dparams)`` for ``L = sum_i w_i l(params; x_i, y_i)``, in pieces.

  ``loss_sum(params, x, y, w)`` returns ``sum_i w_i l_i`` of a batch. With
  ``micro_batch`` the batch is cut into pieces of that many samples (padded
  with ``w = 0``), and ``L`` and its gradient are the sums over the pieces,
  accumulated in a ``lax.scan`` so only one piece's activations are alive.
  Exact for per-sample networks (no batch norm) up to summation order.

  Args:
    loss_sum: the weighted loss of a batch.
    params: pytree to differentiate.
    x, y, w: ``[B, ...]`` inputs, ``[B]`` labels and ``[B]`` weights.
    micro_batch: samples per piece, or None for the whole batch at once.
  """
  grad_fn = jax.value_and_grad(loss_sum)
  b = x.shape[0]
  if micro_batch is None or b <= micro_batch:
    return grad_fn(params, x, y, w)
  pieces = -(-b // micro_batch)
  pad = pieces * micro_batch - b

  def split(a):
    a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape((pieces, micro_batch) + a.shape[1:])

  def body(carry, piece):
    total, grads = carry
    value, g = grad_fn(params, *piece)
    return (total + value, jax.tree.map(jnp.add, grads, g)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (total, grads), _ = jax.lax.scan(body, zeros, (split(x), split(y), split(w)))
  return total, grads


class Programs(NamedTuple):
  """Jitted pieces of one static configuration (see ``compiled_programs``)."""
  train_nets: Callable  # (net_keys, x, y, lr, momentum, wd) -> all nets at once
  train_net: Callable   # (net_key, x, y, lr, momentum, wd) -> one net
  predict: Callable     # (stacked params, test_x) -> [nets, M] int32


@functools.lru_cache(maxsize=None)
def compiled_programs(arch: str, num_classes: int, model_kwargs: tuple,
                      dsa_strategy: str, batch_size: int, epochs: int,
                      test_batch_size: int,
                      micro_batch: Optional[int] = None,
                      use_fast_convnet: bool = False) -> Programs:
  """Jitted programs for one static configuration.

  Cached so repeated calls reuse the same jitted callables, whose own caches
  then skip recompilation for equal shapes. ``train_nets`` (all networks
  vmapped into one program) and ``train_net`` (one network) are the same
  single-network function, so a network trains identically in either.
  The whole training of a network is one XLA program: a ``scan`` over
  epochs around a ``scan`` over the steps of an epoch. With
  ``use_fast_convnet``, a model and input shape that
  ``fast_convnet.supports`` accepts train and predict with that module's
  kernels (same network, float rounding aside).
  """
  model = models.make_model(arch, num_classes, **dict(model_kwargs))
  apply = models.logits_fn(model)
  augmenting = bool(dsa_strategy)

  def fast(x):
    return use_fast_convnet and fast_convnet.supports(model, x.shape[1:])

  def loss_sum_of(logits_fn):
    def loss_sum(params, xb, yb, w):
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits_fn(params, xb), yb)
      return jnp.sum(ce * w)
    return loss_sum

  def loss_and_grads(params, xb, yb, w):
    """``sum_i w_i l_i`` of a batch and its gradient."""
    if not fast(xb):
      return weighted_loss_and_grad(loss_sum_of(apply), params, xb, yb, w,
                                    micro_batch)
    # The Winograd kernels are made once per step and the gradients with
    # respect to them turned back into kernel gradients once per step (the
    # map is linear), not once per micro-batch.
    eval_params, to_params = jax.vjp(fast_convnet.prepare, params)
    total, grads = weighted_loss_and_grad(loss_sum_of(fast_convnet.logits),
                                          eval_params, xb, yb, w, micro_batch)
    return total, to_params(grads)[0]

  def sgd_step(carry, s, train_x, train_y, idx, mask, aug_key, lr_now,
               momentum, wd):
    """Step ``s`` of an epoch for one net; adds to the epoch's loss sum."""
    params, opt_state, loss_sum_so_far = carry
    bidx, bmask = idx[s], mask[s]
    xb = train_x[bidx]
    yb = train_y[bidx]
    if augmenting:
      xb = augment.dsa(jax.random.fold_in(aug_key, s), xb, dsa_strategy,
                       siamese=False, one_family=True)
    w = bmask.astype(jnp.float32)
    total, grads = loss_and_grads(params, xb, yb, w)
    # Mean over the real samples of the batch, like PyTorch's loss on a
    # short last batch.
    grads = jax.tree.map(lambda g: g / jnp.maximum(jnp.sum(w), 1.0), grads)
    updates, opt_state = _make_optimizer(momentum, wd).update(
        grads, opt_state, params)
    # The optimiser ran at unit lr (updates = -momentum buffer).
    updates = jax.tree.map(lambda u: lr_now * u, updates)
    return (optax.apply_updates(params, updates), opt_state,
            loss_sum_so_far + total)

  def train_one(net_key, train_x, train_y, lr, momentum, wd):
    params = models.init_params(model, jax.random.fold_in(net_key, 0),
                                train_x.shape[1:])
    # The momentum buffer starts at zero whatever the hyper-parameters.
    fresh_state = _make_optimizer(0.0, 0.0).init(params)
    half = epochs // 2

    def epoch_body(carry, e):
      params, opt_state = carry
      # The reference builds a new optimiser when it decays the learning
      # rate, which restarts the momentum buffer.
      opt_state = jax.tree.map(
          lambda fresh, cur: jnp.where(e == half, fresh, cur),
          fresh_state, opt_state)
      lr_now = learning_rate_at(e, epochs, lr)
      ekey = jax.random.fold_in(jax.random.fold_in(net_key, 1), e)
      idx, mask = epoch_batches(jax.random.fold_in(ekey, 0),
                                train_y.shape[0], batch_size)
      aug_key = jax.random.fold_in(ekey, 1)

      def step(carry, s):
        return sgd_step(carry, s, train_x, train_y, idx, mask, aug_key,
                        lr_now, momentum, wd), None

      (params, opt_state, loss_sum_e), _ = jax.lax.scan(
          step, (params, opt_state, jnp.zeros((), jnp.float32)),
          jnp.arange(idx.shape[0]))
      return (params, opt_state), loss_sum_e / train_y.shape[0]

    (params, _), epoch_losses = jax.lax.scan(
        epoch_body, (params, fresh_state), jnp.arange(epochs))
    return params, epoch_losses

  @jax.jit
  def train_nets(net_keys, train_x, train_y, lr, momentum, wd):
    return jax.vmap(train_one, in_axes=(0, None, None, None, None, None))(
        net_keys, train_x, train_y, lr, momentum, wd)

  @jax.jit
  def predict(params, test_x):
    n = test_x.shape[0]
    chunk = min(test_batch_size, n)
    if fast(test_x) and micro_batch:
      # Cache-sized pieces, as the training's micro-batches, run faster than
      # large ones (experiments/results/eval_speed/: predict_chunks).
      chunk = min(chunk, micro_batch)
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    xs = jnp.concatenate([test_x, jnp.zeros((pad,) + test_x.shape[1:],
                                            test_x.dtype)])
    xs = xs.reshape((num_chunks, chunk) + test_x.shape[1:])

    # Networks and chunks run one at a time so peak memory is one chunk of
    # one network's activations, whatever num_nets and the test size are.
    def one_net(p):
      if fast(test_x):
        p, logits_fn = fast_convnet.prepare(p), fast_convnet.logits
      else:
        logits_fn = apply
      preds = jax.lax.map(
          lambda xc: jnp.argmax(logits_fn(p, xc), axis=-1).astype(jnp.int32),
          xs)
      return preds.reshape(-1)[:n]

    return jax.lax.map(one_net, params)

  return Programs(train_nets=train_nets, train_net=jax.jit(train_one),
                  predict=predict)


def _train_in_turn(programs: Programs, net_keys, train_x, train_y, lr,
                   momentum, wd, on_net_done=None):
  """``train_nets``'s result, one compiled training per network in turn.

  XLA:CPU turns convolutions vmapped over their weights into grouped
  convolutions, about 5x slower than one network's, so on CPU the networks
  train one after another (each still one program).
  """
  params, losses = [], []
  for i in range(net_keys.shape[0]):
    p, l = programs.train_net(net_keys[i], train_x, train_y, lr, momentum, wd)
    params.append(p)
    losses.append(l)
    if on_net_done is not None:
      jax.block_until_ready(l)
      on_net_done(i + 1, net_keys.shape[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
  return stacked, jnp.stack(losses)


def _check_config(config: EvalConfig):
  if not isinstance(config, EvalConfig):
    raise ValueError(f"config must be an EvalConfig, got {type(config)}")
  if config.num_nets < 1:
    raise ValueError(f"num_nets must be >= 1, got {config.num_nets}")
  if config.epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {config.epochs}")
  if not config.lr > 0:
    raise ValueError(f"lr must be > 0, got {config.lr}")
  if not 0 <= config.momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {config.momentum}")
  if not config.weight_decay >= 0:
    raise ValueError(
        f"weight_decay must be >= 0, got {config.weight_decay}")
  if config.batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
  if not isinstance(config.arch, str):
    raise ValueError(f"arch must be a string, got {config.arch!r}")
  if config.loop not in _LOOPS:
    raise ValueError(f"loop must be one of {_LOOPS}, got {config.loop!r}")
  if config.test_batch_size < 1:
    raise ValueError(
        f"test_batch_size must be >= 1, got {config.test_batch_size}")
  try:
    hash(config.model_kwargs)
    dict(config.model_kwargs)
  except (TypeError, ValueError) as err:
    raise ValueError(
        "model_kwargs must be a tuple of hashable (name, value) pairs, got "
        f"{config.model_kwargs!r}") from err


def _check_key(key):
  dtype = getattr(key, "dtype", None)
  shape = getattr(key, "shape", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if shape == ():
      return
  elif dtype == jnp.uint32 and shape is not None and len(shape) == 1:
    return  # Raw key data, e.g. jax.random.PRNGKey(0).
  raise ValueError(
      "key must be one PRNG key (jax.random.key or jax.random.PRNGKey), got "
      f"{type(key).__name__} with dtype {dtype} and shape {shape}")


def _check_labels(name, labels, n, num_classes):
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
  if labels.shape[0] != n:
    raise ValueError(
        f"{name} has {labels.shape[0]} labels but its inputs have {n} rows")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"{name} must lie in [0, {num_classes}), got range "
        f"[{labels.min()}, {labels.max()}]")
  return labels.astype(np.int32)


def _check_inputs(name, x):
  x = jnp.asarray(x, jnp.float32)
  if x.ndim not in (2, 4):
    raise ValueError(
        f"{name} must be NHWC images [N, H, W, C] or a table [N, F], got "
        f"shape {x.shape}")
  if x.shape[0] < 1:
    raise ValueError(f"{name} must hold at least 1 example, got 0")
  if not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError(f"{name} contains NaN or infinite values")
  return x


def prepare_training_set(train_x, train_y, *, pae: bool = False):
  """The set the evaluation networks train on.

  Args:
    train_x: ``[N, ...]`` float32 inputs (NHWC images when ``pae``).
    train_y: ``[N]`` int labels.
    pae: apply partition-and-expansion once: every image becomes its four
      quadrants upsampled to full size, its label repeated (``4N`` rows).

  Returns:
    ``(x, y)`` as device arrays, float32 and int32.
  """
  train_x = jnp.asarray(train_x, jnp.float32)
  train_y = jnp.asarray(train_y, jnp.int32)
  if pae:
    if train_x.ndim != 4:
      raise ValueError(
          f"pae needs NHWC images but train_x has shape {train_x.shape}")
    train_x, train_y = augment.pae_expand(train_x, train_y)
  return train_x, train_y


def evaluate_synthetic(key, train_x, train_y, test_x, test_y, *,
                       num_classes: int,
                       config: EvalConfig = EvalConfig(),
                       on_net_done: Optional[Callable[[int, int], None]] = None
                       ) -> EvalResult:
  """Trains ``config.num_nets`` fresh networks on a set, tests them.

  Network ``i`` uses ``jax.random.fold_in(key, i)`` for its initialisation,
  its per-epoch shuffles and its augmentation, so results are a pure
  function of ``key`` and the inputs. Works for a few synthetic images per
  class and for a full real training set alike (see the module docstring on
  epochs for the latter).

  Args:
    key: PRNG key.
    train_x: ``[N, H, W, C]`` float32 images or ``[N, F]`` features.
    train_y: ``[N]`` int labels in ``[0, num_classes)``.
    test_x: ``[M, ...]`` with the same per-example shape as ``train_x``.
    test_y: ``[M]`` int labels in ``[0, num_classes)``.
    num_classes: number of classes (>= 2), the width of the classifier.
    config: training protocol (``EvalConfig``). DSA needs images; tables
      must use ``dsa_strategy="none"`` (or "") and ``pae=False``.
    on_net_done: called as ``on_net_done(nets_trained, num_nets)`` as
      networks finish training (progress reports).

  Returns:
    ``EvalResult`` with per-network final-epoch test accuracy, its mean and
    population std, final-epoch training loss, per-class recall and the
    test predictions.

  Raises:
    ValueError: on invalid configuration, shapes, labels or non-finite
      inputs.
  """
  _check_key(key)
  _check_config(config)
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
  num_classes = int(num_classes)
  train_x = _check_inputs("train_x", train_x)
  test_x = _check_inputs("test_x", test_x)
  if train_x.shape[1:] != test_x.shape[1:]:
    raise ValueError(
        f"test_x examples have shape {test_x.shape[1:]} but train_x examples "
        f"have {train_x.shape[1:]}")
  train_y = _check_labels("train_y", train_y, train_x.shape[0], num_classes)
  test_y = _check_labels("test_y", test_y, test_x.shape[0], num_classes)

  strategy = "_".join(augment.parse_strategy(config.dsa_strategy))
  if strategy and train_x.ndim != 4:
    raise ValueError(
        f"dsa_strategy {config.dsa_strategy!r} needs NHWC images but train_x "
        f"has shape {train_x.shape}; use dsa_strategy='none' for tables")
  train_x, train_y = prepare_training_set(train_x, train_y, pae=config.pae)

  loop = _resolve_loop(config.loop)
  programs = compiled_programs(
      config.arch.lower(), num_classes, config.model_kwargs, strategy,
      int(config.batch_size), int(config.epochs), int(config.test_batch_size),
      default_micro_batch(), default_fast_convnet())
  net_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      key, jnp.arange(config.num_nets))
  # Hyper-parameters go in as fixed-dtype arrays: new values reuse the
  # compiled programs instead of being baked in as constants.
  args = (net_keys, train_x, train_y, np.float32(config.lr),
          np.float32(config.momentum), np.float32(config.weight_decay))
  if loop == "fused":
    params, epoch_losses = programs.train_nets(*args)
    if on_net_done is not None:
      jax.block_until_ready(epoch_losses)
      on_net_done(config.num_nets, config.num_nets)
  else:
    params, epoch_losses = _train_in_turn(programs, *args,
                                          on_net_done=on_net_done)
  predictions = np.asarray(programs.predict(params, test_x))
  epoch_losses = np.asarray(epoch_losses, np.float64)
  train_loss = (epoch_losses[:, -1] if config.epochs
                else np.full(config.num_nets, np.nan))

  metrics = classification_metrics(predictions, test_y, num_classes)
  accuracies = np.asarray(metrics["accuracy"], np.float64)
  return EvalResult(
      accuracies=accuracies,
      mean=float(np.mean(accuracies)),
      std=float(np.std(accuracies)),
      train_loss=train_loss,
      per_class_recall=np.asarray(metrics["per_class_recall"]),
      predictions=predictions,
      train_loss_per_epoch=epoch_losses)


def classification_metrics(predictions, labels, num_classes: int, *,
                           benign_class: Optional[int] = None
                           ) -> Dict[str, Any]:
  """Accuracy-type metrics of predicted classes against true labels.

  Args:
    predictions: ``[N]`` or ``[..., N]`` (e.g. ``[num_nets, N]``) predicted
      class ids.
    labels: ``[N]`` true class ids.
    num_classes: number of classes C.
    benign_class: for intrusion detection, the id of the benign (normal)
      class; adds the false-positive rate.

  Returns:
    dict with, per leading index of ``predictions`` (scalars for 1-D input):
    ``accuracy``; ``balanced_accuracy`` (mean recall over the classes that
    occur in ``labels``); ``per_class_recall`` ``[..., C]`` (NaN for classes
    absent from ``labels``); ``confusion_matrix`` ``[..., C, C]`` counts
    indexed [true, predicted]; and with ``benign_class``,
    ``false_positive_rate``: the fraction of benign samples predicted as any
    other (attack) class (NaN without benign samples).

  Raises:
    ValueError: on shape mismatch or ids outside ``[0, num_classes)``.
  """
  if int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f"num_classes must be an integer >= 1, got {num_classes}")
  num_classes = int(num_classes)
  preds = np.asarray(predictions)
  if preds.ndim < 1:
    raise ValueError("predictions must have at least 1 dimension")
  labels = _check_labels("labels", labels, preds.shape[-1], num_classes)
  if not np.issubdtype(preds.dtype, np.integer):
    raise ValueError(f"predictions must be integers, got dtype {preds.dtype}")
  if preds.size and (preds.min() < 0 or preds.max() >= num_classes):
    raise ValueError(
        f"predictions must lie in [0, {num_classes}), got range "
        f"[{preds.min()}, {preds.max()}]")
  if labels.shape[0] == 0:
    raise ValueError("labels must hold at least 1 example, got 0")
  if benign_class is not None and not 0 <= benign_class < num_classes:
    raise ValueError(
        f"benign_class must lie in [0, {num_classes}), got {benign_class}")

  lead = preds.shape[:-1]
  flat = preds.reshape(-1, preds.shape[-1])
  # One bincount per row over (true, predicted) pairs gives the confusion.
  pair = labels[None, :] * num_classes + flat
  confusion = np.stack([
      np.bincount(row, minlength=num_classes * num_classes)
      for row in pair]).reshape(lead + (num_classes, num_classes))
  support = np.bincount(labels, minlength=num_classes)
  correct = np.diagonal(confusion, axis1=-2, axis2=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
  present = support > 0
  out = {
      "accuracy": np.mean(preds == labels, axis=-1),
      "balanced_accuracy": np.mean(recall[..., present], axis=-1),
      "per_class_recall": recall,
      "confusion_matrix": confusion,
  }
  if benign_class is not None:
    benign = labels == benign_class
    if benign.any():
      fpr = np.mean(preds[..., benign] != benign_class, axis=-1)
    else:
      fpr = np.full(lead, np.nan)
    out["false_positive_rate"] = fpr
  if not lead:
    for name in ("accuracy", "balanced_accuracy", "false_positive_rate"):
      if name in out:
        out[name] = float(out[name])
  return out
