"""Classifiers as the model baselines train them: parameters plus state.

FedAvg and DENSE train, average and distil whole classifiers. Two kinds:

* a stateless network of ``models`` (the evaluation architecture, instance
  norm by default): its variables are its ``params`` pytree;
* ``BNConvNet``: DM's ConvNet with BatchNorm in place of instance norm, the
  normalisation DENSE's reference networks have (its data-free generator
  matches their BatchNorm running statistics, DeepInversion's prior). Its
  variables are ``{"params": ..., "batch_stats": ...}``.

``Net`` hides the difference: ``init``, ``logits`` (inference: running
statistics), ``train_logits`` (training: statistics of the batch, running
statistics updated) and ``split`` / ``merge`` (trainable parameters vs
state). With ``fast_kernels`` a ConvNet that ``fast_convnet`` supports
computes its logits (and, through them, every gradient: parameters and
inputs) with that module's kernels, as evaluation trains on a CPU; the
same function up to float rounding. Every leaf of the variables is a float
array, so FedAvg averages the running statistics with the weights, as the
reference averages a whole PyTorch ``state_dict``.

BatchNorm follows PyTorch's ``BatchNorm2d``: per-channel statistics over
(N, H, W) with the biased variance for normalising, running averages with
momentum 0.1, the running variance from the unbiased batch variance
``v * m / (m - 1)`` (m = values per channel), eps 1e-5, scale 1 and bias 0
at init, running mean 0 and variance 1. Batches may carry 0/1 sample
weights (a short last batch padded to the batch size): padded samples are
left out of the statistics, so a padded batch normalises exactly like the
short one.
"""

import dataclasses
import functools
import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from collabdm_jax import fast_convnet
from collabdm_jax import models

_BN_EPS = 1e-5
_BN_MOMENTUM = 0.1  # PyTorch's: running = 0.9 running + 0.1 batch
NORMS = ("batchnorm",)


def _torch_bias_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's bias initialiser."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def batch_moments(x, weights=None):
  """Per-channel mean and biased variance of NHWC ``x`` over N, H, W.

  ``weights [N]`` (0/1) leave samples out; returns ``(mean [C], var [C],
  count)`` with ``count`` the number of values each channel averaged.
  """
  n, h, w = x.shape[:3]
  wt = jnp.ones((n,), x.dtype) if weights is None else weights.astype(x.dtype)
  count = jnp.sum(wt) * h * w
  wx = wt[:, None, None, None]
  mean = jnp.sum(wx * x, (0, 1, 2)) / count
  var = jnp.sum(wx * jnp.square(x - mean), (0, 1, 2)) / count
  return mean, var, count


class BatchNorm(nn.Module):
  """PyTorch ``BatchNorm2d`` on NHWC maps (see the module docstring).

  ``__call__(x, train, weights)``: with ``train`` it normalises by the
  batch's statistics and updates the ``batch_stats`` collection (when it is
  mutable); otherwise by the running ones. The batch's moments are sown
  into ``intermediates`` as ``moments`` in both modes, for DeepInversion's
  loss (``Net.logits_and_moments``); unused, XLA drops them.
  """

  @nn.compact
  def __call__(self, x, train: bool, weights=None):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    run_mean = self.variable("batch_stats", "mean",
                             lambda: jnp.zeros((c,), jnp.float32))
    run_var = self.variable("batch_stats", "var",
                            lambda: jnp.ones((c,), jnp.float32))
    mean, var, count = batch_moments(x, weights)
    self.sow("intermediates", "moments", (mean, var))
    if train:
      if not self.is_initializing() and self.is_mutable_collection(
          "batch_stats"):
        unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
        run_mean.value = ((1 - _BN_MOMENTUM) * run_mean.value
                          + _BN_MOMENTUM * mean)
        run_var.value = ((1 - _BN_MOMENTUM) * run_var.value
                         + _BN_MOMENTUM * unbiased)
    else:
      mean, var = run_mean.value, run_var.value
    return (x - mean) * jax.lax.rsqrt(var + _BN_EPS) * scale + bias


class BNConvNet(nn.Module):
  """DM's ConvNet with BatchNorm: ``depth`` x [conv3x3, BN, act, 2x2 pool].

  The same layers, initialisation and NCHW flattening as ``models.ConvNet``
  (the first conv pads by 3 on single-channel inputs), BatchNorm after each
  conv (DM's ``net_norm='batchnorm'``), then a linear classifier.
  """
  num_classes: int
  width: int = 128
  depth: int = 3
  activation: str = "relu"
  pooling: str = "avgpool"

  @nn.compact
  def __call__(self, x, train: bool = False, weights=None):
    if x.ndim != 4:
      raise ValueError(f"x must be NHWC images for BNConvNet, got shape "
                       f"{tuple(x.shape)}")
    act = {"relu": nn.relu, "leakyrelu": lambda v: nn.leaky_relu(v, 0.01),
           "sigmoid": nn.sigmoid,
           "gelu": lambda v: nn.gelu(v, approximate=False)}[self.activation]
    pad = 3 if x.shape[-1] == 1 else 1
    for d in range(self.depth):
      fan_in = x.shape[-1] * 9
      p = pad if d == 0 else 1
      x = nn.Conv(self.width, (3, 3), padding=((p, p), (p, p)),
                  kernel_init=models.torch_kernel_init,
                  bias_init=_torch_bias_init(fan_in),
                  conv_general_dilated=models.conv_matmul_grads,
                  name=f"conv{d}")(x)
      x = act(BatchNorm(name=f"norm{d}")(x, train, weights))
      if self.pooling == "avgpool":
        x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      elif self.pooling == "maxpool":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, kernel_init=models.torch_kernel_init,
                    bias_init=_torch_bias_init(x.shape[-1]),
                    name="classifier")(x)


