"""Reference-budget tables (issue 13, item 5): 3 seeds per cell.

``get_config(part)`` for one of ``PARTS``:

* ``main``: full Fashion-MNIST, K ∈ {5, 10} × α ∈ {0.1, 0.5} × the seven
  ``VARIANTS`` at ipc 10 (84 cells);
* ``ipc``: CollabDM (count) and central DM at ipc 1 and 50, K = 5, α = 0.5
  (12 cells);
* ``cifar10``: the seven variants on CIFAR-10, K = 5, α = 0.5, ipc 10
  (21 cells).

Budget of every cell: the full training and test sets, 100 server
iterations (random networks), client statistics from batches of 64 real
images per class and iteration, 100 local DM updates, 3 evaluation
ConvNets × 300 epochs; seeds 0, 1, 2 (root key and partition together).
FedAvg and DENSE's clients use ``fmnist_table_paper.baseline_settings()``
(learning rate and up to 200 local epochs chosen on each client's
validation split). DENSE's server keeps ``default.py``'s budget, 30 rounds
× 10 generator steps × 64 samples, not its reference's 200 × 30 × 256,
which costs 45 CPU-hours per cell here
(``experiments/results/client_training/``): on the CPU-sized table, at
30 × 10 × 64 the student reached 0.89 to 0.95 of its teacher's accuracy
and beat FedAvg on the same client models by 7 to 27 points, and 3× the
generator steps added 0.65 points for 2.6× the time
(``experiments/results/fmnist_table/revised_baselines/dense_budget/``).
``fmnist_table_paper.py`` (paper budget, for a GPU) runs the reference's.

Variants (the rows): ``collabdm_count`` (this project's default: the exact
pooled class mean), ``collabdm_uniform`` (the authors' mean of client
means, nothing else changed), ``authors`` (every algorithmic setting of
``authors.py`` — uniform weighting, their batches of 100 / 256, DSA with
flip, ... — at this table's budgets and on this table's Dirichlet split, so
that it is paired with the other rows on the same client data; the authors'
own partition is compared in ``fidelity.py:partition``), ``merged_local_dm``,
``central_dm``, ``fedavg``, ``dense``. Claims (paired over seeds, 95 %
interval): CollabDM against merged local DM and central DM, count against
uniform weighting, ours against authors' mode.

Check the cells without running anything, then run (one process per cell
is fine; rerunning skips finished cells):

  python -m launch.sweep --config=experiments/configs/reference_table.py:main --workdir=/data/sweeps/reference_main --list_cells
  python -m launch.sweep --config=experiments/configs/reference_table.py:main --workdir=/data/sweeps/reference_main --cell=N
  python -m launch.sweep --config=experiments/configs/reference_table.py:main --workdir=/data/sweeps/reference_main --collect_only

Tables go to ``experiments/results/reference_<part>``. Data: Fashion-MNIST
from ``/usr/share/datasets/fashion-mnist`` or ``--config.base.data_dir``;
CIFAR-10 from ``--config.base.data_dir`` (the JPEG archive) or
tensorflow-datasets when online.
"""

import copy

import ml_collections

from experiments.configs import authors
from experiments.configs import config_args
from experiments.configs import default
from experiments.configs import fmnist_table_paper

PARTS = ("main", "ipc", "cifar10")
SEEDS = (0, 1, 2)
VARIANTS = ("collabdm_count", "collabdm_uniform", "authors",
            "merged_local_dm", "central_dm", "fedavg", "dense")
CLAIMS = (("variant", "collabdm_count", "merged_local_dm"),
          ("variant", "collabdm_count", "central_dm"),
          ("variant", "collabdm_count", "collabdm_uniform"),
          ("variant", "collabdm_count", "authors"))


def base_config(dataset="fashion_mnist"):
  """One cell's run config at the reference budget (see the docstring)."""
  c = default.get_config()
  c.dataset = dataset
  c.data_kwargs.max_train_per_class = None
  c.data_kwargs.max_test_per_class = None
  c.partition.num_clients = 5
  c.partition.alpha = 0.5
  c.server.ipc = 10
  c.num_iterations = 100
  c.stats.batch_real = 64
  c.local.iterations = 100
  # Explicit, so the authors' variant can set it (their torch.std).
  c.local.std_ddof = 0
  c.eval.num_nets = 3
  c.eval.epochs = 300
  c.checkpoint.every = 25
  # The paper-scale client training; DENSE's server budget stays
  # default.py's (see the docstring).
  c.baseline.update({k: v for k, v in
                     fmnist_table_paper.baseline_settings().items()
                     if not k.startswith("dense_")})
  return c


def flat_items(d, prefix=""):
  """``{dotted path: value}`` of a nested dict's leaves."""
  out = {}
  for k, v in d.items():
    path = f"{prefix}.{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flat_items(v, path))
    else:
      out[path] = v
  return out


def authors_overrides(base):
  """The field overrides that turn ``base`` into the authors' algorithm.

  ``authors.apply_authors_settings`` on a copy of ``base`` (keeping its
  partition and budgets), as the dotted paths whose value changed.
  """
  theirs = authors.apply_authors_settings(copy.deepcopy(base), partition=False)
  ours, new = flat_items(base.to_dict()), flat_items(theirs.to_dict())
  missing = sorted(set(new) - set(ours))
  if missing:
    raise ValueError(f"authors' settings add fields the base lacks: {missing}")
  return {p: v for p, v in new.items() if ours[p] != v}


def variants(base, names=VARIANTS):
  """The ``variants`` ConfigDict of ``names`` (see the module docstring)."""
  spec = {
      "collabdm_count": {"method": "collabdm", "server.weighting": "count"},
      "collabdm_uniform": {"method": "collabdm",
                           "server.weighting": "uniform"},
      "authors": dict(authors_overrides(base), method="collabdm"),
  }
  for m in ("merged_local_dm", "central_dm", "fedavg", "dense"):
    spec[m] = {"method": m}
  v = ml_collections.ConfigDict()
  for name in names:
    v[name] = ml_collections.ConfigDict(spec[name], allow_dotted_keys=True)
  return v


def get_config(part="main"):
  part = config_args.one_of(part, PARTS, "part")
  base = base_config("cifar10" if part == "cifar10" else "fashion_mnist")
  c = ml_collections.ConfigDict()
  c.name = f"reference_{part}"
  c.base = base
  c.seeds = SEEDS
  c.grid = ml_collections.ConfigDict()
  if part == "main":
    c.variants = variants(base)
    c.claims = CLAIMS
    c.grid.partition = ml_collections.ConfigDict()
    c.grid.partition.num_clients = (5, 10)
    c.grid.partition.alpha = (0.1, 0.5)
  elif part == "ipc":
    c.variants = variants(base, ("collabdm_count", "central_dm"))
    c.claims = CLAIMS[1:2]
    c.grid.server = ml_collections.ConfigDict()
    c.grid.server.ipc = (1, 50)
  else:
    c.variants = variants(base)
    c.claims = CLAIMS
  return c
