"""Tabular intrusion-detection data: 5G-IDS, NSL-KDD and any labelled CSV.

Every loader returns a :class:`~collabdm_jax.data.types.Dataset` with
``kind="tabular"``: features as float32 ``[N, F]``, standardised per feature
with statistics fitted on the training rows only, int32 labels, and the
feature names that survived cleaning. CollabDM's 5G use case fed the traffic
features to a ConvNet as single-channel images; :func:`features_as_images`
does that reshaping.

Parsing is plain ``csv``/numpy (no pandas) so the loaders add no dependency.
Splits are deterministic: :func:`stratified_split` draws one numpy stream per
(seed, class), the host-side analogue of ``jax.random.fold_in``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from collabdm_jax.data.types import Dataset

_log = logging.getLogger(__name__)

DATA_DIR_ENV = "COLLABDM_DATA_DIR"
_5G_SUBDIR = "5g-ids"
_NSL_SUBDIR = "nsl-kdd"

_5G_LABEL = "label"
_5G_TEST_FILE = "Test_Data.csv"
# Capture timestamps: they order packets in one recording session and say
# nothing about the packet itself, so a detector should not key on them.
_5G_TIME_COLUMNS = ("frame.time_relative", "tcp.time_relative")
_5G_CLASS_NAMES = ("normal", "attack")

NSL_KDD_FEATURES = (
    "duration", "protocol_type", "service", "flag", "src_bytes", "dst_bytes",
    "land", "wrong_fragment", "urgent", "hot", "num_failed_logins",
    "logged_in", "num_compromised", "root_shell", "su_attempted", "num_root",
    "num_file_creations", "num_shells", "num_access_files",
    "num_outbound_cmds", "is_host_login", "is_guest_login", "count",
    "srv_count", "serror_rate", "srv_serror_rate", "rerror_rate",
    "srv_rerror_rate", "same_srv_rate", "diff_srv_rate", "srv_diff_host_rate",
    "dst_host_count", "dst_host_srv_count", "dst_host_same_srv_rate",
    "dst_host_diff_srv_rate", "dst_host_same_src_port_rate",
    "dst_host_srv_diff_host_rate", "dst_host_serror_rate",
    "dst_host_srv_serror_rate", "dst_host_rerror_rate",
    "dst_host_srv_rerror_rate")
NSL_KDD_CATEGORICAL = ("protocol_type", "service", "flag")
# Byte counts and durations span several orders of magnitude; without log1p
# a handful of huge transfers dominate the standardised scale.
NSL_KDD_LOG_COLUMNS = ("duration", "src_bytes", "dst_bytes")
_NSL_TRAIN_FILE = "KDDTrain+_20Percent.txt"
_NSL_TEST_FILE = "KDDTest+.txt"
_NSL_FIELDS = len(NSL_KDD_FEATURES) + 2  # + attack name + difficulty

NSL_KDD_5CLASS_NAMES = ("normal", "DoS", "Probe", "R2L", "U2R")
NSL_KDD_ATTACK_GROUPS: Dict[str, str] = {"normal": "normal"}
for _group, _names in (
    ("DoS", ("back", "land", "neptune", "pod", "smurf", "teardrop", "apache2",
             "mailbomb", "processtable", "udpstorm")),
    ("Probe", ("ipsweep", "nmap", "portsweep", "satan", "mscan", "saint")),
    ("R2L", ("ftp_write", "guess_passwd", "imap", "multihop", "phf", "spy",
             "warezclient", "warezmaster", "named", "sendmail",
             "snmpgetattack", "snmpguess", "xlock", "xsnoop", "worm",
             "httptunnel")),
    ("U2R", ("buffer_overflow", "loadmodule", "perl", "rootkit", "ps",
             "sqlattack", "xterm")),
):
  for _name in _names:
    NSL_KDD_ATTACK_GROUPS[_name] = _group
del _group, _names, _name

# Cell spellings read as "missing" by the generic CSV loader.
_MISSING_TOKENS = frozenset(("", "na", "nan", "n/a", "null", "?"))


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


def _resolve_data_dir(data_dir, subdir: str, required: Sequence[str]
                      ) -> pathlib.Path:
  """Finds the folder holding ``required`` files, or says where it looked."""
  hint = (f"pass data_dir=<folder containing {', '.join(required)}> or set "
          f"${DATA_DIR_ENV} to the folder that holds '{subdir}/'")
  if data_dir is not None:
    candidates = [("data_dir", pathlib.Path(data_dir))]
  else:
    candidates = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
      candidates.append((f"${DATA_DIR_ENV}/{subdir}",
                         pathlib.Path(env) / subdir))
    # The project keeps its data bundle in ../shared/data next to the repo.
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    candidates.append(("repo default",
                       repo_root.parent / "shared" / "data" / subdir))
  looked = []
  for label, folder in candidates:
    missing = [f for f in required if not (folder / f).is_file()]
    if not missing:
      return folder
    looked.append(f"{label} {folder} (missing {', '.join(missing)})")
    if label != "repo default":
      # An explicit location that lacks the files is a mistake worth
      # reporting, not something to paper over with a fallback.
      break
  raise FileNotFoundError(
      f"{subdir} data not found; looked in: {'; '.join(looked)}. {hint}.")


def _standardize(train: np.ndarray, test: np.ndarray, enabled: bool):
  """Standardises both splits with train mean/std (std 1 where constant)."""
  train64 = np.asarray(train, np.float64)
  test64 = np.asarray(test, np.float64)
  if not enabled:
    num = train64.shape[1]
    return (train64.astype(np.float32), test64.astype(np.float32),
            np.zeros(num, np.float32), np.ones(num, np.float32))
  mean = train64.mean(axis=0)
  std = train64.std(axis=0)
  # A feature constant on train carries no information the model can scale;
  # std 1 keeps it finite (and exactly 0 on train) instead of dividing by 0.
  std = np.where(std > 0, std, 1.0)
  # Statistics are stored as float32 and applied as stored, so
  # ``denormalize`` and re-standardising reproduce the arrays exactly.
  mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
  m, s = mean32.astype(np.float64), std32.astype(np.float64)
  return (((train64 - m) / s).astype(np.float32),
          ((test64 - m) / s).astype(np.float32), mean32, std32)


def _row_keys(x: np.ndarray) -> List[bytes]:
  """Hashable byte keys of float rows (+0.0 folds -0.0 onto 0.0)."""
  x = np.ascontiguousarray(np.asarray(x, np.float64) + 0.0)
  return [row.tobytes() for row in x]


def _first_unique_rows(x: np.ndarray) -> np.ndarray:
  """Indices of the first occurrence of each distinct row, in file order."""
  seen = set()
  keep = []
  for i, key in enumerate(_row_keys(x)):
    if key not in seen:
      seen.add(key)
      keep.append(i)
  return np.asarray(keep, np.int64)


def _count_rows_in(rows: np.ndarray, reference: np.ndarray) -> int:
  """How many rows of ``rows`` occur (exactly) among ``reference``'s rows."""
  ref = set(_row_keys(reference))
  return sum(key in ref for key in _row_keys(rows))


