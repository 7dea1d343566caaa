"""Image datasets as normalised NHWC numpy arrays.

Sources are tried in a fixed order so that a run never depends on the network
when a local copy exists:

1. an explicit ``data_dir`` (IDX files for MNIST-like sets, the CIFAR-10 JPEG
   archive ``cifar10-jpeg.tar.gz`` or its extracted ``train/``/``test/`` tree,
   or a tensorflow-datasets folder already prepared there);
2. ``$COLLABDM_DATA_DIR/<subfolder>`` (the layout of the shared offline bundle:
   ``mnist/``, ``fashion-mnist/``, ``cifar10/``);
3. known system installs (Debian's ``dataset-fashion-mnist``);
4. tensorflow-datasets via ``tfds.data_source``: data already prepared in the
   tfds data dir, else a download, attempted only when a short socket probe
   says the download host is reachable.

If nothing works a :class:`DatasetUnavailableError` lists every source tried.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.resources
import importlib.util
import io
import os
import re
import socket
import struct
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from collabdm_jax.data import tabular
from collabdm_jax.data.types import Dataset

PathLike = Union[str, os.PathLike]

DATA_DIR_ENV = "COLLABDM_DATA_DIR"
CACHE_DIR_ENV = "COLLABDM_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/collabdm_jax")
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
# tfds first asks its GCS mirror for prepared data, so this host decides whether
# a download can work at all.
TFDS_PROBE_HOST = "storage.googleapis.com"
TFDS_PROBE_PORT = 443
# What a fresh install lacks to download and prepare a tfds image dataset:
# preparing encodes the images with TensorFlow (tf.image.encode_png), which
# the default install does not bring; the ``tfds`` extra does.
TFDS_EXTRA_INSTALL = "pip install 'collabdm_jax[tfds]'"

TABULAR_DATASETS = ("5g_ids", "nsl_kdd")

# Standard IDX file stems shared by MNIST and Fashion-MNIST; each may be stored
# gzipped (``.gz``) or not.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_CIFAR10_CACHE_FORMAT = 1

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# Fine labels in the order of the official ``meta`` file (alphabetical).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


class DatasetUnavailableError(RuntimeError):
  """No source could provide the requested dataset (the message lists them)."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """Static description of one image dataset.

  Attributes:
    name: registry name.
    tfds_name: tensorflow-datasets builder name, or ``None``.
    class_names: one name per class id.
    input_shape: (H, W, C) of one image.
    mean, std: per-channel normalisation on the [0, 1] pixel scale (the
      constants DM uses).
    local_format: ``"idx"``, ``"cifar10_jpeg"``, ``"embedded"`` or ``None``
      (tfds only).
    subdirs: subfolder names looked up under a data dir / ``$COLLABDM_DATA_DIR``.
    known_dirs: system folders that hold the dataset when a package installs it.
    install_hint: how to get the dataset locally, for error messages.
  """

  name: str
  tfds_name: Optional[str]
  class_names: Tuple[str, ...]
  input_shape: Tuple[int, int, int]
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  local_format: Optional[str]
  subdirs: Tuple[str, ...] = ()
  known_dirs: Tuple[Path, ...] = ()
  install_hint: str = ""

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


IMAGE_SPECS: Dict[str, ImageSpec] = {
    "mnist": ImageSpec(
        name="mnist", tfds_name="mnist", class_names=MNIST_CLASSES,
        input_shape=(28, 28, 1), mean=(0.1307,), std=(0.3081,),
        local_format="idx", subdirs=("mnist",),
        install_hint="the four MNIST IDX files (train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz])"),
    "fashion_mnist": ImageSpec(
        name="fashion_mnist", tfds_name="fashion_mnist",
        class_names=FASHION_MNIST_CLASSES, input_shape=(28, 28, 1),
        mean=(0.2861,), std=(0.3530,), local_format="idx",
        subdirs=("fashion-mnist", "fashion_mnist"),
        known_dirs=(DEBIAN_FASHION_MNIST_DIR,),
        install_hint="the four Fashion-MNIST IDX files; on Debian/Ubuntu "
        "`apt-get install dataset-fashion-mnist` installs them to "
        f"{DEBIAN_FASHION_MNIST_DIR}"),
    "cifar10": ImageSpec(
        name="cifar10", tfds_name="cifar10", class_names=CIFAR10_CLASSES,
        input_shape=(32, 32, 3), mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010), local_format="cifar10_jpeg",
        subdirs=("cifar10", "cifar-10"),
        install_hint=f"the JPEG archive {CIFAR10_ARCHIVE_NAME} (members "
        "train/<class>/NNNN.jpg and test/<class>/NNNN.jpg) or its extracted "
        "train/ and test/ folders"),
    "cifar100": ImageSpec(
        name="cifar100", tfds_name="cifar100", class_names=CIFAR100_CLASSES,
        input_shape=(32, 32, 3), mean=(0.5071, 0.4866, 0.4409),
        std=(0.2673, 0.2564, 0.2762), local_format=None,
        install_hint="a tensorflow-datasets folder with cifar100 prepared "
        "in array_record format"),
    "svhn": ImageSpec(
        name="svhn", tfds_name="svhn_cropped", class_names=MNIST_CLASSES,
        input_shape=(32, 32, 3), mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970), local_format=None,
        install_hint="a tensorflow-datasets folder with svhn_cropped prepared "
        "in array_record format"),
    "fashion_mnist_embedded": ImageSpec(
        name="fashion_mnist_embedded", tfds_name=None,
        class_names=FASHION_MNIST_CLASSES, input_shape=(28, 28, 1),
        mean=(0.2861,), std=(0.3530,), local_format="embedded"),
}


def list_datasets() -> Tuple[str, ...]:
  """Returns every name :func:`load_dataset` accepts (images, then tables)."""
  return tuple(IMAGE_SPECS) + TABULAR_DATASETS


def _canonical_name(name) -> str:
  if not isinstance(name, str):
    raise ValueError(f"name must be a string, one of {list_datasets()}; got {name!r}")
  # Accept the spellings used by folder names ("fashion-mnist", "5g-ids").
  return name.strip().lower().replace("-", "_")


def load_dataset(name: str, data_dir: Optional[PathLike] = None, **kw) -> Dataset:
  """Loads any registered dataset as normalised numpy arrays.

  Args:
    name: one of :func:`list_datasets` (``-`` and ``_`` are interchangeable,
      case is ignored).
    data_dir: optional folder (or file) holding the dataset; see
      :func:`load_image_dataset` for images. Tabular names are forwarded to
      ``collabdm_jax.data.tabular``.
    **kw: keyword options of the specific loader (for images:
      ``max_train_per_class``, ``max_test_per_class``, ``allow_download``,
      ``tfds_data_dir``, ``cache_dir``, ``use_cache``, ``probe_timeout``).

  Returns:
    A :class:`Dataset`; images are NHWC float32, labels int32.

  Raises:
    ValueError: unknown name (the message lists the valid ones) or bad option.
    DatasetUnavailableError: no source could provide an image dataset.
  """
  key = _canonical_name(name)
  if key in TABULAR_DATASETS:
    loader = {"5g_ids": tabular.load_5g_ids, "nsl_kdd": tabular.load_nsl_kdd}[key]
    return loader(data_dir=data_dir, **kw)
  return load_image_dataset(key, data_dir, **kw)


# ----------------------------------------------------------------------------
# Array helpers.


def read_idx(source: Union[PathLike, bytes]) -> np.ndarray:
  """Parses an IDX file (gzipped or not) of unsigned bytes.

  Args:
    source: a path to the file, or its raw (possibly gzip-compressed) bytes.

  Returns:
    uint8 array with the dimensions from the header (e.g. [N, 28, 28] images
    or [N] labels).

  Raises:
    ValueError: malformed header, non-uint8 data or a size mismatch.
  """
  label = "<bytes>"
  if not isinstance(source, (bytes, bytearray)):
    label = str(source)
    source = Path(source).read_bytes()
  raw = bytes(source)
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if len(raw) < 4:
    raise ValueError(f"IDX file {label}: {len(raw)} bytes, shorter than the 4-byte magic")
  zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(
        f"IDX file {label}: magic {raw[:4].hex()} is not an unsigned-byte IDX "
        "file (expected 0000 08 <ndim>)")
  if not 1 <= ndim <= 4:
    raise ValueError(f"IDX file {label}: ndim {ndim} outside [1, 4]")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"IDX file {label}: truncated header")
  dims = struct.unpack(">" + "I" * ndim, raw[4:header])
  expected = int(np.prod(dims, dtype=np.int64))
  if len(raw) - header != expected:
    raise ValueError(
        f"IDX file {label}: header dims {dims} need {expected} bytes of data, "
        f"found {len(raw) - header}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def write_idx(array: np.ndarray) -> bytes:
  """Serialises a uint8 array as uncompressed IDX bytes (inverse of read_idx)."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"array must be uint8, got {array.dtype}")
  if not 1 <= array.ndim <= 4:
    raise ValueError(f"array.ndim must be in [1, 4], got {array.ndim}")
  header = struct.pack(">HBB", 0, 0x08, array.ndim)
  header += struct.pack(">" + "I" * array.ndim, *array.shape)
  return header + np.ascontiguousarray(array).tobytes()


