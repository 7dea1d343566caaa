"""A seconds-sized CollabDM run for tests and quick checks (not for results).

  python -m launch.distill --config=experiments/configs/smoke.py --workdir=/tmp/smoke
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data_kwargs.max_train_per_class = 20
  c.data_kwargs.max_test_per_class = 10
  c.partition.num_clients = 3
  c.partition.alpha = 0.5
  c.partition.min_size = 5
  c.num_iterations = 3
  c.model.width = 8
  c.model.depth = 2
  c.stats.batch_real = 8
  c.stats.t_chunk = 2
  c.local.iterations = 2
  c.local.batch_real = 8
  c.server.ipc = 2
  c.eval.num_nets = 2
  c.eval.epochs = 3
  c.eval.model_kwargs.width = 8
  c.eval.model_kwargs.depth = 2
  return c
