"""DENSE: data-free one-shot FL, distilling the client ensemble (Zhang et al.).

DENSE (NeurIPS 2022, reference code ``zj-jayzhang/DENSE``) has two stages.

1. Clients train local models once and upload them. Here they are exactly
   one-shot FedAvg's client models (``fedavg.client_models``: the FedAvg
   key and settings, learning rate and epochs chosen on each
   client's validation split), so DENSE and FedAvg differ only in how the
   server combines the same uploads. The teacher is the ensemble of the
   client models (inference mode); ``ensemble`` says how their logits
   ``l_1..l_K`` combine into the teacher's logits ``t``
   (``ensemble_of_logits``):

   * ``"logits"`` (the reference, default): ``t = (1/K) sum_k l_k``;
   * ``"probs"`` (a deviation): ``t = log((1/K) sum_k softmax(l_k))``, so
     ``softmax(t)`` is the mean of the clients' predicted distributions.
     Every loss below then sees that distribution at temperature 1; at
     temperature ``T`` the KD target is ``softmax(t/T)``, the averaged
     distribution flattened, not the mean of the clients' tempered
     distributions (which tends to the mean of logits as ``T`` grows:
     ``softmax(l/T) ~ (1 + (l - mean(l))/T)/C``, linear in ``l``).

   The same ensemble feeds every term that reads the teacher: the
   generator's cross entropy, adversarial KL (and its disagreement mask)
   and diversity term, and the student's KD loss. DeepInversion's prior
   reads each teacher's BatchNorm statistics, not the ensemble. In
   ``experiments/results/dense_diagnosis/ensemble`` (instance-norm clients
   on Dirichlet-skewed data, 2 seeds) averaging probabilities gave a much
   more accurate ensemble than averaging logits, and a student above
   FedAvg at both seeds (the logit mean's: at one).
2. The server alternates, for ``epochs`` rounds:

   * data generation: a generator (re-initialised every round, as the
     reference resets it) and its latent batch ``z`` are trained with Adam
     for ``g_steps`` steps on crop/flip-augmented samples. The loss has
     the reference's three terms: cross entropy of the ensemble on randomly
     drawn target labels (weight ``oh``); DeepInversion's BatchNorm prior
     (weight ``bn``), ``sum`` over teachers and BatchNorm layers of
     ``||mu_run - mu_batch||_2 + ||var_run - var_batch||_2`` between each
     layer's running statistics (the client's data, as uploaded inside the
     model) and the generated batch's (``nets.deep_inversion_loss``); and
     the adversarial term (weight ``adv``): minus the teacher-to-student KL
     on samples where their predicted classes differ, pushing samples
     towards the decision boundary. The batch of lowest loss seen joins a
     pool that grows every round.
   * distillation: one pass over the whole pool (shuffled, augmented) with
     SGD on the student, loss ``T^2 KL(softmax(t/T) || softmax(s/T))``.

The BatchNorm prior needs BatchNorm teachers: ``baseline.net_norm =
"batchnorm"`` (``nets.BNConvNet``, the ConvNet with BatchNorm, as DENSE's
Fashion-MNIST network; its CIFAR-10 network has no BatchNorm, so there the
reference runs without the prior). By default the clients train the
evaluation ConvNet (instance norm, no running statistics) and ``bn`` is 0:
in ``experiments/results/dense_diagnosis`` the BatchNorm clients gave a
much weaker FedAvg model and ensemble, and the prior did not raise the
student with BatchNorm teachers either. DAFL's information-entropy term
(weight ``div``: minus the entropy of the ensemble's mean prediction over
the batch; not in the reference) is available and off by default; it
changed nothing measurable there.

Student and BatchNorm: the student (the same network as the clients')
trains in training mode (batch statistics, running statistics updated) on
the pool and is tested in inference mode. In the generator's adversarial
term it also runs on batch statistics, as in the reference, but those
passes do not update its running statistics (the reference's do, a side
effect of PyTorch's training mode); only distillation does.

Other differences from the reference: the pool is kept in memory in
normalised float (the reference round-trips it through 8-bit PNG files);
augmentation is DSA's crop (translation by 1/8 of the side, as RandomCrop
with padding 4 on 32 px) and flip, restricted to the families the dataset's
DSA strategy allows (no flip on digits, none on tables), in both stages
(the reference flips only when distilling on 28 px data); tables get an
MLP generator.

Settings (``config.baseline``; reference values in brackets, defaults
first): ``dense_epochs`` 30 [200], ``dense_g_steps`` 10 [30],
``dense_synthesis_batch`` 64 [256], ``dense_kd_batch`` 64 [256] (in the
diagnosis, 2 seeds, DENSE at this budget was above FedAvg at one seed and
level with it at the other; at 5 x 5 x 32, the earlier default, it was far
below at both),
``dense_nz`` 256 [256], ``dense_ngf`` 64 [64], ``dense_lr_g`` 1e-3 [1e-3],
``dense_kd_lr`` 0.005 [0.005], ``dense_kd_momentum`` 0.9 [0.9],
``dense_T`` 20 [20], ``dense_oh`` 1 [1], ``dense_adv`` 1 [1], ``dense_bn``
0 [1 with BatchNorm networks], ``dense_div`` 0 [0], ``dense_ensemble``
``"logits"`` [mean of logits]. Client training: see ``fedavg``.

The student is a fresh network of the clients' architecture; its test
accuracy is reported per seed (``config.eval.num_nets`` seeds; seed i
distils FedAvg seed i's client models), next to the ensemble's (DENSE's
ceiling) and FedAvg's on the same client models (what DENSE must beat).
"""

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from collabdm_jax import augment
from collabdm_jax.baselines import common
from collabdm_jax.baselines import fedavg
from collabdm_jax.baselines import model_cache
from collabdm_jax.baselines import nets