def class_balanced_indices(labels: np.ndarray, per_class: Optional[int]) -> np.ndarray:
  """Indices of the first ``per_class`` examples of every class.

  Args:
    labels: [N] integer labels.
    per_class: how many to keep per class (fewer when a class has fewer), or
      ``None`` for all.

  Returns:
    [M] int64 indices in increasing order, so the original order is kept.
  """
  labels = np.asarray(labels)
  if per_class is None:
    return np.arange(labels.shape[0], dtype=np.int64)
  per_class = _check_per_class(per_class, "per_class")
  keep = np.zeros(labels.shape[0], dtype=bool)
  for c in np.unique(labels):
    keep[np.flatnonzero(labels == c)[:per_class]] = True
  return np.flatnonzero(keep).astype(np.int64)


def normalize_images(images: np.ndarray, mean: Sequence[float],
                     std: Sequence[float]) -> np.ndarray:
  """Maps uint8 pixels to ``(x / 255 - mean) / std`` per channel.

  Args:
    images: [N, H, W, C] uint8.
    mean, std: length-C sequences on the [0, 1] scale.

  Returns:
    [N, H, W, C] float32.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if mean.shape != (images.shape[-1],) or std.shape != mean.shape:
    raise ValueError(
        f"mean/std must have one value per channel ({images.shape[-1]}), "
        f"got {mean.shape} and {std.shape}")
  # In-place float32 arithmetic: CIFAR-10 in float64 would need 1.5 GB.
  out = images.astype(np.float32)
  out *= 1.0 / (255.0 * std)
  out -= mean / std
  return out


def _check_per_class(value, param: str) -> Optional[int]:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{param} must be None or an integer >= 1, got {value!r}")
  return int(value)


# ----------------------------------------------------------------------------
# Local formats.


def _idx_paths(directory: Path) -> Optional[Dict[str, Path]]:
  found = {}
  for key, stem in IDX_FILES.items():
    for candidate in (directory / (stem + ".gz"), directory / stem):
      if candidate.is_file():
        found[key] = candidate
        break
    else:
      return None
  return found


def _idx_arrays(read) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Reads the four IDX arrays via ``read(key)`` and checks they agree."""
  arrays = []
  for split in ("train", "test"):
    images = read(f"{split}_images")
    labels = read(f"{split}_labels")
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
      raise ValueError(
          f"{split} IDX files disagree: images {images.shape}, labels {labels.shape}")
    arrays += [images[..., None], labels.astype(np.int32)]
  return tuple(arrays)