def _constant_columns(x: np.ndarray) -> np.ndarray:
  """Boolean mask of columns holding a single value over all rows."""
  return np.all(x == x[:1], axis=0)


def _duplicate_columns(x: np.ndarray) -> Dict[int, int]:
  """Maps each column identical to an earlier column to that first column."""
  first_by_key: Dict[bytes, int] = {}
  copies = {}
  xt = np.ascontiguousarray(np.asarray(x, np.float64).T + 0.0)
  for j in range(xt.shape[0]):
    key = xt[j].tobytes()
    if key in first_by_key:
      copies[j] = first_by_key[key]
    else:
      first_by_key[key] = j
  return copies


def separating_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Which columns alone classify every row correctly.

  A column separates the classes when no value of it occurs with two
  different labels: a lookup table on that one column is then a perfect
  classifier on these rows (this includes every threshold rule).

  Args:
    x: [N, F] feature matrix.
    y: [N] labels.

  Returns:
    [F] boolean mask, ``True`` for separating columns. All ``False`` when
    ``y`` holds fewer than two classes.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(
        f"x must be [N, F] and y [N]; got x {x.shape}, y {y.shape}")
  if np.unique(y).size < 2:
    return np.zeros(x.shape[1], bool)
  out = np.zeros(x.shape[1], bool)
  for j in range(x.shape[1]):
    pairs = np.unique(np.stack([x[:, j].astype(np.float64),
                                y.astype(np.float64)], axis=1), axis=0)
    out[j] = np.unique(pairs[:, 0]).size == pairs.shape[0]
  return out


def _one_hot(train_values: Sequence[str], test_values: Sequence[str],
             column: str):
  """One-hot codes with categories fitted on train (sorted).

  Returns (train [N, K], test [M, K], feature names, number of test rows
  whose category never occurs in train; those rows are all-zero).
  """
  cats = sorted(set(train_values))
  index = {c: i for i, c in enumerate(cats)}
  def encode(values):
    codes = np.zeros((len(values), len(cats)), np.float64)
    unseen = 0
    for r, v in enumerate(values):
      i = index.get(v)
      if i is None:
        unseen += 1
      else:
        codes[r, i] = 1.0
    return codes, unseen
  train_codes, _ = encode(train_values)
  test_codes, unseen = encode(test_values)
  names = tuple(f"{column}={c}" for c in cats)
  return train_codes, test_codes, names, unseen


