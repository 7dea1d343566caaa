"""Networks of DM (Zhao & Bilen) in Flax linen, initialised as PyTorch does.

CollabDM's loss is the distance between mean embeddings under randomly
initialised, frozen networks, so the *distribution* of those networks is part
of the method. Every layer here therefore reproduces DM's PyTorch models
(`networks.py` of VICO-UoE/DatasetCondensation) in structure and in
initialisation:

* Conv and Linear weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
  ``kaiming_uniform_(a=sqrt(5))``) and biases ~ U(-1/sqrt(fan_in),
  1/sqrt(fan_in)); Flax's defaults (lecun-normal weights, zero biases) would
  give a different loss.
* Instance norm is PyTorch ``GroupNorm(C, C, affine=True)``: per sample and
  channel statistics over H and W, biased variance, eps 1e-5, scale 1, bias 0.
* Embeddings are flattened in PyTorch's NCHW order, so element ``i`` of an
  embedding is the same feature as in the PyTorch model.

Images are NHWC float32 (XLA's preferred convolution layout on CPU); no
module holds mutable state (no batch norm), so a network is fully described by
its ``params`` pytree and every function below is pure, jittable and
vmappable over ``params``.

Parameters are the inner ``'params'`` collection: apply a model with
``model.apply({'params': params}, x)`` or use :func:`embed_fn` /
:func:`logits_fn`.
"""

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from collabdm_jax import cpu_first_block

Params = Any

_NORM_EPS = 1e-5  # PyTorch GroupNorm / LayerNorm default (Flax uses 1e-6).


def torch_kernel_init(key, shape, dtype=jnp.float32):
  """Weight initialiser U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch's.

  PyTorch's ``kaiming_uniform_(a=sqrt(5))`` has exactly this bound. fan_in of
  an HWIO conv kernel is H*W*I and of a Dense kernel [I, O] is I: the product
  of all but the last axis. The values are drawn as one flat vector and
  reshaped because XLA:CPU compiles threefry for a rank-4 shape several times
  slower than for a flat one, and init is compiled per architecture.
  """
  fan_in = math.prod(shape[:-1])
  bound = 1.0 / math.sqrt(fan_in)
  flat = jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound)
  return flat.reshape(shape)


_ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "gelu")
_CONV_NORMS = ("instancenorm", "layernorm", "none")
_MLP_NORMS = ("layernorm", "none")
_POOLINGS = ("avgpool", "maxpool", "none")


def _torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """Bias initialiser U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch's.

  A Flax bias initialiser only sees the bias shape, so the layer's fan_in is
  bound here when the layer is built.
  """
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _patches(x_padded, kh: int, kw: int):
  """im2col: ``[N, H, W, C]`` -> ``[N * Ho * Wo, kh * kw * C]`` (valid windows).

  Column ``(i * kw + j) * C + c`` holds ``x[n, h + i, w + j, c]``, the order
  of an HWIO kernel reshaped to ``[kh * kw * C, O]``.
  """
  n, hp, wp, c = x_padded.shape
  ho, wo = hp - kh + 1, wp - kw + 1
  cols = jnp.concatenate([x_padded[:, i:i + ho, j:j + wo, :]
                          for i in range(kh) for j in range(kw)], axis=-1)
  return cols.reshape(n * ho * wo, kh * kw * c)


