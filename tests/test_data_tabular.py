"""Tabular loaders on the real 5G-IDS / NSL-KDD files and on small CSVs."""

import collections
import csv
import pathlib
import shutil

import numpy as np
import pytest

from collabdm_jax.data import tabular
from collabdm_jax.data.types import Dataset

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
G5 = DATA / "5g-ids"
NSL = DATA / "nsl-kdd"

# Transcribed from shared/data/5g-ids/NOTES.md.
NOTES_CONSTANT = (
    "ip.flags.mf", "tcp.window_size", "ip.fragment", "ip.fragment.count",
    "ip.fragments", "tcp.urgent_pointer", "gtp.ext_hdr.pdu_ses_cont.ppp",
    "gtp.ext_hdr.pdu_ses_cont.rqi", "gtp.flags.pn", "gtp.flags.reserved",
    "gtp.flags.s")
NOTES_GTP_COPIES = (  # identical to gtp.ext_hdr, which is kept
    "gtp.ext_hdr.length", "gtp.ext_hdr.pdu_ses_con.qos_flow_id", "gtp.flags.e",
    "gtp.flags.payload", "gtp.flags.version")
TIME = ("frame.time_relative", "tcp.time_relative")

# Transcribed from shared/data/README.md (NSL-KDD 5-way grouping).
README_GROUPS = {
    "DoS": "back land neptune pod smurf teardrop apache2 mailbomb processtable "
           "udpstorm",
    "Probe": "ipsweep nmap portsweep satan mscan saint",
    "R2L": "ftp_write guess_passwd imap multihop phf spy warezclient "
           "warezmaster named sendmail snmpgetattack snmpguess xlock xsnoop "
           "worm httptunnel",
    "U2R": "buffer_overflow loadmodule perl rootkit ps sqlattack xterm",
}
GROUP_OF = {"normal": "normal"}
GROUP_OF.update({a: g for g, names in README_GROUPS.items()
                 for a in names.split()})

needs_data = pytest.mark.skipif(
    not (G5 / "Test_Data.csv").is_file()
    or not (NSL / "KDDTest+.txt").is_file(),
    reason="shared data bundle not present")


def _raw_5g(name):
  with open(G5 / name, newline="") as fh:
    header = next(csv.reader(fh))
  return header, np.loadtxt(G5 / name, delimiter=",", skiprows=1)


def _value_sets_disjoint(col, y):
  """True when no value of ``col`` occurs with both labels (perfect lookup)."""
  seen = collections.defaultdict(set)
  for v, label in zip(col.tolist(), y.tolist()):
    seen[v].add(label)
  return all(len(s) == 1 for s in seen.values())


def _threshold_separates(col, y):
  a, b = col[y == 0], col[y == 1]
  return a.max() < b.min() or b.max() < a.min()


@pytest.fixture(scope="module")
def g5():
  return tabular.load_5g_ids(G5)


@pytest.fixture(scope="module")
def g5_with_time():
  return tabular.load_5g_ids(G5, drop_time=False)


@pytest.fixture(scope="module")
def g5_raw():
  return tabular.load_5g_ids(G5, standardize=False)


@pytest.fixture(scope="module")
def g5_no_gtp():
  return tabular.load_5g_ids(G5, drop_gtp=True)


@pytest.fixture(scope="module")
def nsl():
  return tabular.load_nsl_kdd(NSL)


@pytest.fixture(scope="module")
def nsl_raw():
  return tabular.load_nsl_kdd(NSL, standardize=False)


# ----------------------------------------------------------------- 5G-IDS


@needs_data
def test_5g_counts_and_record(g5):
  assert isinstance(g5, Dataset)
  assert g5.name == "5g_ids" and g5.kind == "tabular"
  assert g5.class_names == ("normal", "attack") and g5.num_classes == 2
  # 30,288 concatenated rows -> 18,342 distinct (11,942 normal + 6,400 attack)
  assert g5.train_x.shape == (18342, 26)
  assert g5.test_x.shape == (3787, 26)
  assert g5.input_shape == (26,)
  assert np.bincount(g5.train_y).tolist() == [11942, 6400]
  assert np.bincount(g5.test_y).tolist() == [2987, 800]
  assert g5.train_x.dtype == np.float32 and g5.train_y.dtype == np.int32
  assert g5.mean.shape == g5.std.shape == (26,)
  assert len(g5.feature_names) == 26


