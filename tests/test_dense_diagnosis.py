"""The DENSE diagnosis program's settings and its summary tables."""

import json

import pytest

from collabdm_jax.baselines import dense
from experiments import dense_diagnosis as diag


def test_settings_of_each_variant():
  c = diag.base_config(3, 32, 200, 100)
  assert (c.seed, c.partition.seed, c.partition.num_clients) == (3, 3, 5)
  assert c.partition.alpha == 0.5 and c.eval.model_kwargs.width == 32
  assert c.data_kwargs.max_train_per_class == 200
  table = diag.teacher_config(c, "bn_table")
  assert table.baseline.net_norm == "batchnorm"
  assert table.baseline.local_val_fraction == 0.0
  assert tuple(table.baseline.local_lrs) == (0.01,)
  assert table.baseline.local_epochs == 3
  selected = diag.teacher_config(c, "in_selected")
  assert selected.baseline.net_norm is None
  assert selected.baseline.local_val_fraction == 0.15
  assert c.baseline.local_epochs != 3  # the input config is left alone
  names = [r[0] for r in diag.DENSE_RUNS]
  assert len(set(names)) == len(names)
  # The BatchNorm prior only ever runs with BatchNorm teachers.
  assert all(t.startswith("bn") for _, t, _, w, _ in diag.DENSE_RUNS
             if w["bn"] > 0)
  runs = {r[0]: r[1:] for r in diag.DENSE_RUNS}
  assert {r[4] for r in diag.DENSE_RUNS} == set(dense.ENSEMBLES)
  # The probability-ensemble run differs from its reference run only there.
  probs = runs["in_selected_scaled_nodiv_probs"]
  assert probs[:3] == runs["in_selected_scaled_nodiv"][:3]
  assert (probs[3], runs["in_selected_scaled_nodiv"][3]) == ("probs",
                                                             "logits")


def _dense_row(seed, name, student, fedavg, ensemble):
  return {"study": "dense", "seed": seed, "name": name, "teachers": "t",
          "weights": {"bn": 0.0, "div": 0.0},
          "settings": {"epochs": 30, "g_steps": 10, "synthesis_batch": 64},
          "student_accuracy": student, "fedavg_accuracy": fedavg,
          "ensemble_accuracy": ensemble, "agreement_with_ensemble": 0.8,
          "server_wall_s": 1.0}


def test_summary_pairs_student_and_fedavg_per_seed(tmp_path):
  rows = [_dense_row(0, "a", 0.60, 0.50, 0.70),
          _dense_row(1, "a", 0.50, 0.52, 0.55),
          _dense_row(0, "b", 0.20, 0.50, 0.70)]
  (tmp_path / "dense.json").write_text(json.dumps({"rows": rows}))
  text = diag.summarize(tmp_path)
  assert (tmp_path / "summary.md").read_text() == text
  line_a = next(l for l in text.splitlines() if l.startswith("| a | 0, 1 |"))
  assert "+10.0 -2.0" in line_a and "| +4.0 |" in line_a
  ratio = (0.60 / 0.70 + 0.50 / 0.55) / 2
  assert line_a.endswith(f"| {ratio:.2f} |")
  assert any(l.startswith("| b | 0 | -30.0 | -30.0 |")
             for l in text.splitlines())
  # Rows without an ensemble (written before the choice) distilled the
  # logit mean.
  assert ("| 0 | a | t | 30 x 10 x 64 | 0 / 0 | logits | 60.0 | 50.0 | "
          "70.0 |") in text
  rows[2]["ensemble"] = "probs"
  (tmp_path / "dense.json").write_text(json.dumps({"rows": rows}))
  assert "| 0 | b | t | 30 x 10 x 64 | 0 / 0 | probs | 20.0 |" in (
      diag.summarize(tmp_path))


def test_unknown_teachers_are_refused():
  with pytest.raises(ValueError, match="gn_selected"):
    diag.teacher_config(diag.base_config(0, 8, 10, 10), "gn_selected")
