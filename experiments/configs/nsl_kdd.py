"""CollabDM for multi-class intrusion detection on NSL-KDD (tabular).

Connection records (KDDTrain+ 20 % subset, tested on KDDTest+) in the usual
five classes (normal, DoS, Probe, R2L, U2R) are split across sites by a
Dirichlet partition over the classes. Harder than 5G-IDS: the test set holds
attack types never seen in training, and R2L/U2R are rare. Run:

  python -m launch.distill --config=experiments/configs/nsl_kdd.py --workdir=/tmp/nsl_kdd

The optional argument after ``:`` is a comma-separated list of options:

* ``binary``: normal vs attack instead of the five classes.
* ``tabular_aug``: Siamese feature masking and jitter in the matching loss
  (``dsa_strategy="tabular"``).
* ``as_image``: the 118 encoded features as an 11x11 one-channel image and a
  small ConvNet instead of the MLP (the paper's set-up for traffic data).

Baselines: ``--config.method=central_dm`` or ``merged_local_dm``; the
full-data upper bound is ``experiments/full_data_detector.py``. Budgets are
sized for a 2-core CPU (a run takes about a minute).
"""

import ml_collections

from experiments.configs import config_args
from experiments.configs import default
from experiments.configs import ids_5g

OPTIONS = ("binary", "tabular_aug", "as_image")


def get_config(arg=""):
  """The NSL-KDD run; ``arg`` as in the module docstring."""
  chosen = config_args.parse_arg(arg, OPTIONS)
  c = default.get_config()
  c.dataset = "nsl_kdd"
  # Keywords of tabular.load_nsl_kdd.
  c.data_kwargs = ml_collections.ConfigDict(dict(
      grouping="binary" if "binary" in chosen else "5class"))
  return ids_5g.apply_tabular_defaults(c, chosen)
