"""How a committed result was made: commit, command, machine and load.

Every JSON an experiment script writes carries ``provenance()`` so a number
in it can be traced to the code and the machine that produced it.
"""

import os
import pathlib
import platform
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _git(*args):
  try:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def provenance(argv=None):
  """A JSON-ready record of the code, command and machine of this process.

  ``git_dirty`` lists the tracked files that differ from ``git_commit``
  (a result made from uncommitted code says so).
  """
  argv = sys.argv if argv is None else argv
  dirty = _git("status", "--porcelain", "--untracked-files=no")
  return {
      "git_commit": _git("rev-parse", "HEAD"),
      "git_dirty": [] if not dirty else [l[3:] for l in dirty.splitlines()],
      "command": " ".join([os.path.basename(sys.executable), *argv]),
      "hostname": socket.gethostname(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "load_average": list(os.getloadavg()),
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