log = logging.getLogger("collabdm_jax")

_BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """Server-side settings of DENSE (see the module docstring)."""
  epochs: int = 30
  g_steps: int = 10
  synthesis_batch: int = 64
  kd_batch: int = 64
  nz: int = 256
  ngf: int = 64
  lr_g: float = 1e-3
  kd_lr: float = 0.005
  kd_momentum: float = 0.9
  temperature: float = 20.0
  oh: float = 1.0
  adv: float = 1.0
  bn: float = 0.0
  div: float = 0.0
  ensemble: str = "logits"
  aug_strategy: str = "crop_flip"


def dense_config(s, net: nets.Net = None) -> DenseConfig:
  """``DenseConfig`` from ``config.baseline`` (checked against ``net``,
  the clients' network, default ``fedavg.baseline_net(s)``)."""
  b = s.config.baseline
  pos = common.check_positive
  kd_momentum = float(b.dense_kd_momentum)
  if not 0 <= kd_momentum < 1:
    raise ValueError(
        f"baseline.dense_kd_momentum must be in [0, 1), got {kd_momentum}")
  net = fedavg.baseline_net(s) if net is None else net
  bn = pos(b.dense_bn, "baseline.dense_bn", allow_zero=True)
  if bn > 0 and not net.has_batchnorm:
    raise ValueError(
        f"baseline.dense_bn={bn} needs BatchNorm teachers (DeepInversion's "
        f"prior matches their running statistics): set "
        f"baseline.net_norm='batchnorm', or dense_bn=0 for the "
        f"{type(net.module).__name__}")
  return DenseConfig(
      epochs=pos(b.dense_epochs, "baseline.dense_epochs",
                 integer=True),
      g_steps=pos(b.dense_g_steps, "baseline.dense_g_steps",
                  integer=True),
      synthesis_batch=pos(b.dense_synthesis_batch,
                          "baseline.dense_synthesis_batch", integer=True),
      kd_batch=pos(b.dense_kd_batch, "baseline.dense_kd_batch",
                   integer=True),
      nz=pos(b.dense_nz, "baseline.dense_nz", integer=True),
      ngf=pos(b.dense_ngf, "baseline.dense_ngf", integer=True),
      lr_g=pos(b.dense_lr_g, "baseline.dense_lr_g"),
      kd_lr=pos(b.dense_kd_lr, "baseline.dense_kd_lr"),
      kd_momentum=kd_momentum,
      temperature=pos(b.dense_T, "baseline.dense_T"),
      oh=pos(b.dense_oh, "baseline.dense_oh", allow_zero=True),
      adv=pos(b.dense_adv, "baseline.dense_adv", allow_zero=True),
      bn=bn,
      div=pos(b.dense_div, "baseline.dense_div", allow_zero=True),
      ensemble=check_ensemble(b.dense_ensemble, "baseline.dense_ensemble"),
      aug_strategy=common.augment_strategy(s.dsa_strategy))


