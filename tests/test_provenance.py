"""collabdm_jax.provenance: what every results and benchmark file records."""

import pathlib
import subprocess
import sys

import pytest

from collabdm_jax import provenance
from collabdm_jax import results

REPO = pathlib.Path(__file__).resolve().parents[1]


def check_record(record, finished=True):
  """Asserts ``record`` is a complete provenance record of this checkout.

  Shared by the tests of every program that writes one.
  """
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, text=True,
                        capture_output=True, check=True).stdout.strip()
  assert record["git_commit"] == head
  assert isinstance(record["git_dirty"], bool)
  assert record["command"]
  assert record["cpu_model"] and record["cpu_count"] >= 1
  assert record["device_kinds"] and record["device_count"] >= 1
  assert set(record["versions"]) == set(provenance.LIBRARIES)
  assert record["versions"]["jax"] and record["versions"]["jaxlib"]
  assert record["versions"]["flax"] and record["versions"]["optax"]
  assert len(record["load_average_start"]) == 3
  if finished:
    assert record["peak_rss_mb"] > 10  # a Python process with JAX loaded
    assert len(record["load_average_end"]) == 3
    assert record["finished_utc"] >= record["started_utc"]


def _git(cwd, *args):
  subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                 text=True)


def test_record_of_this_checkout():
  rec = provenance.finish(provenance.start(["prog", "--flag=a b"]))
  check_record(rec)
  assert rec["command"] == "prog '--flag=a b'"
  import jax
  assert rec["versions"]["jax"] == jax.__version__


def test_finish_does_not_modify_the_start_record():
  start = provenance.start()
  rec = provenance.finish(start)
  assert "peak_rss_mb" not in start and rec["started_utc"] == start["started_utc"]
  assert rec["command"] == start["command"]


def test_not_a_git_checkout(tmp_path):
  state = provenance.git_state(tmp_path)
  assert state["git_commit"] is None and state["git_dirty"] is None
  assert state["git_error"].startswith("not a git checkout")


def test_commit_and_dirty_flag_of_a_repository(tmp_path):
  _git(tmp_path, "init", "-q")
  _git(tmp_path, "config", "user.email", "t@example.com")
  _git(tmp_path, "config", "user.name", "t")
  (tmp_path / "code.py").write_text("x = 1\n")
  _git(tmp_path, "add", "code.py")
  _git(tmp_path, "commit", "-q", "-m", "one")
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, text=True,
                        capture_output=True, check=True).stdout.strip()
  clean = provenance.git_state(tmp_path)
  assert clean == {"git_commit": head, "git_dirty": False,
                   "git_dirty_files": []}
  # Results and scratch files are untracked: they leave the checkout clean.
  (tmp_path / "results.json").write_text("{}")
  assert provenance.git_state(tmp_path)["git_dirty"] is False
  (tmp_path / "code.py").write_text("x = 2\n")
  dirty = provenance.git_state(tmp_path)
  assert dirty["git_dirty"] is True and dirty["git_dirty_files"] == ["code.py"]
  assert results.commit_label(dirty) == head[:12] + "+dirty"
  assert results.commit_label(clean) == head[:12]


def test_commit_label_without_provenance():
  assert results.commit_label(None) == "unknown"
  assert results.commit_label({"git_commit": None,
                               "git_error": "not a git checkout"}) == "unknown"


def test_commits_summary_counts_finished_rows():
  rows = [{"status": "ok", "commit": "aaa"}, {"status": "ok", "commit": "bbb"},
          {"status": "ok", "commit": "aaa"}, {"status": "pending"},
          {"status": "ok", "commit": None}]
  assert results.commits_summary(rows) == (
      "Made from commits: `aaa` (2 runs), `bbb` (1 run), `unknown` (1 run).")
  assert "none" in results.commits_summary([{"status": "failed"}])


def test_peak_rss_grows_with_an_allocation():
  # Peak RSS is a high-water mark: 200 MB more than the memory resident now
  # must show, whatever the process's earlier peak (the test session's is
  # GBs after the compile-heavy tests, so it is compared with VmRSS).
  def resident_mb():
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
    pytest.skip("no /proc/self/status")
  now = resident_mb()
  block = bytearray(200 * 1024 * 1024)
  block[::4096] = b"x" * len(block[::4096])  # touch every page
  assert provenance.peak_rss_mb() >= now + 190
  del block


def test_record_from_a_subprocess_names_its_command():
  code = ("import json, sys; from collabdm_jax import provenance; "
          "print(json.dumps(provenance.finish(provenance.start())))")
  out = subprocess.run([sys.executable, "-c", code, "extra-arg"], cwd=REPO,
                       text=True, capture_output=True, check=True).stdout
  import json
  rec = json.loads(out)
  check_record(rec)
  assert rec["command"] == "-c extra-arg"


def test_missing_names_what_a_record_lacks():
  started = provenance.start()
  assert provenance.missing(started) == ["peak_rss_mb"]
  assert provenance.missing(provenance.finish(started)) == []
  partial = dict(provenance.finish(started), git_dirty=None,
                 versions={"jax": "0.10.2", "jaxlib": "0.10.2", "flax": None})
  assert provenance.missing(partial) == ["git_dirty", "versions.flax",
                                         "versions.optax"]
  assert provenance.missing({"command": "x"}) == [
      k for k in provenance.REQUIRED if k != "command"]
