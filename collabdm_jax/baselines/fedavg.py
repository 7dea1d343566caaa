"""One-shot FedAvg: clients train from a shared init, the server averages once.

For each of ``config.eval.num_nets`` seeds the server broadcasts one fresh
initialisation of the baselines' network (``nets.make_net``: the
evaluation architecture, or its BatchNorm variant with
``baseline.net_norm``); every client trains it on its own data with SGD and
uploads the weights once; the server averages them, weighted by client
data size (McMahan et al.'s weighting; BatchNorm running statistics are
averaged the same way), and the averaged model is tested on ``s.test_x``.
The spread over seeds covers the shared init and the clients' shuffles and
augmentation.

How long and how fast a client trains is chosen on its own data, as a
practitioner would before uploading a one-shot model:

1. Validation split: ``val_fraction`` of the client's samples, stratified
   by class (``validation_split``: largest-remainder allocation, at least
   one sample of every class stays in training), drawn from the client's
   key.
2. Search: from the broadcast init of seed 0, one run per learning rate of
   ``lrs`` (same init, same shuffles and augmentation for every rate) for
   at most ``epochs`` epochs on the training part; every ``val_every``
   epochs (and at the last) the run's validation accuracy and cross-entropy
   are measured. A run stops early after ``patience`` checks without
   improving its best (accuracy first, loss breaking ties).
3. Choice: the (rate, epoch count) of the best check over all runs
   (highest accuracy, then lowest loss, then fewest epochs, then the
   smaller rate).
4. Refit: every seed trains from its own broadcast init on ALL of the
   client's data with the chosen rate for the chosen number of epochs. The
   searched models are discarded: the refit sees the held-out 10-20 %
   too, which matters for the rare classes of a skewed client, and the
   epoch count carries over because epochs are passes over the data.

``val_fraction = 0`` turns the selection off: every client trains exactly
``epochs`` epochs at the single rate of ``lrs`` (the earlier behaviour,
same keys, so the same models).

Settings (``config.baseline``): ``local_lrs``, ``local_epochs``,
``local_val_fraction``, ``local_val_every``, ``local_patience`` (None:
never stop early), ``local_momentum``, ``local_weight_decay``,
``local_batch``, ``local_dsa`` (DSA on each training batch as the
evaluator trains, one family per batch; None: ``config.eval.dsa``),
``net_norm``. The learning rate is constant (no decay), as in one-shot
FL's local training (DENSE), and weight decay is coupled to the gradient
like PyTorch's SGD (as in ``evaluate``).

Clients of different sizes are padded to one length so that every client,
run and seed shares one compiled program; each epoch visits exactly the
run's own samples in a fresh random order (ragged last batch masked, and
left out of BatchNorm's statistics), so the padding changes nothing but the
shapes. On an accelerator the runs of a client (rates in the search, seeds
in the refit) train side by side (vmapped); on the CPU one after another,
with ``fast_convnet``'s kernels (``baseline_net``).

The client models are also DENSE's teachers: both baselines get them from
``client_models`` (this module's key and settings), which with
``baseline.client_cache_dir`` trains them once for the two
(``model_cache``).
"""

import dataclasses
import functools
import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from collabdm_jax import augment
from collabdm_jax.baselines import common
from collabdm_jax.baselines import model_cache
from collabdm_jax.baselines import nets
from collabdm_jax import evaluate
from collabdm_jax import fast_convnet

# Streams folded into seed i's key (fold_in(key, i)); seed 0's search and
# split streams serve the per-client selection.
_INIT, _TRAIN, _SEARCH, _SPLIT = 0, 1, 2, 3
log = logging.getLogger("collabdm_jax")
_VAL_CHUNK = 500