def _conv_nhwc(x, kernel, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_same_stride1(x, kernel, padding):
  return _conv_nhwc(x, kernel, padding)


def _pad_nhwc(x, padding):
  (pt, pb), (pl, pr) = padding
  return jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def _conv_same_stride1_fwd(x, kernel, padding):
  # XLA's own convolution, the undifferentiated value exactly; only the
  # input is kept, and the kernel gradient rebuilds its patches (dead code,
  # removed by XLA, when only image gradients are wanted, as in DM).
  return _conv_nhwc(x, kernel, padding), (x, kernel)


def _conv_same_stride1_bwd(padding, residuals, dy):
  """Both gradients of a stride-1 NHWC/HWIO convolution, no transposed conv.

  With ``P = im2col(pad(x))`` ``[M, kh*kw*I]`` and ``dY`` ``[M, O]``:
  ``dK = P^T dY``, a matrix product. For the input, a convolution's
  transpose is the convolution of ``dY`` (padded by ``k - 1 - p``, negative
  pads crop) with the kernel flipped in space and with in/out channels
  swapped: ``dX = conv(pad'(dY), flip(K)^T)``, run as XLA's forward
  convolution. When the input has fewer channels than the output (the
  first layer) that convolution has a thin output, so instead ``dX`` is the
  column-to-image sum of the matrix product ``dY K^T``.
  """
  x, kernel = residuals
  kh, kw, ci, co = kernel.shape
  (pt, pb), (pl, pr) = padding
  n, h, w, _ = x.shape
  ho, wo = dy.shape[1], dy.shape[2]
  dy2 = dy.reshape(-1, co)
  patches = _patches(_pad_nhwc(x, padding), kh, kw)
  dk = (patches.T @ dy2).reshape(kernel.shape).astype(kernel.dtype)
  if ci < co:
    dcols = (dy2 @ kernel.reshape(-1, co).T).reshape(n, ho, wo, kh * kw, ci)
    dxp = jnp.zeros((n, h + pt + pb, w + pl + pr, ci), dcols.dtype)
    for i in range(kh):
      for j in range(kw):
        dxp = dxp.at[:, i:i + ho, j:j + wo, :].add(dcols[:, :, :, i * kw + j])
    dx = dxp[:, pt:pt + h, pl:pl + w, :]
  else:
    dyp = _pad_nhwc(dy, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = _conv_nhwc(dyp, flipped, ((0, 0), (0, 0)))
  return dx.astype(x.dtype), dk


_conv_same_stride1.defvjp(_conv_same_stride1_fwd, _conv_same_stride1_bwd)

_NHWC = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1),
                                       ("NHWC", "HWIO", "NHWC"))