@needs_data
def test_5g_without_dedupe_keeps_every_row():
  ds = tabular.load_5g_ids(G5, deduplicate=False)
  assert ds.train_x.shape == (30288, 26)
  assert np.bincount(ds.train_y).tolist() == [23888, 6400]


@needs_data
def test_5g_dropped_columns_are_the_notes_list(g5, g5_with_time):
  header, _ = _raw_5g("Test_Data.csv")
  features = [c for c in header if c != "label"]
  expected = [c for c in features
              if c not in NOTES_CONSTANT and c not in NOTES_GTP_COPIES]
  assert len(expected) == 28
  assert list(g5_with_time.feature_names) == expected
  assert list(g5.feature_names) == [c for c in expected if c not in TIME]
  assert "dropped 11 constant columns" in g5.source


@needs_data
def test_5g_subset_files_parse_alike():
  # Train_subset_2 writes "128" where the others write "128.0": parsed as
  # numbers, the shared normal rows must coincide.
  one = tabular.load_5g_ids(G5, train_files=("Train_subset_1.csv",),
                            drop_time=False, standardize=False)
  two = tabular.load_5g_ids(G5, train_files=("Train_subset_2.csv",),
                            drop_time=False, standardize=False)
  # Column cleaning is fitted per training set: in Train_subset_2 alone
  # gtp.ext_hdr equals ip.flags.df (its attack rows all have df = 0).
  assert set(one.feature_names) - set(two.feature_names) == {"gtp.ext_hdr"}
  common = [n for n in one.feature_names if n in two.feature_names]
  i1 = [one.feature_names.index(n) for n in common]
  i2 = [two.feature_names.index(n) for n in common]
  n1 = {r.tobytes() for r in one.train_x[one.train_y == 0][:, i1]}
  n2 = {r.tobytes() for r in two.train_x[two.train_y == 0][:, i2]}
  assert n1 == n2 and len(n1) == 11942


@needs_data
def test_5g_no_test_row_in_train():
  _, a = _raw_5g("Train_subset_1.csv")
  _, b = _raw_5g("Train_subset_2.csv")
  _, t = _raw_5g("Test_Data.csv")
  train = {r.tobytes() for r in np.concatenate([a, b])[:, :-1] + 0.0}
  assert not any(r.tobytes() in train for r in t[:, :-1] + 0.0)


@needs_data
def test_5g_overlapping_test_file_raises(tmp_path):
  shutil.copy(G5 / "Train_subset_1.csv", tmp_path / "Train_subset_1.csv")
  lines = (G5 / "Train_subset_1.csv").read_text().splitlines()
  test_lines = ([lines[0]] + (G5 / "Test_Data.csv").read_text()
                .splitlines()[1:50] + lines[100:103])
  (tmp_path / "Test_Data.csv").write_text("\n".join(test_lines) + "\n")
  with pytest.raises(ValueError, match="3 rows of Test_Data.csv"):
    tabular.load_5g_ids(tmp_path, train_files=("Train_subset_1.csv",))


def test_5g_missing_folder_says_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match="data_dir"):
    tabular.load_5g_ids(tmp_path / "nowhere")


@needs_data
def test_5g_env_var_sets_default_dir(monkeypatch, tmp_path):
  monkeypatch.setenv(tabular.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="COLLABDM_DATA_DIR"):
    tabular.load_5g_ids()
  monkeypatch.setenv(tabular.DATA_DIR_ENV, str(DATA))
  assert tabular.load_5g_ids().train_x.shape == (18342, 26)


