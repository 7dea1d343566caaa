"""CollabDM for attack detection on 5G core-network traffic (5G-IDS, tabular).

Packets of simulated 5G core traffic (normal vs attack) are split across
sites by a Dirichlet partition over the classes; every site uploads its
per-class embedding statistics once and the server distils a small labelled
table (``server.ipc`` rows per class) that trains a detector. Run:

  python -m launch.distill --config=experiments/configs/ids_5g.py --workdir=/tmp/ids_5g
  python -m launch.distill --config=experiments/configs/ids_5g.py:drop_gtp --workdir=/tmp/ids_5g_nogtp

The optional argument after ``:`` is a comma-separated list of options:

* ``drop_gtp``: remove the GTP-U header columns and their proxies
  (``load_5g_ids(drop_gtp=True)``). Every normal packet is GTP-U and no
  attack packet is, so with those columns a single feature separates the
  classes; without them the detector has to use the traffic itself.
* ``tabular_aug``: Siamese feature masking and jitter on both the real and
  the synthetic side of the matching loss (``dsa_strategy="tabular"``).
* ``as_image``: the paper's set-up, features reshaped into a one-channel
  square image and a small ConvNet instead of the MLP.

Options combine, e.g. ``ids_5g.py:drop_gtp,tabular_aug``. Baselines run
through the same launcher, e.g. ``--config.method=central_dm`` or
``--config.method=merged_local_dm``; ``experiments/full_data_detector.py``
trains the evaluation MLP on all pooled training rows (the upper bound).
Budgets are sized for a 2-core CPU (a run takes about a minute).
"""

import ml_collections

from experiments.configs import config_args
from experiments.configs import default

OPTIONS = ("drop_gtp", "tabular_aug", "as_image")


def tabular_model(width=128, depth=2):
  """The MLP every random network psi_t (and the detector) uses."""
  return ml_collections.ConfigDict(dict(
      arch="mlp", width=width, depth=depth, activation="relu", norm="none"))


def apply_tabular_defaults(c, options):
  """Model, augmentation, partition and budgets shared by the IDS configs.

  Args:
    c: a config from ``default.get_config()`` whose dataset is tabular.
    options: set of ``OPTIONS`` (``drop_gtp`` is handled by the caller).

  Returns:
    ``c``, modified in place.
  """
  if "as_image" in options:
    c.tabular_as_image = True
    # 26 / 18 (5G-IDS) or 118 (NSL-KDD) features make 6x6 / 5x5 / 11x11
    # images: two pooled blocks are all such small maps allow.
    c.model = ml_collections.ConfigDict(dict(
        arch="convnet", width=32, depth=2, norm="instancenorm",
        activation="relu", pooling="avgpool"))
    c.eval.arch = "convnet"
    c.eval.model_kwargs = ml_collections.ConfigDict(dict(width=32, depth=2))
  else:
    c.tabular_as_image = False
    c.model = tabular_model()
    c.eval.arch = "mlp"
    c.eval.model_kwargs = ml_collections.ConfigDict(dict(
        width=128, depth=2, activation="relu", norm="none"))
  c.dsa_strategy = "tabular" if "tabular_aug" in options else "none"
  # Tables are never augmented while training the detector.
  c.eval.dsa = False

  # Five sites, strongly non-IID: most sites see mostly one class.
  c.partition.method = "dirichlet"
  c.partition.num_clients = 5
  c.partition.alpha = 0.1
  c.partition.min_size = 50

  c.num_iterations = 200
  c.stats.batch_real = 128
  c.stats.t_chunk = 50

  c.local.iterations = 100
  c.local.batch_real = 128

  c.server.ipc = 10
  # DM's default image lr; the CollabDM authors' server uses 10 (--lr_img).
  c.server.lr = 1.0
  # Runs take about a minute; nothing worth resuming.
  c.checkpoint.every = 0

  c.eval.num_nets = 5
  c.eval.epochs = 300
  c.eval.batch_size = 256
  return c


def get_config(arg=""):
  """The 5G-IDS run; ``arg`` as in the module docstring."""
  options = config_args.parse_arg(arg, OPTIONS)
  c = default.get_config()
  c.dataset = "5g_ids"
  # Keywords of tabular.load_5g_ids (the image subset options do not apply).
  c.data_kwargs = ml_collections.ConfigDict(dict(
      drop_gtp="drop_gtp" in options))
  return apply_tabular_defaults(c, options)