def _read_csv_cells(path: pathlib.Path, *, header: bool
                    ) -> Tuple[Optional[List[str]], List[List[str]]]:
  """Reads a comma-separated file into stripped string cells."""
  with open(path, newline="") as fh:
    reader = csv.reader(fh)
    head = None
    if header:
      try:
        head = [c.strip() for c in next(reader)]
      except StopIteration:
        raise ValueError(f"{path} is empty (expected a header line)") from None
    rows = [[c.strip() for c in row] for row in reader if row]
  width = len(head) if header else (len(rows[0]) if rows else 0)
  for i, row in enumerate(rows):
    if len(row) != width:
      line = i + (2 if header else 1)
      raise ValueError(
          f"{path}, line {line}: {len(row)} fields, expected {width}")
  return head, rows


def features_as_images(x, side: Optional[int] = None) -> np.ndarray:
  """Reshapes feature vectors into single-channel square images.

  CollabDM's 5G experiment fed traffic features to the ConvNet as 1-channel
  images. Features fill the image row-major; the remaining pixels are 0,
  which for standardised data is the training mean (i.e. "no signal").

  Args:
    x: [N, F] features.
    side: image side s with s * s >= F; default ceil(sqrt(F)).

  Returns:
    float32 [N, s, s, 1] (NHWC).
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"x must be [N, F]; got shape {x.shape}")
  n, f = x.shape
  if f == 0:
    raise ValueError("x must have at least one feature column (F >= 1)")
  if side is None:
    side = math.isqrt(f - 1) + 1
  elif isinstance(side, bool) or not isinstance(side, (int, np.integer)):
    raise ValueError(f"side must be an int; got {side!r}")
  side = int(side)
  if side * side < f:
    raise ValueError(
        f"side must satisfy side * side >= F = {f} (side >= "
        f"{math.isqrt(f - 1) + 1}); got side={side}")
  out = np.zeros((n, side * side), np.float32)
  out[:, :f] = x
  return out.reshape(n, side, side, 1)


def stratified_split(labels, test_fraction: float, seed: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Splits indices per class so both parts keep the class proportions.

  Class c with n_c rows sends round(n_c * test_fraction) rows to test, but
  never all of them: every class keeps at least one training row. Each
  class is shuffled by its own stream derived from (seed, class rank), so
  the split depends only on the labels and the seed.

  Args:
    labels: [N] class labels (any sortable values).
    test_fraction: share of each class put in the test part, 0 < f < 1.
    seed: non-negative int.

  Returns:
    (train_idx, test_idx): sorted int64 index arrays, disjoint, covering
    ``range(N)``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D; got shape {labels.shape}")
  if labels.size < 2:
    raise ValueError(f"labels must hold at least 2 rows; got {labels.size}")
  if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(
        f"test_fraction must be in (0, 1); got {test_fraction!r}")
  if (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
      or seed < 0):
    raise ValueError(f"seed must be a non-negative int; got {seed!r}")
  classes, inverse = np.unique(labels, return_inverse=True)
  train_parts, test_parts = [], []
  for rank in range(classes.size):
    idx = np.flatnonzero(inverse == rank)
    n_test = int(math.floor(idx.size * float(test_fraction) + 0.5))
    n_test = min(n_test, idx.size - 1)
    perm = np.random.default_rng([int(seed), rank]).permutation(idx)
    test_parts.append(perm[:n_test])
    train_parts.append(perm[n_test:])
  test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
  train_idx = np.sort(np.concatenate(train_parts)).astype(np.int64)
  if test_idx.size == 0:
    raise ValueError(
        f"test_fraction={test_fraction} leaves the test part empty for "
        f"{labels.size} rows; raise test_fraction or pass a test file")
  return train_idx, test_idx


# --------------------------------------------------------------------------
# 5G-IDS
# --------------------------------------------------------------------------


def _read_5g(path: pathlib.Path) -> Tuple[List[str], np.ndarray]:
  """Parses one 5G-IDS CSV numerically (files spell ints as 128 or 128.0)."""
  with open(path, newline="") as fh:
    header = [c.strip() for c in next(csv.reader(fh))]
  try:
    values = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64,
                        ndmin=2)
  except ValueError as err:
    raise ValueError(f"{path}: non-numeric or malformed cell ({err})") from None
  if values.shape[1] != len(header):
    raise ValueError(f"{path}: {values.shape[1]} columns but "
                     f"{len(header)} header names")
  finite = np.isfinite(values).all(axis=0)
  if not finite.all():
    raise ValueError(f"{path}: non-finite values in columns "
                     f"{[header[j] for j in np.flatnonzero(~finite)]}")
  return header, values


def load_5g_ids(data_dir=None, *,
                train_files: Sequence[str] = ("Train_subset_1.csv",
                                              "Train_subset_2.csv"),
                drop_gtp: bool = False, drop_time: bool = True,
                deduplicate: bool = True, standardize: bool = True
                ) -> Dataset:
  """Loads the 5G-IDS packet data (binary: normal vs attack).

  Cleaning, all derived from the training rows:
    * constant columns are dropped (11 on the shipped files, all zero);
    * a column identical to an earlier one is dropped (5 copies of
      ``gtp.ext_hdr`` on the shipped files);
    * ``deduplicate`` keeps one copy of each distinct raw row of the
      concatenated train files (both subsets hold the same normal rows:
      30,288 rows -> 18,342);
    * ``drop_time`` drops the capture timestamps ``frame.time_relative`` and
      ``tcp.time_relative``;
    * ``drop_gtp`` drops every ``gtp.*`` column (before the duplicate
      check, so a traffic column equal to a GTP column survives it) and then
      every other column
      that alone separates the training classes (see
      :func:`separating_columns`). Every normal row is a GTP-U packet and no
      attack row is, so these columns make detection trivial. On the shipped
      files the extra proxies are ``udp.port`` (always 2152, the GTP-U port,
      on normal rows) and ``udp.length`` (>= 64 on normal rows because it
      counts the GTP header and inner packet; 0, 8 or 56 on attack rows).
  The test file is neither deduplicated nor used for any statistic.

  Args:
    data_dir: folder with the CSVs; default ``$COLLABDM_DATA_DIR/5g-ids``,
      else ``../shared/data/5g-ids`` next to the repository.
    train_files: training CSV names inside ``data_dir``, concatenated.
    drop_gtp: remove the GTP-U shortcut columns (see above).
    drop_time: remove the two capture-timestamp columns.
    deduplicate: drop repeated raw training rows.
    standardize: standardise with training mean/std.

  Returns:
    Dataset named ``"5g_ids"``, ``kind="tabular"``, classes
    ("normal", "attack"); with the defaults 18,342 train rows, 3,787 test
    rows and 26 features.

  Raises:
    ValueError: a test row also occurs (as raw features) in the training
      files, headers differ, or labels are not 0/1.
    FileNotFoundError: the data folder cannot be found.
  """
  if isinstance(train_files, (str, os.PathLike)):
    train_files = (train_files,)
  train_files = tuple(str(f) for f in train_files)
  if not train_files:
    raise ValueError("train_files must name at least one CSV file")
  folder = _resolve_data_dir(data_dir, _5G_SUBDIR,
                             train_files + (_5G_TEST_FILE,))

  header = None
  parts = []
  for fname in train_files + (_5G_TEST_FILE,):
    head, values = _read_5g(folder / fname)
    if header is None:
      header = head
    elif head != header:
      raise ValueError(f"{folder / fname}: header differs from "
                       f"{folder / train_files[0]}")
    parts.append(values)
  if _5G_LABEL not in header:
    raise ValueError(f"5G-IDS files must have a '{_5G_LABEL}' column")
  label_col = header.index(_5G_LABEL)
  feat_cols = [j for j in range(len(header)) if j != label_col]
  names = [header[j] for j in feat_cols]

  raw_train = np.concatenate(parts[:-1])
  raw_test = parts[-1]
  for part_name, part in (("train", raw_train), ("test", raw_test)):
    bad = np.setdiff1d(np.unique(part[:, label_col]), [0.0, 1.0])
    if bad.size:
      raise ValueError(f"5G-IDS {part_name} labels must be 0 or 1; found "
                       f"{bad.tolist()}")
  x_train, y_train = raw_train[:, feat_cols], raw_train[:, label_col]
  x_test, y_test = raw_test[:, feat_cols], raw_test[:, label_col]

  # Leakage is judged on the raw features: after dropping the timestamps
  # distinct packets may legitimately share a feature vector.
  overlap = _count_rows_in(x_test, x_train)
  if overlap:
    raise ValueError(
        f"{overlap} rows of {_5G_TEST_FILE} also occur in the training files "
        f"{list(train_files)}; the test set must be disjoint from training")

  n_concat = x_train.shape[0]
  if deduplicate:
    keep = _first_unique_rows(raw_train)
    x_train, y_train = x_train[keep], y_train[keep]

  notes = []
  const = _constant_columns(x_train)
  dropped_const = [names[j] for j in np.flatnonzero(const)]
  cols = [j for j in range(len(names)) if not const[j]]
  if drop_gtp:
    # Before the duplicate check, so that a traffic column equal to a GTP
    # column is judged on its own below rather than dropped as its copy.
    cols = [j for j in cols if not names[j].startswith("gtp.")]
  copies = _duplicate_columns(x_train[:, cols])
  dropped_copies = [f"{names[cols[j]]}={names[cols[k]]}"
                    for j, k in sorted(copies.items())]
  cols = [c for i, c in enumerate(cols) if i not in copies]
  notes.append(f"dropped {len(dropped_const)} constant columns")
  notes.append(f"dropped {len(dropped_copies)} duplicate columns "
               f"({', '.join(dropped_copies)})" if dropped_copies
               else "no duplicate columns")
  if drop_time:
    cols = [j for j in cols if names[j] not in _5G_TIME_COLUMNS]
  if drop_gtp:
    shortcut = separating_columns(x_train[:, cols], y_train)
    proxies = [names[cols[i]] for i in np.flatnonzero(shortcut)]
    cols = [c for i, c in enumerate(cols) if not shortcut[i]]
    notes.append("dropped gtp.* and separating proxies "
                 f"({', '.join(proxies) if proxies else 'none'})")

  train_x, test_x, mean, std = _standardize(
      x_train[:, cols], x_test[:, cols], standardize)
  n_feat = len(cols)
  dedupe_note = (f"{n_concat} -> {train_x.shape[0]} distinct train rows"
                 if deduplicate else f"{n_concat} train rows")
  source = (f"{folder} [{'+'.join(train_files)} vs {_5G_TEST_FILE}; "
            f"{dedupe_note}; {'; '.join(notes)}]")
  return Dataset(
      name="5g_ids",
      train_x=train_x, train_y=y_train.astype(np.int32),
      test_x=test_x, test_y=y_test.astype(np.int32),
      num_classes=2, class_names=_5G_CLASS_NAMES,
      input_shape=(n_feat,), mean=mean, std=std, source=source,
      kind="tabular", feature_names=tuple(names[j] for j in cols))


# --------------------------------------------------------------------------
# NSL-KDD
# --------------------------------------------------------------------------


def _read_nsl(path: pathlib.Path):
  """Parses an NSL-KDD file into (numeric dict, categorical dict, attacks)."""
  with open(path) as fh:
    for line_no, line in enumerate(fh, 1):
      if line.strip() and line.count(",") != _NSL_FIELDS - 1:
        raise ValueError(
            f"{path}, line {line_no}: {line.count(',') + 1} fields, expected "
            f"{_NSL_FIELDS} (41 features, attack name, difficulty)")
  num_idx = [j for j, n in enumerate(NSL_KDD_FEATURES)
             if n not in NSL_KDD_CATEGORICAL]
  cat_idx = [NSL_KDD_FEATURES.index(n) for n in NSL_KDD_CATEGORICAL]
  attack_idx = len(NSL_KDD_FEATURES)
  # numpy's C parser: the csv module plus float() per cell is ~10x slower.
  try:
    values = np.loadtxt(path, delimiter=",", usecols=num_idx,
                        dtype=np.float64, ndmin=2)
  except ValueError as err:
    raise ValueError(f"{path}: non-numeric value in a numeric feature "
                     f"({err})") from None
  text = np.loadtxt(path, delimiter=",", usecols=cat_idx + [attack_idx],
                    dtype=str, ndmin=2)
  if values.shape[0] == 0:
    raise ValueError(f"{path} holds no rows")
  numeric = {NSL_KDD_FEATURES[j]: values[:, i] for i, j in enumerate(num_idx)}
  categorical = {n: [v.strip() for v in text[:, i].tolist()]
                 for i, n in enumerate(NSL_KDD_CATEGORICAL)}
  attacks = [v.strip() for v in text[:, -1].tolist()]
  return numeric, categorical, attacks


def load_nsl_kdd(data_dir=None, *, grouping: str = "5class",
                 standardize: bool = True, log_transform: bool = True
                 ) -> Dataset:
  """Loads NSL-KDD (KDDTrain+_20Percent.txt / KDDTest+.txt).

  The 3 categorical features are one-hot encoded in place with categories
  fitted on train (sorted); a test row whose category never occurs in train
  gets all zeros in that block, and the count of such rows is written into
  ``source`` (and logged). The difficulty field is discarded. Columns
  constant on train (e.g. ``num_outbound_cmds``) are kept so the layout is
  the standard one; they standardise to 0 on train.

  Args:
    data_dir: folder with the files; default ``$COLLABDM_DATA_DIR/nsl-kdd``,
      else ``../shared/data/nsl-kdd`` next to the repository.
    grouping: ``"5class"`` (normal, DoS, Probe, R2L, U2R; the usual
      attack-family table, which also covers the test-only attack names) or
      ``"binary"`` (normal vs attack).
    standardize: standardise every feature with training mean/std.
    log_transform: apply log1p to duration, src_bytes and dst_bytes before
      standardising (``feature_names`` keep the raw names).

  Returns:
    Dataset named ``"nsl_kdd"`` with 25,192 train and 22,544 test rows.

  Raises:
    ValueError: unknown grouping, or an attack name missing from the table.
  """
  groupings = ("5class", "binary")
  if grouping not in groupings:
    raise ValueError(f"grouping must be one of {groupings}; got {grouping!r}")
  folder = _resolve_data_dir(data_dir, _NSL_SUBDIR,
                             (_NSL_TRAIN_FILE, _NSL_TEST_FILE))
  tr_num, tr_cat, tr_att = _read_nsl(folder / _NSL_TRAIN_FILE)
  te_num, te_cat, te_att = _read_nsl(folder / _NSL_TEST_FILE)

  if grouping == "5class":
    class_names = NSL_KDD_5CLASS_NAMES
  else:
    class_names = ("normal", "attack")
  class_id = {c: i for i, c in enumerate(class_names)}
  def labels(attacks, fname):
    # The table is checked for "binary" too: a misspelt or new attack name
    # should not silently become "attack".
    unknown = sorted(set(attacks) - set(NSL_KDD_ATTACK_GROUPS))
    if unknown:
      raise ValueError(f"{fname}: attack names not in the NSL-KDD grouping "
                       f"table: {unknown}")
    if grouping == "5class":
      return np.asarray([class_id[NSL_KDD_ATTACK_GROUPS[a]] for a in attacks],
                        np.int32)
    return np.asarray([a != "normal" for a in attacks], np.int32)
  train_y = labels(tr_att, _NSL_TRAIN_FILE)
  test_y = labels(te_att, _NSL_TEST_FILE)

  train_blocks, test_blocks, names, unseen_notes = [], [], [], []
  for name in NSL_KDD_FEATURES:
    if name in NSL_KDD_CATEGORICAL:
      tr, te, block_names, unseen = _one_hot(tr_cat[name], te_cat[name], name)
      if unseen:
        unseen_notes.append(f"{name}: {unseen}")
      names.extend(block_names)
    else:
      tr, te = tr_num[name][:, None], te_num[name][:, None]
      if log_transform and name in NSL_KDD_LOG_COLUMNS:
        if tr.min() < 0 or te.min() < 0:
          raise ValueError(f"log_transform needs '{name}' >= 0")
        tr, te = np.log1p(tr), np.log1p(te)
      names.append(name)
    train_blocks.append(tr)
    test_blocks.append(te)
  train_x, test_x, mean, std = _standardize(
      np.concatenate(train_blocks, axis=1), np.concatenate(test_blocks, axis=1),
      standardize)

  unseen_text = ", ".join(unseen_notes) if unseen_notes else "none"
  if unseen_notes:
    _log.warning("NSL-KDD test rows with categories unseen in train (encoded "
                 "as all-zero): %s", unseen_text)
  log_text = ("on " + ", ".join(NSL_KDD_LOG_COLUMNS) if log_transform
              else "off")
  source = (f"{folder} [{_NSL_TRAIN_FILE} vs {_NSL_TEST_FILE}; grouping "
            f"{grouping}; log1p {log_text}; test rows with unseen "
            f"categories: {unseen_text}]")
  return Dataset(
      name="nsl_kdd",
      train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
      num_classes=len(class_names), class_names=class_names,
      input_shape=(train_x.shape[1],), mean=mean, std=std, source=source,
      kind="tabular", feature_names=tuple(names))


def load_nsl_kdd_attack_names(data_dir=None
                              ) -> Tuple[np.ndarray, np.ndarray]:
  """The attack name of every NSL-KDD row, aligned with ``load_nsl_kdd``.

  ``load_nsl_kdd`` keeps the files' row order, so entry i names the attack
  of ``train_y[i]`` (``test_y[i]``); the 5-class labels group these names
  (``NSL_KDD_ATTACK_GROUPS``). Useful to split a class's recall into the
  attacks it holds, e.g. DoS test rows of attacks absent from training.

  Args:
    data_dir: as for ``load_nsl_kdd``.

  Returns:
    ``(train_names [N], test_names [M])`` string arrays.
  """
  folder = _resolve_data_dir(data_dir, _NSL_SUBDIR,
                             (_NSL_TRAIN_FILE, _NSL_TEST_FILE))
  return tuple(np.asarray(_read_nsl(folder / f)[2])
               for f in (_NSL_TRAIN_FILE, _NSL_TEST_FILE))


# --------------------------------------------------------------------------
# Generic CSV
# --------------------------------------------------------------------------


def _is_missing(cell: str) -> bool:
  return cell.lower() in _MISSING_TOKENS


def _column_cells(rows: List[List[str]], header: List[str], column: str,
                  path) -> List[str]:
  if column not in header:
    raise ValueError(f"{path}: no column named '{column}' (columns: "
                     f"{header})")
  j = header.index(column)
  return [row[j] for row in rows]


def _check_missing(cells: Dict[str, List[str]], path) -> None:
  """Raises naming every column with missing cells and the rows affected."""
  per_column = {}
  bad_rows = set()
  for name, values in cells.items():
    rows = [i for i, v in enumerate(values) if _is_missing(v)]
    if rows:
      per_column[name] = len(rows)
      bad_rows.update(rows)
  if per_column:
    detail = ", ".join(f"'{k}' ({v} rows)" for k, v in per_column.items())
    raise ValueError(
        f"{path}: missing values (empty or one of "
        f"{sorted(t for t in _MISSING_TOKENS if t)}) in columns {detail}; "
        f"{len(bad_rows)} rows affected. Fill or remove those rows, or "
        "exclude the columns with drop_columns")


def _parse_numeric(cells: Dict[str, List[str]], path) -> Dict[str, np.ndarray]:
  """Parses non-categorical columns as float, naming any that are not."""
  out, bad = {}, []
  for name, values in cells.items():
    try:
      col = np.asarray(values, dtype=np.float64)
    except ValueError:
      example = next(v for v in values if not _is_float(v))
      bad.append(f"'{name}' (e.g. {example!r})")
      continue
    if not np.all(np.isfinite(col)):
      raise ValueError(f"{path}: column '{name}' holds non-finite values")
    out[name] = col
  if bad:
    raise ValueError(
        f"{path}: non-numeric feature columns {', '.join(bad)}; declare them "
        "in categorical_columns (one-hot) or exclude them with drop_columns")
  return out


def _is_float(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def _label_mapping(train_labels: Sequence[str], test_labels: Sequence[str]):
  """Deterministic class ids: numeric order if every label is a number."""
  all_labels = list(train_labels) + list(test_labels)
  if all(_is_float(v) for v in all_labels):
    def key(v):
      return float(v)
    def spell(v):
      f = float(v)
      return str(int(f)) if f.is_integer() else repr(f)
  else:
    key = spell = str
  classes = sorted({key(v) for v in train_labels})
  unseen = sorted({key(v) for v in test_labels} - set(classes))
  if unseen:
    raise ValueError(f"test labels {[spell(u) for u in unseen]} never occur "
                     "in the training rows; every class needs training data")
  ids = {c: i for i, c in enumerate(classes)}
  names = tuple(spell(c) for c in classes)
  def encode(values):
    return np.asarray([ids[key(v)] for v in values], np.int32)
  return encode, names


def _read_table(what: str, path):
  """``(path, header, rows)`` of a CSV file with a header and data rows."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what} {path} does not exist")
  header, rows = _read_csv_cells(path, header=True)
  if not rows:
    raise ValueError(f"{path} holds no data rows")
  return path, header, rows