@dataclasses.dataclass(frozen=True)
class LocalTrainConfig:
  """How every client trains its copy of the shared model (module doc)."""
  lrs: Tuple[float, ...] = (0.01, 0.03, 0.1)
  epochs: int = 60
  val_fraction: float = 0.15
  val_every: int = 3
  patience: Optional[int] = 4
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 64
  dsa_strategy: str = ""

  @property
  def selects(self) -> bool:
    """Whether lr and epochs are chosen on a validation split."""
    return self.val_fraction > 0


def local_train_config(s) -> LocalTrainConfig:
  """``LocalTrainConfig`` from ``config.baseline`` (checked)."""
  cfg, b = s.config, s.config.baseline
  momentum = float(b.local_momentum)
  if not 0 <= momentum < 1:
    raise ValueError(
        f"baseline.local_momentum must be in [0, 1), got {momentum}")
  lrs = b.local_lrs
  if isinstance(lrs, (int, float)) or not len(lrs):
    raise ValueError(f"baseline.local_lrs must be a non-empty sequence of "
                     f"learning rates, got {lrs!r}")
  lrs = tuple(common.check_positive(v, "baseline.local_lrs") for v in lrs)
  if len(set(lrs)) != len(lrs):
    raise ValueError(f"baseline.local_lrs has repeated values: {lrs}")
  frac = float(b.local_val_fraction)
  if not 0 <= frac < 1:
    raise ValueError(
        f"baseline.local_val_fraction must be in [0, 1), got {frac}")
  if frac == 0 and len(lrs) != 1:
    raise ValueError(f"baseline.local_lrs must hold one value when "
                     f"baseline.local_val_fraction is 0 (nothing to choose "
                     f"on), got {lrs}")
  patience = b.local_patience
  if patience is not None:
    patience = common.check_positive(patience, "baseline.local_patience",
                                     integer=True)
  dsa = bool(common.unless_none(b.local_dsa, cfg.eval.dsa))
  return LocalTrainConfig(
      lrs=lrs,
      epochs=common.check_positive(b.local_epochs, "baseline.local_epochs",
                                   integer=True, allow_zero=frac == 0),
      val_fraction=frac,
      val_every=common.check_positive(b.local_val_every,
                                      "baseline.local_val_every",
                                      integer=True),
      patience=patience,
      momentum=momentum,
      weight_decay=common.check_positive(
          b.local_weight_decay, "baseline.local_weight_decay",
          allow_zero=True),
      batch_size=common.check_positive(b.local_batch,
                                       "baseline.local_batch", integer=True),
      dsa_strategy="_".join(augment.parse_strategy(s.dsa_strategy)) if dsa
      else "")


def baseline_net(s) -> nets.Net:
  """The network FedAvg and DENSE train (``baseline.net_norm``); on a CPU
  with ``fast_convnet``'s kernels, as evaluation trains there
  (``evaluate.default_fast_convnet``: 2.5x faster per sample for a client's
  SGD at the reference table's settings, ``experiments/results/
  client_training/``)."""
  cfg = s.config
  kwargs = cfg.eval.model_kwargs.to_dict() if "model_kwargs" in cfg.eval \
      else {}
  return nets.make_net(cfg.eval.arch, s.dataset.num_classes, kwargs,
                       cfg.baseline.net_norm,
                       fast_kernels=evaluate.default_fast_convnet())


# ---------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------


def validation_counts(class_counts, fraction: float) -> np.ndarray:
  """Validation samples per class: ``round(fraction * n)`` in all, stratified.

  Largest-remainder allocation of ``round(fraction * sum n_c)`` over the
  classes in proportion to ``n_c``, each capped at ``n_c - 1`` so every
  class the client holds keeps a training sample (ties to the lower class
  index).
  """
  n = np.asarray(class_counts, np.int64)
  total = int(np.floor(fraction * n.sum() + 0.5))
  cap = np.maximum(n - 1, 0)
  total = min(total, int(cap.sum()))
  quota = fraction * n
  out = np.minimum(np.floor(quota).astype(np.int64), cap)
  while out.sum() < total:
    room = out < cap
    rem = np.where(room, quota - out, -np.inf)
    out[int(np.argmax(rem))] += 1
  return out


