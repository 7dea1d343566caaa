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
  # A sweep's variant name (launch.sweep sets it; recorded in results.json).
  c.variant = config_dict.placeholder(str)
  c.seed = 0  # the shared root key: clients and server must agree on it
  c.dataset = "fashion_mnist_embedded"  # a name of data.list_datasets()
  # Where the dataset's files are; None: the loader's defaults (embedded
  # subset, system packages, $COLLABDM_DATA_DIR, downloads).
  c.data_dir = config_dict.placeholder(str)
  # Loader options; None values are not passed. The two below take a
  # class-balanced subset (first k per class) for quick runs.
  c.data_kwargs = ml_collections.ConfigDict()
  c.data_kwargs.max_train_per_class = config_dict.placeholder(int)
  c.data_kwargs.max_test_per_class = config_dict.placeholder(int)
  # Tabular datasets only: features reshaped into a one-channel square image
  # (the paper's set-up for intrusion data, with a ConvNet).
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
  c.partition.num_clients = 10  # K
  c.partition.alpha = 0.1  # Dirichlet concentration (label skew)
  c.partition.min_size = 10  # redraw until every client holds this many
  c.partition.ipc = config_dict.placeholder(int)  # collabdm variant only
  c.partition.classes_per_client = config_dict.placeholder(int)  # shards only
  c.partition.seed = 0  # the partition's own seed (not the root key)

  # Every random network psi_t is this architecture (DM's ConvNet-3).
  c.model = ml_collections.ConfigDict()
  c.model.arch = "convnet"  # a name of models.make_model; the rest are its kwargs
  c.model.width = 128  # channels per conv
  c.model.depth = 3  # conv blocks
  c.model.norm = "instancenorm"  # instancenorm | layernorm | none
  c.model.activation = "relu"  # relu | leakyrelu | sigmoid | gelu
  c.model.pooling = "avgpool"  # avgpool | maxpool | none
  # The first block from patch moments, without its full-resolution map
  # (models.first_block_fused): same function up to rounding; ~21 % faster
  # client pass for 1-channel images on an H200, slower to compile, slower
  # for 3 channels and on CPUs (experiments/results/gpu_profile/README.md).
  c.model.fused_first_block = False

  c.stats = ml_collections.ConfigDict()
  # Real samples per (t, class); None = the whole local class (exact pooled
  # mean). 32 is a CPU budget: the authors' code draws a random batch of 100
  # (`--batch_real`; 512 with `--partition iid`).
  c.stats.batch_real = config_dict.FieldReference(32, field_type=int)
  # Also upload per-class second moments (needed by server.std_weight > 0).
  c.stats.second_moments = False
  # Samples per embedding batch. Small batches stay in cache: on 2 CPU cores
  # ConvNet-3 embeds ~1.5x faster per image in batches of 64 than of 256.
  c.stats.embed_batch = 64
  c.stats.t_chunk = 8  # iterations embedded per call of the client pass
  # Most clients one device embeds per call; None = 32 (client.plan_layout).
  c.stats.clients_per_device = config_dict.placeholder(int)

  c.local = ml_collections.ConfigDict()
  # Clients distil a few local images, the server's initialisation
  # (server.init="local").
  c.local.enabled = True
  # "shared": local DM iteration t runs under psi_t and the Siamese keys of
  # the uploaded statistics, and matches the client's own uploaded means, so
  # the real data is augmented and embedded once (its real batch is then
  # stats.batch_real, and local.batch_real is unused; iteration i > T reuses
  # t = i mod T). "independent": the reference's local DM, a fresh private
  # network per iteration and its own real pass with local.batch_real. At the
  # reference config (experiments/configs/reference.py) the independent pass
  # was two thirds of all FLOPs; there, shared minus independent accuracy
  # was +0.35, -0.78 and +0.25 points on three seeds (mean -0.06, 95 %
  # interval -1.62 to +1.49): no difference seen
  # (experiments/results/reference/README.md).
  c.local.networks = "shared"
  c.local.ipc = config_dict.placeholder(int)  # None: ipc // clients + 1
  c.local.iterations = 20  # authors: 401 (their loop runs range(400 + 1))
  c.local.lr = 1.0  # image learning rate (SGD), DM's lr_img
  c.local.momentum = 0.5  # image optimiser momentum
  # "independent" only; authors: 256 (fixed in their client code).
  c.local.batch_real = 64
  # Authors: 1 with --aug (PAE), with torch.std's unbiased estimate
  # (local.std_ddof = 1); 0 otherwise.
  c.local.std_weight = 0.0
  c.local.std_ddof = 0  # 0 population std, 1 unbiased (torch.std)
  c.local.init = "real"  # real | noise: where local images start

  c.server = ml_collections.ConfigDict()
  c.server.ipc = 10  # synthetic images per class
  c.server.lr = 10.0  # image learning rate (SGD), the authors' --lr_img
  c.server.momentum = 0.5  # image optimiser momentum
  c.server.init = "local"  # local | noise | real (real = not federated)
  # Each synthetic image is a 2x2 mosaic of four (PAE, as IDM); evaluation
  # decodes the mosaics.
  c.server.pae = False
  # Weight of the per-class embedding std term (needs stats.second_moments).
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
  c.privacy.delta = 1e-5  # the delta of (epsilon, delta)-DP, per example
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
  # Float arrays on the wire: float32 (exact) or bfloat16 (half the bytes).
  c.message.transport_dtype = "float32"

  # Server checkpoints in <workdir>/checkpoints: a relaunch with the same
  # --workdir resumes where a killed run stopped. every=0 turns them off.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10  # server iterations between checkpoints
  c.checkpoint.max_to_keep = 2  # checkpoints kept on disk

  c.eval = ml_collections.ConfigDict()
  # Fresh networks trained on the synthetic set and tested on the test split.
  c.eval.arch = "convnet"  # a name of models.make_model
  # Keyword arguments of the eval architecture; empty: its defaults.
  c.eval.model_kwargs = ml_collections.ConfigDict()
  c.eval.num_nets = 3  # networks trained; accuracy is their mean and std
  c.eval.epochs = 100  # authors: 1000
  c.eval.lr = 0.01  # SGD; a tenth of it from half the epochs on (DM's schedule)
  c.eval.momentum = 0.9  # SGD momentum
  c.eval.weight_decay = 5e-4  # added to the gradient (PyTorch SGD)
  c.eval.batch_size = 256  # training batch
  c.eval.dsa = True  # train with the run's DSA strategy (images only)

  # Settings of the comparison baselines (config.method != "collabdm";
  # collabdm_jax/baselines/). None means "as the field named in the comment".
  c.baseline = ml_collections.ConfigDict()
  # central_dm: DM on the pooled data, with the server's ipc and iterations.
  c.baseline.central_lr = 1.0  # DM's lr_img
  c.baseline.central_momentum = config_dict.placeholder(float)  # local.momentum
  c.baseline.central_batch_real = config_dict.placeholder(int)  # local.batch_real
  c.baseline.central_init = "real"  # real | noise
  # fedavg and dense: the network every client trains and how (the clients'
  # models are FedAvg's uploads and DENSE's teachers; baselines/fedavg.py).
  # Network: None = the evaluation network (config.eval); "batchnorm" = that
  # ConvNet with BatchNorm, as DENSE's Fashion-MNIST networks (needed for
  # dense_bn; weaker FedAvg and ensembles here, see
  # experiments/results/dense_diagnosis).
  c.baseline.net_norm = config_dict.placeholder(str)
  # Learning rate and epochs are chosen per client on a stratified
  # validation split of its own data, then the client retrains on all of it.
  c.baseline.local_lrs = (0.01, 0.03, 0.1)  # candidate learning rates
  c.baseline.local_epochs = 60  # most epochs tried (exact count if no split)
  c.baseline.local_val_fraction = 0.15  # held-out share; 0: no selection
  c.baseline.local_val_every = 3  # epochs between validation checks
  # Checks without improvement before a candidate stops (None: never).
  c.baseline.local_patience = 4
  c.baseline.local_momentum = 0.9  # SGD momentum
  c.baseline.local_weight_decay = 5e-4  # SGD weight decay (PyTorch-coupled)
  c.baseline.local_batch = 64  # SGD batch (clients may hold a few hundred)
  c.baseline.local_dsa = config_dict.placeholder(bool)  # eval.dsa
  # A folder where the trained client models are kept, so the fedavg and
  # dense runs of one config train them once (the second reads them back;
  # baselines/model_cache.py), and where a cut-off client training or
  # DENSE server keeps its progress to go on from. None: always train,
  # nothing resumes.
  c.baseline.client_cache_dir = config_dict.placeholder(str)
  # dense: the server's generator and distillation (DENSE's names). At this
  # budget DENSE came level with or above FedAvg in the diagnosis (2 seeds,
  # experiments/results/dense_diagnosis); at 5 x 5 x 32 it was far below.
  c.baseline.dense_epochs = 30  # rounds; reference: 200
  c.baseline.dense_g_steps = 10  # generator steps per round; reference: 30
  c.baseline.dense_synthesis_batch = 64  # reference: 256
  c.baseline.dense_kd_batch = 64  # reference: 256
  c.baseline.dense_nz = 256  # generator noise size
  c.baseline.dense_ngf = 64  # generator width
  c.baseline.dense_lr_g = 1e-3  # generator learning rate (Adam)
  c.baseline.dense_kd_lr = 0.005  # student learning rate (SGD)
  c.baseline.dense_kd_momentum = 0.9  # student SGD momentum
  c.baseline.dense_T = 20.0  # distillation temperature
  c.baseline.dense_oh = 1.0  # weight of the one-hot (cross-entropy) loss
  c.baseline.dense_adv = 1.0  # weight of the adversarial loss
  # Weight of DeepInversion's BatchNorm-statistics prior: needs net_norm
  # "batchnorm" (reference 1 with its BatchNorm networks; its CIFAR-10
  # network has no BatchNorm, so there the prior is absent).
  c.baseline.dense_bn = 0.0
  # Weight of DAFL's diversity (ensemble entropy) term, not in the
  # reference; a stand-in for dense_bn with instance-norm teachers.
  c.baseline.dense_div = 0.0
  # How the clients' logits combine into the teacher: "logits" averages the
  # logits (the reference); "probs" = log of the mean of their softmaxes, a
  # deviation (a stronger ensemble of skewed clients in the diagnosis).
  c.baseline.dense_ensemble = "logits"
  return c
