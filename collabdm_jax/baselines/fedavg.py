"""One-shot FedAvg: clients train from a shared init, the server averages once.

For each of ``config.eval.num_nets`` seeds the server broadcasts one fresh
initialisation of the evaluation architecture (``config.eval``); every
client trains it on its own data for ``local_epochs`` with SGD and uploads
the weights; the server averages them once, weighted by client data size
(McMahan et al.'s weighting), and the averaged model is tested on
``s.test_x``. The spread over seeds covers the shared init and the clients'
shuffles and augmentation.

Settings (``config.baseline``, defaults in brackets): ``local_epochs`` [5],
``local_lr`` [0.01], ``local_momentum`` [0.9], ``local_weight_decay``
[5e-4], ``local_batch`` [256], ``local_dsa`` [``config.eval.dsa``]: DSA on
each training batch, as the evaluator trains (per-image parameters, one
family per batch). The learning rate is constant (no decay), as in one-shot
FL's local training (DENSE), and weight decay is coupled to the gradient
like PyTorch's SGD (as in ``evaluate``).

Clients of different sizes are padded to one length so that every client
and seed shares one compiled program; each client's epoch visits exactly
its own samples in a fresh random order (ragged last batch masked), so the
padding changes nothing but the shapes. The seeds of a client train side
by side (vmapped), the clients one after the other.

The client models are also DENSE's teachers (``dense`` calls
``train_clients`` with this module's key), so the two baselines share them.
"""

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from collabdm_jax import augment
from collabdm_jax.baselines import common
from collabdm_jax import evaluate
from collabdm_jax import models


@dataclasses.dataclass(frozen=True)
class LocalTrainConfig:
  """How every client trains its copy of the shared model."""
  epochs: int = 5
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 256
  dsa_strategy: str = ""


def local_train_config(s) -> LocalTrainConfig:
  """``LocalTrainConfig`` from ``config.baseline`` (module docstring)."""
  cfg, b = s.config, s.config.baseline
  momentum = float(b.local_momentum)
  if not 0 <= momentum < 1:
    raise ValueError(
        f"baseline.local_momentum must be in [0, 1), got {momentum}")
  dsa = bool(common.unless_none(b.local_dsa, cfg.eval.dsa))
  return LocalTrainConfig(
      epochs=common.check_positive(b.local_epochs,
                                   "baseline.local_epochs", integer=True,
                                   allow_zero=True),
      lr=common.check_positive(b.local_lr, "baseline.local_lr"),
      momentum=momentum,
      weight_decay=common.check_positive(
          b.local_weight_decay, "baseline.local_weight_decay",
          allow_zero=True),
      batch_size=common.check_positive(b.local_batch,
                                       "baseline.local_batch", integer=True),
      dsa_strategy="_".join(augment.parse_strategy(s.dsa_strategy)) if dsa
      else "")


def shuffled_batches(key, n, capacity: int, batch: int):
  """Random order of the first ``n`` of ``capacity`` slots, padded by ``batch``.

  ``n`` may be traced. Returns ``order [capacity + batch]`` int32: the
  indices ``0..n-1`` in random order first, then the padded slots; step i of
  an epoch takes ``order[i*batch:(i+1)*batch]`` and masks positions
  ``>= n`` (``batch_slice``). The tail of ``batch`` zeros keeps the last
  slice in range.
  """
  u = jax.random.uniform(key, (capacity,))
  u = jnp.where(jnp.arange(capacity) < n, u, 2.0)
  order = jnp.argsort(u).astype(jnp.int32)
  return jnp.concatenate([order, jnp.zeros((batch,), jnp.int32)])


def batch_slice(order, i, n, batch: int):
  """Indices ``[batch]`` and 0/1 weights of step ``i`` over ``order``."""
  idx = jax.lax.dynamic_slice_in_dim(order, i * batch, batch)
  return idx, (i * batch + jnp.arange(batch) < n).astype(jnp.float32)


