"""Ranges every embedding of a random network psi_t must lie in.

A server that does not trust its clients can still check their statistics
against what psi_t can output at all. For DM's ConvNet with instance norm
this is a closed form:

* instance norm maps the ``n = H*W`` values of each channel to
  ``z_i = (x_i - mean) / sqrt(var + eps)`` with ``var`` the biased variance.
  A zero-mean vector of n entries with mean square ``var`` has no entry
  above ``sqrt((n - 1) * var)`` in magnitude (put all the spread on one
  entry), so ``|z_i| < sqrt(n - 1)``; the affine part gives
  ``gamma * z + beta`` in ``[beta - |gamma| r, beta + |gamma| r]`` with
  ``r = sqrt(n - 1)``;
* the activation maps that interval to ``[act(a), act(b)]`` (ReLU, leaky
  ReLU and sigmoid are non-decreasing; GELU dips to about -0.17 between);
* average and max pooling stay inside the range of their inputs;
* the embedding is the last block's map flattened channel-major (NCHW), so
  each channel's range repeats ``H' * W'`` times.

Any mean (or mean of squares) of such embeddings lies in the same range (in
its square), so a client mean outside it cannot be honest. The bound uses
psi_t's own norm parameters, derived from the shared root key.
"""

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from collabdm_jax import dm
from collabdm_jax import models

# A lower bound of GELU(x) = x * Phi(x) over all x (its minimum is -0.16997
# at x = -0.75179).
_GELU_MIN = -0.17


def _activation_range(activation: str, a: np.ndarray, b: np.ndarray):
  """Elementwise range of ``activation`` over the intervals ``[a, b]``."""
  if activation == "relu":
    return np.maximum(a, 0.0), np.maximum(b, 0.0)
  if activation == "leakyrelu":
    return np.where(a > 0, a, 0.01 * a), np.where(b > 0, b, 0.01 * b)
  if activation == "sigmoid":
    return 1.0 / (1.0 + np.exp(-a)), 1.0 / (1.0 + np.exp(-b))
  if activation == "gelu":
    gelu = lambda v: np.asarray(jax.nn.gelu(v, approximate=False))
    ga, gb = gelu(a), gelu(b)
    return np.minimum(np.minimum(ga, gb), _GELU_MIN), np.maximum(ga, gb)
  raise ValueError(f"no range known for activation {activation!r}")


def last_norm_size(model, input_shape) -> Tuple[int, int]:
  """``(H, W)`` of the map the last instance norm of a ConvNet normalises.

  Follows ``models.ConvNet``: 3x3 convs keep the size except the first on
  single-channel inputs (padding 3 grows it by 4); each block but the last
  pools 2x2 before the next conv (flooring odd sizes).
  """
  h, w, ch = input_shape
  grow = 4 if ch == 1 else 0
  h, w = h + grow, w + grow
  for _ in range(model.depth - 1):
    if model.pooling != "none":
      h, w = h // 2, w // 2
  return h, w


def _supported(model) -> bool:
  return (isinstance(model, models.ConvNet) and model.norm == "instancenorm"
          and model.activation in ("relu", "leakyrelu", "sigmoid", "gelu"))


def embedding_ranges(model, input_shape, root, num_iterations
                     ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """``(lo, hi)``, each ``[T, D]``: the range of every embedding entry of psi_t.

  Args:
    model: the embedding network of every psi_t.
    input_shape: one example's shape.
    root: the shared root key (psi_t's norm parameters come from it).
    num_iterations: T.

  Returns:
    float32 arrays ``lo <= embed(psi_t, x)[d] <= hi`` for every input x, or
    None when no closed form is known for the architecture (anything but a
    ConvNet with instance norm), in which case a server can configure a
    bound instead.
  """
  if not _supported(model):
    return None
  input_shape = tuple(input_shape)
  h, w = last_norm_size(model, input_shape)
  out = jax.eval_shape(
      lambda x: model.apply({"params": models.init_params(
          model, jax.random.key(0), input_shape)}, x,
          method=model.feature_map),
      jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32))
  hf, wf = out.shape[1:3]
  expect = (h // 2, w // 2) if model.pooling != "none" else (h, w)
  if (hf, wf) != expect or out.shape[3] * hf * wf != models.feature_dim(
      model, input_shape):
    raise ValueError(f"embedding_ranges: ConvNet layout changed (final map "
                     f"{out.shape[1:]} for a last norm over {h}x{w}); update "
                     f"last_norm_size")
  last = f"norm{model.depth - 1}"

  def norm_params(t):
    p = dm.network_params(model, root, t, input_shape)[last]
    return p["scale"], p["bias"]

  # Only the norm parameters are returned, so XLA never draws the conv weights.
  scale, bias = jax.jit(jax.vmap(norm_params))(jnp.arange(num_iterations))
  scale, bias = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
  r = math.sqrt(h * w - 1)
  lo, hi = _activation_range(model.activation, bias - np.abs(scale) * r,
                             bias + np.abs(scale) * r)
  # NCHW flattening: channel c covers entries [c*H'*W', (c+1)*H'*W').
  rep = hf * wf
  return (np.repeat(lo, rep, axis=-1).astype(np.float32),
          np.repeat(hi, rep, axis=-1).astype(np.float32))
