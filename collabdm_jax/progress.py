"""What a run logs while it works: progress with an ETA, a heartbeat, timings."""

import contextlib
import logging
import threading
import time

log = logging.getLogger("collabdm_jax")


class Progress:
  """Logs ``done/total`` with rate and ETA at most every ``every_s`` seconds.

  Used as a context manager it also logs, every ``heartbeat_s`` seconds, that
  the phase is still running, and its wall time when it ends: for a phase
  that runs as one compiled program (evaluation), where no partial progress
  is visible from the host.
  """

  def __init__(self, name, total, every_s=10.0, heartbeat_s=10.0):
    self.name, self.total, self.every_s = name, total, every_s
    self.heartbeat_s = heartbeat_s
    self.start = self.last = time.perf_counter()
    self._stop = threading.Event()
    self._thread = None

  def update(self, done, extra=""):
    now = time.perf_counter()
    if done < self.total and now - self.last < self.every_s:
      return
    self.last = now
    elapsed = now - self.start
    eta = elapsed / max(done, 1) * (self.total - done)
    log.info("%s %d/%d  %.1fs elapsed, ETA %.1fs %s", self.name, done,
             self.total, elapsed, eta, extra)

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      log.info("%s: running, %.0fs elapsed", self.name,
               time.perf_counter() - self.start)

  def __enter__(self):
    self.start = self.last = time.perf_counter()
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name=f"heartbeat-{self.name}")
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    log.info("%s: done in %.1fs", self.name, time.perf_counter() - self.start)


@contextlib.contextmanager
def timed(timings, key):
  """Adds the wall seconds of the block to ``timings[key]`` (None: no-op)."""
  t0 = time.perf_counter()
  try:
    yield
  finally:
    if timings is not None:
      timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
