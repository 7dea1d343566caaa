"""Sweep config: the intrusion-detection table (CollabDM against baselines).

Every method sees the same data, the same Dirichlet split of the classes over
5 sites (alpha 0.1, partition seed 0), the same synthetic budget (10 rows per
class) and the same evaluator (an MLP trained from scratch, 5 networks per
run), repeated for root seeds 0, 1 and 2 (random networks, local
distillation, server initialisation and evaluation networks all follow the
root seed; the partition does not). The argument picks the data:

* ``5g`` (default): 5G-IDS with all features and without the GTP-U header
  columns (``data_kwargs.drop_gtp`` in the grid);
* ``nsl_kdd``: NSL-KDD, five classes.

Run the cells with the sweep launcher (resumable), one folder per cell:

  python -m launch.sweep --config=experiments/configs/ids_table.py:5g --workdir=/tmp/sweeps/ids_5g
  python -m launch.sweep --config=experiments/configs/ids_table.py:nsl_kdd --workdir=/tmp/sweeps/ids_nsl_kdd

The full-data detector (``experiments/full_data_detector.py``, epochs
``script.full_data_epochs``) is not a ``pipeline.run`` method, so it is not a grid
value; ``experiments/run_ids_table.py`` runs these same cells plus the
full-data and real-subset rows and writes the table with balanced accuracy,
false-positive rate and per-class recall (mean ± std over the seeds) to
``experiments/results/ids_5g/``.
"""

import ml_collections

from experiments.configs import config_args
from experiments.configs import ids_5g
from experiments.configs import nsl_kdd

METHODS = ("collabdm", "central_dm", "merged_local_dm")
SEEDS = (0, 1, 2)
DATASETS = ("5g", "nsl_kdd")


def get_config(arg="5g"):
  """The sweep for one data set (``arg`` in ``DATASETS``)."""
  arg = config_args.one_of(arg or "5g", DATASETS)
  c = ml_collections.ConfigDict()
  grid = {"method": list(METHODS), "seed": list(SEEDS)}
  if arg == "5g":
    c.name = "ids_5g"
    c.base = ids_5g.get_config()
    grid["data_kwargs.drop_gtp"] = [False, True]
  else:
    c.name = "ids_nsl_kdd"
    c.base = nsl_kdd.get_config()
  c.grid = ml_collections.ConfigDict(grid, allow_dotted_keys=True)
  # Read by experiments/run_ids_table.py, not by the sweep: passes of the
  # full-data detector over all pooled training rows.
  c.script = ml_collections.ConfigDict({"full_data_epochs": 30})
  return c
