"""scripts/bench_gpu.py runs at tiny size on the CPU and prints its one table."""

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import jax

from tests import numerics

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_tiny_prints_one_table():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false", "XLA_FLAGS": ""}  # one CPU device
  out = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--size", "tiny"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  title = lines[0]
  assert "device cpu" in title and f"jax {jax.__version__}" in title
  assert datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d") in title
  header = [c.strip() for c in lines[2].strip("|").split("|")]
  assert header == ["part", "model", "attention", "batch x seq", "fits", "tokens/s", "workers/s", "MFU", "notes"]
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]
  assert all(len(r) == len(header) for r in rows), "a cell broke the table"
  by_part = {}
  for r in rows:
    by_part.setdefault(r[0], []).append(dict(zip(header, r)))

  train = by_part["(a) train step"]
  assert [r["attention"] for r in train] == ["xla", "blocked"]  # what the CPU can run
  assert len(by_part["(b) LoRA step"]) == 1
  for r in train + by_part["(b) LoRA step"]:
    assert r["fits"] == "yes" and float(r["tokens/s"].replace(",", "")) > 0
    assert r["MFU"] == "n/a"  # no peak FLOP/s for a CPU
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
