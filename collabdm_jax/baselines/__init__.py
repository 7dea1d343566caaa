"""Comparison baselines for CollabDM on the same data, partition and budget.

Every baseline takes the ``setup.Setup`` a CollabDM run builds from its
config (same dataset, same client partition, same shared root key) and
returns either a synthetic set for the shared evaluator or the test metrics
of a trained model:

* ``central_dm``: DM on the pooled data of all clients (not federated; the
  quality CollabDM aims to reach).
* ``merged_local_dm``: every client distils alone; the server concatenates
  the local sets (CollabDM's starting point, without the server iterations).
* ``fedavg``: one-shot FedAvg, client models averaged once.
* ``dense``: DENSE (Zhang et al., NeurIPS 2022), data-free distillation of
  the client ensemble into a server model through a generator.

Each module exposes ``run(s, timings) -> dict``. Image baselines return
``{"images": [M, ...] float32, "labels": [M] int32}``; model baselines
return ``{"accuracies": [n], "accuracy_mean", "accuracy_std",
"predictions": [n, N_test], ...}`` computed on ``s.test_x`` /
``s.dataset.test_y``. Wall seconds of each phase are added to ``timings``.

Baseline-specific settings are the ``config.baseline`` block that
``experiments/configs/default.py`` declares (a None there means "as the
CollabDM field its comment names", ``common.unless_none``).

Randomness: each baseline draws from its own stream ``common.baseline_key(root,
name)``, folded from the shared root key, so results are a pure function of
the config and never collide with the protocol's streams in ``keys``.
"""

from collabdm_jax.baselines import central_dm
from collabdm_jax.baselines import dense
from collabdm_jax.baselines import fedavg
from collabdm_jax.baselines import merged_local_dm

# The registry ``pipeline.run`` dispatches ``config.method`` through.
RUNNERS = {
    "central_dm": central_dm.run,
    "merged_local_dm": merged_local_dm.run,
    "fedavg": fedavg.run,
    "dense": dense.run,
}
IMAGE_BASELINES = ("central_dm", "merged_local_dm")
MODEL_BASELINES = ("fedavg", "dense")


def runner(method: str):
  """``run(s, timings) -> dict`` of baseline ``method`` (ValueError if none)."""
  if method not in RUNNERS:
    raise ValueError(f"method must be 'collabdm' or one of {tuple(RUNNERS)}, "
                     f"got {method!r}")
  return RUNNERS[method]