def load_idx_folder(directory: PathLike):
  """Reads the four standard MNIST-format IDX files of a folder.

  Args:
    directory: folder with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
      t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz].

  Returns:
    (train_x [N, H, W, 1] uint8, train_y [N] int32, test_x, test_y).
  """
  paths = _idx_paths(Path(directory))
  if paths is None:
    raise DatasetUnavailableError(f"{directory} lacks one of the IDX files {list(IDX_FILES.values())}")
  return _idx_arrays(lambda key: read_idx(paths[key]))


_CIFAR_MEMBER = re.compile(r"(?:^|/)(train|test)/([^/]+)/(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def _decode_image(data: bytes) -> np.ndarray:
  from PIL import Image  # Imported lazily: only CIFAR-10 files need Pillow.
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _assemble_cifar(records, origin: str):
  """Sorts decoded (split, class, number, image) records into arrays."""
  index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
  unknown = sorted({r[1] for r in records} - set(index))
  if unknown:
    raise ValueError(
        f"{origin}: class folders {unknown} are not CIFAR-10 classes {CIFAR10_CLASSES}")
  out = []
  for split in ("train", "test"):
    rows = sorted(((index[c], n, img) for s, c, n, img in records if s == split),
                  key=lambda row: row[:2])
    if not rows:
      raise ValueError(f"{origin}: no {split}/<class>/NNNN.jpg images found")
    keys = [(c, n) for c, n, _ in rows]
    if len(set(keys)) != len(keys):
      raise ValueError(f"{origin}: duplicate {split} image numbers within a class")
    bad = [img.shape for _, _, img in rows if img.shape != (32, 32, 3)]
    if bad:
      raise ValueError(f"{origin}: {len(bad)} {split} images are not 32x32x3 (e.g. {bad[0]})")
    out.append(np.stack([img for _, _, img in rows]))
    out.append(np.array([c for c, _, _ in rows], dtype=np.int32))
  return tuple(out)


def decode_cifar10_archive(archive: PathLike):
  """Decodes every JPEG of a CIFAR-10 JPEG archive by streaming it (no extraction).

  Args:
    archive: a tar (optionally gzipped) with members ``[prefix/]train/<class>/NNNN.jpg``
      and ``[prefix/]test/<class>/NNNN.jpg``.

  Returns:
    (train_x [N, 32, 32, 3] uint8, train_y [N] int32, test_x, test_y), each
    split sorted by class (canonical CIFAR-10 order) then file number.
  """
  records = []
  # "r|*" reads the (gzipped) tar strictly front to back, never seeking.
  with tarfile.open(archive, "r|*") as tar:
    for member in tar:
      match = _CIFAR_MEMBER.search(member.name)
      if not member.isfile() or match is None:
        continue
      with tar.extractfile(member) as fh:
        image = _decode_image(fh.read())
      records.append((match.group(1).lower(), match.group(2), int(match.group(3)), image))
  return _assemble_cifar(records, str(archive))


def decode_cifar10_folder(directory: PathLike):
  """Decodes an extracted CIFAR-10 JPEG tree (``train/<class>/*.jpg``, ``test/...``).

  Returns the same arrays as :func:`decode_cifar10_archive`.
  """
  directory = Path(directory)
  records = []
  for split in ("train", "test"):
    for path in sorted((directory / split).glob("*/*")):
      match = _CIFAR_MEMBER.search(path.relative_to(directory).as_posix())
      if match is not None and path.is_file():
        records.append((split, match.group(2), int(match.group(3)),
                        _decode_image(path.read_bytes())))
  return _assemble_cifar(records, str(directory))


def _resolve_cache_dir(cache_dir: Optional[PathLike]) -> Path:
  if cache_dir is not None:
    return Path(cache_dir).expanduser()
  return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def cifar10_cache_path(archive: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
  """Where the decoded arrays of ``archive`` are cached.

  The file name hashes the archive's absolute path, size and mtime, plus the
  Pillow version (JPEG decoders may differ by a grey level), so a changed
  archive or decoder never reuses stale pixels.
  """
  from PIL import __version__ as pil_version
  archive = Path(archive).resolve()
  stat = archive.stat()
  key = f"{archive}|{stat.st_size}|{stat.st_mtime_ns}|{pil_version}|{_CIFAR10_CACHE_FORMAT}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return _resolve_cache_dir(cache_dir) / f"cifar10-jpeg-{digest}.npz"


_CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")


def _read_cache(path: Path):
  with np.load(path, allow_pickle=False) as data:
    arrays = tuple(np.asarray(data[k]) for k in _CACHE_KEYS)
  train_x, train_y, test_x, test_y = arrays
  for x, y in ((train_x, train_y), (test_x, test_y)):
    if (x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3)
        or y.dtype != np.int32 or y.shape != (x.shape[0],)
        or y.min() < 0 or y.max() >= 10):
      raise ValueError(f"cache {path} has unexpected arrays")
  return arrays


def _write_cache(path: Path, arrays) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a concurrent reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
      with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **dict(zip(_CACHE_KEYS, arrays)))
      os.replace(tmp, path)
    except BaseException:
      Path(tmp).unlink(missing_ok=True)
      raise
  except OSError:
    pass  # A read-only or full cache dir only costs a re-decode next time.


