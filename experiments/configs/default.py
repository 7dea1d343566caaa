"""Default CollabDM run: embedded Fashion-MNIST subset, 10 clients, Dir(0.1), ipc 10.

Sized to finish in a few minutes on 2 CPU cores (short budgets everywhere);
``fmnist_table_paper.py`` holds the paper-scale budgets, ``authors.py``
the authors' exact settings (``docs/fidelity.md`` lists every difference).
Run:

  python -m launch.distill --config=experiments/configs/default.py --workdir=/tmp/collabdm

Override any field on the command line, e.g. ``--config.num_iterations=200``.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.method = "collabdm"  # or a baseline: central_dm, merged_local_dm, fedavg, dense
  c.seed = 0  # the shared root key: clients and server must agree on it
  c.dataset = "fashion_mnist_embedded"
  c.data_dir = config_dict.placeholder(str)
  # Loader options; None values are not passed. The two below take a
  # class-balanced subset (first k per class) for quick runs.
  c.data_kwargs = ml_collections.ConfigDict()
  c.data_kwargs.max_train_per_class = config_dict.placeholder(int)
  c.data_kwargs.max_test_per_class = config_dict.placeholder(int)
  c.tabular_as_image = False
  # Precision of the embedding networks in the client pass, local DM and the
  # server: "float32", or "bfloat16" (mixed precision: bf16 convolutions and
  # matmuls, float32 norms, statistics, images and optimiser). On an H200 it
  # made the client pass 1.02-1.28x faster and left this run's accuracy
  # unchanged within noise (experiments/results/BENCH.md); on CPUs it brings
  # nothing. Evaluation always trains in float32.
  c.compute_dtype = "float32"
  # Siamese DSA families; "auto" picks DM's set for the dataset (no flip on
  # digits, none on tables).
  c.dsa_strategy = "auto"
  # Server iterations = number of distinct random networks psi_t.
  c.num_iterations = 40

  c.partition = ml_collections.ConfigDict()
  c.partition.method = "dirichlet"  # iid | dirichlet | collabdm | shards
  c.partition.num_clients = 10
  c.partition.alpha = 0.1
  c.partition.min_size = 10
  c.partition.ipc = config_dict.placeholder(int)  # collabdm variant only
  c.partition.classes_per_client = config_dict.placeholder(int)  # shards only
  c.partition.seed = 0

  # Every random network psi_t is this architecture (DM's ConvNet-3).
  c.model = ml_collections.ConfigDict()
  c.model.arch = "convnet"
  c.model.width = 128
  c.model.depth = 3
  c.model.norm = "instancenorm"
  c.model.activation = "relu"
  c.model.pooling = "avgpool"

  c.stats = ml_collections.ConfigDict()
  # Real samples per (t, class); None = the whole local class (exact pooled
  # mean). 32 is a CPU budget: the authors' code draws a random batch of 100
  # (`--batch_real`; 512 with `--partition iid`).
  c.stats.batch_real = config_dict.FieldReference(32, field_type=int)
  c.stats.second_moments = False
  # Samples per embedding batch. Small batches stay in cache: on 2 CPU cores
  # ConvNet-3 embeds ~1.5x faster per image in batches of 64 than of 256.
  c.stats.embed_batch = 64
  c.stats.t_chunk = 8
  # Most clients one device embeds per call; None = 32 (client.plan_layout).
  c.stats.clients_per_device = config_dict.placeholder(int)

  c.local = ml_collections.ConfigDict()
  c.local.enabled = True
  # "shared": local DM iteration t runs under psi_t and the Siamese keys of
  # the uploaded statistics, and matches the client's own uploaded means, so
  # the real data is augmented and embedded once (its real batch is then
  # stats.batch_real, and local.batch_real is unused; iteration i > T reuses
  # t = i mod T). "independent": the reference's local DM, a fresh private
  # network per iteration and its own real pass with local.batch_real. At the
  # reference config (experiments/configs/reference.py) the independent pass
  # was two thirds of all FLOPs; there, shared minus independent accuracy
  # was +0.35 and -0.78 points on two seeds, so not yet told apart
  # (experiments/results/reference/README.md).
  c.local.networks = "shared"
  c.local.ipc = config_dict.placeholder(int)  # None: ipc // clients + 1
  c.local.iterations = 20  # authors: 401 (their loop runs range(400 + 1))
  c.local.lr = 1.0
  c.local.momentum = 0.5
  # "independent" only; authors: 256 (fixed in their client code).
  c.local.batch_real = 64
  # Authors: 1 with --aug (PAE), with torch.std's unbiased estimate
  # (local.std_ddof = 1); 0 otherwise.
  c.local.std_weight = 0.0
  c.local.std_ddof = 0  # 0 population std, 1 unbiased (torch.std)
  c.local.init = "real"

  c.server = ml_collections.ConfigDict()
  c.server.ipc = 10
  c.server.lr = 10.0
  c.server.momentum = 0.5
  c.server.init = "local"  # local | noise | real (real = not federated)
  c.server.pae = False
  c.server.std_weight = 0.0
  # count: the exact pooled class mean; uniform: the plain mean of the
  # clients' means, as the authors' server computes it (docs/fidelity.md).
  c.server.weighting = "count"
  # How client statistics become targets per (t, c) (collabdm_jax/aggregation.py):
  # mean (the weighted mean above, not robust) | median (coordinate-wise) |
  # trimmed_mean | geometric_median (Weiszfeld) | clipped_mean. Robust ones
  # bound what a minority of malicious clients can do to the targets.
  c.server.aggregator = "mean"
  c.server.trim_fraction = 0.2  # trimmed_mean: weight cut from each tail, < 0.5
  c.server.clip_multiplier = 2.0  # clipped_mean: radius / median distance to median
  # Robust aggregators cap a count weight at this multiple of the cell's
  # median weight, so claiming a huge class buys no extra influence.
  c.server.weight_cap = 1.0
  # Checks of untrusted uploads (protocol.MessageSpec). A client claiming
  # more than max_class_size samples of a class is rejected (None: no bound).
  c.server.max_class_size = config_dict.placeholder(int)
  # |embedding entry| bound client means are held to; None derives the range
  # from psi_t (ConvNet with instance norm; other nets are then unchecked).
  c.server.max_abs_embedding = config_dict.placeholder(float)

  # Differential privacy of the uploads, per example (collabdm_jax/privacy.py,
  # docs/privacy.md). Each real embedding is clipped to L2 norm clip_norm,
  # each class's batch is a Poisson sample (rate stats.batch_real / class
  # size), and each released per-(t, c) sum gets Gaussian noise whose
  # multiplier is calibrated so that an example's T releases spend at most
  # (epsilon, delta) (dp-accounting's PLD accountant). Under privacy no
  # local images are uploaded and the server starts from noise.
  c.privacy = ml_collections.ConfigDict()
  c.privacy.epsilon = config_dict.placeholder(float)  # None or inf: off
  c.privacy.delta = 1e-5
  # ConvNet-3 (instance norm) embeddings of Fashion-MNIST have L2 norms of
  # 24.5-26.5 (5th-95th percentile, psi_0 and psi_1 with DSA), so 27 clips
  # few of them: clipping below the norms would shrink the targets but not
  # the synthetic images' embeddings, and the noise scales with the norm.
  c.privacy.clip_norm = 27.0
  # The clients' secret seed of the Poisson samples and the noise. None draws
  # a fresh one from the OS every run; fix it only for reproducible
  # experiments (whoever knows it can remove the noise).
  c.privacy.seed = config_dict.placeholder(int)

  c.message = ml_collections.ConfigDict()
  c.message.transport_dtype = "float32"  # or bfloat16

  # Server checkpoints in <workdir>/checkpoints: a relaunch with the same
  # --workdir resumes where a killed run stopped. every=0 turns them off.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10  # server iterations between checkpoints
  c.checkpoint.max_to_keep = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.arch = "convnet"
  c.eval.model_kwargs = ml_collections.ConfigDict()
  c.eval.num_nets = 3
  c.eval.epochs = 100  # authors: 1000
  c.eval.lr = 0.01
  c.eval.momentum = 0.9
  c.eval.weight_decay = 5e-4
  c.eval.batch_size = 256
  c.eval.dsa = True
  return c