def load_csv_dataset(train_path, *, label_column: str, test_path=None,
                     test_fraction: float = 0.2, seed: int = 0,
                     feature_columns: Optional[Sequence[str]] = None,
                     drop_columns: Sequence[str] = (),
                     categorical_columns: Optional[Sequence[str]] = None,
                     standardize: bool = True, deduplicate: bool = True,
                     name: str = "csv") -> Dataset:
  """Loads any comma-separated file with a header and a label column.

  Labels (strings or numbers) map to ids in sorted order (numeric order when
  every label is a number); ``class_names`` holds them. Missing cells (empty,
  NA, NaN, N/A, null, ?) raise a ValueError naming the columns and the number
  of rows; non-numeric feature columns must be listed in
  ``categorical_columns`` (one-hot, categories fitted on train, unseen test
  categories -> all-zero and counted in ``source``) or they raise.

  Without ``test_path`` the (deduplicated) rows are split by
  :func:`stratified_split`. With it, training rows are deduplicated and test
  rows that also occur in train are counted in ``source`` and logged.

  Args:
    train_path: CSV path.
    label_column: name of the label column.
    test_path: optional CSV with the same columns (any order).
    test_fraction: test share per class when there is no test file.
    seed: split seed (non-negative int).
    feature_columns: features to use, in this order; default every column
      but the label and ``drop_columns``.
    drop_columns: columns to ignore.
    categorical_columns: feature columns to one-hot encode.
    standardize: standardise with training mean/std.
    deduplicate: keep one copy of each repeated training row (before the
      split, so duplicates cannot straddle train and test).
    name: dataset name.

  Returns:
    Dataset with ``kind="tabular"``.
  """
  train_path, header, rows = _read_table("train_path", train_path)
  if label_column not in header:
    raise ValueError(f"label_column '{label_column}' is not a column of "
                     f"{train_path} (columns: {header})")
  drop_columns = tuple(drop_columns)
  unknown = [c for c in drop_columns if c not in header]
  if unknown:
    raise ValueError(f"drop_columns {unknown} are not columns of {train_path}")
  if feature_columns is None:
    features = [c for c in header
                if c != label_column and c not in drop_columns]
  else:
    features = list(feature_columns)
    unknown = [c for c in features if c not in header]
    if unknown:
      raise ValueError(f"feature_columns {unknown} are not columns of "
                       f"{train_path}")
    clash = [c for c in features if c == label_column or c in drop_columns]
    if clash:
      raise ValueError(f"feature_columns {clash} are also the label or in "
                       "drop_columns")
  if not features:
    raise ValueError("no feature columns left after removing the label and "
                     "drop_columns")
  if len(set(features)) != len(features):
    raise ValueError(f"feature columns repeat: {features}")
  categorical = tuple(categorical_columns or ())
  unknown = [c for c in categorical if c not in features]
  if unknown:
    raise ValueError(f"categorical_columns {unknown} are not feature columns")

  def parse(path, head, body):
    cells = {c: _column_cells(body, head, c, path)
             for c in features + [label_column]}
    _check_missing(cells, path)
    numeric = _parse_numeric({c: cells[c] for c in features
                              if c not in categorical}, path)
    return cells, numeric

  train_cells, train_num = parse(train_path, header, rows)
  if test_path is not None:
    test_path, test_header, test_rows = _read_table("test_path", test_path)
    test_cells, test_num = parse(test_path, test_header, test_rows)
  encode_labels, class_names = _label_mapping(
      train_cells[label_column],
      test_cells[label_column] if test_path is not None else ())
  labels = encode_labels(train_cells[label_column])

  # Rows as numbers (categories as codes) so duplicates are found by value:
  # "128" and "128.0" are the same row.
  def identity_matrix(cells, numeric, y):
    cols = []
    for c in features:
      if c in categorical:
        _, codes = np.unique(np.asarray(cells[c]), return_inverse=True)
        cols.append(codes.astype(np.float64))
      else:
        cols.append(numeric[c])
    return np.stack(cols + [y.astype(np.float64)], axis=1)

  n_read = len(rows)
  keep = np.arange(n_read)
  if deduplicate:
    keep = _first_unique_rows(identity_matrix(train_cells, train_num, labels))
  notes = [f"{n_read} -> {keep.size} distinct rows" if deduplicate
           else f"{n_read} rows"]
  if test_path is None:
    tr_idx, te_idx = stratified_split(labels[keep], test_fraction, seed)
    tr_rows, te_rows = keep[tr_idx], keep[te_idx]
    test_cells, test_num = train_cells, train_num
    test_labels = labels
    notes.append(f"stratified split test_fraction={test_fraction} seed={seed}")
    where = str(train_path)
  else:
    tr_rows = keep
    te_rows = np.arange(len(test_rows))
    test_labels = encode_labels(test_cells[label_column])
    where = f"{train_path} vs {test_path}"

  train_blocks, test_blocks, names, unseen_notes = [], [], [], []
  for c in features:
    if c in categorical:
      tr_vals = [train_cells[c][i] for i in tr_rows]
      te_vals = [test_cells[c][i] for i in te_rows]
      tr, te, block_names, unseen = _one_hot(tr_vals, te_vals, c)
      if unseen:
        unseen_notes.append(f"{c}: {unseen}")
      names.extend(block_names)
    else:
      tr = train_num[c][tr_rows][:, None]
      te = test_num[c][te_rows][:, None]
      names.append(c)
    train_blocks.append(tr)
    test_blocks.append(te)
  raw_train = np.concatenate(train_blocks, axis=1)
  raw_test = np.concatenate(test_blocks, axis=1)
  train_y = labels[tr_rows]
  test_y = test_labels[te_rows]

  if test_path is not None:
    shared = _count_rows_in(
        np.concatenate([raw_test, test_y[:, None]], axis=1),
        np.concatenate([raw_train, train_y[:, None]], axis=1))
    notes.append(f"{shared} test rows also in train")
    if shared:
      _log.warning("%s: %d test rows also occur in the training rows",
                   test_path, shared)
  if unseen_notes:
    notes.append("test rows with unseen categories: " + ", ".join(unseen_notes))
    _log.warning("%s: test rows with categories unseen in train (all-zero): "
                 "%s", name, ", ".join(unseen_notes))

  train_x, test_x, mean, std = _standardize(raw_train, raw_test, standardize)
  return Dataset(
      name=name, train_x=train_x, train_y=train_y.astype(np.int32),
      test_x=test_x, test_y=test_y.astype(np.int32),
      num_classes=len(class_names), class_names=class_names,
      input_shape=(train_x.shape[1],), mean=mean, std=std,
      source=f"{where} [{'; '.join(notes)}]", kind="tabular",
      feature_names=tuple(names))
