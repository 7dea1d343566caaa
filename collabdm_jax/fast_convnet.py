"""DM's ConvNet for training evaluation networks fast on a CPU.

Evaluation (``evaluate.py``) trains a fresh ConvNet from scratch on the
synthetic set for hundreds of epochs; on this project's 2-core CPU that was
most of a run's time. This module computes the same network, with the same
parameters (``models.ConvNet``'s pytree), in fewer floating-point operations
and fewer passes over memory. Values and gradients equal ``models.ConvNet``'s
up to float rounding (relative 1e-5 or better, ``tests/test_fast_convnet.py``).
It serves evaluation and, on a CPU, the model baselines' networks
(``baselines.nets.Net.fast_kernels``: FedAvg's clients, DENSE's teachers,
student and generator gradients); the embedding networks of the
distillation loss keep ``models.py``'s own arithmetic.

It covers DM's default ConvNet: blocks ``[3x3 conv, instance norm, ReLU,
2x2 average pool]`` (any width and depth) whose convolution outputs have even
sides at every block (28x28x1 and 32x32x3 inputs do, up to depth 5); see
``supports``. Three changes of arithmetic make it fast:

* **Blocks after the first: Winograd convolutions.** F(2x2, 3x3) (Lavin &
  Gray, 2016) computes a 2x2 output tile from a 4x4 input tile ``d`` as
  ``Y = A^T [(G K G^T) . (B^T d B)] A`` per channel pair, so the convolution
  becomes 16 matrix products ``M_xi = V_xi U_xi`` (``V = B^T d B`` over all
  tiles, ``[tiles, C_in]``; ``U = G K G^T``, ``[C_in, C_out]``) with 2.25x
  fewer multiplications than the direct product, and without the 9x im2col
  copy of the input. The backward pass is the transpose of each linear step:
  ``dM = A dY A^T``, ``dU_xi = V_xi^T dM_xi``, ``dV_xi = dM_xi U_xi^T`` and
  ``dx`` the sum over overlapping tiles of ``B dV B^T``.
* **Pool-tile layout.** A 2x2 output tile of the convolution is exactly one
  window of the 2x2 pooling, so a block's convolution output stays as
  ``[4 (p, q), N, tiles, C]``, ``y[n, 2a + p, 2b + q, c]`` at
  ``[2p + q, n, a * S + b, c]`` (``[N, 4, tiles, C]`` in the first block):
  pooling is a sum of four slabs and its gradient a broadcast, with no window
  reduction and no interleaving.
* **First block: instance-norm statistics from the patches.** With ``P`` the
  ``K = 9 C_in`` column im2col matrix of one image (``[HW, K]``), ``mu`` its
  column means, ``P_c = P - mu`` and ``Cov = P_c^T P_c / HW``, the
  convolution ``y = P W + b`` has per-channel mean ``mu W + b`` and biased
  variance ``w_c^T Cov w_c``. So the normalised map is
  ``z = (P_c W) g + beta`` with ``g = scale / sqrt(var + eps)``, from one
  thin matrix product; the backward pass needs only ``Q = P_c^T dz`` per
  image (and ``S = sum dz``, from a column of ones appended to ``P_c``):
  with ``T = sum dz yhat = (w_c . Q_c) / sigma_c`` (sums over positions),
  ``dW = sum_n g_n (Q_n - Cov_n W T_n / sigma_n)``, ``dscale = sum T`` and
  ``dbeta = sum S``.

A convolution bias followed by instance norm shifts a channel by a constant
that the normalisation removes, so the biases of every block drop out of the
function: their gradient is exactly zero here (the reference gets float noise
around 1e-7 of the other gradients), and weight decay still shrinks them as
before.

Why on a CPU only: measured on this project's 2-core CPU, one training epoch
of the default evaluation (100 Fashion-MNIST images, micro-batches of 10,
DSA) took about half the CPU time of the reference kernels
(``experiments/results/eval_speed/``). Einsums here use the backend's default
precision, which on GPUs may be TF32, and the GPU path was not measured, so
``evaluate`` uses this module on CPUs only.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from collabdm_jax import models

EvalParams = Dict[str, Any]

_EPS = 1e-5  # PyTorch GroupNorm's, as models.InstanceNorm.


def _first_padding(channels: int) -> int:
  # DM's rule, as models.ConvNet: pad 3 on single-channel inputs, else 1.
  return 3 if channels == 1 else 1


def supports(model, input_shape) -> bool:
  """Whether ``model`` on examples of ``input_shape`` can run here.

  True for a ``models.ConvNet`` with instance norm, ReLU and average pooling
  (DM's default; ``fused_first_block`` does not matter, the parameters are
  the same) when every block's convolution output has even sides, e.g.
  28x28x1 or 32x32x3 inputs at depth <= 5.
  """
  if not isinstance(model, models.ConvNet):
    return False
  if (model.norm, model.activation, model.pooling) != (
      "instancenorm", "relu", "avgpool"):
    return False
  shape = tuple(input_shape)
  if len(shape) != 3:
    return False
  pad = _first_padding(shape[2])
  sides = [s + 2 * pad - 2 for s in shape[:2]]
  return all(s > 0 and s % (2 ** model.depth) == 0 for s in sides)


# ---------------------------------------------------------------------------
# Winograd F(2x2, 3x3) transforms. xi = 4u + v indexes the 4x4 transformed
# tile; every transform is written as sums of slices, which XLA fuses into a
# few elementwise loops.
# ---------------------------------------------------------------------------


def _bt(r: List[jax.Array]) -> List[jax.Array]:
  """B^T applied to 4 rows: (r0 - r2, r1 + r2, r2 - r1, r1 - r3)."""
  return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]


def _b(e: List[jax.Array]) -> List[jax.Array]:
  """B applied to 4 rows, the transpose of ``_bt``."""
  return [e[0], e[1] - e[2] + e[3], e[2] + e[1] - e[0], -e[3]]


def _g(k: List[jax.Array]) -> List[jax.Array]:
  """G applied to 3 rows: (k0, (k0 + k1 + k2) / 2, (k0 - k1 + k2) / 2, k2)."""
  return [k[0], 0.5 * (k[0] + k[1] + k[2]), 0.5 * (k[0] - k[1] + k[2]), k[2]]


def _at(m: List[jax.Array]) -> List[jax.Array]:
  """A^T applied to 4 rows: (m0 + m1 + m2, m1 - m2 - m3)."""
  return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _a(e: List[jax.Array]) -> List[jax.Array]:
  """A applied to 2 rows, the transpose of ``_at``."""
  return [e[0], e[0] + e[1], e[0] - e[1], -e[1]]


def kernel_transform(kernel: jax.Array) -> jax.Array:
  """``U = G K G^T`` per channel pair: HWIO ``[3, 3, I, O]`` -> ``[16, I, O]``."""
  out = []
  for row in _g([kernel[i] for i in range(3)]):
    out.extend(_g([row[j] for j in range(3)]))
  return jnp.stack(out)


def input_transform(x_padded: jax.Array) -> jax.Array:
  """``V = B^T d B`` of every 4x4 tile with stride 2.

  Args:
    x_padded: ``[N, 2R + 2, 2S + 2, C]``, a map padded by 1.

  Returns:
    ``[16, N * R * S, C]``; tile ``(a, b)`` reads rows ``2a .. 2a + 3`` and
    columns ``2b .. 2b + 3`` and is row ``(n * R + a) * S + b``.
  """
  n, hp, wp, c = x_padded.shape
  r, s = (hp - 2) // 2, (wp - 2) // 2
  out = []
  for rows in _bt([x_padded[:, i:i + 2 * r:2] for i in range(4)]):
    out.extend(_bt([rows[:, :, j:j + 2 * s:2] for j in range(4)]))
  return jnp.stack(out).reshape(16, n * r * s, c)


def _overlap_add(parts: List[jax.Array], axis: int) -> jax.Array:
  """Sums 4 per-tile parts into the positions ``2t + j`` they came from.

  ``parts[j]`` has ``T`` entries along ``axis`` (one per tile); the result
  has ``2T + 2``: even positions ``2t`` get ``parts[0][t] + parts[2][t-1]``
  and odd ones ``2t + 1`` get ``parts[1][t] + parts[3][t-1]`` (tiles of
  stride 2 overlap by 2).
  """
  def pad(a, lo, hi):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (lo, hi)
    return jnp.pad(a, widths)

  even = pad(parts[0], 0, 1) + pad(parts[2], 1, 0)
  odd = pad(parts[1], 0, 1) + pad(parts[3], 1, 0)
  shape = list(even.shape)
  shape[axis] *= 2
  return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


def input_transform_transpose(dv: jax.Array, n: int, r: int,
                              s: int) -> jax.Array:
  """Transpose of ``input_transform``: ``[16, N R S, C]`` -> ``[N, 2R+2, 2S+2, C]``."""
  dv = dv.reshape(4, 4, n, r, s, dv.shape[-1])
  rows = [_overlap_add(_b([dv[u, v] for v in range(4)]), axis=2)
          for u in range(4)]
  return _overlap_add(_b(rows), axis=1)


def output_transform(m: jax.Array) -> jax.Array:
  """``Y = A^T M A``: ``[16, tiles, C]`` -> ``[4 (2p + q), tiles, C]``."""
  m = m.reshape((4, 4) + m.shape[1:])
  out = []
  for row in _at([m[u] for u in range(4)]):
    out.extend(_at([row[v] for v in range(4)]))
  return jnp.stack(out)


def output_transform_transpose(dy: jax.Array) -> jax.Array:
  """``dM = A dY A^T``: ``[4, tiles, C]`` -> ``[16, tiles, C]``."""
  dy = dy.reshape((2, 2) + dy.shape[1:])
  out = []
  for row in _a([dy[0], dy[1]]):
    out.extend(_a([row[0], row[1]]))
  return jnp.stack(out)


# ---------------------------------------------------------------------------
# Instance norm, ReLU and 2x2 average pooling on pool-tile maps [4, N, T, C].
# ---------------------------------------------------------------------------


def _pool_relu(z: jax.Array, axis: int = 0) -> jax.Array:
  """Mean of ReLU over the 4 window positions (``axis``), as elementwise sums."""
  r = [jnp.maximum(lax.index_in_dim(z, i, axis, keepdims=False), 0.0)
       for i in range(4)]
  return ((r[0] + r[1]) + (r[2] + r[3])) * 0.25


def _norm_pool_forward(y, scale, beta):
  """``y`` ``[4, N, T, C]`` -> (pooled ``[N, T, C]``, yhat, 1 / sigma)."""
  mean = jnp.mean(y, axis=(0, 2), keepdims=True)
  centred = y - mean
  var = jnp.mean(jnp.square(centred), axis=(0, 2), keepdims=True)
  inv = lax.rsqrt(var + _EPS)
  yhat = centred * inv
  return _pool_relu(yhat * scale + beta), yhat, inv


def _norm_pool_backward(yhat, inv, scale, beta, dout):
  """Cotangents of ``_norm_pool_forward`` for ``dout`` ``[N, T, C]``.

  With ``dz`` the cotangent of ``z = yhat * scale + beta`` and sums over
  the ``HW`` positions of a map, ``dy = (scale / sigma) (dz - sum dz / HW -
  yhat sum(dz yhat) / HW)``.
  """
  hw = yhat.shape[0] * yhat.shape[2]
  z = yhat * scale + beta
  dz = jnp.where(z > 0, dout[None] * 0.25, 0.0)
  s = jnp.sum(dz, axis=(0, 2), keepdims=True)
  t = jnp.sum(dz * yhat, axis=(0, 2), keepdims=True)
  dy = (scale * inv) * (dz - s / hw - yhat * (t / hw))
  return dy, jnp.sum(t, axis=(0, 1, 2)), jnp.sum(s, axis=(0, 1, 2))


@jax.custom_vjp
def winograd_block(x, u, u_t, scale, beta):
  """``avgpool2(relu(instance_norm(conv3x3(x))))`` with a Winograd conv.

  Args:
    x: ``[N, H, W, C_in]`` with even H and W (padding 1, stride 1).
    u: ``[16, C_in, C_out]`` Winograd kernel (``kernel_transform``).
    u_t: ``u`` with its last two axes swapped, for the input gradient; it
      gets a zero cotangent (the gradient flows through ``u``).
    scale, beta: ``[C_out]`` instance-norm affine parameters.

  Returns:
    ``[N, H / 2, W / 2, C_out]``.
  """
  return _winograd_block_fwd(x, u, u_t, scale, beta)[0]


def _winograd_block_fwd(x, u, u_t, scale, beta):
  n, h, w, _ = x.shape
  r, s = h // 2, w // 2
  v = input_transform(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
  m = jnp.einsum("xmc,xcd->xmd", v, u)
  y = output_transform(m).reshape(4, n, r * s, -1)
  out, yhat, inv = _norm_pool_forward(y, scale, beta)
  return out.reshape(n, r, s, -1), (v, u_t, yhat, inv, scale, beta, x.shape)


def _winograd_block_bwd(res, dout):
  v, u_t, yhat, inv, scale, beta, x_shape = res
  n, h, w, _ = x_shape
  r, s = h // 2, w // 2
  co = dout.shape[-1]
  dy, dscale, dbeta = _norm_pool_backward(yhat, inv, scale, beta,
                                          dout.reshape(n, r * s, co))
  dm = output_transform_transpose(dy.reshape(4, n * r * s, co))
  du = jnp.einsum("xmc,xmd->xcd", v, dm)
  dv = jnp.einsum("xmd,xdc->xmc", dm, u_t)
  dx = input_transform_transpose(dv, n, r, s)[:, 1:h + 1, 1:w + 1, :]
  return dx, du, jnp.zeros_like(u_t), dscale, dbeta


winograd_block.defvjp(_winograd_block_fwd, _winograd_block_bwd)


# ---------------------------------------------------------------------------
# First block: thin patches, statistics from their covariance.
# ---------------------------------------------------------------------------


def tile_patches(x: jax.Array, padding: int) -> Tuple[jax.Array, int, int]:
  """im2col of a 3x3 convolution in per-image pool-tile order.

  Args:
    x: ``[N, H, W, C]`` (the convolution output, ``H + 2 padding - 2``
      square side, must be even).
    padding: zero padding on every side.

  Returns:
    ``(P, R, S)``: ``P`` ``[N, 4, R * S, 9 C]`` with
    ``P[n, 2p + q, a S + b, (3i + j) C + c] = x_pad[n, 2a + p + i,
    2b + q + j, c]`` (the HWIO kernel's row order), ``R x S`` pooled sides.
  """
  n, _, _, c = x.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  hp, wp = xp.shape[1], xp.shape[2]
  r, s = (hp - 2) // 2, (wp - 2) // 2
  # One gather of constant pixel indices: 36 strided slices, concatenated,
  # ran no faster and compiled many times more slowly.
  a, b = np.meshgrid(np.arange(r), np.arange(s), indexing="ij")
  rows = np.stack([2 * a + p + i for p in range(2) for q in range(2)
                   for i in range(3) for j in range(3)])
  cols = np.stack([2 * b + q + j for p in range(2) for q in range(2)
                   for i in range(3) for j in range(3)])
  index = (rows * wp + cols).reshape(4, 9, r * s).transpose(0, 2, 1)
  patches = jnp.take(xp.reshape(n, hp * wp, c), jnp.asarray(index, jnp.int32),
                     axis=1)  # [N, 4, R S, 9, C]
  return patches.reshape(n, 4, r * s, 9 * c), r, s


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def first_block(x, kernel, scale, beta, padding: int):
  """``avgpool2(relu(instance_norm(conv3x3(x))))`` for few input channels.

  Args:
    x: ``[N, H, W, C_in]`` images; ``H + 2 padding - 2`` and ``W + 2
      padding - 2`` even.
    kernel: ``[3, 3, C_in, C_out]`` (HWIO); the conv bias is not an input
      (instance norm removes it).
    scale, beta: ``[C_out]`` instance-norm affine parameters.
    padding: zero padding of the convolution.

  Returns:
    ``[N, (H + 2 padding - 2) / 2, (W + 2 padding - 2) / 2, C_out]``.
  """
  return _first_block_fwd(x, kernel, scale, beta, padding)[0]


def _first_block_fwd(x, kernel, scale, beta, padding):
  n = x.shape[0]
  co = kernel.shape[-1]
  patches, r, s = tile_patches(x, padding)
  hw = 4 * r * s
  k = patches.shape[-1]
  centred = (patches - jnp.mean(patches, axis=(1, 2), keepdims=True)
             ).reshape(n, hw, k)
  cov = jnp.einsum("npk,npl->nkl", centred, centred) / hw
  w = kernel.reshape(k, co)
  inv = lax.rsqrt(jnp.einsum("nkl,kc,lc->nc", cov, w, w) + _EPS)  # [N, C]
  y0 = (centred.reshape(-1, k) @ w).reshape(n, 4, r * s, co)
  gain = (scale * inv)[:, None, None, :]
  out = _pool_relu(y0 * gain + beta, axis=1).reshape(n, r, s, co)
  # A column of ones after the centred patches makes P^T dz carry sum dz too.
  ones = jnp.ones((n, hw, 1), centred.dtype)
  return out, (jnp.concatenate([centred, ones], axis=-1), cov, w, inv, scale,
               beta, y0, x)


def _first_block_bwd(padding, res, dout):
  centred_1, cov, w, inv, scale, beta, y0, x = res
  n, r, s, co = dout.shape
  hw = 4 * r * s
  k = w.shape[0]
  gain = scale * inv  # [N, C]
  z = y0 * gain[:, None, None, :] + beta
  dz = jnp.where(z > 0, dout.reshape(n, 1, r * s, co) * 0.25, 0.0)
  dz = dz.reshape(n, hw, co)
  q_1 = jnp.einsum("npk,npc->nkc", centred_1, dz)
  q, dbeta_n = q_1[:, :k], q_1[:, k]  # P_c^T dz and sum dz
  dscale_n = jnp.einsum("kc,nkc->nc", w, q) * inv  # sum dz * yhat
  dw = jnp.sum(gain[:, None, :] * (q - jnp.einsum("nkl,lc->nkc", cov, w)
                                   * (dscale_n * inv)[:, None, :]), axis=0)
  # The input cotangent: dead code when x is data, as in training.
  centred = centred_1[..., :k]
  yhat = jnp.einsum("npk,kc->npc", centred, w) * inv[:, None, :]
  dy = gain[:, None, :] * (dz - dbeta_n[:, None, :] / hw
                           - yhat * (dscale_n / hw)[:, None, :])
  dcols = jnp.einsum("npc,kc->npk", dy, w).reshape(n, 4, r * s, k)
  _, patches_vjp = jax.vjp(lambda v: tile_patches(v, padding)[0], x)
  dx, = patches_vjp(dcols)
  return (dx, dw.reshape(3, 3, x.shape[-1], co), jnp.sum(dscale_n, axis=0),
          jnp.sum(dbeta_n, axis=0))


first_block.defvjp(_first_block_fwd, _first_block_bwd)


# ---------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------


def prepare(params) -> EvalParams:
  """This module's parameters from a ConvNet's ``params`` (a linear map).

  Keeps the first kernel, the norms and the classifier, replaces every
  later kernel by its Winograd kernel (and that kernel transposed for the
  input gradient), and drops the convolution biases (instance norm removes
  them). Being linear, ``jax.vjp(prepare, params)`` turns gradients with
  respect to the returned parameters back into gradients of ``params``;
  computing it once per SGD step keeps the transform out of the per-image
  work.
  """
  depth = sum(1 for name in params if name.startswith("conv"))
  out = {"conv0": params["conv0"]["kernel"],
         "classifier": params["classifier"]}
  for d in range(depth):
    out[f"norm{d}"] = params[f"norm{d}"]
  for d in range(1, depth):
    u = kernel_transform(params[f"conv{d}"]["kernel"])
    out[f"winograd{d}"] = u
    out[f"winograd{d}_t"] = jnp.swapaxes(u, 1, 2)
  return out


def logits(eval_params: EvalParams, x: jax.Array) -> jax.Array:
  """The ConvNet's logits ``[N, classes]`` from ``prepare``'s parameters.

  Equal to ``models.logits_fn(model)(params, x)`` up to float rounding for a
  model and input shape that ``supports`` accepts.
  """
  norm = eval_params["norm0"]
  h = first_block(x, eval_params["conv0"], norm["scale"], norm["bias"],
                  _first_padding(x.shape[-1]))
  d = 1
  while f"winograd{d}" in eval_params:
    norm = eval_params[f"norm{d}"]
    h = winograd_block(h, eval_params[f"winograd{d}"],
                       lax.stop_gradient(eval_params[f"winograd{d}_t"]),
                       norm["scale"], norm["bias"])
    d += 1
  # PyTorch's NCHW flattening order, as models.ConvNet.
  features = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
  head = eval_params["classifier"]
  return features @ head["kernel"] + head["bias"]
