"""``python -m labor_jax.experiments foundation --quick`` end to end in a subprocess on a tiny random Hugging
Face model in place of SmolLM2 (``tiny_hf`` in tests/conftest.py): the data with the model's tokenizer (titles,
codes), the LoRA fine-tunes by the main job's recipe and the full fine-tune, the zero-shot and in-context rows,
scoring and the table."""

import json
import subprocess
import sys

from tests.runs import ROOT
from tests.test_main_job import job_env


def test_foundation_quick_writes_its_table_with_every_row(tmp_path, tiny_hf, uninterrupted):
  """experiments foundation --quick on a tiny random Hugging Face model (the dataset's tokenizer): the data,
  the LoRA runs on titles and codes and the full fine-tune, the zero-shot and in-context rows, scoring and
  the table with an interval per row; the tiny LLM's row is the session's tiny run (--tiny-llm), scored on
  its own dataset."""
  out = tmp_path / "foundation"
  tiny = uninterrupted
  p = subprocess.run([sys.executable, "-m", "labor_jax.experiments", "foundation", "--quick", "--model",
                      str(tiny_hf), "--out", str(out), "--bootstrap", "50", "--tiny-llm", str(tiny)],
                     cwd=ROOT, env=job_env(), capture_output=True, text=True, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "foundation experiment: 100%" in p.stdout
  summary = json.loads((out / "summary.json").read_text())
  rows = summary["rows"]
  assert set(rows) == {"zero_shot", "in_context", "lora_titles_seed0", "lora_codes_seed0", "full_titles_seed0",
                       "tiny_llm", "multinomial_logit", "first-order_Markov", "empirical_frequencies", "career"}
  assert summary["steps"] == {"lora_titles": 2, "lora_codes": 2, "full_titles": 2}
  assert summary["seeds_by_row"] == {"lora_titles": 1, "lora_codes": 1, "full_titles": 1}
  assert summary["recipes"]["lora_titles"] == "main/smollm2" and summary["in_context"] == 3
  # the in-context row reads other tokens than the zero-shot row's, so it scores differently
  assert rows["in_context"]["perplexity"] != rows["zero_shot"]["perplexity"]
  assert "log_ppl_diff_ci" not in rows["multinomial_logit"]
  assert all(len(r["log_ppl_diff_ci"]) == 2 for k, r in rows.items() if k != "multinomial_logit")
  table = (out / "table.md").read_text()
  logit_row = next(line for line in table.splitlines() if line.startswith("| multinomial logit |"))
  assert logit_row.startswith("| multinomial logit | 4.028 [") and logit_row.endswith("| (reference) |")
  assert "zero-shot" in table
  assert (out / "lora_codes" / "seed0" / "summary.json").exists()
  assert str(tiny) in rows["tiny_llm"]["name"] and not (out / "tiny_llm").exists()  # scored, not trained again


def test_full_fine_tuning_takes_its_own_number_of_seeds():
  from labor_jax.cli.foundation import seeds_by_row
  assert seeds_by_row(3, 1) == {"lora_titles": 3, "lora_codes": 3, "full_titles": 1}
  assert seeds_by_row(1, 3) == {"lora_titles": 1, "lora_codes": 1, "full_titles": 3}
  assert seeds_by_row(2, None) == {"lora_titles": 2, "lora_codes": 2, "full_titles": 2}
