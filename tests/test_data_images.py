"""Tests of the image data layer on the real files (skipped where a file is missing)."""

import gzip
import hashlib
import importlib.resources
import io
import re
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from collabdm_jax.data import Dataset, DatasetUnavailableError, list_datasets, load_dataset
from collabdm_jax.data import images

SHARED = Path(__file__).parents[1].parent / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
CIFAR_ARCHIVE = SHARED / "cifar10" / "cifar10-jpeg.tar.gz"
FASHION_DIR = images.DEBIAN_FASHION_MNIST_DIR
EMBEDDED_DIR = Path(images.__file__).parent / "embedded"

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"shared MNIST bundle not found at {MNIST_DIR}")
needs_cifar = pytest.mark.skipif(
    not CIFAR_ARCHIVE.is_file(), reason=f"shared CIFAR-10 archive not found at {CIFAR_ARCHIVE}")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FASHION_DIR} (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
  # A developer's own COLLABDM_DATA_DIR must not change which source a test sees.
  monkeypatch.delenv(images.DATA_DIR_ENV, raising=False)


def _pixels(ds: Dataset, x: np.ndarray) -> np.ndarray:
  """Back to the 0..255 scale."""
  return ds.denormalize(x.astype(np.float64)) * 255.0


def _moments(x: np.ndarray):
  """Per-channel mean and std of [N, H, W, C], accumulated in float64 by chunks
  (float32 strided reductions drift by several percent over 10^7 values)."""
  total = np.zeros(x.shape[-1])
  total_sq = np.zeros(x.shape[-1])
  count = 0
  for i in range(0, x.shape[0], 2000):
    chunk = x[i:i + 2000].reshape(-1, x.shape[-1]).astype(np.float64)
    total += chunk.sum(axis=0)
    total_sq += np.square(chunk).sum(axis=0)
    count += chunk.shape[0]
  mean = total / count
  return mean, np.sqrt(total_sq / count - mean**2)


def _pixel_moments(ds: Dataset, x: np.ndarray):
  """Per-channel pixel mean/std (0..255) of normalised images, via linearity."""
  mean, std = _moments(x)
  return (mean * ds.std + ds.mean) * 255.0, std * ds.std * 255.0


# ----------------------------------------------------------------------------
# Registry and helpers.


def test_list_datasets_names_every_loader():
  assert set(list_datasets()) == {
      "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn",
      "fashion_mnist_embedded", "5g_ids", "nsl_kdd"}


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="imagenet") as err:
    load_dataset("imagenet")
  for name in list_datasets():
    assert name in str(err.value)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_per_class_limit_is_rejected(bad):
  with pytest.raises(ValueError, match="max_train_per_class"):
    load_dataset("fashion_mnist_embedded", max_train_per_class=bad)
  with pytest.raises(ValueError, match="max_test_per_class"):
    load_dataset("fashion_mnist_embedded", max_test_per_class=bad)


def test_tabular_names_dispatch_to_tabular_module(monkeypatch):
  calls = []
  monkeypatch.setattr(images.tabular, "load_5g_ids", lambda data_dir=None, **kw:
                      calls.append(("5g", data_dir, kw)) or "5g")
  monkeypatch.setattr(images.tabular, "load_nsl_kdd", lambda data_dir=None, **kw:
                      calls.append(("nsl", data_dir, kw)) or "nsl")
  assert load_dataset("5G-IDS", data_dir="/x", seed=3) == "5g"
  assert load_dataset("nsl_kdd") == "nsl"
  assert calls == [("5g", "/x", {"seed": 3}), ("nsl", None, {})]


