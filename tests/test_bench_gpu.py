"""scripts/gpu_check.sh --dry-run: the GPU machine's one command, at tiny sizes on the CPU, so it cannot rot
between the rare runs on an accelerator (scripts/bench_gpu.py, scripts/gpu_memory.py, scripts/gpu_report.py)."""

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from tests import numerics

ROOT = Path(__file__).resolve().parents[1]


def _env():
  # The CLI's interpreter is the suite's; one CPU device is set by the script itself.
  return {**os.environ, "PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check") / "report.md"
  proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out, proc.stdout


def _table(text: str, heading: str) -> list[dict]:
  """The markdown table under ``## heading`` as dicts (cells stripped; escaped bars kept inside a cell)."""
  section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
  lines = [ln for ln in section.splitlines() if ln.startswith("|")]
  split = lambda ln: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]
  header = split(lines[0])
  rows = [split(ln) for ln in lines[2:]]
  assert all(len(r) == len(header) for r in rows), "a cell broke the table"
  return [dict(zip(header, r)) for r in rows]


def test_every_step_runs_and_the_report_names_the_machine(dry_run):
  out, _ = dry_run
  text = out.read_text()
  assert "- device: 1 x cpu (backend cpu" in text and f"jax {jax.__version__}" in text
  now = datetime.datetime.now(datetime.timezone.utc)  # the report was written today, or just before midnight
  assert any((now - datetime.timedelta(days=d)).strftime("%Y-%m-%d") in text for d in (0, 1))
  steps = {r["step"]: r["status"] for r in _table(text, "Steps")}
  assert list(steps) == ["imports", "device", "bench_a", "bench_b", "bench_d", "memory", "bench_c",
                         "tests_test_numerics"]
  assert set(steps.values()) == {"ok"}, steps
  tests = _table(text, "Tests on the device")
  assert len(tests) == 1 and re.fullmatch(r"\d+ passed in [\d.]+s", tests[0]["pytest's closing line"]), tests


def test_benchmark_rows_of_every_part(dry_run):
  out, _ = dry_run
  rows = _table(out.read_text(), "Benchmarks (scripts/bench_gpu.py)")
  by_part = {}
  for r in rows:
    by_part.setdefault(r["part"], []).append(r)
  train = by_part["(a) train step"]
  assert [r["attention"] for r in train] == ["xla", "blocked"]  # what the CPU can run
  main_job = by_part["(d) main job's model"]
  assert [("LoRA" in r["model"], "full" in r["model"], "scoring" in r["model"]) for r in main_job] == [
      (True, False, False), (False, True, False), (False, False, True)]
  for r in train + by_part["(b) LoRA step"] + main_job[:2]:
    assert r["fits"] == "yes" and float(r["tokens/s"].replace(",", "")) > 0, r
    assert r["MFU"] == "n/a"  # no peak FLOP/s for a CPU
  assert "3 NLSY epochs (141 steps)" in main_job[0]["notes"] and float(main_job[2]["workers/s"]) > 0
  fused, torch_row = by_part["(c) scorer"]
  assert fused["model"].startswith("labor_jax fused") and "PyTorch" in torch_row["model"]
  for r in (fused, torch_row):
    assert "335 titles" in r["batch x seq"] and float(r["workers/s"]) > 0
  # Same weights at tiny size: the PyTorch cached-prefix scores are the fused scorer's.
  found = re.search(r"log-prob diff vs PyTorch ([0-9.e+-]+) \(log-probs to (-[0-9.]+)\)", fused["notes"])
  diff, low = float(found.group(1)), float(found.group(2))
  # One forward pass of the tiny shapes (2 layers, intermediate 172, 128 tokens) in PyTorch's order and XLA's:
  # its float32 bound at the log-probs' magnitude (tests.numerics).
  assert diff <= numerics.tolerance(None, terms=172, layers=2, scale=abs(low)), (diff, low)


def test_planner_recipes_compile_the_measured_steps(dry_run):
  """On the CPU the planner (fake device) and the benchmark's own compiled step are the same compiler on the same
  program, so their plans are equal to the byte: the recipes bench_gpu.py hands to the planner describe exactly the
  steps it timed (a recipe that dropped LoRA, remat or a dtype would plan other bytes)."""
  out, _ = dry_run
  figures = json.loads((out.parent / "report.md.d" / "memory.md.json").read_text())
  assert len(figures) == 3  # (b), (d) LoRA, (d) full
  for f in figures:
    assert f["planner"] and f["planner"] == f["device_plan"], f
    assert f["device_peak"] is None  # the CPU keeps no allocator statistics
  assert figures[1]["planner"] != figures[2]["planner"]  # LoRA and full fine-tuning are different programs


def test_a_spent_budget_skips_the_steps_and_says_so(tmp_path):
  out = tmp_path / "report.md"
  proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--budget", "5", "--out", str(out)], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0  # nothing was measured
  steps = _table(out.read_text(), "Steps")
  assert steps and all(r["status"] == "skipped: budget spent" for r in steps), steps
  assert "no benchmark part finished" in out.read_text()


def test_wheel_list_pins_what_setup_py_pins():
  """scripts/gpu_wheels.txt: one NAME==VERSION a line, each the version setup.py installs here."""
  setup = (ROOT / "setup.py").read_text()
  pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', setup))
  norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
  pins = {norm(k): v for k, v in pins.items()}
  lines = [ln.split("#")[0].strip() for ln in (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()]
  wheels = [ln for ln in lines if ln]
  assert wheels and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", w) for w in wheels), wheels
  for w in wheels:
    name, version = w.split("==")
    if norm(name) in pins:
      assert pins[norm(name)] == version, (w, pins[norm(name)])
  assert {"grain", "array-record", "tensorboardx", "gguf"} <= {norm(w.split("==")[0]) for w in wheels}


def test_smollm2_preset_is_the_wheels_model():
  """config.preset('smollm2_135m') (shapes for plans and GPU benchmarks) equals the GGUF file's architecture."""
  from labor_jax.config import LlamaConfig, preset
  from labor_jax.interop import gguf
  try:
    path = gguf.smollm2_path()
  except gguf.GGUFError as e:
    pytest.skip(str(e))
  from_file = LlamaConfig.from_hf_dict(gguf.hf_config(gguf.open_gguf(path)))
  fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id")
  mine = preset("smollm2_135m")
  assert {f: getattr(mine, f) for f in fields} == {f: getattr(from_file, f) for f in fields}
  assert mine.rms_norm_eps == pytest.approx(from_file.rms_norm_eps, rel=1e-6)  # stored as float32 in the file


def test_steps_import_without_tensorflow_datasets():
  """An accelerator image may lack tensorflow-datasets (the H200's did): the loader, the planner, the scorer and the
  training loop import without it; only writing or reading resume records needs it."""
  code = ("import sys; sys.modules['tensorflow_datasets'] = None\n"  # any import of it raises ImportError
          "import data_pipeline.loader, labor_jax.planning, labor_jax.scorer, labor_jax.training.loop\n"
          "from data_pipeline import dataset_dir\n"
          "try:\n  dataset_dir._tfds_builder()\nexcept ImportError:\n  print('records need tfds')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "records need tfds"
