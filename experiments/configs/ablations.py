"""CPU-sized CollabDM ablations, one factor at a time.

``get_config(ablation)`` for one of

* ``weighting``: count-weighted (exact pooled mean) vs uniform (the
  authors' mean of client means) aggregation, at α ∈ {0.1, 0.5};
* ``iterations``: 10, 20, 40, 80 server iterations (= random networks,
  and the number of statistics each client uploads);
* ``batch_real``: client statistics from a random batch of 32 real images
  per class vs the whole local class (``stats.batch_real=None``, exact);
* ``transport``: float32 vs bfloat16 messages;
* ``init``: server initialised from the clients' locally distilled images
  vs Gaussian noise;
* ``pae``: partition-and-expansion off vs on.

Everything else is ``fmnist_table.py``'s setting with CollabDM, 10 clients,
Dir(0.1), ipc 10 (cells finish on 2 CPU cores in well under 30 minutes).
Run one ablation, or all of them:

  python -m launch.sweep --config=experiments/configs/ablations.py:weighting --workdir=/tmp/sweeps/ablation_weighting
  for a in weighting iterations batch_real transport init pae; do python -m launch.sweep --config=experiments/configs/ablations.py:$a --workdir=/tmp/sweeps/ablation_$a; done

Running one writes its tables to ``experiments/results/ablation_<name>``
(the sweep's default results folder), with the ablated field as its own
column. None of these ablations has been run and committed yet: no
``experiments/results/ablation_*`` folder exists until someone runs the
commands above and commits the output.
"""

import ml_collections

from experiments.configs import config_args
from experiments.configs import fmnist_table

ABLATIONS = ("weighting", "iterations", "batch_real", "transport", "init",
             "pae")


def _grid(ablation):
  g = ml_collections.ConfigDict()
  if ablation == "weighting":
    g.server = {"weighting": ("count", "uniform")}
    g.partition = {"alpha": (0.1, 0.5)}
  elif ablation == "iterations":
    g.num_iterations = (10, 20, 40, 80)
  elif ablation == "batch_real":
    g.stats = {"batch_real": (32, None)}
  elif ablation == "transport":
    g.message = {"transport_dtype": ("float32", "bfloat16")}
  elif ablation == "init":
    g.server = {"init": ("local", "noise")}
  elif ablation == "pae":
    g.server = {"pae": (False, True)}
  return g


def get_config(ablation="weighting"):
  ablation = config_args.one_of(ablation, ABLATIONS, "ablation")
  base = fmnist_table.get_config().base
  base.method = "collabdm"
  base.partition.num_clients = 10
  base.partition.alpha = 0.1
  base.server.ipc = 10

  c = ml_collections.ConfigDict()
  c.name = f"ablation_{ablation}"
  c.base = base
  c.grid = _grid(ablation)
  return c