def test_idx_round_trip_and_malformed_files(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  raw = images.write_idx(array)
  assert raw[:4] == b"\x00\x00\x08\x03"
  np.testing.assert_array_equal(images.read_idx(raw), array)
  np.testing.assert_array_equal(images.read_idx(gzip.compress(raw)), array)
  (tmp_path / "a.idx").write_bytes(raw)
  np.testing.assert_array_equal(images.read_idx(tmp_path / "a.idx"), array)
  with pytest.raises(ValueError, match="need 24 bytes"):
    images.read_idx(raw[:-1])
  with pytest.raises(ValueError, match="magic"):
    images.read_idx(b"\x00\x00\x0d\x01" + raw[4:])


def test_class_balanced_indices_keeps_first_k_in_order():
  labels = np.array([2, 0, 2, 1, 0, 2, 1, 0])
  np.testing.assert_array_equal(images.class_balanced_indices(labels, 2), [0, 1, 2, 3, 4, 6])
  np.testing.assert_array_equal(images.class_balanced_indices(labels, 5), np.arange(8))
  np.testing.assert_array_equal(images.class_balanced_indices(labels, None), np.arange(8))


def test_normalize_images_per_channel():
  x = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1).repeat(2, axis=-1)
  out = images.normalize_images(x, mean=[0.2, 0.5], std=[0.5, 0.25])
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, :, 0], [-0.4, 0.0, 1.6], atol=1e-6)
  np.testing.assert_allclose(out[0, 0, :, 1], [-2.0, -1.2, 2.0], atol=1e-6)
  with pytest.raises(ValueError, match="one value per channel"):
    images.normalize_images(x, mean=[0.5], std=[0.5])


# ----------------------------------------------------------------------------
# Fashion-MNIST (Debian package) and the embedded subset.


@needs_fashion
def test_fashion_mnist_from_debian_package():
  ds = load_dataset("fashion_mnist")  # No data_dir, no env var: the known install.
  assert ds.source == str(FASHION_DIR)
  assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
  assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
  np.testing.assert_array_equal(np.bincount(ds.train_y), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_y), [1000] * 10)
  np.testing.assert_array_equal(ds.train_y[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
  # Known pixel statistics of the official training set: 72.94 / 90.02.
  px_mean, px_std = _pixel_moments(ds, ds.train_x)
  assert px_mean[0] == pytest.approx(72.940, abs=0.01)
  assert px_std[0] == pytest.approx(90.021, abs=0.01)
  pixels = _pixels(ds, ds.train_x[:1000])
  np.testing.assert_allclose(np.round(pixels), pixels, atol=1e-3)  # integral pixels
  # DM's constants are the true training statistics, so the result is ~N(0, 1).
  mean, std = _moments(ds.train_x)
  assert abs(mean[0]) < 0.005 and std[0] == pytest.approx(1.0, abs=0.005)


def test_embedded_subset_is_class_balanced_real_data():
  ds = load_dataset("fashion_mnist_embedded")
  assert ds.source == "embedded" and ds.name == "fashion_mnist_embedded"
  assert ds.train_x.shape == (5000, 28, 28, 1) and ds.test_x.shape == (1000, 28, 28, 1)
  assert ds.train_x.dtype == np.float32 and ds.test_y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.train_y), [500] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_y), [100] * 10)
  assert _pixel_moments(ds, ds.train_x)[0][0] == pytest.approx(73.273, abs=0.01)
  assert _pixel_moments(ds, ds.test_x)[0][0] == pytest.approx(72.671, abs=0.01)
  small = load_dataset("fashion_mnist_embedded", max_train_per_class=2, max_test_per_class=1)
  np.testing.assert_array_equal(np.bincount(small.train_y), [2] * 10)
  np.testing.assert_array_equal(small.test_y, ds.test_y[images.class_balanced_indices(ds.test_y, 1)])
  with pytest.raises(ValueError, match="data_dir"):
    load_dataset("fashion_mnist_embedded", data_dir="/tmp")


def test_embedded_files_are_package_data_matching_readme():
  folder = importlib.resources.files("collabdm_jax.data").joinpath("embedded")
  readme = folder.joinpath("README.md").read_text()
  sums = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (t\S+)$",
                                                             readme, re.M))
  assert set(sums) == {stem + ".gz" for stem in images.IDX_FILES.values()}
  total = 0
  for name, digest in sums.items():
    data = folder.joinpath(name).read_bytes()
    total += len(data)
    assert hashlib.sha256(data).hexdigest() == digest, name
  assert total < 4_000_000
  assert "0.0~git20200523.55506a9-1" in readme and "Zalando SE" in readme
  assert "500" in readme and "first" in readme