def validation_split(key, labels, fraction: float, num_classes: int):
  """Stratified ``(train_idx, val_idx)`` of one client's samples.

  ``validation_counts`` samples of each class, chosen uniformly within the
  class by ``key``; both index arrays are sorted, disjoint and together
  ``0..N-1``.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes)
  per_class = validation_counts(counts, fraction)
  u = np.asarray(jax.random.uniform(key, (len(labels),)))
  val = []
  for c in np.flatnonzero(per_class):
    idx = np.flatnonzero(labels == c)
    val.append(idx[np.argsort(u[idx], kind="stable")[:per_class[c]]])
  val = np.sort(np.concatenate(val)) if val else np.zeros((0,), np.int64)
  train = np.setdiff1d(np.arange(len(labels)), val)
  return train, val


# ---------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------


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
def client_programs(net: nets.Net, input_shape, batch: int,
                    dsa_strategy: str, micro_batch=None):
  """Jitted ``(init, order, step, val_sums)`` vmapped over runs, per config.

  ``step`` takes one learning rate per run. ``micro_batch`` computes a
  stateless network's gradient in pieces of that many samples
  (``evaluate.weighted_loss_and_grad``); a BatchNorm network takes the
  whole batch at once (its statistics are the batch's). A ``Net`` with
  ``fast_kernels`` prepares ``fast_convnet``'s kernels once per step, not
  once per micro-batch, as ``evaluate`` does.
  """

  fast = net.fast_kernels and fast_convnet.supports(net.module, input_shape)

  def fast_loss_sum(eval_params, xb, yb, w):
    ce = optax.softmax_cross_entropy_with_integer_labels(
        fast_convnet.logits(eval_params, xb), yb)
    return jnp.sum(ce * w)

  def loss_sum(params, state, xb, yb, w):
    logits, new = net.train_logits(net.merge(params, state), xb, w)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
    return jnp.sum(ce * w), net.split(new)[1]

  @jax.jit
  def init(init_keys, momentum, wd):
    variables = jax.vmap(lambda k: net.init(k, input_shape))(init_keys)
    params = jax.vmap(lambda v: net.split(v)[0])(variables)
    return variables, jax.vmap(sgd(1.0, momentum, wd).init)(params)

  @functools.partial(jax.jit, static_argnums=2)
  def order(keys, n, capacity):
    return jax.vmap(lambda k: shuffled_batches(k, n, capacity, batch))(keys)

  def one(variables, opt_state, x, y, order, i, n, aug_key, lr, momentum,
          wd):
    idx, w = batch_slice(order, i, n, batch)
    xb, yb = x[idx], y[idx]
    if dsa_strategy:
      xb = augment.dsa(aug_key, xb, dsa_strategy, siamese=False,
                       one_family=True)
    params, state = net.split(variables)
    if fast:
      # As in evaluate: the Winograd kernels are made once per step and
      # their gradients mapped back once per step (prepare is linear).
      eval_params, to_params = jax.vjp(fast_convnet.prepare, params)
      _, grads = evaluate.weighted_loss_and_grad(fast_loss_sum, eval_params,
                                                 xb, yb, w, micro_batch)
      grads = to_params(grads)[0]
    elif net.has_batchnorm:
      (_, state), grads = jax.value_and_grad(loss_sum, has_aux=True)(
          params, state, xb, yb, w)
    else:
      _, grads = evaluate.weighted_loss_and_grad(
          lambda p, a, b, c: loss_sum(p, state, a, b, c)[0], params, xb, yb,
          w, micro_batch)
    # Mean over the real samples, like PyTorch on a short last batch.
    grads = jax.tree.map(lambda g: g / jnp.maximum(jnp.sum(w), 1.0), grads)
    updates, opt_state = sgd(lr, momentum, wd).update(grads, opt_state,
                                                      params)
    return (net.merge(optax.apply_updates(params, updates), state),
            opt_state)

  step = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, 0, None, None, 0,
                                        0, None, None)),
                 donate_argnums=(0, 1))

  @jax.jit
  def val_sums(variables, x, y, w):
    """Correct predictions and summed cross-entropy per run on a chunk."""

    def one_run(v):
      logits = net.logits(v, x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
      return jnp.sum(hit * w), jnp.sum(ce * w)

    return jax.vmap(one_run)(variables)

  return init, order, step, val_sums


# ---------------------------------------------------------------------------
# Training one client
# ---------------------------------------------------------------------------


def _fold_each(keys, i):
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)


def _validate(val_sums, variables, val):
  """``(accuracy [R], mean cross-entropy [R])`` on the padded split ``val``."""
  xv, yv, nv = val
  c = min(_VAL_CHUNK, xv.shape[0])
  hits = losses = 0.0
  for j in range(0, xv.shape[0], c):
    w = (j + np.arange(c) < nv).astype(np.float32)
    h, l = val_sums(variables, xv[j:j + c], yv[j:j + c], w)
    hits, losses = hits + np.asarray(h), losses + np.asarray(l, np.float64)
  # Hit counts are exact small integers in float32: the accuracy is the
  # exact fraction.
  return np.rint(hits).astype(np.float64) / nv, losses / nv


def _better(a, b) -> bool:
  """Check ``a = (acc, loss)`` beats ``b``: higher accuracy, then lower loss."""
  return b is None or a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def train_runs(programs, init_keys, run_keys, lrs, x, y, n: int,
               epochs: int, cfg: LocalTrainConfig, val=None,
               checkpoint: Optional[model_cache.RunCheckpoint] = None):
  """Trains R runs of one client side by side; validates them if asked.

  Args:
    programs: ``client_programs(...)`` of the network and batch.
    init_keys, run_keys: ``[R]`` keys: run r starts from
      ``net.init(init_keys[r])`` and draws epoch e's order from
      ``fold_in(fold_in(run_keys[r], e), 0)`` and step i's augmentation from
      ``fold_in(fold_in(fold_in(run_keys[r], e), 1), i)``.
    lrs: ``[R]`` learning rates.
    x, y: the client's samples padded to the shared capacity; n: how many
      are real (the first n).
    epochs: epochs to train (at most, with ``val``).
    cfg: momentum, weight decay, batch, validation cadence and patience.
    val: None, or ``(x_val, y_val, n_val)`` padded: check every
      ``cfg.val_every`` epochs and at the last, stop a run after
      ``cfg.patience`` checks without improvement, and the whole group when
      every run has stopped.
    checkpoint: optional ``model_cache.RunCheckpoint``: the state is saved
      there every ``cfg.val_every`` epochs and at the last (after the check,
      with ``val``; its record's ``wall_s`` counts the run's seconds so
      far, across cuts), and a run that finds a saved state goes on from
      it. Epoch keys depend only on the epoch, so a resumed run ends where
      the uninterrupted one does.

  Returns:
    ``(variables [R, ...], curves)``: ``curves[r]`` is the list of
    ``(epoch, accuracy, loss)`` checks of run r up to its stop (empty
    without ``val``).
  """
  init, order, step, val_sums = programs
  capacity = x.shape[0]
  b = min(cfg.batch_size, capacity)
  R = len(lrs)
  hyper = (np.float32(cfg.momentum), np.float32(cfg.weight_decay))
  lrs = jnp.asarray(np.asarray(lrs, np.float32))
  variables, opt_state = init(jnp.stack(init_keys), *hyper)
  run_keys = jnp.stack(run_keys)
  curves = [[] for _ in range(R)]
  best, since, active = [None] * R, [0] * R, [True] * R
  start, t0 = 0, time.perf_counter()
  saved = None if checkpoint is None else checkpoint.load(
      (variables, opt_state))
  if saved is not None:
    (variables, opt_state), rec = saved
    variables, opt_state = jax.tree.map(jnp.asarray, (variables, opt_state))
    start = rec["epoch"] if any(rec["active"]) else epochs
    curves = [[tuple(p) for p in c] for c in rec["curves"]]
    best = [None if v is None else tuple(v) for v in rec["best"]]
    since, active = list(rec["since"]), list(rec["active"])
    log.info("run %s resumed after epoch %d of %d", checkpoint.name,
             rec["epoch"], epochs)
  for e in range(start, epochs):
    ekeys = _fold_each(run_keys, e)
    orders = order(_fold_each(ekeys, 0), np.int32(n), capacity)
    akeys = _fold_each(ekeys, 1)
    for i in range(-(-n // b)):
      variables, opt_state = step(variables, opt_state, x, y, orders,
                                  np.int32(i), np.int32(n),
                                  _fold_each(akeys, i), lrs, *hyper)
    done = e + 1
    if not (done % cfg.val_every == 0 or done == epochs):
      continue
    if val is not None:
      acc, loss = _validate(val_sums, variables, val)
      log.info("epoch %d: validation accuracy %s, loss %s", done,
               np.round(acc, 4).tolist(), np.round(loss, 4).tolist())
      for r in range(R):
        if not active[r]:
          continue
        check = (float(acc[r]), float(loss[r]))
        curves[r].append((done, *check))
        if _better(check, best[r]):
          best[r], since[r] = check, 0
        else:
          since[r] += 1
          active[r] = cfg.patience is None or since[r] < cfg.patience
    if checkpoint is not None:
      checkpoint.save((variables, opt_state), {
          "epoch": done, "curves": curves, "best": best, "since": since,
          "active": active,
          "wall_s": checkpoint.resumed_s + time.perf_counter() - t0})
    if not any(active):
      break
  return variables, curves


def choose(curves, lrs) -> Dict:
  """The best check over all runs: ``{"lr", "epochs", "val_accuracy",
  "val_loss"}`` (highest accuracy, lowest loss, fewest epochs, smaller lr)."""
  cands = [(-acc, loss, epoch, lr, acc)
           for curve, lr in zip(curves, lrs) for epoch, acc, loss in curve]
  if not cands:
    raise ValueError("no validation checks to choose from")
  _, loss, epoch, lr, acc = min(cands)
  return {"lr": float(lr), "epochs": int(epoch), "val_accuracy": float(acc),
          "val_loss": float(loss)}


def _pad(a, capacity):
  out = np.zeros((capacity,) + a.shape[1:], a.dtype)
  out[:len(a)] = a
  return out


def _run_checkpoint(progress, client, run):
  return None if progress is None else progress.run_checkpoint(client, run)


def _resumed_s(checkpoints) -> float:
  return sum(c.resumed_s for c in checkpoints if c is not None)


def train_local_models(key, net: nets.Net, input_shape, client_x, client_y,
                       num_seeds: int, cfg: LocalTrainConfig,
                       num_classes: int,
                       progress: Optional[model_cache.ClientProgress] = None):
  """Every client's one-shot model, ``num_seeds`` times (module docstring).

  Args:
    key: the run's key; seed i's shared init is ``net.init(fold_in(fold_in(
      key, i), 0))`` and client k's refit draws from ``fold_in(fold_in(
      fold_in(key, i), 1), k)``; client k's validation split and search use
      seed 0's streams 3 and 2 (folded with k).
    net: the network every client trains.
    input_shape: one example's shape.
    client_x, client_y: per-client inputs ``[n_k, ...]`` and labels.
    num_seeds: independent repetitions (different shared inits).
    cfg: local training settings.
    num_classes: C (the split is stratified over 0..C-1).
    progress: optional per-client store of this same training
      (``model_cache.ClientProgress``): a client found there is read, not
      trained, and every client trained is saved there at once, so an
      interrupted training resumes where it stopped. A client's training
      does not depend on the others' (only on the shapes, which all
      clients' sizes fix before any trains), so the result is the same.
      Each of a client's runs also goes on from its last validation check
      (``ClientProgress.run_checkpoint``; named ``search<g>`` and
      ``refit<g>`` by run group).

  Returns:
    ``(variables, report)``: variables with leaves ``[num_seeds, K, ...]``;
    ``report[k]`` holds client k's sizes, the chosen ``lr`` and
    ``epochs``, the validation ``curves`` per learning rate, its best
    check, and ``search_s`` / ``refit_s`` wall seconds (of the run that
    trained it; ``resumed`` is True when this call read it from
    ``progress``; ``resumed_s``, when present, is how many of those
    seconds its runs spent before a cut, read from their checkpoints).

  Raises:
    ValueError: bad sizes, or (before any training) a client too small for
    a validation split.
  """
  if num_seeds < 1:
    raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
  if not len(client_x) == len(client_y) >= 1:
    raise ValueError("client_x and client_y must be equally long, >= 1 client")
  ns = [len(y) for y in client_y]
  if min(ns) < 1:
    raise ValueError(f"every client needs >= 1 sample, got sizes {ns}")
  seed0 = jax.random.fold_in(key, 0)
  splits = []
  for k, y in enumerate(client_y):
    if not cfg.selects:
      splits.append(None)
      continue
    tr, va = validation_split(
        jax.random.fold_in(jax.random.fold_in(seed0, _SPLIT), k), y,
        cfg.val_fraction, num_classes)
    if len(va) == 0:
      raise ValueError(
          f"client {k} has {ns[k]} samples: too few for a validation split "
          f"of baseline.local_val_fraction={cfg.val_fraction} (set it to 0 "
          f"to train a fixed number of epochs)")
    splits.append((tr, va))
  capacity = max(ns)
  b = min(cfg.batch_size, capacity)
  micro = None if net.has_batchnorm else evaluate.default_micro_batch()
  programs = client_programs(net, tuple(input_shape), b, cfg.dsa_strategy,
                             micro)
  # On CPU the runs train one after another (a run axis of 1): XLA:CPU
  # turns convolutions vmapped over weights into slow grouped convolutions
  # (see evaluate.py). Same keys and arithmetic, so the same models up to
  # float summation order.
  on_cpu = jax.default_backend() == "cpu"
  val_cap = max([len(sp[1]) for sp in splits if sp] or [0])
  if val_cap > _VAL_CHUNK:  # whole chunks: one compiled validation program
    val_cap = -(-val_cap // _VAL_CHUNK) * _VAL_CHUNK
  seed_keys = [jax.random.fold_in(key, i) for i in range(num_seeds)]
  out, report = [], []
  for k in range(len(ns)):
    hit = progress.load(k) if progress is not None else None
    if hit is not None:
      log.info("client %d's models read from the interrupted training", k)
      out.append(jax.tree.map(jnp.asarray, hit[0]))
      report.append(dict(hit[1], resumed=True))
      continue
    x, y = np.asarray(client_x[k], np.float32), np.asarray(client_y[k],
                                                           np.int32)
    entry = {"n": ns[k]}
    ckpts = []  # this client's run checkpoints (None without progress)
    t0 = time.perf_counter()
    lr, epochs = cfg.lrs[0], cfg.epochs
    if splits[k] is not None:
      tr, va = splits[k]
      val = (jnp.asarray(_pad(x[va], val_cap)), jnp.asarray(_pad(y[va],
                                                                  val_cap)),
             len(va))
      init_key = jax.random.fold_in(seed0, _INIT)
      run_key = jax.random.fold_in(jax.random.fold_in(seed0, _SEARCH), k)
      groups = [[j] for j in range(len(cfg.lrs))] if on_cpu else \
          [list(range(len(cfg.lrs)))]
      curves = [None] * len(cfg.lrs)
      xt, yt = jnp.asarray(_pad(x[tr], capacity)), jnp.asarray(
          _pad(y[tr], capacity))
      for gi, g in enumerate(groups):
        ckpts.append(_run_checkpoint(progress, k, f"search{gi}"))
        _, cg = train_runs(programs, [init_key] * len(g), [run_key] * len(g),
                           [cfg.lrs[j] for j in g], xt, yt, len(tr),
                           cfg.epochs, cfg, val, ckpts[-1])
        for j, c in zip(g, cg):
          curves[j] = c
      chosen = choose(curves, cfg.lrs)
      lr, epochs = chosen["lr"], chosen["epochs"]
      log.info("client %d: chose lr %g and %d epochs (validation accuracy "
               "%.4f) in %.0f s", k, lr, epochs, chosen["val_accuracy"],
               time.perf_counter() - t0)
      entry.update(n_train=len(tr), n_val=len(va), **chosen,
                   search_epochs=int(sum(c[-1][0] for c in curves)),
                   curves={repr(l): [list(p) for p in c]
                           for l, c in zip(cfg.lrs, curves)})
    else:
      entry.update(lr=float(lr), epochs=int(epochs))
    search_before = _resumed_s(ckpts)
    t1 = time.perf_counter()
    xk, yk = jnp.asarray(_pad(x, capacity)), jnp.asarray(_pad(y, capacity))
    groups = [[i] for i in range(num_seeds)] if on_cpu else \
        [list(range(num_seeds))]
    per_group = []
    for gi, g in enumerate(groups):
      ckpts.append(_run_checkpoint(progress, k, f"refit{gi}"))
      v, _ = train_runs(
          programs,
          [jax.random.fold_in(seed_keys[i], _INIT) for i in g],
          [jax.random.fold_in(jax.random.fold_in(seed_keys[i], _TRAIN), k)
           for i in g],
          [lr] * len(g), xk, yk, ns[k], epochs, cfg, checkpoint=ckpts[-1])
      per_group.append(v)
    params = jax.tree.map(lambda *a: jnp.concatenate(a, 0), *per_group)
    jax.block_until_ready(params)
    # Wall times count the seconds runs spent before a cut, too.
    before = _resumed_s(ckpts)
    entry.update(search_s=round(t1 - t0 + search_before, 3),
                 refit_s=round(time.perf_counter() - t1 + before
                               - search_before, 3))
    if before:
      entry["resumed_s"] = round(before, 3)
    log.info("client %d of %d trained (%d samples) in %.0f s", k, len(ns),
             ns[k], time.perf_counter() - t0)
    if progress is not None:
      progress.save(k, params, entry)
    out.append(params)
    report.append(entry)
  return jax.tree.map(lambda *a: jnp.stack(a, 1), *out), report


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
    client_params: leaves ``[S, K, ...]`` (BatchNorm running statistics
      included: they are averaged like the weights).
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


def local_training_record(cfg: LocalTrainConfig, net: nets.Net,
                          report: List[Dict]) -> Dict:
  """The ``results.json`` record of the clients' training: settings,
  budgets, choices and wall times."""
  return {
      "net": type(net.module).__name__,
      "settings": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in dataclasses.asdict(cfg).items()},
      "clients": report,
      "search_s": round(sum(r["search_s"] for r in report), 3),
      "refit_s": round(sum(r["refit_s"] for r in report), 3),
  }


def client_models(s, n: int, net: Optional[nets.Net] = None):
  """Every client's one-shot models ``[n, K, ...]`` and their training record.

  ``train_local_models`` on the setup's clients with the FedAvg key and
  ``local_train_config(s)`` (``n`` seeds), or, with
  ``config.baseline.client_cache_dir`` set, the models an earlier run of
  the same training stored there (``model_cache``: keyed by the clients'
  data, the network, the settings, the key and the code). With a cache, a
  training that was cut off resumes with the clients it finished, and the
  client it was training from that client's last validation check
  (``model_cache.ClientProgress``). The record is
  ``local_training_record``'s, plus ``cache``: None without a cache, else
  the entry's file and whether this run trained (``"stored"``) or read it
  (``"read"``); a read record keeps the wall times of the run that trained.
  """
  net = baseline_net(s) if net is None else net
  lcfg = local_train_config(s)
  xs, ys = client_data(s)
  key = common.baseline_key(s.root, "fedavg")
  cache_dir = s.config.baseline.get("client_cache_dir")
  digest = covered = None
  if cache_dir:
    digest, covered = model_cache.fingerprint(key, xs, ys, {
        "net": repr(net.module), "fast_kernels": net.fast_kernels,
        "local": dataclasses.asdict(lcfg),
        "num_seeds": int(n), "num_classes": int(s.dataset.num_classes),
        "input_shape": [int(d) for d in s.input_shape]})
    hit = model_cache.load(cache_dir, digest)
    if hit is not None:
      params, entry = hit
      log.info("client models read from the cache entry %s", digest)
      record = dict(entry["record"])
      record["cache"] = {"file": str(model_cache.entry_path(cache_dir, digest)),
                         "fingerprint": digest, "action": "read"}
      return jax.tree.map(jnp.asarray, params), record
  progress = model_cache.ClientProgress(cache_dir, digest, covered) \
      if cache_dir else None
  params, report = train_local_models(key, net, s.input_shape, xs, ys, n,
                                      lcfg, s.dataset.num_classes, progress)
  record = local_training_record(lcfg, net, report)
  record["cache"] = None
  if cache_dir:
    path = model_cache.store(cache_dir, digest, params, record, covered)
    progress.clear(len(xs))
    record["cache"] = {"file": str(path), "fingerprint": digest,
                       "action": "stored"}
  return params, record


def run(s, timings: dict) -> dict:
  """One-shot FedAvg of the baselines' network, tested per seed.

  Args:
    s: ``setup.Setup``.
    timings: receives ``fedavg_client_training`` (selection and refit) and
      ``fedavg_evaluate``.

  Returns:
    ``accuracies [n]``, ``accuracy_mean``, ``accuracy_std``,
    ``per_class_recall [C]``, ``predictions [n, N_test]`` (n =
    ``config.eval.num_nets``); ``extra`` for ``results.json``:
    ``local_training`` (``local_training_record``) and
    ``client_accuracies [n, K]`` (each client's own model on the test
    set); plus ``params`` (the averaged models, leaves ``[n, ...]``) and
    ``client_params`` (leaves ``[n, K, ...]``) as numpy pytrees for
    inspection (not JSON).
  """
  cfg = s.config
  n = common.check_positive(cfg.eval.num_nets, "eval.num_nets",
                            integer=True)
  net = baseline_net(s)
  _, ys = client_data(s)
  t0 = time.perf_counter()
  client_params, record = client_models(s, n, net)
  params = average_params(client_params, [len(y) for y in ys])
  jax.block_until_ready(params)
  t1 = time.perf_counter()
  logits = nets.logits_fn(net)
  preds = common.predict(logits, params, s.test_x)
  out = common.model_metrics(preds, s.dataset.test_y, s.dataset.num_classes)
  out["extra"] = {
      "local_training": record,
      "client_accuracies": client_accuracies(
          net, client_params, s.test_x, s.dataset.test_y).tolist(),
  }
  timings["fedavg_client_training"] = t1 - t0
  timings["fedavg_evaluate"] = time.perf_counter() - t1
  out["params"] = jax.device_get(params)
  out["client_params"] = jax.device_get(client_params)
  return out


def client_accuracies(net: nets.Net, client_params, x, y) -> np.ndarray:
  """Test accuracy ``[S, K]`` of every client's own model."""
  logits = nets.logits_fn(net)
  K = jax.tree.leaves(client_params)[0].shape[1]
  cols = [np.mean(common.predict(
      logits, jax.tree.map(lambda a, k=k: a[:, k], client_params), x)
      == np.asarray(y), -1) for k in range(K)]
  return np.stack(cols, 1)
