"""The reference config: the speed yardstick against the authors' PyTorch code.

Full Fashion-MNIST, 5 clients holding the authors' partition (every client
first gets 10 random images of every class, the rest of each class is split
by Dir(0.5)), 10 images per class, 100 server iterations, real batch 64 per
(iteration, class), local DM 100 iterations, the authors' unweighted mean of
client means, and 3 evaluation ConvNets trained 300 epochs each (DM's
protocol, DSA). Run it, and time it phase by phase, with:

  python -m experiments.reference_bench --out=experiments/results/reference/reference.json

or as a plain run:

  python -m launch.distill --config=experiments/configs/reference.py --workdir=/tmp/reference

``--config.local.networks=independent`` gives local DM its own networks and
real pass (a real batch of 256), as the authors' code does.
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.dataset = "fashion_mnist"
  c.num_iterations = 100
  c.partition.method = "collabdm"
  c.partition.num_clients = 5
  c.partition.alpha = 0.5
  c.partition.ipc = 10
  c.stats.batch_real = 64
  c.local.iterations = 100
  c.local.batch_real = 256  # used by local.networks="independent" only
  c.server.ipc = 10
  c.server.weighting = "uniform"
  c.eval.num_nets = 3
  c.eval.epochs = 300
  c.eval.dsa = True
  return c