@needs_fashion
def test_embedded_subset_equals_first_k_per_class_of_debian_files():
  full = load_dataset("fashion_mnist", data_dir=FASHION_DIR,
                      max_train_per_class=500, max_test_per_class=100)
  emb = load_dataset("fashion_mnist_embedded")
  np.testing.assert_array_equal(full.train_y, emb.train_y)
  np.testing.assert_array_equal(full.test_y, emb.test_y)
  np.testing.assert_array_equal(full.train_x, emb.train_x)
  np.testing.assert_array_equal(full.test_x, emb.test_x)


# ----------------------------------------------------------------------------
# MNIST from the shared bundle.


@needs_mnist
def test_mnist_from_shared_bundle():
  ds = load_dataset("mnist", data_dir=MNIST_DIR)
  assert ds.source == str(MNIST_DIR)
  assert ds.train_x.shape == (10000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  np.testing.assert_array_equal(
      np.bincount(ds.train_y), [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978])
  np.testing.assert_array_equal(
      np.bincount(ds.test_y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  (train_mean,), (train_std,) = _pixel_moments(ds, ds.train_x)
  (test_mean,), (test_std,) = _pixel_moments(ds, ds.test_x)
  assert train_mean == pytest.approx(33.44, abs=0.005)
  assert train_std == pytest.approx(78.72, abs=0.005)
  assert test_mean == pytest.approx(33.79, abs=0.005)
  assert test_std == pytest.approx(79.17, abs=0.005)
  # The well-known first training image: a 5, row 5 from column 12.
  assert ds.train_y[0] == 5
  np.testing.assert_allclose(_pixels(ds, ds.train_x[:1])[0, 5, 12:24, 0],
                             [3, 18, 18, 18, 126, 136, 175, 26, 166, 255, 247, 127], atol=1e-3)
  np.testing.assert_allclose(ds.mean, [0.1307])
  np.testing.assert_allclose(ds.std, [0.3081])
  assert abs(_moments(ds.train_x)[0][0]) < 0.01  # 33.44/255 = 0.1311 vs DM's 0.1307


@needs_mnist
def test_mnist_found_through_bundle_root_and_env_var(monkeypatch):
  by_root = load_dataset("mnist", data_dir=SHARED, max_train_per_class=3, max_test_per_class=1)
  assert by_root.source == str(MNIST_DIR)
  monkeypatch.setenv(images.DATA_DIR_ENV, str(SHARED))
  by_env = load_dataset("mnist", max_train_per_class=3, max_test_per_class=1)
  assert by_env.source == str(MNIST_DIR)
  np.testing.assert_array_equal(by_env.train_x, by_root.train_x)
  np.testing.assert_array_equal(np.bincount(by_env.train_y), [3] * 10)
  assert by_env.train_y[0] == 5  # first-k keeps file order


def test_explicit_data_dir_without_files_fails_fast(tmp_path):
  start = time.monotonic()
  with pytest.raises(DatasetUnavailableError) as err:
    load_dataset("mnist", data_dir=tmp_path)
  assert time.monotonic() - start < 10
  msg = str(err.value)
  assert str(tmp_path) in msg and "t10k-images-idx3-ubyte" in msg


# ----------------------------------------------------------------------------
# CIFAR-10 JPEG archive.


@pytest.fixture(scope="module")
def cifar_raw():
  # Default cache location on purpose: later test sessions then skip the ~10 s decode.
  return images.load_cifar10_archive(CIFAR_ARCHIVE)


@pytest.fixture(scope="module")
def cifar_ds(cifar_raw):
  return load_dataset("cifar10", data_dir=CIFAR_ARCHIVE.parent)


@needs_cifar
def test_cifar10_counts_order_and_pixels(cifar_raw, cifar_ds):
  train_x, train_y, test_x, test_y = cifar_raw
  assert train_x.shape == (50000, 32, 32, 3) and test_x.shape == (10000, 32, 32, 3)
  assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
  # Sorted by class, then file number: 5000 / 1000 consecutive rows per class.
  np.testing.assert_array_equal(train_y, np.repeat(np.arange(10), 5000))
  np.testing.assert_array_equal(test_y, np.repeat(np.arange(10), 1000))
  # README: mean RGB over all 60,000 images 125.39, 123.06, 114.03.
  channel_sums = (train_x.sum(axis=(0, 1, 2), dtype=np.int64)
                  + test_x.sum(axis=(0, 1, 2), dtype=np.int64))  # exact integer sums
  np.testing.assert_allclose(channel_sums / (60000 * 32 * 32), [125.39, 123.06, 114.03],
                             atol=0.005)

  ds = cifar_ds
  assert ds.source == str(CIFAR_ARCHIVE)
  assert ds.class_names == images.CIFAR10_CLASSES and ds.num_classes == 10
  assert ds.input_shape == (32, 32, 3)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  np.testing.assert_array_equal(ds.train_y, train_y)
  np.testing.assert_allclose(_pixels(ds, ds.train_x[:500]), train_x[:500], atol=1e-3)
  np.testing.assert_allclose(_pixels(ds, ds.test_x[-500:]), test_x[-500:], atol=1e-3)
  per_channel_mean, per_channel_std = _moments(ds.train_x[::10])  # 500 per class
  assert np.all(np.abs(per_channel_mean) < 0.02)
  # DM's CIFAR-10 "std" constants (~0.20) are below the true pixel std (~0.25),
  # so normalised channels have std ~1.2, as in the reference code.
  assert np.all((per_channel_std > 1.15) & (per_channel_std < 1.35)), per_channel_std


@needs_cifar
def test_cifar10_cache_is_used_and_subset_is_first_k(cifar_raw, cifar_ds, monkeypatch):
  cache = images.cifar10_cache_path(CIFAR_ARCHIVE)
  if not cache.is_file():  # Writing itself is tested on a tmp dir below.
    pytest.skip(f"default cache dir {cache.parent} is not writable here")

  def no_decode(_):
    raise AssertionError("decoded although a valid cache exists")

  monkeypatch.setattr(images, "decode_cifar10_archive", no_decode)
  sub = load_dataset("cifar10", data_dir=CIFAR_ARCHIVE, max_train_per_class=3,
                     max_test_per_class=2)
  rows = (np.arange(10)[:, None] * 5000 + np.arange(3)).ravel()
  np.testing.assert_array_equal(sub.train_x, cifar_ds.train_x[rows])
  np.testing.assert_array_equal(sub.train_y, np.repeat(np.arange(10), 3))
  np.testing.assert_array_equal(np.bincount(sub.test_y), [2] * 10)


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
  """A 10-class archive of real CIFAR-10 JPEGs (train 0000-0001, test 0000), stored
  in reverse order under an extra top folder to exercise sorting and prefixes."""
  if not CIFAR_ARCHIVE.is_file():
    pytest.skip(f"shared CIFAR-10 archive not found at {CIFAR_ARCHIVE}")
  wanted = re.compile(r"^(train/[a-z]+/000[01]|test/[a-z]+/0000)\.jpg$")
  members = []
  with tarfile.open(CIFAR_ARCHIVE, "r:gz") as tar:
    for member in tar:
      if member.isfile() and wanted.match(member.name):
        members.append((member.name, tar.extractfile(member).read()))
  assert len(members) == 30
  path = tmp_path_factory.mktemp("small") / "small.tar.gz"
  with tarfile.open(path, "w:gz") as out:
    for name, data in reversed(members):
      info = tarfile.TarInfo("CIFAR-10-images/" + name)
      info.size = len(data)
      out.addfile(info, io.BytesIO(data))
  return path


def test_small_archive_decodes_sorted_and_matches_full(small_cifar, cifar_raw):
  train_x, train_y, test_x, test_y = images.decode_cifar10_archive(small_cifar)
  np.testing.assert_array_equal(train_y, np.repeat(np.arange(10), 2))
  np.testing.assert_array_equal(test_y, np.arange(10))
  rows = (np.arange(10)[:, None] * 5000 + np.arange(2)).ravel()
  np.testing.assert_array_equal(train_x, cifar_raw[0][rows])
  np.testing.assert_array_equal(test_x, cifar_raw[2][np.arange(10) * 1000])


def test_unreadable_cache_falls_back_to_decoding(small_cifar, tmp_path):
  expected = images.decode_cifar10_archive(small_cifar)
  cache = images.cifar10_cache_path(small_cifar, tmp_path)
  cache.write_bytes(b"not an npz file")
  got = images.load_cifar10_archive(small_cifar, cache_dir=tmp_path)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)
  # The bad cache was replaced by a good one, readable without pickle.
  with np.load(cache, allow_pickle=False) as data:
    np.testing.assert_array_equal(data["train_x"], expected[0])
  # A cache dir that cannot be created is silently skipped.
  blocker = tmp_path / "file"
  blocker.write_bytes(b"")
  got = images.load_cifar10_archive(small_cifar, cache_dir=blocker / "sub")
  np.testing.assert_array_equal(got[0], expected[0])


def test_cache_dir_from_env_var(small_cifar, tmp_path, monkeypatch):
  monkeypatch.setenv(images.CACHE_DIR_ENV, str(tmp_path))
  ds = load_dataset("cifar10", data_dir=small_cifar)
  assert ds.train_x.shape == (20, 32, 32, 3)
  assert images.cifar10_cache_path(small_cifar).parent == tmp_path
  assert images.cifar10_cache_path(small_cifar).is_file()


def test_extracted_cifar_folder_and_bad_class(small_cifar, tmp_path):
  with tarfile.open(small_cifar, "r:gz") as tar:
    tar.extractall(tmp_path, filter="data")
  root = tmp_path / "CIFAR-10-images"
  ds = load_dataset("cifar10", data_dir=root)
  assert ds.source == str(root)
  arch = load_dataset("cifar10", data_dir=small_cifar, use_cache=False)
  np.testing.assert_array_equal(ds.train_x, arch.train_x)
  np.testing.assert_array_equal(ds.test_y, arch.test_y)
  (root / "train" / "airplane").rename(root / "train" / "aeroplane")
  with pytest.raises(ValueError, match="aeroplane"):
    images.decode_cifar10_folder(root)


def test_duplicate_archive_members_are_rejected(small_cifar, tmp_path):
  path = tmp_path / "dup.tar"
  with tarfile.open(small_cifar, "r:gz") as src, tarfile.open(path, "w") as out:
    for member in src.getmembers():
      data = src.extractfile(member).read()
      out.addfile(member, io.BytesIO(data))
      if member.name.endswith("train/cat/0000.jpg"):
        member.name = member.name.replace("CIFAR-10-images/", "copy/")
        out.addfile(member, io.BytesIO(data))
  with pytest.raises(ValueError, match="duplicate"):
    images.decode_cifar10_archive(path)


# ----------------------------------------------------------------------------
# tensorflow-datasets path and offline behaviour.


def test_network_probe_true_and_false():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    assert images.network_reachable("127.0.0.1", server.getsockname()[1], timeout=2.0)
  with socket.socket() as closed:
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]  # bound, not listening: connection refused
    assert not images.network_reachable("127.0.0.1", port, timeout=2.0)
  start = time.monotonic()
  assert not images.network_reachable("192.0.2.1", 9, timeout=0.5)  # TEST-NET-1
  assert time.monotonic() - start < 2.0
  with pytest.raises(ValueError, match="timeout"):
    images.network_reachable(timeout=0)


def test_tfds_source_with_mock_data(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  probes = []
  monkeypatch.setattr(images, "network_reachable",
                      lambda host, port, timeout: probes.append(host) or True)
  with tfds.testing.mock_data(num_examples=40):
    ds = load_dataset("cifar100", tfds_data_dir=tmp_path)
    svhn_full = load_dataset("svhn", tfds_data_dir=tmp_path)
    svhn_sub = load_dataset("svhn", tfds_data_dir=tmp_path, max_train_per_class=1,
                            max_test_per_class=2)
  assert probes  # the download branch ran (mock data is never "prepared")
  assert ds.source == "tfds:cifar100" and ds.num_classes == 100
  assert ds.class_names[:3] == ("apple", "aquarium_fish", "baby") and len(ds.class_names) == 100
  assert ds.train_x.shape == (40, 32, 32, 3) and ds.test_x.shape == (40, 32, 32, 3)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert ds.train_y.min() >= 0 and ds.train_y.max() < 100
  px = _pixels(ds, ds.train_x)
  assert px.min() > -1e-3 and px.max() < 255 + 1e-3
  np.testing.assert_allclose(ds.mean, [0.5071, 0.4866, 0.4409])
  assert svhn_full.source == "tfds:svhn_cropped"
  keep = images.class_balanced_indices(svhn_full.train_y, 1)
  np.testing.assert_array_equal(svhn_sub.train_y, svhn_full.train_y[keep])
  np.testing.assert_array_equal(svhn_sub.train_x, svhn_full.train_x[keep])
  keep = images.class_balanced_indices(svhn_full.test_y, 2)
  np.testing.assert_array_equal(svhn_sub.test_x, svhn_full.test_x[keep])


def test_allow_download_false_never_probes(tmp_path, monkeypatch):
  def probe(*args, **kw):
    raise AssertionError("probed the network although allow_download=False")

  monkeypatch.setattr(images, "network_reachable", probe)
  with pytest.raises(DatasetUnavailableError, match="allow_download=False"):
    load_dataset("svhn", tfds_data_dir=tmp_path, allow_download=False)


def test_offline_fails_within_seconds_listing_sources(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  # A real probe against an address that never answers (TEST-NET-1), so the
  # test behaves the same on- and offline and never downloads anything.
  monkeypatch.setattr(images, "_probe_target", lambda: ("192.0.2.1", 9))
  start = time.monotonic()
  with pytest.raises(DatasetUnavailableError) as err:
    load_dataset("cifar100", tfds_data_dir=tmp_path, probe_timeout=0.5)
  assert time.monotonic() - start < 5.0
  msg = str(err.value)
  for needle in ("data_dir: not given", "no local file format", str(tmp_path),
                 "192.0.2.1:9 not reachable", "tfds_data_dir", "fashion_mnist_embedded",
                 "collabdm_jax[tfds]"):
    assert needle in msg, needle


def test_download_without_tensorflow_names_the_tfds_extra(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  # Online, but preparing the download fails as it does without TensorFlow.
  monkeypatch.setattr(images, "network_reachable", lambda *a, **k: True)
  monkeypatch.setattr(images, "tensorflow_installed", lambda: False)

  def prepare(*args, **kwargs):
    raise ModuleNotFoundError("No module named 'tensorflow'")

  monkeypatch.setattr(images, "_read_tfds", prepare)
  with pytest.raises(DatasetUnavailableError) as err:
    load_dataset("svhn", tfds_data_dir=tmp_path)
  msg = str(err.value)
  for needle in ("No module named 'tensorflow'", "needs TensorFlow",
                 "pip install 'collabdm_jax[tfds]'", str(tmp_path)):
    assert needle in msg, needle


def test_offline_fashion_mnist_message_names_local_sources(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  spec = images.IMAGE_SPECS["fashion_mnist"]
  missing = tmp_path / "no-such-install"
  monkeypatch.setitem(images.IMAGE_SPECS, "fashion_mnist",
                      images.dataclasses.replace(spec, known_dirs=(missing,)))
  monkeypatch.setenv(images.DATA_DIR_ENV, str(tmp_path))
  monkeypatch.setattr(images, "network_reachable", lambda *a, **k: False)
  start = time.monotonic()
  with pytest.raises(DatasetUnavailableError) as err:
    load_dataset("fashion_mnist", tfds_data_dir=tmp_path / "tfds")
  assert time.monotonic() - start < 5.0
  msg = str(err.value)
  for needle in (f"COLLABDM_DATA_DIR={tmp_path}", "fashion-mnist/", str(missing),
                 "apt-get install dataset-fashion-mnist", "not reachable"):
    assert needle in msg, needle
