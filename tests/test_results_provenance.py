"""Every committed result file says how it was made (issue 13, item 3).

A JSON file under ``experiments/results/`` (other than a sweep's
``cell.json``, which only names its cell) must hold at least one
``provenance`` record, and every record in it must be complete
(``provenance.missing``). Files made before the full record existed, and
that cannot be remade here, are listed in ``LEGACY`` with the reason; the
test also fails when a listed file no longer lacks anything (or is gone),
so the list only shrinks.
"""

import fnmatch
import json
import pathlib
import subprocess

from collabdm_jax import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]

# pattern -> why its files' records are incomplete and stay so.
LEGACY = {
    "experiments/results/bench_gpu.json":
        "made on a lent GPU before versions and peak RSS were recorded; "
        "record added by hand from BENCH.md",
    "experiments/results/sampling_probe_gpu.json":
        "made on a lent GPU before versions and peak RSS were recorded",
    "experiments/results/gpu_profile/run*/reference_gpu.json":
        "made on a lent GPU by reference_bench's earlier layout (git, "
        "command, environment, load, peak RSS at the top level)",
    "experiments/results/bench.json":
        "the CPU benchmark suite before versions and peak RSS were in the "
        "record; record added by hand from BENCH.md",
    "experiments/results/reference/reference*.json":
        "reference_bench's earlier layout (git, command, environment, load, "
        "peak RSS at the top level; no jaxlib/flax/optax versions); these "
        "are the timed runs the speed issue was closed on",
    "experiments/results/fmnist_table/cells/method=*/results.json":
        "the single-seed CPU-sized table of 2026-11-25, before peak RSS was "
        "recorded (record added from its README); superseded cells, kept "
        "because the README compares against them",
    "experiments/results/redesign_equivalence/digests.json":
        "a comparison of two commits' outputs, each named in the file; "
        "made by its digest.py, which records no machine",
}


def result_files():
  out = subprocess.run(["git", "ls-files", "experiments/results"], cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout
  return [p for p in out.split() if p.endswith(".json")
          and not p.endswith("/cell.json")]


def records(doc):
  """Every ``provenance`` record anywhere in a JSON document."""
  if isinstance(doc, dict):
    if isinstance(doc.get("provenance"), dict):
      yield doc["provenance"]
    for k, v in doc.items():
      if k != "provenance":
        yield from records(v)
  elif isinstance(doc, list):
    for v in doc:
      yield from records(v)


def gaps(path):
  """What the file's records lack ([] when complete)."""
  found = list(records(json.loads((ROOT / path).read_text())))
  if not found:
    return ["no provenance record"]
  return sorted({m for r in found for m in provenance.missing(r)})


def legacy_reason(path):
  for pattern, why in LEGACY.items():
    if fnmatch.fnmatch(path, pattern):
      return why
  return None


def test_every_result_file_records_how_it_was_made():
  files = result_files()
  assert len(files) > 50
  found = {p: gaps(p) for p in files if not legacy_reason(p)}
  incomplete = {p: g for p, g in found.items() if g}
  assert not incomplete, incomplete


def test_the_legacy_list_is_exact():
  files = result_files()
  for pattern in LEGACY:
    matched = fnmatch.filter(files, pattern)
    assert matched, f"{pattern}: no committed file matches; drop it"
    complete = [p for p in matched if not gaps(p)]
    assert not complete, (
        f"{pattern}: now complete, drop from LEGACY: {complete}")
