"""Regenerates the Fashion-MNIST subset embedded in ``collabdm_jax/data/embedded``.

Selection rule: for every class, the first k images of that class in file
order (k = --train-per-class of the official training file, --test-per-class of
the official test file); the chosen images keep their relative file order.
Output: the four standard IDX file names, gzip level 9 with mtime 0 and no
stored file name (so the bytes, and their sha256s, are reproducible), plus a
README.md with provenance, licence, counts and checksums.

Usage (from the repository root, after `apt-get install dataset-fashion-mnist`):

    .venv/bin/python experiments/make_embedded_subset.py
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
from pathlib import Path

from absl import app
from absl import flags
import numpy as np

from collabdm_jax.data.images import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    IDX_FILES,
    class_balanced_indices,
    load_idx_folder,
    write_idx,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "collabdm_jax" / "data" / "embedded"
PACKAGE = "dataset-fashion-mnist"
# The version this subset was made from; used when dpkg cannot be asked.
KNOWN_VERSION = "0.0~git20200523.55506a9-1"

EXPAT = """\
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of
the Software, and to permit persons to whom the Software is furnished to do so,
subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS
FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."""


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _package_version() -> str:
  if shutil.which("dpkg-query") is None:
    return KNOWN_VERSION
  result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE],
                          capture_output=True, text=True, check=False)
  return result.stdout.strip() or KNOWN_VERSION


def _counts_table(train_y: np.ndarray, test_y: np.ndarray) -> str:
  rows = ["| id | class | train | test |", "|---|---|---|---|"]
  for c, name in enumerate(FASHION_MNIST_CLASSES):
    rows.append(f"| {c} | {name} | {int((train_y == c).sum())} | {int((test_y == c).sum())} |")
  rows.append(f"| | total | {train_y.size} | {test_y.size} |")
  return "\n".join(rows)


def build(source: Path, out: Path, train_per_class: int, test_per_class: int) -> dict:
  """Writes the subset and its README; returns {file name: sha256}."""
  train_x, train_y, test_x, test_y = load_idx_folder(source)
  keep_train = class_balanced_indices(train_y, train_per_class)
  keep_test = class_balanced_indices(test_y, test_per_class)
  arrays = {
      "train_images": train_x[keep_train, ..., 0],
      "train_labels": train_y[keep_train].astype(np.uint8),
      "test_images": test_x[keep_test, ..., 0],
      "test_labels": test_y[keep_test].astype(np.uint8),
  }
  out.mkdir(parents=True, exist_ok=True)
  shipped = {}
  for key, array in arrays.items():
    name = IDX_FILES[key] + ".gz"
    data = gzip.compress(write_idx(array), compresslevel=9, mtime=0)
    (out / name).write_bytes(data)
    shipped[name] = (_sha256(data), len(data))

  source_sums = {}
  for stem in IDX_FILES.values():
    path = source / (stem + ".gz")
    if not path.is_file():
      path = source / stem
    source_sums[path.name] = _sha256(path.read_bytes())

  total = sum(size for _, size in shipped.values())
  sums = "\n".join(f"{digest}  {name}" for name, (digest, _) in shipped.items())
  sizes = "\n".join(f"| `{name}` | {size:,} |" for name, (_, size) in shipped.items())
  src_sums = "\n".join(f"{digest}  {name}" for name, digest in source_sums.items())
  first_train = ", ".join(str(i) for i in keep_train[:5])
  readme = f"""# Embedded Fashion-MNIST subset

`load_dataset("fashion_mnist_embedded")` reads these files (installed as package
data, read with `importlib.resources`), so the package has a real image dataset
without any download or system package.

## Provenance

- Data: Fashion-MNIST, Zalando Research (https://github.com/zalandoresearch/fashion-mnist),
  28x28 greyscale images of Zalando articles in 10 classes.
- Taken from the Debian package `{PACKAGE}` version `{_package_version()}`, files in
  `{source}`.
- sha256 of the source files used:

```
{src_sums}
```

## Selection rule

For each class, the first {train_per_class} training images and the first {test_per_class}
test images of that class in file order (official training file for train, official
`t10k` file for test). Selected images keep their relative file order; pixels and labels
are unchanged. Training indices begin {first_train}, ... of the official 60,000.
Regenerate with `python experiments/make_embedded_subset.py` (byte-identical output).

## Counts

{_counts_table(arrays["train_labels"], arrays["test_labels"])}

## Files

Standard IDX format (big-endian header: magic 0x00000803 images / 0x00000801 labels, then
one uint32 per dimension, then uint8 data), gzip level 9 with mtime 0 and no stored name.

| file | bytes |
|---|---|
{sizes}

Total {total:,} bytes. Checksums (`sha256sum -c` from this folder; this README is not listed):

```
{sums}
```

## Licence

Fashion-MNIST is released under the MIT licence (Debian: `License: Expat`). Copyright
line from the package's `/usr/share/doc/{PACKAGE}/copyright`:
`Copyright: 2017, Zalando SE, https:tech.zalando.com` (quoted as written there).
Licence text (Expat):

{EXPAT}
"""
  (out / "README.md").write_text(readme)
  return {name: digest for name, (digest, _) in shipped.items()}


_SOURCE = flags.DEFINE_string(
    "source", str(DEBIAN_FASHION_MNIST_DIR),
    "folder with the four Fashion-MNIST IDX files")
_OUT = flags.DEFINE_string("out", str(DEFAULT_OUT), "where the subset goes")
_TRAIN = flags.DEFINE_integer("train-per-class", 500,
                              "training images per class", lower_bound=1)
_TEST = flags.DEFINE_integer("test-per-class", 100, "test images per class",
                             lower_bound=1)


def main(argv) -> None:
  del argv  # every argument is a flag
  out = Path(_OUT.value)
  sums = build(Path(_SOURCE.value), out, _TRAIN.value, _TEST.value)
  for name, digest in sums.items():
    print(f"{digest}  {out / name}")


if __name__ == "__main__":
  app.run(main)