def load_cifar10_archive(archive: PathLike, cache_dir: Optional[PathLike] = None,
                         use_cache: bool = True):
  """Decoded CIFAR-10 JPEG archive, read from / written to an .npz cache.

  Args:
    archive: path to ``cifar10-jpeg.tar.gz``.
    cache_dir: cache folder; default ``$COLLABDM_CACHE_DIR`` or
      ``~/.cache/collabdm_jax``.
    use_cache: ``False`` always decodes and writes nothing.

  Returns:
    (train_x [50000, 32, 32, 3] uint8, train_y int32, test_x, test_y) for the
    full archive; see :func:`decode_cifar10_archive` for the order.
  """
  if not use_cache:
    return decode_cifar10_archive(archive)
  path = cifar10_cache_path(archive, cache_dir)
  try:
    return _read_cache(path)
  except Exception:  # noqa: BLE001 - any unreadable cache just means decode again.
    pass
  arrays = decode_cifar10_archive(archive)
  _write_cache(path, arrays)
  return arrays


def _embedded_arrays():
  folder = importlib.resources.files("collabdm_jax.data").joinpath("embedded")
  return _idx_arrays(lambda key: read_idx(folder.joinpath(IDX_FILES[key] + ".gz").read_bytes()))


def _find_local(spec: ImageSpec, folder: Path) -> Optional[Path]:
  """The file or folder in ``folder`` (or its dataset subfolder) holding ``spec``."""
  candidates = [folder] + [folder / sub for sub in spec.subdirs]
  for candidate in candidates:
    if spec.local_format == "idx":
      if candidate.is_dir() and _idx_paths(candidate) is not None:
        return candidate
    elif spec.local_format == "cifar10_jpeg":
      if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz", ".tar")):
        return candidate
      if (candidate / CIFAR10_ARCHIVE_NAME).is_file():
        return candidate / CIFAR10_ARCHIVE_NAME
      if (candidate / "train").is_dir() and (candidate / "test").is_dir():
        return candidate
  return None


