"""Server checkpoints: exact round trip and resume, kills, bad checkpoints."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from collabdm_jax import checkpoint
from collabdm_jax import losses
from collabdm_jax import models
from collabdm_jax import protocol
from collabdm_jax import server

C, IPC, T, EVERY = 2, 2, 6, 2
SHAPE = (8, 8, 1)
ROOT = jax.random.key(11)
FINGERPRINT = protocol.key_fingerprint(ROOT)
CONFIG_HASH = protocol.config_hash({"test": "checkpoint", "T": T})
CFG = server.ServerConfig(ipc=IPC, dsa_strategy="color_crop")
MODEL = models.make_model("convnet", C, width=8, depth=1)
D = models.feature_dim(MODEL, SHAPE)


def problem():
  """Fixed targets [T, C, D] (class 1 absent at t=2) and starting images."""
  rng = np.random.default_rng(0)
  valid = np.ones((T, C), bool)
  valid[2, 1] = False  # a class nobody held at t=2: exercises bool arrays
  targets = losses.ClassMoments(
      rng.standard_normal((T, C, D)).astype(np.float32),
      np.abs(rng.standard_normal((T, C, D))).astype(np.float32), valid)
  init = rng.standard_normal((C, IPC) + SHAPE).astype(np.float32)
  return targets, init


def make_ckpt(directory, **kw):
  args = dict(every=EVERY, config_hash=CONFIG_HASH,
              root_fingerprint=FINGERPRINT)
  args.update(kw)
  return checkpoint.ServerCheckpointer(directory, **args)


def tmpl(num_iterations=T, ipc=IPC):
  return checkpoint.templates(server.ServerConfig(ipc=ipc), num_iterations, C,
                              SHAPE, D)


def host(tree):
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def assert_trees_equal(a, b):
  # Same structure, shapes and dtypes, and bitwise-equal values (floats
  # without NaN).
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  chex.assert_trees_all_equal(a, b, strict=True)


def run(targets, init, chunks=None, state=None, on_iteration=None):
  chunks = [(0, targets)] if chunks is None else chunks
  return server.synthesize(ROOT, chunks, MODEL, SHAPE, C, CFG, init,
                           state=state, on_iteration=on_iteration)


@pytest.fixture(scope="module")
def reference():
  """An uninterrupted run; host copies of the state after every iteration."""
  targets, init = problem()
  states = []
  final = run(targets, init,
              on_iteration=lambda t, st, l: states.append(host(st)))
  assert len(states) == T
  assert_trees_equal(host(final), states[-1])
  return targets, init, states


def test_round_trip_is_exact(reference, tmp_path):
  targets, _, states = reference
  mid = states[2]
  # After 3 steps the momentum trace is non-zero: it must come back too.
  assert np.abs(np.asarray(mid.opt_state[0].trace)).max() > 0
  with make_ckpt(tmp_path / "ck") as ck:
    ck.save(2, mid, targets, extra={"upload": {"0": 123}})
  restored = make_ckpt(tmp_path / "ck").restore_or_none(*tmpl())
  assert restored.next_t == 3
  assert restored.extra == {"upload": {"0": 123}}
  assert isinstance(restored.state, type(mid))
  assert isinstance(restored.state.images, jax.Array)
  assert_trees_equal(host(restored.state), mid)
  assert isinstance(restored.targets, losses.ClassMoments)
  assert_trees_equal(restored.targets, targets)
  assert not restored.targets.valid[2, 1]


class Interrupted(Exception):
  pass


def test_resume_mid_run_is_bit_identical(reference, tmp_path):
  targets, init, states = reference
  ck = make_ckpt(tmp_path / "ck")
  saved = []

  def dies_at_3(t, st, l):
    saved.append(ck.maybe_save(t, st, targets))
    if t == 3:  # iteration 3 ran, but only steps up to 2 were committed
      raise Interrupted

  with pytest.raises(Interrupted):
    run(targets, init, on_iteration=dies_at_3)
  assert saved == [False, True, False, True]
  ck.close()

  ck = make_ckpt(tmp_path / "ck")
  restored = ck.restore_or_none(*tmpl())
  assert restored.next_t == 4  # saved after t=3, before the interruption
  assert_trees_equal(host(restored.state), states[3])
  final = run(None, None,
              chunks=checkpoint.resume_chunks(restored.targets,
                                              restored.next_t),
              state=restored.state,
              on_iteration=lambda t, st, l: ck.maybe_save(t, st,
                                                          restored.targets))
  assert_trees_equal(host(final), states[-1])
  # The last iteration is always saved: a relaunch now has nothing to do.
  again = make_ckpt(tmp_path / "ck").restore_or_none(*tmpl())
  assert again.next_t == T
  assert checkpoint.resume_chunks(again.targets, again.next_t) == []
  assert_trees_equal(host(again.state), states[-1])


CHILD = """
import sys
sys.path.insert(0, {tests_dir!r})
import test_checkpoint as tc
tc.child_main(sys.argv[1:])
"""


def child_main(argv):
  """A tiny server run with checkpoints, as a relaunchable process.

  argv: directory, output .npz, "targets"/"no-targets" (whether the clients'
  targets are available: a relaunch must not need them), and the step after
  whose save the first launch stalls so it is surely killed mid-run
  (0 = never).
  """
  directory, out, have_targets, stall_step = argv
  stall_step = int(stall_step)
  ck = make_ckpt(directory)
  restored = ck.restore_or_none(*tmpl())
  if restored is None:
    if have_targets != "targets":
      raise SystemExit("no checkpoint to resume and no targets")
    targets, init = problem()
    chunks, state = [(0, targets)], None
    print("fresh start", flush=True)
  else:
    targets, init, state = restored.targets, None, restored.state
    chunks = checkpoint.resume_chunks(targets, restored.next_t)
    print(f"resumed next_t={restored.next_t}", flush=True)

  def on_iteration(t, st, l):
    saved = ck.maybe_save(t, st, targets)
    if stall_step:
      time.sleep(0.1)  # leave the killer a window between checkpoints
      if saved and t + 1 >= stall_step:
        time.sleep(600)

  final = run(targets, init, chunks=chunks, state=state,
              on_iteration=on_iteration)
  ck.close()
  np.savez(out, images=np.asarray(final.images),
           trace=np.asarray(final.opt_state[0].trace))


def launch(tmp_path, *args):
  script = CHILD.format(tests_dir=str(pathlib.Path(__file__).parent))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=tmp_path)


def finished_steps(directory):
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.slow  # kills and relaunches a run in subprocesses
def test_killed_process_resumes_to_identical_images(reference, tmp_path):
  _, _, states = reference
  directory, out = tmp_path / "ck", tmp_path / "final.npz"
  proc = launch(tmp_path, directory, out, "targets", 4)
  deadline = time.monotonic() + 240
  while not finished_steps(directory):
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail("no checkpoint appeared: " + proc.communicate()[1][-3000:])
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  assert not out.exists()
  assert finished_steps(directory)  # at least one committed checkpoint

  # The relaunch has no client targets: it must resume from the checkpoint.
  proc = launch(tmp_path, directory, out, "no-targets", 0)
  stdout, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  resumed_at = int(stdout.split("resumed next_t=")[1].split()[0])
  assert resumed_at in (2, 4)
  with np.load(out) as f:
    np.testing.assert_array_equal(f["images"], states[-1].images)
    np.testing.assert_array_equal(f["trace"], states[-1].opt_state[0].trace)


@pytest.fixture()
def saved_dir(reference, tmp_path):
  """A directory with committed steps 2 and 4."""
  targets, _, states = reference
  with make_ckpt(tmp_path / "ck") as ck:
    ck.save(1, states[1], targets)
    ck.save(3, states[3], targets)
  return tmp_path / "ck"


def test_half_written_step_is_ignored_and_cleaned(reference, saved_dir):
  _, _, states = reference
  # What a save killed half-way leaves: a temporary directory, partly filled.
  tmp = saved_dir / "6.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(saved_dir / "4", tmp)
  shutil.rmtree(tmp / "meta")
  restored = make_ckpt(saved_dir).restore_or_none(*tmpl())
  assert restored.next_t == 4
  assert_trees_equal(host(restored.state), states[3])
  assert not tmp.exists()


def test_half_deleted_old_step_does_not_matter(reference, saved_dir):
  targets, _, states = reference
  # A kill while pruning step 2 (after step 4 was committed) leaves a part.
  (saved_dir / "2" / "_CHECKPOINT_METADATA").unlink()
  shutil.rmtree(saved_dir / "2" / "state")
  with make_ckpt(saved_dir) as ck:
    restored = ck.restore_or_none(*tmpl())
    assert restored.next_t == 4
    ck.save(5, states[5], targets)
  assert finished_steps(saved_dir) == [4, 6]


def test_only_half_written_step_means_fresh_start(saved_dir, tmp_path):
  directory = tmp_path / "only_tmp"
  directory.mkdir()
  shutil.copytree(saved_dir / "2",
                  directory / "2.orbax-checkpoint-tmp-1700000000000000")
  assert make_ckpt(directory).restore_or_none(*tmpl()) is None


def test_empty_or_missing_directory_means_fresh_start(tmp_path):
  (tmp_path / "empty").mkdir()
  assert make_ckpt(tmp_path / "empty").restore_or_none(*tmpl()) is None
  assert make_ckpt(tmp_path / "new").restore_or_none(*tmpl()) is None
  assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("kwargs, template, words", [
    ({"config_hash": "0" * 64}, {}, "config hash mismatch"),
    ({"root_fingerprint": protocol.key_fingerprint(jax.random.key(12))}, {},
     "root key fingerprint mismatch"),
    ({}, {"ipc": IPC + 1}, "state.images mismatch"),
    ({}, {"num_iterations": T + 1}, "targets.mean mismatch"),
])
def test_mismatched_checkpoint_is_refused(saved_dir, kwargs, template, words):
  with pytest.raises(checkpoint.CheckpointError) as e:
    make_ckpt(saved_dir, **kwargs).restore_or_none(*tmpl(**template))
  assert words in str(e.value)
  assert str(saved_dir.absolute()) in str(e.value)
  assert isinstance(e.value, ValueError)


def largest_file(directory):
  return max((p for p in directory.rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path, **changes):
  data = json.loads(path.read_text())
  data.update(changes)
  path.write_text(json.dumps(data))


def flip_middle_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


# A failed tensorstore read can leave a callback for Orbax's already-closed
# event loop; Python reports it as unraisable. The error itself is raised.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [
    lambda d: truncate(largest_file(d / "4" / "state")),
    lambda d: flip_middle_byte(largest_file(d / "4" / "state")),
    lambda d: truncate(largest_file(d / "4" / "targets")),
    lambda d: (d / "4" / "meta" / "metadata").write_text("{not json"),
    lambda d: edit_json(d / "4" / "meta" / "metadata", extra={"x": 2}),
    lambda d: shutil.rmtree(d / "4" / "targets"),
], ids=["truncated-state", "flipped-state", "truncated-targets",
        "garbled-meta", "edited-meta", "missing-targets"])
def test_corrupt_checkpoint_is_refused(saved_dir, damage):
  damage(saved_dir)
  with make_ckpt(saved_dir) as ck, pytest.raises(
      checkpoint.CheckpointError) as e:
    ck.restore_or_none(*tmpl())
  assert str(saved_dir.absolute()) in str(e.value)
  assert "step 4" in str(e.value)


def test_save_schedule_and_argument_checks(reference, tmp_path):
  targets, _, states = reference
  ck = make_ckpt(tmp_path / "ck", every=4)
  assert [t for t in range(T) if ck.should_save(t, T)] == [3, 5]
  assert not ck.maybe_save(2, states[2], targets)
  assert ck.latest_step() is None
  assert ck.maybe_save(3, states[3], targets)
  assert ck.latest_step() == 4
  with pytest.raises(ValueError, match="after the latest"):
    ck.save(2, states[2], targets)
  with pytest.raises(ValueError, match="t must be in"):
    ck.save(T, states[-1], targets)
  with pytest.raises(ValueError, match="extra"):
    ck.save(4, states[4], targets, extra={"x": object()})
  for bad in ({"every": 0}, {"max_to_keep": 0}, {"config_hash": ""}):
    with pytest.raises(ValueError):
      make_ckpt(tmp_path / "other", **bad)
  with pytest.raises(ValueError, match="next_t"):
    checkpoint.resume_chunks(targets, T + 1)
  (t0, chunk), = checkpoint.resume_chunks(targets, 4)
  assert t0 == 4 and chunk.mean.shape == (T - 4, C, D)


def test_old_steps_are_pruned(reference, tmp_path):
  targets, _, states = reference
  with make_ckpt(tmp_path / "ck", every=1, max_to_keep=2) as ck:
    for t in range(T):
      ck.maybe_save(t, states[t], targets)
  assert finished_steps(tmp_path / "ck") == [T - 1, T]


def test_synthesis_config_hash_ignores_eval_and_paths():
  import ml_collections
  c = ml_collections.ConfigDict({"seed": 0, "server": {"ipc": 10},
                                 "eval": {"epochs": 100}, "data_dir": "/a"})
  h = checkpoint.synthesis_config_hash(c)
  c.eval.epochs, c.data_dir = 5, "/b"
  assert checkpoint.synthesis_config_hash(c) == h
  c.server.ipc = 20
  assert checkpoint.synthesis_config_hash(c) != h