def sgd(lr, momentum, weight_decay):
  """PyTorch's SGD: weight decay enters the gradient before the momentum."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(lr, momentum=momentum))


# Steps are dispatched from Python, one jitted step each: when this was
# written, XLA:CPU ran convolution gradients inside a loop body far slower
# than at top level (jax-ml/jax#12868; 2.5x for a width-8 ConvNet step and
# >4x for width 128 measured here). models.conv_matmul_grads has since made
# them matrix products, which loops do not slow down (evaluate.py trains a
# whole network as one program); the per-step dispatch costs well under a
# millisecond. Shapes are identical for every client and step, so
# everything compiles once.
@functools.lru_cache(maxsize=None)
def client_programs(model, input_shape, batch: int, dsa_strategy: str,
                    micro_batch=None):
  """Jitted ``(init, order, step)`` vmapped over seeds, cached per config.

  ``micro_batch`` computes each step's gradient in pieces of that many
  samples (``evaluate.weighted_loss_and_grad``).
  """
  apply_fn = common.logits_of(model)

  def loss_sum(p, xb, yb, w):
    ce = optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, xb), yb)
    return jnp.sum(ce * w)

  @jax.jit
  def init(init_keys, lr, momentum, wd):
    params = jax.vmap(lambda k: models.init_params(model, k, input_shape))(
        init_keys)
    return params, jax.vmap(sgd(lr, momentum, wd).init)(params)

  @functools.partial(jax.jit, static_argnums=2)
  def order(keys, n, capacity):
    return jax.vmap(lambda k: shuffled_batches(k, n, capacity, batch))(keys)

  def one(params, opt_state, x, y, order, i, n, aug_key, lr, momentum, wd):
    idx, w = batch_slice(order, i, n, batch)
    xb, yb = x[idx], y[idx]
    if dsa_strategy:
      xb = augment.dsa(aug_key, xb, dsa_strategy, siamese=False,
                       one_family=True)

    _, grads = evaluate.weighted_loss_and_grad(loss_sum, params, xb, yb, w,
                                               micro_batch)
    # Mean over the real samples, like PyTorch on a short last batch.
    grads = jax.tree.map(lambda g: g / jnp.maximum(jnp.sum(w), 1.0), grads)
    updates, opt_state = sgd(lr, momentum, wd).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, 0, None, None, 0,
                                        None, None, None)),
                 donate_argnums=(0, 1))
  return init, order, step


def train_clients(key, model, input_shape, client_x, client_y,
                  num_seeds: int, cfg: LocalTrainConfig):
  """Local training of every client from one shared init per seed.

  Each client runs ``cfg.epochs`` epochs over exactly its own samples (fresh
  random order per epoch, batch ``min(batch_size, N_max)`` slots, a short
  last batch masked), SGD with constant learning rate; the seeds of one
  client train side by side (vmapped).

  Args:
    key: the run's key; seed i's shared init is ``fold_in(fold_in(key, i),
      0)``, client k's shuffles and augmentation come from
      ``fold_in(fold_in(fold_in(key, i), 1), k)``.
    model: the architecture every client trains.
    input_shape: one example's shape.
    client_x, client_y: per-client inputs ``[n_k, ...]`` and labels.
    num_seeds: independent repetitions (different shared inits).
    cfg: local training settings.

  Returns:
    Parameters with leaves ``[num_seeds, K, ...]``.
  """
  if num_seeds < 1:
    raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
  if not len(client_x) == len(client_y) >= 1:
    raise ValueError("client_x and client_y must be equally long, >= 1 client")
  xs, ys, ns = pad_clients(client_x, client_y)
  capacity = xs.shape[1]
  b = min(cfg.batch_size, capacity)
  # On CPU the seeds train one after another (a seed axis of 1) with split
  # forward passes: XLA:CPU turns convolutions vmapped over weights into
  # slow grouped convolutions, and large batches fall out of cache (see
  # evaluate.py). Same keys and arithmetic, so the same models up to float
  # summation order.
  on_cpu = jax.default_backend() == "cpu"
  init, order, step = client_programs(
      model, tuple(input_shape), b, cfg.dsa_strategy,
      evaluate.default_micro_batch())
  hyper = (np.float32(cfg.lr), np.float32(cfg.momentum),
           np.float32(cfg.weight_decay))
  xs, ys = jnp.asarray(xs), jnp.asarray(ys)
  all_seeds = [jax.random.fold_in(key, i) for i in range(num_seeds)]
  groups = [[k] for k in all_seeds] if on_cpu else [all_seeds]
  per_group = [_train_seeds(seed_keys, xs, ys, ns, capacity, b, cfg, hyper,
                            init, order, step) for seed_keys in groups]
  return jax.tree.map(lambda *a: jnp.concatenate(a, 0), *per_group)


def _train_seeds(seed_keys, xs, ys, ns, capacity, b, cfg, hyper, init, order,
                 step):
  """``train_clients`` for the given seed keys, side by side (vmapped)."""
  init_keys = jnp.stack([jax.random.fold_in(k, 0) for k in seed_keys])
  out = []
  for k in range(len(ns)):
    n = int(ns[k])
    ckeys = jnp.stack([jax.random.fold_in(jax.random.fold_in(sk, 1), k)
                       for sk in seed_keys])
    xk, yk = xs[k], ys[k]
    params, opt_state = init(init_keys, *hyper)
    for e in range(cfg.epochs):
      ekeys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(ckeys, e)
      orders = order(jax.vmap(jax.random.fold_in, in_axes=(0, None))(ekeys, 0),
                     np.int32(n), capacity)
      akeys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(ekeys, 1)
      for i in range(-(-n // b)):
        params, opt_state = step(
            params, opt_state, xk, yk, orders, np.int32(i), np.int32(n),
            jax.vmap(jax.random.fold_in, in_axes=(0, None))(akeys, i), *hyper)
    out.append(params)
  return jax.tree.map(lambda *a: jnp.stack(a, 1), *out)


def pad_clients(client_x: Sequence[np.ndarray], client_y: Sequence[np.ndarray]):
  """Stacks clients of unequal size: ``x [K, N_max, ...]``, ``y``, ``n [K]``."""
  ns = np.array([len(y) for y in client_y], np.int32)
  cap = max(int(ns.max()), 1)
  shape = np.asarray(client_x[0]).shape[1:]
  xs = np.zeros((len(ns), cap) + shape, np.float32)
  ys = np.zeros((len(ns), cap), np.int32)
  for k, (x, y) in enumerate(zip(client_x, client_y)):
    xs[k, :len(y)] = x
    ys[k, :len(y)] = y
  return xs, ys, ns


def average_params(client_params, client_sizes):
  """FedAvg: the size-weighted mean over the client axis (axis 1).

  Args:
    client_params: leaves ``[S, K, ...]``.
    client_sizes: ``[K]`` sample counts (weights ``n_k / sum n``).

  Returns:
    Leaves ``[S, ...]``.
  """
  sizes = np.asarray(client_sizes, np.float64)
  if (sizes.ndim != 1 or sizes.size == 0 or (sizes < 0).any()
      or sizes.sum() <= 0):
    raise ValueError(f"client_sizes must be [K] non-negative with a positive "
                     f"sum, got {client_sizes!r}")
  w = jnp.asarray(sizes / sizes.sum(), jnp.float32)
  return jax.tree.map(lambda a: jnp.tensordot(w, a, axes=([0], [1])),
                      client_params)


def client_data(s):
  """Per-client ``(inputs, labels)`` lists in client order."""
  idx = s.partition.client_indices
  return ([s.train_x[i] for i in idx], [s.dataset.train_y[i] for i in idx])


def run(s, timings: dict) -> dict:
  """One-shot FedAvg of the evaluation architecture, tested per seed.

  Args:
    s: ``setup.Setup``.
    timings: receives ``fedavg_client_training`` and ``fedavg_evaluate``.

  Returns:
    ``accuracies [n]``, ``accuracy_mean``, ``accuracy_std``,
    ``per_class_recall [C]``, ``predictions [n, N_test]`` (n =
    ``config.eval.num_nets``), plus ``params`` (the averaged models, leaves
    ``[n, ...]``) and ``client_params`` (leaves ``[n, K, ...]``) as numpy
    pytrees for inspection (not JSON).
  """
  cfg = s.config
  n = common.check_positive(cfg.eval.num_nets, "eval.num_nets",
                            integer=True)
  model = common.eval_model(cfg, s.dataset.num_classes)
  lcfg = local_train_config(s)
  xs, ys = client_data(s)
  t0 = time.perf_counter()
  client_params = train_clients(common.baseline_key(s.root, "fedavg"),
                                model, s.input_shape, xs, ys, n, lcfg)
  params = average_params(client_params, [len(y) for y in ys])
  jax.block_until_ready(params)
  t1 = time.perf_counter()
  preds = common.predict(common.logits_of(model), params, s.test_x)
  out = common.model_metrics(preds, s.dataset.test_y, s.dataset.num_classes)
  timings["fedavg_client_training"] = t1 - t0
  timings["fedavg_evaluate"] = time.perf_counter() - t1
  out["params"] = jax.device_get(params)
  out["client_params"] = jax.device_get(client_params)
  return out