def _load_local(spec: ImageSpec, location: Path, cache_dir, use_cache):
  if spec.local_format == "idx":
    return load_idx_folder(location)
  if location.is_dir():
    return decode_cifar10_folder(location)
  return load_cifar10_archive(location, cache_dir=cache_dir, use_cache=use_cache)


# ----------------------------------------------------------------------------
# tensorflow-datasets.


def network_reachable(host: str = TFDS_PROBE_HOST, port: int = TFDS_PROBE_PORT,
                      timeout: float = 2.0) -> bool:
  """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

  The attempt (DNS lookup included, which has no timeout of its own) runs in a
  daemon thread, so the call returns after at most ``timeout`` seconds.
  """
  if not timeout > 0:
    raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
  outcome = []

  def attempt():
    try:
      with socket.create_connection((host, port), timeout=timeout):
        outcome.append(True)
    except (OSError, ValueError):
      outcome.append(False)

  thread = threading.Thread(target=attempt, name="collabdm-net-probe", daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(outcome) and outcome[0]


def _probe_target() -> Tuple[str, int]:
  """The host a tfds download would connect to first (an HTTPS proxy if set)."""
  proxy = urllib.request.getproxies().get("https")
  if proxy:
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if parsed.hostname:
      return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
  return TFDS_PROBE_HOST, TFDS_PROBE_PORT


def _tfds_builder(tfds, spec: ImageSpec, tfds_data_dir):
  # array_record is the random-access format tfds.data_source needs; without an
  # explicit format a given data_dir would be prepared as TFRecord and unreadable.
  return tfds.builder(spec.tfds_name, data_dir=tfds_data_dir, file_format="array_record")


def _read_tfds_split(tfds, spec: ImageSpec, split: str, tfds_data_dir, download: bool,
                     per_class: Optional[int]):
  source = tfds.data_source(
      spec.tfds_name, split=split, data_dir=tfds_data_dir, download=download,
      builder_kwargs={"file_format": "array_record"})
  images, labels = [], []
  counts = np.zeros(spec.num_classes, np.int64)
  for i in range(len(source)):
    example = source[i]
    label = int(example["label"])
    if not 0 <= label < spec.num_classes:
      raise ValueError(f"tfds:{spec.tfds_name} {split}[{i}] has label {label} "
                       f"outside [0, {spec.num_classes})")
    if per_class is not None and counts[label] >= per_class:
      continue
    image = np.asarray(example["image"], dtype=np.uint8)
    if image.shape != spec.input_shape:
      raise ValueError(f"tfds:{spec.tfds_name} {split}[{i}] image shape {image.shape} "
                       f"!= {spec.input_shape}")
    images.append(image)
    labels.append(label)
    counts[label] += 1
    # First-k per class needs no more reads once every class is full.
    if per_class is not None and counts.min() >= per_class:
      break
  if not images:
    raise ValueError(f"tfds:{spec.tfds_name} split {split!r} is empty")
  return np.stack(images), np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------
# The loader.


def load_image_dataset(
    name: str,
    data_dir: Optional[PathLike] = None,
    *,
    max_train_per_class: Optional[int] = None,
    max_test_per_class: Optional[int] = None,
    allow_download: bool = True,
    tfds_data_dir: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    use_cache: bool = True,
    probe_timeout: float = 2.0,
) -> Dataset:
  """Loads an image dataset as normalised NHWC float32 arrays.

  Args:
    name: a key of :data:`IMAGE_SPECS` (``mnist``, ``fashion_mnist``,
      ``cifar10``, ``cifar100``, ``svhn``, ``fashion_mnist_embedded``).
    data_dir: optional folder (or CIFAR-10 archive file) to read from. Checked
      as is and through its dataset subfolder (e.g. ``<data_dir>/mnist``), and
      as a tensorflow-datasets folder. When given, no other source is used: if
      it lacks the data, :class:`DatasetUnavailableError` is raised.
    max_train_per_class, max_test_per_class: keep only the first k examples of
      each class (in file order), or ``None`` for all.
    allow_download: ``False`` forbids any network access (tfds may still read
      data it prepared earlier).
    tfds_data_dir: tensorflow-datasets data folder (default: tfds's own,
      ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    cache_dir: where decoded CIFAR-10 JPEGs are cached (default
      ``$COLLABDM_CACHE_DIR`` or ``~/.cache/collabdm_jax``).
    use_cache: ``False`` neither reads nor writes that cache.
    probe_timeout: seconds the network probe may take before a download is
      declared impossible.

  Returns:
    A :class:`Dataset` with train_x/test_x [N, H, W, C] float32 normalised by
    the dataset's per-channel mean/std, train_y/test_y [N] int32.

  Raises:
    ValueError: unknown name or bad option.
    DatasetUnavailableError: no source could provide the data; the message
      lists every source tried and how to provide one.
  """
  key = _canonical_name(name)
  if key not in IMAGE_SPECS:
    raise ValueError(f"name must be one of {list_datasets()}; got {name!r}")
  spec = IMAGE_SPECS[key]
  max_train_per_class = _check_per_class(max_train_per_class, "max_train_per_class")
  max_test_per_class = _check_per_class(max_test_per_class, "max_test_per_class")
  if not probe_timeout > 0:
    raise ValueError(f"probe_timeout must be > 0 seconds, got {probe_timeout!r}")

  arrays, source = None, None
  if spec.local_format == "embedded":
    if data_dir is not None:
      raise ValueError(f"data_dir must be None for {key} (it ships with the package), "
                       f"got {data_dir!r}")
    arrays, source = _embedded_arrays(), "embedded"
  elif data_dir is not None:
    arrays, source = _from_explicit_dir(spec, Path(data_dir).expanduser(),
                                        max_train_per_class, max_test_per_class,
                                        cache_dir, use_cache)
  else:
    arrays, source = _from_default_sources(spec, max_train_per_class, max_test_per_class,
                                           allow_download, tfds_data_dir, cache_dir,
                                           use_cache, probe_timeout)
  return _to_dataset(spec, arrays, source, max_train_per_class, max_test_per_class)


def _to_dataset(spec, arrays, source, max_train, max_test) -> Dataset:
  train_x, train_y, test_x, test_y = arrays
  for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
    if x.shape[1:] != spec.input_shape:
      raise ValueError(f"{spec.name} {split} images have shape {x.shape[1:]}, "
                       f"expected {spec.input_shape} (from {source})")
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
      raise ValueError(f"{spec.name} {split} labels outside [0, {spec.num_classes}) "
                       f"(from {source})")
  keep_train = class_balanced_indices(train_y, max_train)
  keep_test = class_balanced_indices(test_y, max_test)
  return Dataset(
      name=spec.name,
      train_x=normalize_images(train_x[keep_train], spec.mean, spec.std),
      train_y=np.asarray(train_y[keep_train], np.int32),
      test_x=normalize_images(test_x[keep_test], spec.mean, spec.std),
      test_y=np.asarray(test_y[keep_test], np.int32),
      num_classes=spec.num_classes,
      class_names=spec.class_names,
      input_shape=spec.input_shape,
      mean=np.asarray(spec.mean, np.float32),
      std=np.asarray(spec.std, np.float32),
      source=source,
      kind="image",
  )


def tensorflow_installed() -> bool:
  """Whether TensorFlow is importable (looked up, not imported: it is heavy)."""
  return importlib.util.find_spec("tensorflow") is not None


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # Heavy; only imported when needed.
  except ImportError:
    return None
  return tfds


def _tfds_status(spec: ImageSpec, tfds_data_dir) -> Tuple[Optional[bool], str]:
  """(prepared?, description) of tfds data on disk; ``None`` if tfds is missing."""
  tfds = _import_tfds()
  if tfds is None:
    return None, f"tensorflow-datasets: not installed ({TFDS_EXTRA_INSTALL})"
  builder = _tfds_builder(tfds, spec, tfds_data_dir)
  if builder.is_prepared():
    return True, f"tfds prepared data in {builder.data_dir}"
  return False, (f"tfds prepared data ({spec.tfds_name}, array_record) in "
                 f"{builder.data_dir}: not found")


def _read_tfds(spec, tfds_data_dir, download, max_train, max_test):
  tfds = _import_tfds()
  train = _read_tfds_split(tfds, spec, "train", tfds_data_dir, download, max_train)
  test = _read_tfds_split(tfds, spec, "test", tfds_data_dir, download, max_test)
  return train + test


def _from_explicit_dir(spec, folder, max_train, max_test, cache_dir, use_cache):
  tried = []
  if spec.local_format is not None:
    location = _find_local(spec, folder)
    if location is not None:
      return _load_local(spec, location, cache_dir, use_cache), str(location)
    looked = ", ".join(str(p) for p in [folder] + [folder / s for s in spec.subdirs])
    tried.append(f"data_dir files ({spec.install_hint}) in {looked}: not found")
  if spec.tfds_name is not None and folder.is_dir():
    prepared, note = _tfds_status(spec, folder)
    if prepared:
      return _read_tfds(spec, folder, False, max_train, max_test), f"tfds:{spec.tfds_name}"
    tried.append(note)
  raise DatasetUnavailableError(
      f"Could not load {spec.name!r} from data_dir={str(folder)!r}. Tried:\n"
      + "".join(f"  - {t}\n" for t in tried)
      + _how_to_provide(spec))


def _from_default_sources(spec, max_train, max_test, allow_download, tfds_data_dir,
                          cache_dir, use_cache, probe_timeout):
  tried = ["data_dir: not given"]
  env_dir = os.environ.get(DATA_DIR_ENV)
  if spec.local_format is None:
    tried.append(f"local files: {spec.name} has no local file format here, only tfds")
  elif env_dir:
    base = Path(env_dir).expanduser()
    for sub in spec.subdirs:
      location = _find_local(dataclasses.replace(spec, subdirs=()), base / sub)
      if location is not None:
        return _load_local(spec, location, cache_dir, use_cache), str(location)
    tried.append(f"${DATA_DIR_ENV}={env_dir}: no "
                 + " or ".join(f"{s}/" for s in spec.subdirs) + " subfolder with the files")
  else:
    tried.append(f"${DATA_DIR_ENV}: not set")
  if spec.local_format is not None:
    for known in spec.known_dirs:
      location = _find_local(dataclasses.replace(spec, subdirs=()), known)
      if location is not None:
        return _load_local(spec, location, cache_dir, use_cache), str(location)
      tried.append(f"known local install {known}: not found")
    if not spec.known_dirs:
      tried.append("known local installs: none for this dataset")

  if spec.tfds_name is None:
    raise DatasetUnavailableError(f"Could not load {spec.name!r}. Tried:\n"
                                  + "".join(f"  - {t}\n" for t in tried))
  prepared, note = _tfds_status(spec, tfds_data_dir)
  if prepared:
    return _read_tfds(spec, tfds_data_dir, False, max_train, max_test), f"tfds:{spec.tfds_name}"
  tried.append(note)
  # prepared is None when tfds is not installed: nothing to download with.
  if prepared is not None and not allow_download:
    tried.append("tfds download: disabled (allow_download=False)")
  elif prepared is not None:
    host, port = _probe_target()
    if network_reachable(host, port, probe_timeout):
      try:
        arrays = _read_tfds(spec, tfds_data_dir, True, max_train, max_test)
      except Exception as err:  # noqa: BLE001 - add which sources were tried.
        needs_tf = ("" if tensorflow_installed() else
                    " Preparing a tfds image dataset needs TensorFlow, which is "
                    f"not installed: {TFDS_EXTRA_INSTALL} brings it.")
        raise DatasetUnavailableError(
            f"Downloading {spec.tfds_name!r} with tensorflow-datasets failed ({err})."
            f"{needs_tf} Also tried:\n" + "".join(f"  - {t}\n" for t in tried)
            + _how_to_provide(spec)) from err
      return arrays, f"tfds:{spec.tfds_name}"
    tried.append(f"tfds download: skipped, {host}:{port} not reachable within "
                 f"{probe_timeout:g} s (offline?)")
  raise DatasetUnavailableError(
      f"Could not load {spec.name!r}. Tried:\n" + "".join(f"  - {t}\n" for t in tried)
      + _how_to_provide(spec))


def _how_to_provide(spec: ImageSpec) -> str:
  lines = ["To provide it:"]
  if spec.local_format is not None:
    sub = spec.subdirs[0]
    lines.append(f"  - pass data_dir=<folder with {spec.install_hint}>, or")
    lines.append(f"  - set ${DATA_DIR_ENV} to a folder whose {sub}/ subfolder holds them, or")
  if spec.name == "fashion_mnist":
    lines.append(f"  - apt-get install dataset-fashion-mnist (installs to {DEBIAN_FASHION_MNIST_DIR}), or")
  lines.append(f"  - pass tfds_data_dir=<folder where tfds.data_source({spec.tfds_name!r}) "
               "prepared it>, or")
  lines.append("  - run once with network access and allow_download=True so "
               f"tensorflow-datasets downloads and prepares {spec.tfds_name!r} "
               f"(this needs TensorFlow: {TFDS_EXTRA_INSTALL}), or")
  lines.append("  - use name='fashion_mnist_embedded', which ships with the package.")
  return "\n".join(lines)
