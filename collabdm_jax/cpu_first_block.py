"""DM's ConvNet first block as compiled CPU kernels (forward and input gradient).

On XLA:CPU the first block of the ConvNet, ``3x3 conv -> instance norm ->
ReLU -> 2x2 average pool``, is the slowest part of the network for its
work: at the reference shapes (28x28x1 images padded to 32x32 maps of 128
channels) it was a third of the forward time of a batch of 64 for 2.5 % of
the FLOPs, because its 512 KiB conv map per image went through memory
between XLA's fusions. ``cpu_first_block.cc`` computes the block one image
at a time: the forward pass takes the instance-norm statistics from the
image's 3x3 patch moments (channel c of ``y = P w_c`` has mean ``mu . w_c``
and variance ``w_c^T Cov(P) w_c``), so it never stores the map; the
gradient with respect to the input (the DM losses' image gradients) keeps
one map per image in the core's cache. models.ConvNet runs its first block
through them on CPUs (``experiments/results/first_block`` measures both
against XLA).

Parameter gradients (training a network through the block) stay XLA's own
(``first_block``'s custom VJP). Values and gradients equal those of the
plain layers up to float rounding (``tests/test_cpu_first_block.py``).

The kernel is C++ against the XLA FFI headers that jaxlib ships, compiled
on first use with the system's ``g++`` (``-O3 -march=native``) into
``$COLLABDM_KERNEL_DIR`` (default ``~/.cache/collabdm_jax``) under a name
that hashes the source, the command, the jaxlib version and the CPU's
flags, and registered as an XLA custom call. Without a compiler, or if the
build fails (logged once), or with ``COLLABDM_CPU_KERNELS=0``, everything
runs as before on XLA's ops.
"""

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("collabdm_jax")

SOURCE = pathlib.Path(__file__).with_name("cpu_first_block.cc")
TARGET = "collabdm_first_block_forward"
BACKWARD_TARGET = "collabdm_first_block_backward"
EPSILON = 1e-5  # models.InstanceNorm's
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_ENV_SWITCH = "COLLABDM_CPU_KERNELS"


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


def library_path() -> pathlib.Path:
  """Where the compiled kernel for this source, jaxlib and CPU lives."""
  root = pathlib.Path(os.environ.get(
      "COLLABDM_KERNEL_DIR", pathlib.Path.home() / ".cache" / "collabdm_jax"))
  h = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(_FLAGS).encode(),
               jax.lib.__version__.encode(), _cpu_flags().encode(),
               platform.machine().encode()):
    h.update(part + b"\0")
  return root / f"cpu_first_block-{h.hexdigest()[:16]}.so"


def build(path: pathlib.Path) -> None:
  """Compiles ``SOURCE`` into ``path`` (a temporary file, then renamed).

  Raises:
    RuntimeError: no ``g++``, or the compiler failed (its message inside).
  """
  compiler = shutil.which("g++")
  if compiler is None:
    raise RuntimeError("no g++ on PATH to build the CPU first-block kernel")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o",
         tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"building the CPU first-block kernel failed:\n"
                       f"{' '.join(cmd)}\n{done.stderr[-2000:]}")
  os.replace(tmp, path)


@functools.lru_cache(maxsize=None)
def _registered() -> bool:
  """Builds (once per machine) and registers the kernel; False on failure."""
  try:
    path = library_path()
    if not path.exists():
      build(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(
        TARGET, jax.ffi.pycapsule(lib.CollabdmFirstBlockForward),
        platform="cpu")
    jax.ffi.register_ffi_target(
        BACKWARD_TARGET, jax.ffi.pycapsule(lib.CollabdmFirstBlockBackward),
        platform="cpu")
    return True
  except (OSError, RuntimeError) as e:
    log.warning("the CPU first-block kernel is unavailable, XLA's ops run "
                "the block instead: %s", e)
    return False


_xla_only = False


@contextlib.contextmanager
def xla_ops():
  """Within it, ConvNets traced run their first block as XLA's ops.

  For counting a program's FLOPs: XLA's cost analysis counts none for a
  custom call, so a count of a program with the kernels would leave the
  block's convolutions out.
  """
  global _xla_only
  before, _xla_only = _xla_only, True
  try:
    yield
  finally:
    _xla_only = before


def enabled() -> bool:
  """Whether ConvNets traced now use the kernels (CPU backend, not switched
  off with ``COLLABDM_CPU_KERNELS=0`` or ``xla_ops``, and they build)."""
  if _xla_only or os.environ.get(_ENV_SWITCH, "1") == "0":
    return False
  return jax.default_backend() == "cpu" and _registered()


def _check(x, kernel, scale, beta, padding):
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or \
      kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"first block: x must be [N, H, W, C] and the kernel "
                     f"[3, 3, C, C_out], got {x.shape} and {kernel.shape}")
  co = kernel.shape[-1]
  if scale.shape != (co,) or beta.shape != (co,):
    raise ValueError(f"first block: scale and beta must be [{co}], got "
                     f"{scale.shape} and {beta.shape}")
  if co > 1024:
    raise ValueError(f"first block: at most 1024 channels, got {co}")
  ho, wo = x.shape[1] + 2 * padding - 2, x.shape[2] + 2 * padding - 2
  if padding < 0 or min(ho, wo) < 2:
    raise ValueError(f"first block: padding {padding} leaves a {ho}x{wo} "
                     "map, too small to pool")
  return ho // 2, wo // 2, co