def conv_matmul_grads(lhs, rhs, window_strides, padding, lhs_dilation=None,
                      rhs_dilation=None, dimension_numbers=None,
                      feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` whose gradients avoid transposed convs.

  The value is exactly ``lax.conv_general_dilated``'s (same call), also
  when differentiated, so embeddings and predictions do not change. For the
  stride-1, undilated, ungrouped NHWC convolutions of DM's networks the
  backward pass (``_conv_same_stride1_bwd``) computes the kernel gradient
  as an im2col matrix product and the input gradient as a forward
  convolution, instead of XLA's transposed convolutions: XLA:CPU compiles
  those to slow generic code, above all inside loops. Measured on this
  project's 2-core CPU, ConvNet-3 on 100 Fashion-MNIST images, gradients in
  a ``lax.scan`` over micro-batches of 10: 0.26 s per step instead of 4.6 s
  with XLA's gradients. The input gradient was an im2col product too, and
  so was the differentiated forward pass; with XLA's forward convolution
  instead, DM's server step at ipc 10 (image gradients only, one class of
  10 images at a time) takes 0.27 s instead of 0.34 and that evaluation
  step about the same (0.47 s against 0.49), both in one run on the loaded
  2-core CPU (``experiments/results/dm_step/dm_step.json``: ``now`` against
  ``now_im2col_conv``, ``eval_gradient``). Other convolutions keep XLA's
  own gradients.
  """
  simple = (tuple(window_strides) == (1, 1)
            and tuple(lhs_dilation or (1, 1)) == (1, 1)
            and tuple(rhs_dilation or (1, 1)) == (1, 1)
            and feature_group_count == 1 and precision is None and not kwargs
            and not isinstance(padding, str)
            and jax.lax.conv_dimension_numbers(
                lhs.shape, rhs.shape, dimension_numbers) == _NHWC)
  if not simple:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision,
        **kwargs)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_same_stride1(lhs, rhs, padding)


def _conv(x, features: int, kernel: int, padding: int, name: str,
          stride: int = 1, use_bias: bool = True):
  """PyTorch-initialised square conv with symmetric zero padding, NHWC."""
  fan_in = x.shape[-1] * kernel * kernel
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=use_bias,
      kernel_init=torch_kernel_init, bias_init=_torch_bias_init(fan_in),
      conv_general_dilated=conv_matmul_grads, name=name)(x)


def _dense(x, features: int, name: str):
  """PyTorch-initialised fully connected layer on the last axis."""
  return nn.Dense(features, kernel_init=torch_kernel_init,
                  bias_init=_torch_bias_init(x.shape[-1]), name=name)(x)


def _flatten_nchw(x):
  """Flattens [N, H, W, C] in PyTorch's C, H, W order (other ranks: row-major).

  Matching PyTorch's ``view(N, -1)`` on NCHW makes embedding coordinates and
  classifier weights correspond one to one with DM's models.
  """
  if x.ndim == 4:
    x = jnp.transpose(x, (0, 3, 1, 2))
  return x.reshape(x.shape[0], -1)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == "relu":
    return nn.relu
  if name == "leakyrelu":
    return lambda v: nn.leaky_relu(v, negative_slope=0.01)  # PyTorch default.
  if name == "sigmoid":
    return nn.sigmoid
  # PyTorch's nn.GELU is the exact erf form, not the tanh approximation.
  return lambda v: nn.gelu(v, approximate=False)


def _pool(x, kind: str, window: int = 2):
  """Non-overlapping pooling; VALID padding floors odd sizes like PyTorch."""
  if kind == "avgpool":
    return nn.avg_pool(x, (window, window), strides=(window, window),
                       padding="VALID")
  return nn.max_pool(x, (window, window), strides=(window, window),
                     padding="VALID")


def _check_choice(value: str, name: str, choices: Sequence[str]):
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _is_positive_int(value) -> bool:
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= 1)


def _check_positive(value: int, name: str):
  if not _is_positive_int(value):
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_images(x, model_name: str):
  if x.ndim != 4:
    raise ValueError(
        f"x must be a batch of NHWC images of rank 4 for {model_name}, got "
        f"shape {tuple(x.shape)}")


class InstanceNorm(nn.Module):
  """PyTorch ``GroupNorm(C, C, affine=True)`` on NHWC maps.

  Statistics per sample and channel over H and W, biased variance computed
  from centred values (as PyTorch does, rather than E[x^2] - E[x]^2), eps
  1e-5, per-channel ``scale`` (init 1) and ``bias`` (init 0).
  """
  epsilon: float = _NORM_EPS

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    # Statistics in float32 whatever the compute dtype (a no-op in float32):
    # bfloat16's 8-bit mantissa would swamp small variances.
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=(1, 2), keepdims=True)
    centred = xf - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True)
    out = centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return out.astype(x.dtype)


class _ConvWeights(nn.Module):
  """The parameters of ``_conv``'s ``nn.Conv`` alone, without applying it.

  Same names, shapes, initialisers and order of creation as ``nn.Conv``
  (kernel, then bias), so a network's parameters do not depend on whether
  its first block runs as a convolution or fused (``first_block_fused``).
  """
  features: int
  kernel: int
  in_channels: int

  @nn.compact
  def __call__(self):
    fan_in = self.in_channels * self.kernel * self.kernel
    k = self.param("kernel", torch_kernel_init,
                   (self.kernel, self.kernel, self.in_channels, self.features))
    b = self.param("bias", _torch_bias_init(fan_in), (self.features,))
    return k, b


class _NormWeights(nn.Module):
  """``InstanceNorm``'s parameters (scale 1, bias 0) without applying it."""

  @nn.compact
  def __call__(self, channels: int):
    return (self.param("scale", nn.initializers.ones, (channels,)),
            self.param("bias", nn.initializers.zeros, (channels,)))


def first_block_fused(x, kernel, scale, bias, padding: int, activation,
                      pooling: str, epsilon: float = _NORM_EPS):
  """conv3x3 -> instance norm -> activation -> 2x2 pool, without the conv map.

  With ``P`` the im2col patches of one image (``[HW, K]``, ``K = 9 C_in``),
  ``mu`` their mean and ``S`` their covariance over the HW positions, the
  conv output ``y = P W + b`` has per-channel mean ``mu W + b`` and biased
  variance ``w_c^T S w_c``. So the normalised map is
  ``z = (P - mu) (W * g) + beta`` with ``g = scale / sqrt(var + eps)``: the
  conv bias cancels, and ``z`` is a K-term sum per output element that XLA
  fuses with the activation and the pooling. The full-resolution map
  (32x32x128 per image, the largest tensor of the network) is never written,
  and its three reads by the norm never happen. Equal to the unfused block
  up to float rounding (relative 3e-7 on Fashion-MNIST shapes).

  Measured on an H200 (``experiments/results/gpu_profile/``): the unfused
  first block is 65 % of the ConvNet forward on 28x28x1 inputs for 1 % of
  its FLOPs; fused, the forward of 4,096 images takes 3.50 ms instead of
  5.01 and the 100-client statistics pass 4.55 s instead of 5.78 per 100
  iterations. With 3 input channels (27 taps) it is slower (5.75 ms against
  4.71), and so it is on the CPU; and its programs took longer to compile,
  which made the small reference config slower end to end on the GPU (73 s
  against 45). Hence off by default (``ConvNet.fused_first_block``).
  """
  n, h, w, _ = x.shape
  kh, kw, ci, co = kernel.shape
  xf = x.astype(jnp.float32)
  xp = jnp.pad(xf, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
  patches = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :]
                             for i in range(kh) for j in range(kw)], axis=-1)
  k = kh * kw * ci
  mu = jnp.mean(patches, axis=(1, 2))
  centred = patches - mu[:, None, None, :]
  cov = jnp.einsum("nhwk,nhwl->nkl", centred, centred,
                   precision="highest") / (ho * wo)
  w2 = kernel.astype(jnp.float32).reshape(k, co)
  var = jnp.einsum("nkl,kc,lc->nc", cov, w2, w2, precision="highest")
  gain = jax.lax.rsqrt(var + epsilon) * scale
  a = w2[None] * gain[:, None, :]
  z = bias + sum(centred[..., i:i + 1] * a[:, None, None, i, :]
                 for i in range(k))
  z = activation(z)
  if pooling != "none":
    z = _pool(z, pooling)
  return z.astype(x.dtype)


class _Classifier(nn.Module):
  """Features (``features``, defined by each network) and a linear classifier.

  ``embed(x)`` is the features, ``__call__(x)`` the logits; both run one
  compact ``_forward``, so the features' layers and the ``classifier`` are
  this module's own parameters.
  """
  num_classes: int

  def __post_init__(self):
    _check_positive(self.num_classes, "num_classes")
    super().__post_init__()

  def features(self, x, output: str):
    """``[N, ...] -> [N, D]`` features (NHWC maps when ``output == "map"``)."""
    raise NotImplementedError

  @nn.compact
  def _forward(self, x, output: str):
    x = self.features(x, output)
    if output != "logits":
      return x
    return _dense(x, self.num_classes, "classifier")

  def embed(self, x):
    """Features before the classifier: x [N, ...] -> [N, D]."""
    return self._forward(x, "embed")

  def __call__(self, x):
    """Logits: x [N, ...] -> [N, num_classes]."""
    return self._forward(x, "logits")


class ConvNet(_Classifier):
  """DM's ConvNet: ``depth`` x [3x3 conv, norm, activation, 2x2 pool].

  The first conv pads by 3 instead of 1 on single-channel inputs (DM's rule;
  it turns 28x28 MNIST-style images into 32x32 maps, so the default net embeds
  both 28x28x1 and 32x32x3 inputs into 128*4*4 = 2048 features).

  Attributes:
    num_classes: classifier outputs.
    width: channels of every conv.
    depth: number of conv blocks.
    norm: "instancenorm" (DM default), "layernorm" (over C, H, W with
      element-wise affine, as PyTorch ``LayerNorm([C, H, W])``) or "none".
    activation: "relu", "leakyrelu" (slope 0.01), "sigmoid" or "gelu" (erf).
    pooling: "avgpool" (DM default), "maxpool" or "none".
    fused_first_block: run the first block (with instance norm) as
      ``first_block_fused``: the same function up to float rounding and the
      same parameters, faster for 1-channel inputs on a GPU's long passes
      (see that function for the measurements).
  """
  width: int = 128
  depth: int = 3
  norm: str = "instancenorm"
  activation: str = "relu"
  pooling: str = "avgpool"
  fused_first_block: bool = False

  def __post_init__(self):
    _check_positive(self.width, "width")
    _check_positive(self.depth, "depth")
    _check_choice(self.norm, "norm", _CONV_NORMS)
    _check_choice(self.activation, "activation", _ACTIVATIONS)
    _check_choice(self.pooling, "pooling", _POOLINGS)
    if not isinstance(self.fused_first_block, bool):
      raise ValueError("fused_first_block must be a bool, got "
                       f"{self.fused_first_block!r}")
    super().__post_init__()

  def features(self, x, output: str):
    """Flattened last block (NCHW order): [N, H, W, C] -> [N, width*H'*W']."""
    _check_images(x, "ConvNet")
    act = _activation(self.activation)
    first_padding = 3 if x.shape[-1] == 1 else 1
    for d in range(self.depth):
      if (d == 0 and self.fused_first_block and self.norm == "instancenorm"
          and min(x.shape[1], x.shape[2]) >= 2):
        kernel, _ = _ConvWeights(self.width, 3, x.shape[-1], name="conv0")()
        scale, bias = _NormWeights(name="norm0")(self.width)
        x = first_block_fused(x, kernel, scale, bias, first_padding, act,
                              self.pooling)
        continue
      if d == 0 and self._first_block_on_cpu_kernel(x, first_padding):
        kernel, conv_bias = _ConvWeights(self.width, 3, x.shape[-1],
                                         name="conv0")()
        scale, bias = _NormWeights(name="norm0")(self.width)
        x = cpu_first_block.first_block(x, kernel, conv_bias, scale, bias,
                                        first_padding)
        continue
      x = _conv(x, self.width, 3, first_padding if d == 0 else 1, f"conv{d}")
      if self.norm == "instancenorm":
        x = InstanceNorm(name=f"norm{d}")(x)
      elif self.norm == "layernorm":
        x = nn.LayerNorm(epsilon=_NORM_EPS, reduction_axes=(1, 2, 3),
                         feature_axes=(1, 2, 3), use_fast_variance=False,
                         name=f"norm{d}")(x)
      x = act(x)
      if self.pooling != "none":
        if min(x.shape[1], x.shape[2]) < 2:
          raise ValueError(
              f"input spatial size {x.shape[1:3]} at block {d} is too small "
              f"to pool for depth={self.depth}; use larger images or a "
              "smaller depth")
        x = _pool(x, self.pooling)
    return x if output == "map" else _flatten_nchw(x)

  def _first_block_on_cpu_kernel(self, x, padding) -> bool:
    """Whether block 0 runs as ``cpu_first_block``'s kernel: DM's block
    (instance norm, ReLU, average pool) on float32 maps big enough to pool,
    on a CPU where the kernel builds (``cpu_first_block.enabled``)."""
    return (self.norm == "instancenorm" and self.activation == "relu"
            and self.pooling == "avgpool" and x.dtype == jnp.float32
            and min(x.shape[1], x.shape[2]) + 2 * padding - 2 >= 2
            and self.width <= 1024 and cpu_first_block.enabled())

  def feature_map(self, x):
    """Last block's output as NHWC maps [N, H', W', width] (before flatten)."""
    return self._forward(x, "map")


class MLP(_Classifier):
  """Fully connected net: ``depth`` x [Linear(width), norm, activation], then
  a linear classifier.

  Inputs of any rank are flattened per example (images in NCHW order, as in
  PyTorch), so the same net serves images and tabular rows. DM's MLP is
  ``MLP(num_classes, width=128, depth=2)``.

  Attributes:
    num_classes: classifier outputs.
    width: units of every hidden layer.
    depth: number of hidden layers.
    activation: "relu", "leakyrelu", "sigmoid" or "gelu".
    norm: "none" or "layernorm" (per hidden layer, eps 1e-5).
  """
  width: int = 256
  depth: int = 3
  activation: str = "relu"
  norm: str = "none"

  def __post_init__(self):
    _check_positive(self.width, "width")
    _check_positive(self.depth, "depth")
    _check_choice(self.norm, "norm", _MLP_NORMS)
    _check_choice(self.activation, "activation", _ACTIVATIONS)
    super().__post_init__()

  def features(self, x, output: str):
    """Last hidden layer's output: [N, ...] -> [N, width]."""
    del output
    if x.ndim < 2:
      raise ValueError(
          f"x must have a batch axis and at least one feature axis, got "
          f"shape {tuple(x.shape)}")
    act = _activation(self.activation)
    x = _flatten_nchw(x)
    for d in range(self.depth):
      x = _dense(x, self.width, f"fc{d}")
      if self.norm == "layernorm":
        x = nn.LayerNorm(epsilon=_NORM_EPS, use_fast_variance=False,
                         name=f"norm{d}")(x)
      x = act(x)
    return x


class AlexNet(_Classifier):
  """DM's 'AlexNet' (no normalisation): five convs, three 2x2 max pools.

  conv5x5(128) [padding 4 on single-channel inputs, else 2], relu, maxpool;
  conv5x5(192), relu, maxpool; conv3x3(256), relu; conv3x3(192), relu;
  conv3x3(192), relu, maxpool. Embedding 192*4*4 = 3072 for 28x28x1 and
  32x32x3 inputs.
  """

  def features(self, x, output: str):
    """Flattened features: [N, H, W, C] -> [N, 3072] for 32x32 maps."""
    del output
    _check_images(x, "AlexNet")
    x = nn.relu(_conv(x, 128, 5, 4 if x.shape[-1] == 1 else 2, "conv0"))
    x = _pool(x, "maxpool")
    x = nn.relu(_conv(x, 192, 5, 2, "conv1"))
    x = _pool(x, "maxpool")
    x = nn.relu(_conv(x, 256, 3, 1, "conv2"))
    x = nn.relu(_conv(x, 192, 3, 1, "conv3"))
    x = nn.relu(_conv(x, 192, 3, 1, "conv4"))
    return _flatten_nchw(_pool(x, "maxpool"))


# Channels of VGG11's convs; "M" is a 2x2 max pool.
_VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(_Classifier):
  """DM's 'VGG11' with instance norm: [conv3x3, instance norm, relu] blocks
  and five 2x2 max pools; the first conv pads by 3 on single-channel inputs.

  Embedding 512 for 28x28x1 and 32x32x3 inputs.
  """

  def features(self, x, output: str):
    """Flattened features: [N, H, W, C] -> [N, 512] for 32x32 maps."""
    del output
    _check_images(x, "VGG11")
    first_padding = 3 if x.shape[-1] == 1 else 1
    conv_index = 0
    for i, item in enumerate(_VGG11_CFG):
      if item == "M":
        x = _pool(x, "maxpool")
        continue
      x = _conv(x, item, 3, first_padding if i == 0 else 1,
                f"conv{conv_index}")
      x = nn.relu(InstanceNorm(name=f"norm{conv_index}")(x))
      conv_index += 1
    # DM's trailing AvgPool2d(kernel_size=1, stride=1) is the identity.
    return _flatten_nchw(x)


class BasicBlock(nn.Module):
  """ResNet basic block with instance norm and bias-free convs (DM's).

  relu(IN(conv3x3_s(x))) -> IN(conv3x3(.)), plus a shortcut that is the
  identity, or IN(conv1x1_s(x)) when the stride or channel count changes;
  relu of the sum.
  """
  planes: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    out = _conv(x, self.planes, 3, 1, "conv1", stride=self.stride,
                use_bias=False)
    out = nn.relu(InstanceNorm(name="norm1")(out))
    out = _conv(out, self.planes, 3, 1, "conv2", use_bias=False)
    out = InstanceNorm(name="norm2")(out)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = _conv(x, self.planes, 1, 0, "shortcut_conv",
                       stride=self.stride, use_bias=False)
      shortcut = InstanceNorm(name="shortcut_norm")(shortcut)
    return nn.relu(out + shortcut)


class ResNet18(_Classifier):
  """DM's 'ResNet18' with instance norm (strided convs, not the _AP variant).

  Stem relu(IN(conv3x3(64, bias-free))), four stages of two basic blocks
  (64, 128, 256, 512 channels; strides 1, 2, 2, 2), 4x4 average pooling.
  Embedding 512 for 28x28x1 and 32x32x3 inputs.
  """

  def features(self, x, output: str):
    """Pooled features: [N, H, W, C] -> [N, 512] for 32x32 inputs."""
    del output
    _check_images(x, "ResNet18")
    x = _conv(x, 64, 3, 1, "conv1", use_bias=False)
    x = nn.relu(InstanceNorm(name="norm1")(x))
    for stage, (planes, stride) in enumerate(
        ((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      x = BasicBlock(planes, stride, name=f"layer{stage}_0")(x)
      x = BasicBlock(planes, 1, name=f"layer{stage}_1")(x)
    if min(x.shape[1], x.shape[2]) < 4:
      raise ValueError(
          f"ResNet18 needs inputs of at least 25x25 pixels (final maps "
          f"4x4), got final maps {x.shape[1:3]}")
    return _flatten_nchw(_pool(x, "avgpool", window=4))


_ARCHS = {
    "convnet": ConvNet,
    "alexnet": AlexNet,
    "vgg11": VGG11,
    "resnet18": ResNet18,
    "mlp": MLP,
}


def make_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a network by name.

  Args:
    arch: one of "convnet", "alexnet", "vgg11", "resnet18", "mlp"
      (case-insensitive).
    num_classes: classifier outputs, >= 1.
    **kwargs: overrides of the model's fields, e.g. ``width=64, depth=2`` for
      "convnet" ("alexnet", "vgg11" and "resnet18" have no other fields).

  Returns:
    The unbound Flax module.

  Raises:
    ValueError: unknown ``arch``, a keyword that is not a field of that
      model, or a field value outside its allowed set.
  """
  if not isinstance(arch, str) or arch.lower() not in _ARCHS:
    raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
  cls = _ARCHS[arch.lower()]
  fields = {f.name for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name", "num_classes")}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
        f"unknown keyword(s) {unknown} for arch {arch!r}; allowed: "
        f"{sorted(fields)}")
  return cls(num_classes=num_classes, **kwargs)


def _check_input_shape(model: nn.Module, input_shape) -> tuple:
  try:
    shape = tuple(input_shape)
  except TypeError:
    shape = ()
  if not shape or not all(_is_positive_int(s) for s in shape):
    raise ValueError(
        f"input_shape must be a non-empty tuple of positive ints (one "
        f"example's shape), got {input_shape!r}")
  shape = tuple(int(s) for s in shape)
  if not isinstance(model, MLP) and len(shape) != 3:
    raise ValueError(
        f"input_shape must be (H, W, C) for {type(model).__name__}, got "
        f"{shape}")
  return shape


def _init_variables(model: nn.Module, key, shape: tuple):
  return model.init(key, jnp.zeros((1,) + shape, jnp.float32))["params"]


# Jitted with the model static so that the dummy forward pass run by
# ``model.init`` is dead code that XLA removes; equal models share the cache.
_init_jit = jax.jit(_init_variables, static_argnums=(0, 2))


def init_params(model: nn.Module, key: jax.Array, input_shape) -> Params:
  """Draws PyTorch-default initial parameters.

  Args:
    model: a module from :func:`make_model` (or built directly).
    key: PRNG key (typed or raw uint32).
    input_shape: shape of ONE example, e.g. (28, 28, 1) or (44,) for an MLP.

  Returns:
    The ``'params'`` collection (a dict pytree) with the classifier included.
  """
  return _init_jit(model, key, _check_input_shape(model, input_shape))


COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(name: str) -> str:
  """Returns ``name`` if it is one of :data:`COMPUTE_DTYPES`, else raises."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got "
                     f"{name!r}")
  return name


def embed_fn(model: nn.Module, compute_dtype: str = "float32"
             ) -> Callable[[Params, jax.Array], jax.Array]:
  """Returns ``f(params, x) -> features`` with x [N, ...] -> [N, feat].

  ``f`` is pure: jit it, and vmap it over stacked ``params`` to embed one batch
  under many random networks.

  ``compute_dtype="bfloat16"`` runs the network in mixed precision: the
  float32 parameters and inputs are cast to bfloat16 inside ``f`` (so the
  random networks themselves are unchanged), convolutions and matmuls run in
  bfloat16 with the backend's float32 accumulation, instance-norm statistics
  stay float32, and features come back as float32, so the sums and means
  built on them are float32 either way. Gradients with respect to ``x`` flow
  through the casts.
  """
  method = type(model).embed
  check_compute_dtype(compute_dtype)

  def f(params, x):
    return model.apply({"params": params}, x, method=method)

  if compute_dtype == "float32":
    return f
  dtype = jnp.dtype(compute_dtype)

  def cast(a):
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

  def mixed(params, x):
    return f(jax.tree_util.tree_map(cast, params),
             cast(x)).astype(jnp.float32)

  return mixed


def embed_many_fn(
    model: nn.Module) -> Callable[[Params, jax.Array], jax.Array]:
  """Returns ``f(stacked_params, x) -> [T, N, feat]``: x under T networks.

  ``stacked_params`` has a leading axis T (e.g. from vmapping
  :func:`random_network_params` over t). Same values as
  ``jax.vmap(embed_fn(model), in_axes=(0, None))``, but the networks run one
  after another with ``lax.map``: vmapping convolutions over their kernels
  turns them into grouped convolutions, which XLA:CPU ran about 5x slower
  (ConvNet, 32x32x3, 256 images, 4 networks).
  """
  embed = embed_fn(model)

  def f(stacked_params, x):
    return jax.lax.map(lambda p: embed(p, x), stacked_params)

  return f


def logits_fn(model: nn.Module) -> Callable[[Params, jax.Array], jax.Array]:
  """Returns the pure ``f(params, x) -> logits`` with x [N, ...] -> [N, classes]."""

  def f(params, x):
    return model.apply({"params": params}, x)

  return f


def random_network_params(model: nn.Module, root_key: jax.Array, t,
                          input_shape) -> Params:
  """Parameters of the random network of iteration ``t``.

  Equal to ``init_params(model, jax.random.fold_in(root_key, t), input_shape)``
  and traceable in ``t``, so ``jax.vmap(lambda t: random_network_params(model,
  key, t, shape))(jnp.arange(T))`` stacks T networks along a leading axis.

  Args:
    model: the network.
    root_key: PRNG key shared by everyone who must agree on the networks.
    t: iteration index (int or int32 scalar array, possibly traced).
    input_shape: shape of one example.

  Returns:
    The ``'params'`` pytree of network ``t``.
  """
  return init_params(model, jax.random.fold_in(root_key, t), input_shape)


def feature_dim(model: nn.Module, input_shape) -> int:
  """Length of ``embed`` features for examples of shape ``input_shape``.

  Computed abstractly (no FLOPs): 2048 for the default ConvNet on (28, 28, 1)
  and (32, 32, 3).
  """
  shape = _check_input_shape(model, input_shape)
  embed = embed_fn(model)

  def features(key):
    params = _init_variables(model, key, shape)
    return embed(params, jnp.zeros((1,) + shape, jnp.float32))

  out = jax.eval_shape(features, jax.random.key(0))
  return int(out.shape[-1])
