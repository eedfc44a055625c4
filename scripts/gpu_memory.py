"""Memory plan against measurement: the planner's figure (``python -m labor_jax.plan``: the step compiled ahead of
time for a fake CPU device) beside what the accelerator's own compiler planned and what the device really held.

  python scripts/gpu_memory.py --bench-json b.json d.json --out memory.md

Reads the rows that ``scripts/bench_gpu.py --json`` wrote for its train steps ((b) the 7B-shaped LoRA step, (d) the
SmolLM2-shaped steps). Each such row carries the planner recipe of the very step it timed (the config, the preset
and the ``--set`` overrides, one device) together with this backend's compiled plan (XLA's buffer assignment for
the accelerator: arguments + temporaries + outputs not aliased to a donated argument) and the device's peak memory
in the process that ran it (``memory_stats()['peak_bytes_in_use']``). This script compiles each recipe for one
fake CPU device, exactly as the planner does (:func:`labor_jax.planning.train_plan`), and prints one markdown table.

Each bench part runs in its own process, so a row's device peak is that process's peak: it also counts weights
the process allocated before (for (d): the LoRA step's state was freed, but the peak is the largest of the
process so far). Runs on the CPU; no accelerator needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                   if "device_count" not in f)  # one device, as the rows ran
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2 ** 30


def cpu_plan(recipe: dict) -> int:
  """The planner's peak (bytes) for one fake CPU device, as ``python -m labor_jax.plan --devices 1``."""
  from labor_jax import planning, sharding
  from labor_jax.training import config as train_config

  sets = list(recipe["sets"]) + ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
  cfg = train_config.load(recipe["config"], sets)
  config = train_config.model_config(cfg, planning.base_config(cfg, recipe.get("preset")))
  return planning.train_plan(cfg, config, sharding.make_mesh(1, 1, 1)).peak


def ratio(a, b) -> str:
  return "n/a" if not a or not b else f"{a / b:.2f}"


def gib(x) -> str:
  return "n/a" if x is None else f"{x / GIB:.3g}"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--bench-json", nargs="+", required=True, help="files written by bench_gpu.py --json")
  ap.add_argument("--out", help="also write the table here")
  args = ap.parse_args(argv)
  rows = []
  for path in args.bench_json:
    if not os.path.exists(path):
      print(f"gpu_memory: {path} is missing (its bench part failed or timed out); its rows are left out",
            file=sys.stderr)
      continue
    with open(path) as f:
      rows += [r for r in json.load(f) if r.get("recipe") and r.get("fits") == "yes"]
  planned_bytes = []
  lines = ["| step | batch x seq | planner, 1 fake CPU device (GiB) | this device's compiled plan (GiB) "
           "| device peak (GiB) | peak / planner | peak / device plan | planner command |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
  for r in rows:
    recipe = r["recipe"]
    try:
      planned = cpu_plan(recipe)
    except Exception as e:  # noqa: BLE001 - one row's failure leaves the others
      planned = None
      print(f"gpu_memory: planning {r['model']} failed: {type(e).__name__}: {e}", file=sys.stderr)
    planned_bytes.append(planned)
    cmd = (f"python -m labor_jax.plan --config {recipe['config']} --devices 1 --mesh data=1,fsdp=1,tensor=1 "
           f"--no-score" + (f" --preset {recipe['preset']}" if recipe.get("preset") else "")
           + "".join(f" --set '{s}'" for s in recipe["sets"]))
    lines.append(f"| {r['part']}: {r['model']} | {r['shape']} | {gib(planned)} | {gib(r.get('plan'))} "
                 f"| {gib(r.get('peak'))} | {ratio(r.get('peak'), planned)} | {ratio(r.get('peak'), r.get('plan'))} "
                 f"| `{cmd.replace('|', chr(92) + '|')}` |")  # an escaped bar keeps the cell whole
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
    with open(args.out + ".json", "w") as f:  # the figures in bytes, for tests and later tables
      json.dump([dict(model=r["model"], planner=p, device_plan=r.get("plan"), device_peak=r.get("peak"))
                 for r, p in zip(rows, planned_bytes)], f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