@needs_data
def test_5g_standardisation_uses_train_statistics(g5, g5_raw):
  nonconst = g5_raw.train_x.std(0) > 0
  assert nonconst.all()  # constants were dropped
  np.testing.assert_allclose(g5.train_x.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(g5.train_x.std(0), 1.0, atol=1e-4)
  # The test split is standardised with train statistics, so it is not
  # exactly centred.
  assert np.abs(g5.test_x.mean(0)).max() > 0.05
  # Recomputing from the raw training rows reproduces mean/std.
  raw_train = g5_raw.train_x.astype(np.float64)
  np.testing.assert_allclose(g5.mean, raw_train.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g5.std, raw_train.std(0), rtol=1e-5)
  both = np.concatenate([raw_train, g5_raw.test_x])
  assert not np.allclose(g5.mean, both.mean(0), rtol=1e-4)
  np.testing.assert_allclose((g5_raw.test_x - g5.mean) / g5.std, g5.test_x,
                             atol=1e-4)
  # float32 rounding of z times a std of ~1e9 (tcp.ack_raw): compare in
  # units of std.
  back = (g5.denormalize(g5.train_x) - g5_raw.train_x) / g5.std
  assert np.abs(back).max() < 1e-5
  assert np.all(g5_raw.mean == 0) and np.all(g5_raw.std == 1)


@needs_data
def test_5g_drop_gtp_removes_every_single_column_shortcut(g5, g5_no_gtp):
  # With GTP columns a single column separates the classes perfectly.
  flags = g5.feature_names.index("gtp.flags")
  assert _value_sets_disjoint(g5.train_x[:, flags], g5.train_y)
  names = g5_no_gtp.feature_names
  assert not any(n.startswith("gtp.") for n in names)
  assert "udp.port" not in names and "udp.length" not in names
  assert len(names) == 18
  assert set(g5.feature_names) - set(names) == {
      "udp.port", "udp.length", "gtp.ext_hdr",
      "gtp.ext_hdr.pdu_ses_con.pdu_type", "gtp.flags", "gtp.length",
      "gtp.message", "gtp.teid"}
  for j, name in enumerate(names):
    col = g5_no_gtp.train_x[:, j]
    assert not _value_sets_disjoint(col, g5_no_gtp.train_y), name
    assert not _threshold_separates(col, g5_no_gtp.train_y), name
  assert "udp.port, udp.length" in g5_no_gtp.source
  assert g5_no_gtp.train_x.shape == (18342, 18)


def test_separating_columns_helper():
  x = np.array([[1, 5, 0], [1, 6, 1], [2, 5, 2], [2, 7, 3]], float)
  y = np.array([0, 0, 1, 1])
  np.testing.assert_array_equal(tabular.separating_columns(x, y),
                                [True, False, True])
  assert not tabular.separating_columns(x, np.zeros(4)).any()


# ---------------------------------------------------------------- NSL-KDD


def _nsl_rows(name):
  with open(NSL / name, newline="") as fh:
    return list(csv.reader(fh))


@needs_data
def test_nsl_counts_and_grouping(nsl):
  assert nsl.name == "nsl_kdd" and nsl.kind == "tabular"
  assert nsl.class_names == ("normal", "DoS", "Probe", "R2L", "U2R")
  assert nsl.train_x.shape[0] == 25192 and nsl.test_x.shape[0] == 22544
  train_counts = np.bincount(nsl.train_y, minlength=5).tolist()
  # normal 13,449; DoS = neptune 8282 + smurf 529 + back 196 + teardrop 188
  # + pod 38 + land 1; Probe = ipsweep 710 + satan 691 + portsweep 587 +
  # nmap 301.
  assert train_counts[:3] == [13449, 9234, 2289]
  for rows, y in ((_nsl_rows("KDDTrain+_20Percent.txt"), nsl.train_y),
                  (_nsl_rows("KDDTest+.txt"), nsl.test_y)):
    groups = collections.Counter(GROUP_OF[r[41]] for r in rows)
    got = np.bincount(y, minlength=5)
    assert [groups[c] for c in nsl.class_names] == got.tolist()
  assert train_counts == [13449, 9234, 2289, 209, 11]


@needs_data
def test_nsl_test_only_attacks_are_grouped(nsl):
  rows = _nsl_rows("KDDTest+.txt")
  train_names = {r[41] for r in _nsl_rows("KDDTrain+_20Percent.txt")}
  test_only = [i for i, r in enumerate(rows) if r[41] not in train_names]
  assert len(test_only) > 0
  apache = [i for i, r in enumerate(rows) if r[41] == "apache2"]
  assert apache and np.all(nsl.test_y[apache] == 1)  # DoS
  xterm = [i for i, r in enumerate(rows) if r[41] == "xterm"]
  assert xterm and np.all(nsl.test_y[xterm] == 4)  # U2R


@needs_data
def test_nsl_attack_names_align_with_labels(nsl):
  train_names, test_names = tabular.load_nsl_kdd_attack_names(NSL)
  assert train_names.shape == nsl.train_y.shape
  assert test_names.shape == nsl.test_y.shape
  # Row i's name groups to row i's label, in both files.
  for names, y in ((train_names, nsl.train_y), (test_names, nsl.test_y)):
    groups = np.asarray([nsl.class_names.index(GROUP_OF[n]) for n in names])
    np.testing.assert_array_equal(groups, y)
  assert collections.Counter(train_names.tolist())["neptune"] == 8282
  assert train_names[0] == _nsl_rows("KDDTrain+_20Percent.txt")[0][41]
  assert test_names[-1] == _nsl_rows("KDDTest+.txt")[-1][41]


@needs_data
def test_nsl_binary_grouping():
  ds = tabular.load_nsl_kdd(NSL, grouping="binary")
  assert ds.class_names == ("normal", "attack")
  assert np.bincount(ds.train_y).tolist() == [13449, 25192 - 13449]
  assert np.bincount(ds.test_y).tolist() == [9711, 22544 - 9711]


@needs_data
def test_nsl_one_hot_width_and_unseen_category(nsl, nsl_raw):
  names = nsl.feature_names
  # 38 numeric + one-hot: 3 protocols, 66 services, 11 flags seen in train.
  assert nsl.input_shape == (118,) and len(names) == 118
  for col, width in (("protocol_type", 3), ("service", 66), ("flag", 11)):
    block = [j for j, n in enumerate(names) if n.startswith(col + "=")]
    assert len(block) == width
    assert block == list(range(block[0], block[0] + width))  # in place
    np.testing.assert_array_equal(nsl_raw.train_x[:, block].sum(1), 1.0)
  assert names[:5] == ("duration", "protocol_type=icmp", "protocol_type=tcp",
                       "protocol_type=udp", "service=IRC")
  service = [j for j, n in enumerate(names) if n.startswith("service=")]
  rows = _nsl_rows("KDDTest+.txt")
  unseen = [i for i, r in enumerate(rows) if r[2] == "tftp_u"]
  assert len(unseen) == 1
  assert nsl_raw.test_x[unseen][:, service].sum() == 0
  assert np.sum(nsl_raw.test_x[:, service].sum(1) == 0) == 1
  assert "service: 1" in nsl.source


@needs_data
def test_nsl_log_transform_and_train_statistics(nsl, nsl_raw):
  rows = _nsl_rows("KDDTrain+_20Percent.txt")
  j = nsl.feature_names.index("src_bytes")
  src = np.array([float(r[4]) for r in rows])
  np.testing.assert_allclose(nsl_raw.train_x[:, j], np.log1p(src), rtol=1e-6)
  plain = tabular.load_nsl_kdd(NSL, standardize=False, log_transform=False)
  np.testing.assert_allclose(plain.train_x[:, j], src, rtol=1e-6)
  const = nsl_raw.train_x.std(0) == 0  # e.g. num_outbound_cmds
  assert const.any() and np.all(nsl.std[const] == 1)
  np.testing.assert_allclose(nsl.train_x.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(nsl.train_x.std(0)[~const], 1.0, atol=1e-3)
  np.testing.assert_allclose(nsl.mean, nsl_raw.train_x.astype(np.float64)
                             .mean(0), rtol=1e-5, atol=1e-6)


@needs_data
def test_nsl_unknown_attack_and_bad_grouping(tmp_path):
  shutil.copy(NSL / "KDDTrain+_20Percent.txt", tmp_path)
  lines = (NSL / "KDDTest+.txt").read_text().splitlines()[:20]
  fields = lines[3].split(",")
  fields[41] = "zeroday"
  lines[3] = ",".join(fields)
  (tmp_path / "KDDTest+.txt").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match="zeroday"):
    tabular.load_nsl_kdd(tmp_path)
  with pytest.raises(ValueError, match="grouping"):
    tabular.load_nsl_kdd(NSL, grouping="3class")


# ------------------------------------------------------------ generic CSV


def _write(path, header, rows):
  path.write_text("\n".join([",".join(header)]
                            + [",".join(map(str, r)) for r in rows]) + "\n")
  return path


def _toy_rows(n_per_class=(30, 20, 10)):
  rng = np.random.default_rng(0)
  rows = []
  for label, n in zip(("setosa", "virginica", "versicolor"), n_per_class):
    for _ in range(n):
      rows.append([round(float(rng.normal()), 6), round(float(rng.normal()), 6),
                   rng.choice(["a", "b", "c"]), label, "ignored"])
  return rows


def test_csv_string_labels_split_and_one_hot(tmp_path):
  rows = _toy_rows()
  rows.append(list(rows[0]))  # an exact duplicate row
  path = _write(tmp_path / "toy.csv", ["x1", "x2", "kind", "species", "id"],
                rows)
  ds = tabular.load_csv_dataset(path, label_column="species",
                                categorical_columns=["kind"],
                                drop_columns=["id"], test_fraction=0.2, seed=3,
                                name="toy")
  assert ds.name == "toy" and ds.kind == "tabular"
  assert ds.class_names == ("setosa", "versicolor", "virginica")
  assert ds.feature_names == ("x1", "x2", "kind=a", "kind=b", "kind=c")
  assert ds.train_x.shape[0] + ds.test_x.shape[0] == 60  # duplicate dropped
  assert np.bincount(ds.test_y).tolist() == [6, 2, 4]
  assert np.bincount(ds.train_y).tolist() == [24, 8, 16]
  np.testing.assert_allclose(ds.train_x.mean(0), 0.0, atol=1e-5)
  again = tabular.load_csv_dataset(path, label_column="species",
                                   categorical_columns=["kind"],
                                   drop_columns=["id"], test_fraction=0.2,
                                   seed=3)
  np.testing.assert_array_equal(ds.test_x, again.test_x)
  raw = tabular.load_csv_dataset(path, label_column="species",
                                 categorical_columns=["kind"],
                                 drop_columns=["id"], standardize=False,
                                 seed=3)
  np.testing.assert_array_equal(raw.train_x[:, 2:].sum(1), 1.0)


def test_csv_missing_values_are_reported(tmp_path):
  rows = _toy_rows((4, 4, 4))
  rows[1][0] = ""
  rows[2][0] = "NA"
  rows[5][1] = "?"
  path = _write(tmp_path / "gaps.csv", ["x1", "x2", "kind", "species", "id"],
                rows)
  with pytest.raises(ValueError) as err:
    tabular.load_csv_dataset(path, label_column="species",
                             categorical_columns=["kind"], drop_columns=["id"])
  msg = str(err.value)
  assert "'x1' (2 rows)" in msg and "'x2' (1 rows)" in msg
  assert "3 rows affected" in msg


def test_csv_undeclared_text_column_raises(tmp_path):
  path = _write(tmp_path / "t.csv", ["x1", "x2", "kind", "species", "id"],
                _toy_rows((4, 4, 4)))
  with pytest.raises(ValueError, match="'kind'.*categorical_columns"):
    tabular.load_csv_dataset(path, label_column="species",
                             drop_columns=["id"])
  with pytest.raises(ValueError, match="label_column 'nope'"):
    tabular.load_csv_dataset(path, label_column="nope")


def test_csv_test_file_numeric_labels_and_unseen(tmp_path):
  header = ["f", "g", "y"]
  train = _write(tmp_path / "train.csv", header,
                 [[1, 0, 10], [2, 1, 2], [3, 0, 10], [4, 1, 2], [5, 5, 2]])
  test = _write(tmp_path / "test.csv", ["y", "g", "f"],
                [[2, 1, 7], [10, 9, 9], [10, 0, 1.0]])
  ds = tabular.load_csv_dataset(train, label_column="y", test_path=test)
  assert ds.class_names == ("2", "10")  # numeric order, not "10" < "2"
  np.testing.assert_array_equal(ds.train_y, [1, 0, 1, 0, 0])
  np.testing.assert_array_equal(ds.test_y, [0, 1, 1])
  np.testing.assert_allclose(ds.mean, [3.0, 1.4], rtol=1e-6)
  np.testing.assert_allclose(ds.test_x[1], ([9, 9] - ds.mean) / ds.std,
                             rtol=1e-5)
  assert "1 test rows also in train" in ds.source  # "1.0" equals "1"
  bad = _write(tmp_path / "bad.csv", header, [[1, 1, 7]])
  with pytest.raises(ValueError, match=r"\['7'\]"):
    tabular.load_csv_dataset(train, label_column="y", test_path=bad)


# ------------------------------------------------ split and image reshaping


def test_stratified_split_keeps_proportions_and_is_deterministic():
  labels = np.repeat([2, 0, 1], [100, 50, 10])
  tr, te = tabular.stratified_split(labels, 0.2, seed=7)
  assert np.bincount(labels[te]).tolist() == [10, 2, 20]
  assert np.bincount(labels[tr]).tolist() == [40, 8, 80]
  assert np.intersect1d(tr, te).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])),
                                np.arange(160))
  tr2, te2 = tabular.stratified_split(labels, 0.2, seed=7)
  np.testing.assert_array_equal(te, te2)
  np.testing.assert_array_equal(tr, tr2)
  _, te3 = tabular.stratified_split(labels, 0.2, seed=8)
  assert not np.array_equal(te, te3)
  # A singleton class stays in train.
  tr4, te4 = tabular.stratified_split(np.array([0, 0, 0, 0, 1]), 0.5, seed=0)
  assert 4 in tr4 and te4.size == 2


