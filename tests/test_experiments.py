"""The paper's ablations (labor_jax.experiments): ``--quick`` end to end in a subprocess, the table's rows
and columns, the paired differences against the per-run perplexities, and the check that stops when a
variant's test split holds other transitions."""

import json
import math
import os
import subprocess
import sys

import pytest

from data_pipeline.dataset_dir import DatasetDir
from labor_jax import evaluation
from labor_jax.cli import experiments
from tests.runs import ROOT, cpu_env


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("experiments") / "out"
  cmd = [sys.executable, "-m", "labor_jax.experiments", "--quick", "--out", str(out), "--bootstrap", "200"]
  p = subprocess.run(cmd, cwd=ROOT, env=_cached_env(), capture_output=True, text=True, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  return out, p.stdout


def _cached_env():
  """One CPU device, and every compiled program written to the run's compilation cache (tests/conftest.py),
  however quick to compile: the runs with the same shapes (most variants) share their compiled steps
  (about 100 -> 70 s on 2 cores)."""
  return cpu_env(1)


def test_quick_table_has_every_variant_and_column(quick):
  out, stdout = quick
  lines = (out / "table.md").read_text().splitlines()
  header = next(line for line in lines if line.startswith("| variant"))
  assert [c.strip() for c in header.strip("|").split("|")] == [
      "variant", "perplexity (1 seed)", "log-ppl difference to main [95% CI]", "the paper found", "we found"]
  rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| variant", "| ---"))]
  assert [r.split("|")[1].strip() for r in rows] == [v.name for v in (experiments.MAIN, *experiments.VARIANTS)]
  for r in rows[1:]:
    cells = [c.strip() for c in r.strip("|").split("|")]
    assert len(cells) == 5 and "[" in cells[2] and cells[3] and cells[4].endswith("zero")
  assert "not reported" in next(r for r in rows if r.startswith("| without birth year"))
  assert "| variant" in stdout and "Machine:" in stdout


def test_quick_differences_are_paired_log_perplexities(quick):
  out, _ = quick
  s = json.loads((out / "summary.json").read_text())
  assert s["quick"] and s["seeds"] == 1 and s["transitions"] > 0 and s["workers"] > 0
  main = s["variants"]["main"]
  for key, r in s["variants"].items():
    assert len(r["runs"]) == 1 and (out / key / "seed0" / "summary.json").exists()
    if key == "main":
      continue
    # one seed: the seed-averaged difference is the difference of the two runs' log perplexities
    assert r["log_ppl_diff"] == pytest.approx(math.log(r["perplexity_mean"]) - math.log(main["perplexity_mean"]),
                                              abs=1e-6)
    lo, hi = r["log_ppl_diff_ci"]
    assert lo <= r["log_ppl_diff"] <= hi and r["excludes_zero"] == (lo > 0 or hi < 0)


def test_transitions_must_match(quick):
  out, _ = quick
  main = DatasetDir(out / "data")
  ref = evaluation.transitions_of(main, main.datasets)
  pooled = evaluation.transitions_of(DatasetDir(out / "data_pooled"), main.datasets)
  evaluation.check_same_transitions(ref, pooled, "pooled")  # NLSY's workers keep their split when pooled
  with pytest.raises(RuntimeError, match="other transitions"):
    evaluation.check_same_transitions(ref, ref.iloc[1:].reset_index(drop=True), "one transition short")
  moved = ref.copy()
  moved.loc[0, "occ"] = (moved.loc[0, "occ"] + 1) % 9
  with pytest.raises(RuntimeError, match="other transitions"):
    evaluation.check_same_transitions(ref, moved, "another occupation")
