"""sha256 of every array of runs' synthetic.npz, and their accuracies.

  python experiments/results/redesign_equivalence/digest.py WORKDIR...

Prints one JSON document: per workdir, each array's sha256 (of its dtype,
shape and bytes) and the accuracies from results.json.
"""

import hashlib
import json
import pathlib

from absl import app
import numpy as np


def digest(workdir):
  """``{array name: sha256, "accuracies": [...], "accuracy_mean": m}``."""
  w = pathlib.Path(workdir)
  out = {}
  with np.load(w / "synthetic.npz") as z:
    for name in sorted(z.files):
      a = z[name]
      out[name] = hashlib.sha256(a.dtype.str.encode() + str(a.shape).encode()
                                 + a.tobytes()).hexdigest()
  results = json.loads((w / "results.json").read_text())
  out["accuracies"] = results["accuracies"]
  out["accuracy_mean"] = results["accuracy_mean"]
  return out


def main(argv):
  print(json.dumps({w: digest(w) for w in argv[1:]}, indent=1))


if __name__ == "__main__":
  app.run(main)