@pytest.mark.parametrize("kwargs", [dict(test_fraction=0.0),
                                    dict(test_fraction=1.0),
                                    dict(seed=-1), dict(seed=1.5)])
def test_stratified_split_rejects_bad_arguments(kwargs):
  args = dict(test_fraction=0.2, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError):
    tabular.stratified_split(np.arange(10) % 2, **args)


def test_features_as_images():
  x = np.random.default_rng(0).normal(size=(5, 26))  # 5G: 26 features -> 6x6
  imgs = tabular.features_as_images(x)
  assert imgs.shape == (5, 6, 6, 1) and imgs.dtype == np.float32
  flat = imgs.reshape(5, 36)
  np.testing.assert_array_equal(flat[:, :26], x.astype(np.float32))
  np.testing.assert_array_equal(imgs[:, 0, :, 0], x[:, :6].astype(np.float32))
  assert np.all(flat[:, 26:] == 0)
  assert tabular.features_as_images(np.ones((2, 16))).shape == (2, 4, 4, 1)
  big = tabular.features_as_images(np.ones((3, 16)), side=8)
  assert big.shape == (3, 8, 8, 1) and big.sum() == 48
  with pytest.raises(ValueError, match="side"):
    tabular.features_as_images(np.ones((2, 26)), side=5)
  with pytest.raises(ValueError):
    tabular.features_as_images(np.ones(26))