# ---------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------

def _W_INIT(key, shape, dtype=jnp.float32):
  """N(0, 0.02) weights, as the reference resets its generator every round.

  Drawn flat and reshaped: XLA:CPU compiles threefry for rank-4 shapes
  several times slower (see ``models.torch_kernel_init``).
  """
  flat = 0.02 * jax.random.normal(key, (math.prod(shape),), dtype)
  return flat.reshape(shape)


class _BatchStatNorm(nn.Module):
  """BatchNorm in training mode: batch statistics, affine, no running stats.

  The reference generator is only ever run in training mode, so its running
  averages are never used; without them the module stays pure.
  """

  @nn.compact
  def __call__(self, x):
    axes = tuple(range(x.ndim - 1))
    scale = self.param(
        "scale", lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s),
        (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _BN_EPS) * scale + bias


def _upsample2(x):
  """Nearest-neighbour x2 upsampling of NHWC maps."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Generator(nn.Module):
  """DENSE's generator, NHWC: z -> image in the dataset's normalised space.

  Images: Linear(nz -> 2ngf * H/4 * W/4), BN, up x2, conv3x3(2ngf), BN,
  LeakyReLU(0.2), up x2, conv3x3(ngf), BN, LeakyReLU(0.2), conv3x3(C),
  sigmoid, then ``(pixel - mean) / std`` so samples live where the client
  models' inputs do. Tables (``out_shape`` of rank 1): Linear(4ngf), BN,
  LeakyReLU, Linear(4ngf), BN, LeakyReLU, Linear(F), unbounded (features are
  standardised).

  Attributes:
    out_shape: one sample's shape, (H, W, C) with H, W divisible by 4, or (F,).
    ngf: generator width.
    mean, std: per-channel normalisation of the dataset (images only).
  """
  out_shape: Tuple[int, ...]
  ngf: int = 64
  mean: Tuple[float, ...] = (0.0,)
  std: Tuple[float, ...] = (1.0,)

  @nn.compact
  def __call__(self, z):
    lrelu = lambda v: nn.leaky_relu(v, 0.2)
    dense = functools.partial(nn.Dense, kernel_init=_W_INIT)
    if len(self.out_shape) == 1:
      x = lrelu(_BatchStatNorm()(dense(4 * self.ngf)(z)))
      x = lrelu(_BatchStatNorm()(dense(4 * self.ngf)(x)))
      return dense(self.out_shape[0])(x)
    h, w, c = self.out_shape
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1,
                             kernel_init=_W_INIT)
    x = dense(2 * self.ngf * (h // 4) * (w // 4))(z)
    x = x.reshape((z.shape[0], h // 4, w // 4, 2 * self.ngf))
    x = _upsample2(_BatchStatNorm()(x))
    x = lrelu(_BatchStatNorm()(conv(2 * self.ngf, use_bias=False)(x)))
    x = _upsample2(x)
    x = lrelu(_BatchStatNorm()(conv(self.ngf, use_bias=False)(x)))
    x = nn.sigmoid(conv(c)(x))
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)


def make_generator(input_shape, ngf, mean=None, std=None) -> Generator:
  """A ``Generator`` for samples of ``input_shape`` (checked)."""
  shape = tuple(int(v) for v in input_shape)
  if len(shape) == 3:
    if shape[0] % 4 or shape[1] % 4:
      raise ValueError(f"input_shape height and width must be divisible by 4 "
                       f"for the DENSE generator, got {shape}")
    c = shape[2]
    mean = np.ravel(np.asarray(0.0 if mean is None else mean, np.float64))
    std = np.ravel(np.asarray(1.0 if std is None else std, np.float64))
    if mean.size not in (1, c) or std.size not in (1, c):
      raise ValueError(f"mean and std must have 1 or {c} entries, got "
                       f"{mean.size} and {std.size}")
    if not (std > 0).all():
      raise ValueError(f"std must be > 0, got {std}")
    return Generator(shape, ngf,
                     tuple(float(v) for v in np.broadcast_to(mean, (c,))),
                     tuple(float(v) for v in np.broadcast_to(std, (c,))))
  if len(shape) == 1:
    return Generator(shape, ngf)
  raise ValueError(f"input_shape must be (H, W, C) or (F,), got {shape}")


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def kl_per_sample(student_logits, teacher_logits, temperature=1.0):
  """``T^2 KL(softmax(t/T) || softmax(s/T))`` per row, ``[B]``."""
  t = temperature
  log_p = jax.nn.log_softmax(teacher_logits / t)
  log_q = jax.nn.log_softmax(student_logits / t)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1) * (t * t)


def generator_loss(teacher_logits, student_logits, targets, bn_term=0.0, *,
                   oh, adv, div, bn=0.0):
  """DENSE's generator objective (module docstring).

  ``bn_term`` is the teachers' DeepInversion loss on the batch (0 without
  BatchNorm). Returns ``(total, (ce, adv_term, div_term, bn_term))``;
  ``adv_term`` is minus the mean KL over the batch, counted only where
  student and teacher predict different classes; ``div_term`` is minus the
  entropy of the ensemble's mean prediction.
  """
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      teacher_logits, targets))
  differ = (jnp.argmax(student_logits, -1)
            != jnp.argmax(teacher_logits, -1)).astype(jnp.float32)
  adv_term = -jnp.mean(kl_per_sample(student_logits, teacher_logits) * differ)
  p_mean = jnp.mean(jax.nn.softmax(teacher_logits), 0)
  div_term = jnp.sum(p_mean * jnp.log(p_mean + 1e-12))
  bn_term = jnp.asarray(bn_term, jnp.float32)
  total = oh * ce + adv * adv_term + div * div_term + bn * bn_term
  return total, (ce, adv_term, div_term, bn_term)


# ---------------------------------------------------------------------------
# Server programs
# ---------------------------------------------------------------------------


ENSEMBLES = ("logits", "probs")


def check_ensemble(ensemble, name="ensemble") -> str:
  """``ensemble`` if it is one of ``ENSEMBLES``, else a ValueError."""
  if ensemble not in ENSEMBLES:
    raise ValueError(f"{name} must be one of {list(ENSEMBLES)}, got "
                     f"{ensemble!r}")
  return ensemble


def ensemble_of_logits(logits, ensemble="logits"):
  """The teacher's logits ``[B, C]`` from the clients' ``[B, C]`` each.

  ``"logits"``: ``(1/K) sum_k l_k`` (DENSE's reference; summed in the
  clients' order, as before the choice existed). ``"probs"``:
  ``log((1/K) sum_k softmax(l_k)) = logsumexp_k log_softmax(l_k) - log K``,
  computed in log space so that confident clients do not underflow;
  ``softmax`` of it is the mean of the clients' softmaxes.

  Args:
    logits: a sequence of K arrays ``[B, C]`` (or an array ``[K, B, C]``).
    ensemble: one of ``ENSEMBLES``.
  """
  check_ensemble(ensemble)
  k = len(logits)
  if ensemble == "logits":
    return sum(logits[i] for i in range(k)) / k
  log_p = jax.nn.log_softmax(jnp.stack(list(logits)), -1)
  return jax.nn.logsumexp(log_p, 0) - jnp.log(float(k))


def _augment(key, x, strategy):
  if not strategy:
    return x
  return augment.dsa(key, x, strategy, siamese=False, one_family=False)


def _take(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


@functools.lru_cache(maxsize=None)
def ensemble_logits(net: nets.Net, ensemble: str = "logits"):
  """``f(teachers [K, ...], x) -> the ensemble's logits``, cached per net.

  The teachers run in inference mode and combine by ``ensemble_of_logits``.
  Unrolled over the (few) teachers rather than vmapped: XLA:CPU turns
  convolutions vmapped over their weights into grouped convolutions,
  several times slower (see ``fedavg.train_local_models``).
  """
  check_ensemble(ensemble)

  def f(teachers, x):
    k = jax.tree.leaves(teachers)[0].shape[0]
    return ensemble_of_logits(
        [net.logits(_take(teachers, i), x) for i in range(k)], ensemble)

  return f


def _ensemble_and_prior(net: nets.Net, with_bn: bool, ensemble: str):
  """``f(teachers, x) -> (ensemble logits, DeepInversion loss summed over
  teachers)``; the loss is 0 when ``with_bn`` is False."""

  def f(teachers, x):
    if not with_bn:
      return ensemble_logits(net, ensemble)(teachers, x), 0.0
    k = jax.tree.leaves(teachers)[0].shape[0]
    logits, prior = [], 0.0
    for i in range(k):
      l, moments = net.logits_and_moments(_take(teachers, i), x)
      logits.append(l)
      prior = prior + nets.deep_inversion_loss(moments)
    return ensemble_of_logits(logits, ensemble), prior

  return f


@functools.lru_cache(maxsize=None)
def _generator_programs(net, generator, num_classes, batch, nz, lr_g, oh,
                        adv, div, bn, ensemble, aug_strategy):
  """Jitted ``(start_round, generator_step)`` for one static configuration.

  Steps are dispatched from Python (see ``fedavg.client_programs`` for
  why: XLA:CPU convolutions inside loop bodies are slow; for this
  generator a ``lax.scan`` over the steps was ~100x slower per step). Only
  settings that shape the program key the cache, so budgets (rounds,
  steps) can change without recompiling.
  """
  teacher_fn = _ensemble_and_prior(net, bn > 0, ensemble)
  g_opt = optax.adam(lr_g, b1=0.5, b2=0.999)
  B = batch

  @jax.jit
  def start_round(key):
    """Fresh generator (the reference resets it), latents and targets."""
    gen_params = generator.init(jax.random.fold_in(key, 0),
                                jnp.zeros((B, nz)))["params"]
    z = jax.random.normal(jax.random.fold_in(key, 1), (B, nz))
    targets = jnp.sort(jax.random.randint(jax.random.fold_in(key, 2), (B,), 0,
                                          num_classes))
    variables = (gen_params, z)
    return variables, g_opt.init(variables), targets

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def generator_step(variables, opt_state, teachers, student, targets,
                     aug_key):
    """One Adam step on (generator, z); returns the pre-step samples/loss."""

    def loss_fn(variables):
      gp, z = variables
      x = generator.apply({"params": gp}, z)
      xa = _augment(aug_key, x, aug_strategy)
      t_logits, prior = teacher_fn(teachers, xa)
      s_logits, _ = net.train_logits(student, xa)
      total, parts = generator_loss(t_logits, s_logits, targets, prior,
                                    oh=oh, adv=adv, div=div, bn=bn)
      return total, (x, parts)

    (loss, (x, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables)
    updates, opt_state = g_opt.update(grads, opt_state, variables)
    return (optax.apply_updates(variables, updates), opt_state, x,
            jnp.stack((loss,) + parts))

  return start_round, generator_step


@functools.lru_cache(maxsize=None)
def kd_programs(net, pool_size, b, kd_lr, kd_momentum, temperature,
                aug_strategy, ensemble="logits"):
  """Jitted ``(kd_order, kd_step, kd_opt)`` for one static configuration;
  the KD target is the ``ensemble`` of the teachers
  (``ensemble_of_logits``)."""
  teacher = ensemble_logits(net, ensemble)
  kd_opt = optax.sgd(kd_lr, momentum=kd_momentum)

  @jax.jit
  def kd_order(key, n):
    return fedavg.shuffled_batches(key, n, pool_size, b)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def kd_step(student, opt_state, teachers, pool, order, i, n, aug_key):
    """One KD step on pool batch ``i``; returns the summed loss too."""
    idx, w = fedavg.batch_slice(order, i, n, b)
    xb = _augment(aug_key, pool[idx], aug_strategy)
    t_logits = teacher(teachers, xb)
    params, state = net.split(student)

    def loss_fn(p):
      logits, new = net.train_logits(net.merge(p, state), xb, w)
      kl = kl_per_sample(logits, t_logits, temperature)
      return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = kd_opt.update(grads, opt_state, params)
    return (net.merge(optax.apply_updates(params, updates),
                      net.split(new)[1]), opt_state, loss * jnp.sum(w))

  return kd_order, kd_step, kd_opt


def distill(key, teachers, net, input_shape, num_classes, cfg: DenseConfig,
            mean=None, std=None, on_round=None,
            checkpoint: Optional[model_cache.RunCheckpoint] = None,
            save_every_s: float = 300.0):
  """DENSE's server stage for one seed.

  Args:
    key: this seed's server key (student init, generator rounds, KD order).
    teachers: client models' variables, leaves ``[K, ...]``.
    net: the ``nets.Net`` of teachers and student.
    input_shape: one sample's shape.
    num_classes: C.
    cfg: ``DenseConfig`` (``bn > 0`` needs a BatchNorm ``net``).
    mean, std: the dataset's per-channel normalisation (images).
    on_round: optional ``f(round, student)`` called after each round's
      distillation pass (e.g. to test the student as it learns).
    checkpoint: optional ``model_cache.RunCheckpoint``: after a round, if
      ``save_every_s`` seconds have passed since the last save, and after
      the last round, the student, its optimiser state, the pool and the
      history are saved there; a call that finds a saved state goes on
      after its round (rounds draw their keys from the round index only,
      so the result is the uninterrupted one). A save rewrites the pool:
      at DENSE's reference budget up to 200 x 256 samples, hence the
      interval rather than every round.

  Returns:
    ``(student, init, history)``: the distilled student's variables, its
    initialisation, and ``history`` with ``gen`` ``[epochs, g_steps, 5]``
    (total, ce, adv, div, bn generator losses), ``kd`` ``[epochs]`` (mean
    KD loss of each pass over the pool) and ``pool`` ``[epochs * batch,
    ...]`` (every generated sample the student was distilled on).
  """
  if cfg.bn > 0 and not net.has_batchnorm:
    raise ValueError("cfg.bn > 0 needs a network with BatchNorm")
  generator = make_generator(input_shape, cfg.ngf, mean, std)
  B = cfg.synthesis_batch
  pool_size = cfg.epochs * B
  start_round, generator_step = _generator_programs(
      net, generator, int(num_classes), B, cfg.nz, cfg.lr_g, cfg.oh,
      cfg.adv, cfg.div, cfg.bn, check_ensemble(cfg.ensemble, "cfg.ensemble"),
      cfg.aug_strategy)
  b = min(cfg.kd_batch, pool_size)
  kd_order, kd_step, kd_opt = kd_programs(
      net, pool_size, b, cfg.kd_lr, cfg.kd_momentum, cfg.temperature,
      cfg.aug_strategy, cfg.ensemble)
  student = net.init(jax.random.fold_in(key, 0), input_shape)
  init = jax.tree.map(jnp.copy, student)  # the steps donate the student
  opt_state = kd_opt.init(net.split(student)[0])
  pool = jnp.zeros((pool_size,) + tuple(input_shape), jnp.float32)
  gen_hist, kd_hist = [], []
  start = 0
  t0 = saved_at = time.perf_counter()
  saved = None if checkpoint is None else checkpoint.load(
      (student, opt_state, pool))
  if saved is not None:
    (student, opt_state, pool), rec = saved
    student, opt_state, pool = jax.tree.map(jnp.asarray,
                                            (student, opt_state, pool))
    start = rec["round"]
    gen_hist = [np.asarray(h, np.float32) for h in rec["gen"]]
    kd_hist = [float(v) for v in rec["kd"]]
    log.info("DENSE %s resumed after round %d of %d", checkpoint.name,
             start, cfg.epochs)
  for e in range(start, cfg.epochs):
    ekey = jax.random.fold_in(jax.random.fold_in(key, 1), e)
    gkey = jax.random.fold_in(ekey, 0)
    variables, g_state, targets = start_round(gkey)
    aug_key = jax.random.fold_in(gkey, 3)
    best_loss, best_x, hist = np.inf, None, []
    for i in range(cfg.g_steps):
      variables, g_state, x, losses = generator_step(
          variables, g_state, teachers, student, targets,
          jax.random.fold_in(aug_key, i))
      losses = np.asarray(losses)
      hist.append(losses)
      # As the reference: keep the samples of the lowest loss seen (the
      # loss is computed before this step's update, on these samples).
      if best_x is None or losses[0] < best_loss:
        best_loss, best_x = float(losses[0]), x
    pool = jax.lax.dynamic_update_slice_in_dim(pool, best_x, e * B, 0)
    n = np.int32((e + 1) * B)
    kkey = jax.random.fold_in(ekey, 1)
    order = kd_order(jax.random.fold_in(kkey, 0), n)
    aug = jax.random.fold_in(kkey, 1)
    total = 0.0
    for i in range(-(-int(n) // b)):
      student, opt_state, loss = kd_step(student, opt_state, teachers, pool,
                                         order, np.int32(i), n,
                                         jax.random.fold_in(aug, i))
      total += float(loss)
    gen_hist.append(np.stack(hist))
    kd_hist.append(total / int(n))
    # A reference-budget run lasts hours on a CPU: say where it is.
    log.info("DENSE round %d of %d: best generator loss %.4f, KD loss %.4f "
             "over a pool of %d", e + 1, cfg.epochs, best_loss, kd_hist[-1],
             int(n))
    if on_round is not None:
      on_round(e, student)
    now = time.perf_counter()
    if checkpoint is not None and (e + 1 == cfg.epochs
                                   or now - saved_at >= save_every_s):
      checkpoint.save((student, opt_state, pool), {
          "round": e + 1, "gen": [h.tolist() for h in gen_hist],
          "kd": kd_hist, "wall_s": checkpoint.resumed_s + now - t0})
      saved_at = time.perf_counter()
  history = {"gen": np.stack(gen_hist), "kd": np.asarray(kd_hist),
             "pool": np.asarray(pool)}
  return student, init, history


def server_checkpoints(directory, key, teachers, net: nets.Net, input_shape,
                       num_classes, cfg: DenseConfig, mean, std, n: int):
  """``n`` ``model_cache.RunCheckpoint``s of ``distill``, one per seed.

  Named ``dense-<fingerprint>-seed<i>`` in ``directory`` (the client-model
  cache), where the fingerprint covers what the server stage reads: the
  teachers' arrays, the network, the settings, the key, the JAX version
  and backend and the package's code. A rerun of the same cell finds its
  students' saved rounds; anything else misses them.
  """
  covered = {
      "format": "collabdm_jax dense rounds 1",
      "net": repr(net.module), "fast_kernels": net.fast_kernels,
      "settings": dataclasses.asdict(cfg),
      "input_shape": [int(d) for d in input_shape],
      "num_classes": int(num_classes),
      "mean": None if mean is None else np.ravel(mean).tolist(),
      "std": None if std is None else np.ravel(std).tolist(),
      "key": np.asarray(jax.random.key_data(key)).tolist(),
      "jax": jax.__version__, "backend": jax.default_backend(),
      "code": model_cache.code_digest(),
  }
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(teachers):
    leaf = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{leaf.dtype}{leaf.shape}".encode() + leaf.tobytes())
  covered["teachers"] = h.hexdigest()
  digest = hashlib.sha256(
      json.dumps(covered, sort_keys=True).encode()).hexdigest()
  return [model_cache.RunCheckpoint(directory, f"dense-{digest}-seed{i}",
                                    dict(covered, seed=i)) for i in range(n)]


def _stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def server_budget(cfg: DenseConfig) -> dict:
  """What the server stage costs per seed, in samples and steps."""
  b = min(cfg.kd_batch, cfg.epochs * cfg.synthesis_batch)
  kd_steps = sum(-(-(e + 1) * cfg.synthesis_batch // b)
                 for e in range(cfg.epochs))
  return {"rounds": cfg.epochs, "generator_steps": cfg.epochs * cfg.g_steps,
          "pool_size": cfg.epochs * cfg.synthesis_batch,
          "kd_steps": kd_steps, "kd_batch": b}


def run(s, timings: dict, client_params=None) -> dict:
  """DENSE on the setup's clients; student accuracy over ``num_nets`` seeds.

  Args:
    s: ``setup.Setup``.
    client_params: optional ``fedavg.run(s, ...)["client_params"]`` of the
      same config (leaves ``[n, K, ...]``): reused as the teachers instead
      of training the identical client models again.
    timings: receives ``dense_client_training``, ``dense_server`` and
      ``dense_evaluate`` (wall seconds).

  Returns:
    ``accuracies [n]``, ``accuracy_mean``, ``accuracy_std``,
    ``per_class_recall [C]``, ``predictions [n, N_test]`` of the students;
    ``ensemble_predictions`` / ``fedavg_predictions`` /
    ``init_predictions`` ``[n, N_test]`` (the teachers' ensemble, FedAvg
    of the same client models, the students before distillation);
    ``extra`` for ``results.json``: ``ensemble_accuracies``,
    ``fedavg_accuracies``, ``init_accuracies`` ``[n]``, ``dense``
    (settings, ``server_budget`` and, for a run that went on from saved
    rounds, ``resumed_s``: the seconds its rounds spent before the cut,
    which ``dense_server`` does not count) and ``local_training`` (None
    when the teachers were passed in); with
    ``config.baseline.client_cache_dir`` set, each student's rounds are
    saved there as it distils (``server_checkpoints``), so a cut-off cell
    goes on from them; ``history`` (per seed, see ``distill``),
    ``params`` and ``init_params`` (students after / before, leaves
    ``[n, ...]``) for inspection (not JSON).
  """
  cfg = s.config
  n = common.check_positive(cfg.eval.num_nets, "eval.num_nets",
                            integer=True)
  C = s.dataset.num_classes
  net = fedavg.baseline_net(s)
  dcfg = dense_config(s, net)
  xs, ys = fedavg.client_data(s)
  t0 = time.perf_counter()
  local = None
  if client_params is None:
    teachers, local = fedavg.client_models(s, n, net)
  else:
    teachers = jax.tree.map(jnp.asarray, client_params)
    shape = jax.tree.leaves(teachers)[0].shape[:2]
    if shape != (n, len(xs)):
      raise ValueError(f"client_params must have leaves [num_nets={n}, "
                       f"K={len(xs)}, ...], got leading shape {shape}")
  jax.block_until_ready(teachers)
  t1 = time.perf_counter()
  key = common.baseline_key(s.root, "dense")
  mean = std = None
  if len(s.input_shape) == 3:
    mean, std = s.dataset.mean, s.dataset.std
  cache_dir = cfg.baseline.get("client_cache_dir")
  ckpts = server_checkpoints(cache_dir, key, teachers, net, s.input_shape, C,
                             dcfg, mean, std, n) if cache_dir else [None] * n
  students, inits, histories = [], [], []
  for i in range(n):
    st, init, hist = distill(
        jax.random.fold_in(key, i), _take(teachers, i), net, s.input_shape,
        C, dcfg, mean, std, checkpoint=ckpts[i])
    students.append(st)
    inits.append(init)
    histories.append(hist)
  students, inits = _stack(students), _stack(inits)
  jax.block_until_ready(students)
  # Every student is finished: their saved rounds (pools included) go.
  before_s = sum(c.resumed_s for c in ckpts if c is not None)
  for c in ckpts:
    if c is not None:
      c.remove()
  t2 = time.perf_counter()
  logits = nets.logits_fn(net)
  out = common.model_metrics(
      common.predict(logits, students, s.test_x), s.dataset.test_y, C)
  init_preds = common.predict(logits, inits, s.test_x)
  ens_preds = common.predict(ensemble_logits(net, dcfg.ensemble),
                             teachers, s.test_x)
  avg = fedavg.average_params(teachers, [len(y) for y in ys])
  avg_preds = common.predict(logits, avg, s.test_x)
  test_y = np.asarray(s.dataset.test_y)
  out["ensemble_predictions"] = ens_preds
  out["fedavg_predictions"] = avg_preds
  out["init_predictions"] = init_preds
  out["extra"] = {
      "ensemble_accuracies": np.mean(ens_preds == test_y, -1).tolist(),
      "fedavg_accuracies": np.mean(avg_preds == test_y, -1).tolist(),
      "init_accuracies": np.mean(init_preds == test_y, -1).tolist(),
      "dense": {"settings": dataclasses.asdict(dcfg),
                "budget": server_budget(dcfg)},
      "local_training": local,
  }
  out["history"] = histories
  out["params"] = jax.device_get(students)
  out["init_params"] = jax.device_get(inits)
  timings["dense_client_training"] = t1 - t0
  timings["dense_server"] = t2 - t1  # this process's (see resumed_s)
  if before_s:
    out["extra"]["dense"]["resumed_s"] = round(before_s, 3)
  timings["dense_evaluate"] = time.perf_counter() - t2
  return out
