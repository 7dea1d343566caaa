"""Test-session set-up.

XLA compilation dominates this suite's run time on CPU, and several tests
compile the same programs (often in subprocesses: the launchers). A
persistent compilation cache shared by the whole session, subprocesses
included through the environment, compiles each program once.
"""

import os
import tempfile

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "collabdm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
