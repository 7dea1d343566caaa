"""Paired runs that measure each difference from the authors' code. Not run yet.

``get_config(setting)`` for one of ``SETTINGS`` gives a sweep of two
variants, ``theirs`` and ``ours``, that differ in that one setting only,
over seeds 0, 1, 2; its table reports the paired difference
``theirs − ours`` with a 95 % interval (``docs/fidelity.md`` has a row per
setting). The base is the authors' mode (``authors.py``) at the
reference-table budget (``reference_table.py``: full Fashion-MNIST, K = 5,
α = 0.5, ipc 10, 100 server iterations, 100 local DM updates, 3 ConvNets ×
300 epochs):

* ``weighting``: uniform (mean of client means) vs count (pooled mean);
* ``batch_real``: client statistics from 100 vs 64 real images per class;
* ``local_batch``: local DM real batch 256 vs 64;
* ``partition``: the authors' floor + Dirichlet scheme vs plain Dirichlet;
* ``local_updates``: the authors' range(n + 1) local loop (101 updates at
  this budget) vs n = 100;
* ``flip``: DSA with flip vs without, on MNIST (the only dataset where
  this project's ``dsa_strategy="auto"`` drops it);
* ``pae_std``: with PAE on, the local std term (authors) vs none (this
  project's default ``local.std_weight = 0``);
* ``std_ddof``: with PAE and the std term, torch.std's unbiased estimate vs
  the population std.

  python -m launch.sweep --config=experiments/configs/fidelity.py:weighting --workdir=/data/sweeps/fidelity_weighting

Tables go to ``experiments/results/fidelity_<setting>``.
"""

import ml_collections

from experiments.configs import authors
from experiments.configs import config_args
from experiments.configs import reference_table

SEEDS = (0, 1, 2)
# setting -> (overrides of theirs, overrides of ours, dataset, base variants)
_PAIRS = {
    "weighting": ({"server.weighting": "uniform"},
                  {"server.weighting": "count"}, "fashion_mnist", ()),
    "batch_real": ({"stats.batch_real": 100}, {"stats.batch_real": 64},
                   "fashion_mnist", ()),
    "local_batch": ({"local.batch_real": 256}, {"local.batch_real": 64},
                    "fashion_mnist", ()),
    "partition": ({"partition.method": "collabdm"},
                  {"partition.method": "dirichlet"}, "fashion_mnist", ()),
    "local_updates": ({"local.iterations": 101}, {"local.iterations": 100},
                      "fashion_mnist", ()),
    "flip": ({"dsa_strategy": "color_crop_cutout_flip_scale_rotate"},
             {"dsa_strategy": "auto"}, "mnist", ()),
    "pae_std": ({"local.std_weight": 1.0}, {"local.std_weight": 0.0},
                "fashion_mnist", ("aug",)),
    "std_ddof": ({"local.std_ddof": 1}, {"local.std_ddof": 0},
                 "fashion_mnist", ("aug",)),
}
SETTINGS = tuple(_PAIRS)


def base_config(dataset, base_variants=()):
  """The authors' mode at the reference-table budget."""
  c = reference_table.base_config(dataset)
  return authors.apply_authors_settings(c, base_variants)


def get_config(setting="weighting"):
  setting = config_args.one_of(setting, SETTINGS, "setting")
  theirs, ours, dataset, base_variants = _PAIRS[setting]
  c = ml_collections.ConfigDict()
  c.name = f"fidelity_{setting}"
  c.base = base_config(dataset, base_variants)
  c.variants = ml_collections.ConfigDict()
  c.variants.theirs = ml_collections.ConfigDict(theirs, allow_dotted_keys=True)
  c.variants.ours = ml_collections.ConfigDict(ours, allow_dotted_keys=True)
  c.seeds = SEEDS
  c.claims = (("variant", "theirs", "ours"),)
  c.grid = ml_collections.ConfigDict()
  return c
