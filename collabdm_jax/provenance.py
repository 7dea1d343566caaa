"""Where a number came from: code version, command, machine and load.

Every ``results.json`` and benchmark JSON carries a ``provenance`` record so
that a figure can be traced to the commit, command and machine that made it
without anyone writing that down by hand. A run takes ``start()`` when it
begins (load average at start) and ``finish(record)`` when it writes its
results (peak resident memory, load average at the end).

Record keys (``start``):

==========================  ===================================================
``git_commit``              full hash of ``HEAD`` of the checkout holding this
                            package, or None (then ``git_error`` says why, e.g.
                            "not a git checkout")
``git_dirty``               True when tracked files differ from ``HEAD`` (the
                            numbers may not be reproducible from the commit);
                            None when unknown
``git_dirty_files``         up to ``MAX_DIRTY_FILES`` changed tracked paths
``command``                 the command line (``shlex``-quoted ``sys.argv``)
``python``                  interpreter path and version
``hostname``                the machine's name
``cpu_model``, ``cpu_count``  from ``/proc/cpuinfo`` and ``os.cpu_count()``
``backend``, ``device_kinds``, ``device_count``  what JAX computes on
``versions``                jax, jaxlib, flax, optax, numpy (None if absent)
``load_average_start``      1/5/15-minute load averages when the run began
``started_utc``             ISO time the record was taken
==========================  ===================================================

``finish`` adds ``peak_rss_mb`` (this process; ``peak_rss_children_mb`` for
finished child processes), ``load_average_end`` and ``finished_utc``.
``missing`` says which of the fields a finished record must hold it lacks.
"""

import datetime
import importlib.metadata
import os
import pathlib
import platform
import resource
import shlex
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import jax

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy")
MAX_DIRTY_FILES = 20
# What a finished record must hold for a number to be traced (issue 13):
# code version, command, machine, libraries, load and memory.
REQUIRED = ("git_commit", "git_dirty", "command", "cpu_model", "cpu_count",
            "device_kinds", "versions", "load_average_start", "peak_rss_mb")
REQUIRED_LIBRARIES = ("jax", "jaxlib", "flax", "optax")
_GIT_TIMEOUT_S = 10


def _git(args: Sequence[str], cwd) -> str:
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True,
                        text=True, check=True, timeout=_GIT_TIMEOUT_S).stdout


def git_state(directory=PACKAGE_DIR) -> Dict:
  """Commit and dirty flag of the git checkout containing ``directory``.

  Returns ``{"git_commit": hash, "git_dirty": bool, "git_dirty_files":
  [...]}``; outside a checkout (e.g. an installed wheel) or without git, the
  commit and flag are None and ``git_error`` says why. Untracked files do not
  make a checkout dirty: they are results and scratch files, not code.
  """
  try:
    commit = _git(["rev-parse", "HEAD"], directory).strip()
    status = _git(["status", "--porcelain", "--untracked-files=no"],
                  directory).splitlines()
  except FileNotFoundError:
    return {"git_commit": None, "git_dirty": None, "git_dirty_files": [],
            "git_error": "git is not installed"}
  except subprocess.CalledProcessError as e:
    reason = (e.stderr or "").strip().splitlines()
    msg = reason[0] if reason else f"git exited with {e.returncode}"
    if "not a git repository" in msg:
      msg = f"not a git checkout: {directory}"
    return {"git_commit": None, "git_dirty": None, "git_dirty_files": [],
            "git_error": msg}
  except (OSError, subprocess.TimeoutExpired) as e:
    return {"git_commit": None, "git_dirty": None, "git_dirty_files": [],
            "git_error": f"{type(e).__name__}: {e}"}
  files = [line[3:] for line in status if len(line) > 3]
  return {"git_commit": commit, "git_dirty": bool(files),
          "git_dirty_files": files[:MAX_DIRTY_FILES]}


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``; ``platform`` elsewhere)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def library_versions(names: Sequence[str] = LIBRARIES) -> Dict[str, Optional[str]]:
  """Installed version of each distribution (None when not installed)."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
  """Peak resident memory in MiB of this process (or its waited children).

  ``ru_maxrss`` is KiB on Linux and bytes on macOS.
  """
  rss = resource.getrusage(who).ru_maxrss
  return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def load_average():
  """1, 5 and 15-minute load averages, or None where the OS has none."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


def start(argv: Optional[Sequence[str]] = None) -> Dict:
  """The provenance record of a run that begins now (see module docstring).

  Args:
    argv: the command line to record; default ``sys.argv``.
  """
  devices = jax.devices()
  record = git_state()
  record.update({
      "command": shlex.join(list(sys.argv if argv is None else argv)),
      "python": f"{sys.executable} {platform.python_version()}",
      "hostname": socket.gethostname(),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "backend": jax.default_backend(),
      "device_kinds": sorted({d.device_kind for d in devices}),
      "device_count": len(devices),
      "versions": library_versions(),
      "load_average_start": load_average(),
      "started_utc": _now(),
  })
  return record


def finish(record: Optional[Dict]) -> Dict:
  """``record`` (from ``start``; None takes one now) plus what ends a run.

  Adds ``peak_rss_mb``, ``peak_rss_children_mb``, ``load_average_end`` and
  ``finished_utc``; ``record`` itself is not modified.
  """
  out = dict(start() if record is None else record)
  out.update({
      "peak_rss_mb": round(peak_rss_mb(), 1),
      "peak_rss_children_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1),
      "load_average_end": load_average(),
      "finished_utc": _now(),
  })
  return out


def missing(record: Dict) -> List[str]:
  """The ``REQUIRED`` fields (and library versions) ``record`` lacks.

  A field counts as missing when it is absent or None (a commit of None:
  not made from a git checkout; a dirty flag of None: unknown). An empty
  list means the record is complete.
  """
  out = [k for k in REQUIRED if record.get(k) is None]
  versions = record.get("versions") or {}
  out += [f"versions.{k}" for k in REQUIRED_LIBRARIES
          if "versions" not in out and versions.get(k) is None]
  return out