def reference(x, kernel, bias, scale, beta, padding):
  """The block with XLA's ops, as models.ConvNet's layers compute it."""
  y = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  mean = jnp.mean(y, axis=(1, 2), keepdims=True)
  centred = y - mean
  var = jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True)
  z = jax.nn.relu(centred * jax.lax.rsqrt(var + EPSILON) * scale + beta)
  n, h, w, c = z.shape
  z = z[:, :h // 2 * 2, :w // 2 * 2]
  return z.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def kernel_forward(x, kernel, scale, beta, padding: int):
  """The block by the compiled kernel (float32; the conv bias cancels in
  the instance norm, so the kernel takes none). ``[N, H', W', C_out]``."""
  hq, wq, co = _check(x, kernel, scale, beta, padding)
  call = jax.ffi.ffi_call(
      TARGET, jax.ShapeDtypeStruct((x.shape[0], hq, wq, co), jnp.float32),
      vmap_method="sequential")
  return call(x.astype(jnp.float32), kernel.astype(jnp.float32),
              scale.astype(jnp.float32), beta.astype(jnp.float32),
              padding=np.int64(padding), eps=np.float32(EPSILON))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def first_block(x, kernel, bias, scale, beta, padding: int):
  """The first block by the compiled kernels, forward and input gradient.

  The parameters' gradients (when a network is trained through it) are
  XLA's, from ``reference``.

  Args:
    x: ``[N, H, W, C]`` float32 images.
    kernel: ``[3, 3, C, C_out]``; bias, scale, beta: ``[C_out]``.
    padding: the conv's zero padding on each side.

  Returns:
    ``[N, H', W', C_out]`` with ``H' = (H + 2 padding - 2) // 2`` (W' alike).
  """
  del bias  # removed by the instance norm's centring
  return kernel_forward(x, kernel, scale, beta, padding)


def kernel_input_gradient(x, kernel, scale, beta, dout, padding: int):
  """The block's gradient w.r.t. ``x`` for the output cotangent ``dout``,
  by the compiled kernel (it recomputes the conv map and its statistics)."""
  hq, wq, co = _check(x, kernel, scale, beta, padding)
  if dout.shape != (x.shape[0], hq, wq, co):
    raise ValueError(f"first block: dout must be {(x.shape[0], hq, wq, co)}, "
                     f"got {dout.shape}")
  call = jax.ffi.ffi_call(
      BACKWARD_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
      vmap_method="sequential")
  return call(x.astype(jnp.float32), kernel.astype(jnp.float32),
              scale.astype(jnp.float32), beta.astype(jnp.float32),
              dout.astype(jnp.float32), padding=np.int64(padding),
              eps=np.float32(EPSILON))


def _first_block_fwd(x, kernel, bias, scale, beta, padding):
  return (first_block(x, kernel, bias, scale, beta, padding),
          (x, kernel, bias, scale, beta))


def _first_block_bwd(padding, residuals, dout):
  x, kernel, bias, scale, beta = residuals
  dx = kernel_input_gradient(x, kernel, scale, beta, dout, padding)
  # The parameters' gradients (training) from XLA's ops; a DM loss only
  # asks for dx, and XLA then drops this computation as unused.
  _, vjp = jax.vjp(lambda *p: reference(x, *p, padding), kernel, bias, scale,
                   beta)
  return (dx, *vjp(dout))


first_block.defvjp(_first_block_fwd, _first_block_bwd)
