"""The main job (``python -m labor_jax.main``): ``--quick`` end to end in a subprocess on a tiny random
Hugging Face model in place of SmolLM2 (``tiny_hf`` in tests/conftest.py; the same path: data with the model's
tokenizer, the fine-tune by ``configs/main/smollm2.yaml``, the from-scratch model, scoring and the table), and
the recipe's length in epochs on the embedded NLSY data."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from data_pipeline.dataset_dir import DatasetDir
from labor_jax.training.recipes import planned_steps
from tests.runs import ROOT, cpu_env

ROWS = {"labor_llm_seed0", "off_the_shelf", "nlsy_only", "multinomial_logit", "first-order_Markov",
        "empirical_frequencies", "career"}


def job_env():
  """One CPU device; every compiled program goes to the run's compilation cache (tests/conftest.py), so
  programs of the same shapes (the main job's and experiments foundation's fine-tunes) compile once a run."""
  return cpu_env(1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_hf):
  out = tmp_path_factory.mktemp("main_job") / "out"
  p = subprocess.run([sys.executable, "-m", "labor_jax.main", "--quick", "--model", str(tiny_hf), "--out",
                      str(out), "--bootstrap", "100"], cwd=ROOT, env=job_env(), capture_output=True, text=True, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  return out, p.stdout


def test_quick_writes_every_row_with_its_intervals(quick):
  out, stdout = quick
  s = json.loads((out / "summary.json").read_text())
  assert s["quick"] and s["seeds"] == 1 and s["steps_per_seed"] == 2 and s["recipe"] == "main/smollm2"
  rows = s["rows"]
  assert set(rows) == ROWS
  assert rows["multinomial_logit"]["perplexity"] == pytest.approx(4.028, abs=5e-4)  # the README's logit row
  assert "log_ppl_diff_ci" not in rows["multinomial_logit"]  # the reference
  for key, r in rows.items():
    lo, hi = r["perplexity_ci"]
    assert lo <= r["perplexity"] <= hi and math.isfinite(r["perplexity"])
    if key != "multinomial_logit":
      lo, hi = r["log_ppl_diff_ci"]
      assert lo <= r["log_ppl_diff"] <= hi
      # the paired difference is the difference of the two rows' log perplexities
      assert r["log_ppl_diff"] == pytest.approx(
          math.log(r["perplexity"]) - math.log(rows["multinomial_logit"]["perplexity"]), abs=1e-9)
  table = (out / "table.md").read_text()
  assert "(reference)" in table and "off the shelf" in table and "Machine:" in table
  assert "main job: 100%" in stdout and "== 5/5" in stdout


def test_quick_runs_are_ordinary_training_runs(quick):
  out, stdout = quick
  for run_dir in ("llm", "llm_nlsy_only"):
    cfg = yaml.safe_load((out / run_dir / "config.yaml").read_text())
    assert cfg["steps"] == 2
    assert [json.loads(line)["step"] for line in (out / run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)][-1] == 2
  assert yaml.safe_load((out / "llm" / "config.yaml").read_text())["lora"]["enabled"]
  assert "python -m labor_jax.train --config configs/main/smollm2.yaml" in stdout
  # the fine-tune and the off-the-shelf row read the model's tokenizer; the from-scratch row its own
  assert json.loads((out / "data" / "summary.json").read_text())["vocab_size"] != json.loads(
      (out / "data_tiny" / "summary.json").read_text())["vocab_size"]


def test_recipe_is_three_epochs_of_the_training_split(nlsy_dataset):
  rows = len(DatasetDir(nlsy_dataset).source("train"))
  assert rows == 375
  assert planned_steps("main/smollm2", nlsy_dataset) == math.ceil(3 * rows / 8) == 141
  assert planned_steps("main/smollm2", nlsy_dataset, {"epochs": 1}) == 47
  assert planned_steps("main/scratch", nlsy_dataset) == 600  # a recipe in steps keeps them
