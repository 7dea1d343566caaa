"""Test-session set-up.

XLA compilation dominates this suite's run time on CPU, and several tests
compile the same programs (often in subprocesses: the launchers). A
persistent compilation cache shared by the whole session, subprocesses
included through the environment, compiles each program once.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "collabdm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def quick_script_json(tmp_path_factory):
  """Runs ``python SCRIPT --quick --out=FILE`` from the repository root.

  Returns a function ``(script, timeout, *args) -> document``: the one JSON
  document the script prints, checked to be what it wrote to FILE.
  """
  def run(script, timeout, *args):
    out = tmp_path_factory.mktemp("quick") / "out.json"
    proc = subprocess.run(
        [sys.executable, script, "--quick", f"--out={out}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert json.loads(out.read_text()) == doc
    return doc

  return run
