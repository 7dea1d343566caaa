"""Configs are complete and locked: default.py declares (with a comment)
every field a run reads, other config files only set declared fields, and
a typo in a command-line override fails before anything runs."""

import ast
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from experiments.configs import ablations
from experiments.configs import authors
from experiments.configs import config_args
from experiments.configs import default
from experiments.configs import fidelity
from experiments.configs import fmnist_table
from experiments.configs import fmnist_table_paper
from experiments.configs import ids_5g
from experiments.configs import ids_table
from experiments.configs import nsl_kdd
from experiments.configs import reference
from experiments.configs import reference_table
from experiments.configs import smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Keyword arguments of a loader or an architecture: their fields depend on
# which one a config names, so default.py cannot declare them all.
FREE_FORM = ("data_kwargs", "model", "eval.model_kwargs")


def leaves(config, prefix=""):
  for k, v in config.items():
    path = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict) and not any(
        path == f for f in FREE_FORM):
      yield from leaves(v, path + ".")
    else:
      yield path


def run_configs():
  """Every committed run config, and the base of every sweep config."""
  out = {"smoke": smoke.get_config(), "reference": reference.get_config(),
         "authors": authors.get_config(), "ids_5g": ids_5g.get_config(),
         "ids_5g_image": ids_5g.get_config("as_image,tabular_aug"),
         "nsl_kdd": nsl_kdd.get_config("binary"),
         "authors_aug_cifar10": authors.get_config("aug,cifar10")}
  sweeps = {"fmnist_table": fmnist_table.get_config(),
            "fmnist_table_paper": fmnist_table_paper.get_config(),
            "ids_table": ids_table.get_config("nsl_kdd"),
            "reference_table": reference_table.get_config("main"),
            "fidelity": fidelity.get_config(fidelity.SETTINGS[0])}
  sweeps.update({f"ablation_{a}": ablations.get_config(a)
                 for a in ablations.ABLATIONS})
  out.update({f"{k}.base": v.base for k, v in sweeps.items()})
  return out


def test_config_files_set_only_declared_fields():
  declared = set(leaves(default.get_config()))
  for name, config in run_configs().items():
    extra = sorted(set(leaves(config)) - declared)
    assert not extra, f"{name} sets fields default.py does not declare: {extra}"


def test_default_declares_every_field_with_a_comment():
  """Each ``c.path = value`` of default.py has a comment on its line or in
  the comment block just above it (blocks of fields share a comment)."""
  lines = (ROOT / "experiments" / "configs" / "default.py").read_text(
      ).splitlines()
  tree = ast.parse("\n".join(lines))
  bare = []
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Assign) and
            isinstance(node.targets[0], ast.Attribute)):
      continue
    if (isinstance(node.value, ast.Call) and
        getattr(node.value.func, "attr", "") == "ConfigDict"):
      continue  # a block, not a field
    i = node.lineno - 1
    if "#" in lines[i]:
      continue
    above = i - 1
    # Fields in a run under one comment: walk up over uncommented fields.
    while above >= 0 and lines[above].strip().startswith("c.") and \
        "#" not in lines[above]:
      above -= 1
    if not (above >= 0 and lines[above].strip().startswith("#")):
      bare.append(lines[i].strip())
  assert not bare, f"fields without a comment: {bare}"


def test_every_config_flag_is_locked():
  unlocked = []
  for path in sorted(list((ROOT / "launch").glob("*.py")) +
                     list((ROOT / "experiments").glob("*.py"))):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and
          getattr(node.func, "attr", "") == "DEFINE_config_file"):
        kw = {k.arg: k.value for k in node.keywords}
        if not (isinstance(kw.get("lock_config"), ast.Constant) and
                kw["lock_config"].value is True):
          unlocked.append(f"{path.relative_to(ROOT)}:{node.lineno}")
  assert not unlocked, f"config flags without lock_config=True: {unlocked}"


def test_an_override_typo_fails_before_the_run(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.distill",
       "--config=experiments/configs/smoke.py", f"--workdir={tmp_path}",
       "--config.num_iteration=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "num_iteration" in proc.stderr
  assert not (tmp_path / "config.json").exists()  # nothing started


def test_arg_parsers_name_the_bad_value():
  assert config_args.parse_arg("a, b", ("a", "b", "c")) == {"a", "b"}
  assert config_args.parse_arg("", ("a",)) == set()
  with pytest.raises(ValueError, match=r"\['d'\] are unknown"):
    config_args.parse_arg("a,d", ("a", "b"))
  assert config_args.one_of(" ipc ", ("main", "ipc"), "part") == "ipc"
  with pytest.raises(ValueError, match="part must be one of.*'x'"):
    config_args.one_of("x", ("main", "ipc"), "part")
  with pytest.raises(ValueError, match="ablation must be one of"):
    ablations.get_config("nothing")