@dataclasses.dataclass(frozen=True)
class Net:
  """A classifier of the model baselines (see the module docstring).

  Hashable, so jitted programs can be cached per ``Net``.
  """
  module: Any
  fast_kernels: bool = False

  def _apply(self, params, x):
    """A stateless network's logits, with ``fast_convnet``'s kernels when
    asked and supported for ``x``'s shape."""
    if self.fast_kernels and fast_convnet.supports(self.module, x.shape[1:]):
      # prepare is linear: gradients flow back to the ConvNet's params.
      return fast_convnet.logits(fast_convnet.prepare(params), x)
    return self.module.apply({"params": params}, x)

  @property
  def has_batchnorm(self) -> bool:
    return isinstance(self.module, BNConvNet)

  def init(self, key, input_shape):
    """Initial variables for examples of shape ``input_shape``."""
    if not self.has_batchnorm:
      return models.init_params(self.module, key, input_shape)
    v = self.module.init(key, jnp.zeros((1,) + tuple(input_shape)))
    return {"params": v["params"], "batch_stats": v["batch_stats"]}

  def logits(self, variables, x):
    """Inference logits (BatchNorm: running statistics)."""
    if not self.has_batchnorm:
      return self._apply(variables, x)
    return self.module.apply(variables, x, False)

  def train_logits(self, variables, x, weights=None):
    """``(logits, new variables)`` in training mode.

    BatchNorm normalises by the (weighted) batch statistics and the new
    variables hold the updated running statistics; a stateless network
    returns its variables unchanged.
    """
    if not self.has_batchnorm:
      return self._apply(variables, x), variables
    logits, upd = self.module.apply(variables, x, True, weights,
                                    mutable=["batch_stats"])
    return logits, {"params": variables["params"],
                    "batch_stats": upd["batch_stats"]}

  def logits_and_moments(self, variables, x):
    """Inference logits and, per BatchNorm layer (in order), the batch's
    ``(mean, var)`` and the running ``(mean, var)`` of that layer's input."""
    if not self.has_batchnorm:
      raise ValueError("moments need a network with BatchNorm")
    logits, inter = self.module.apply(variables, x, False,
                                      mutable=["intermediates"])
    inter = inter["intermediates"]
    out = []
    for d in range(self.module.depth):
      mean, var = inter[f"norm{d}"]["moments"][0]
      run = variables["batch_stats"][f"norm{d}"]
      out.append((mean, var, run["mean"], run["var"]))
    return logits, out

  def split(self, variables) -> Tuple[Any, Any]:
    """``(trainable parameters, state)``; the state is ``{}`` if none."""
    if not self.has_batchnorm:
      return variables, {}
    return variables["params"], variables["batch_stats"]

  def merge(self, params, state):
    """Inverse of ``split``."""
    if not self.has_batchnorm:
      return params
    return {"params": params, "batch_stats": state}


def deep_inversion_loss(moments):
  """DeepInversion's feature prior, as DENSE's reference computes it.

  ``sum_l ||mu_run_l - mu_l||_2 + ||var_run_l - var_l||_2`` over the layers'
  ``(mean, var, running mean, running var)`` (``Net.logits_and_moments``):
  plain (not squared) L2 norms, summed over layers.
  """
  return sum(jnp.linalg.norm(rv - v) + jnp.linalg.norm(rm - m)
             for m, v, rm, rv in moments)


def make_net(eval_arch: str, num_classes: int, eval_kwargs, norm=None,
             fast_kernels: bool = False) -> Net:
  """The baselines' ``Net``: the evaluation architecture, or with ``norm``.

  Args:
    eval_arch, eval_kwargs: ``config.eval.arch`` and its ``model_kwargs``.
    num_classes: C.
    norm: None for the evaluation network itself; "batchnorm" for
      ``BNConvNet`` with the evaluation ConvNet's width, depth, activation
      and pooling (only for ``eval_arch == "convnet"``).
    fast_kernels: ``Net.fast_kernels`` of the evaluation network (no
      effect on ``BNConvNet``).
  """
  kwargs = dict(eval_kwargs or {})
  if norm is None:
    return Net(models.make_model(eval_arch, num_classes, **kwargs),
               bool(fast_kernels))
  if norm not in NORMS:
    raise ValueError(f"baseline.net_norm must be None or one of {NORMS}, "
                     f"got {norm!r}")
  if eval_arch.lower() != "convnet":
    raise ValueError(f"baseline.net_norm='batchnorm' needs eval.arch "
                     f"'convnet', got {eval_arch!r}")
  # Checks the kwargs exactly as the evaluation ConvNet would.
  base = models.make_model("convnet", num_classes, **kwargs)
  return Net(BNConvNet(num_classes, width=base.width, depth=base.depth,
                       activation=base.activation, pooling=base.pooling))


@functools.lru_cache(maxsize=None)
def logits_fn(net: Net):
  """``f(variables, x) -> logits`` (inference), one object per ``Net``."""
  return lambda v, x: net.logits(v, x)
