"""What the validation occupation perplexity costs the main job (#14 item 1's budget: at most 10%).

Builds the main job's data (the embedded NLSY panel; the synthetic stage-1 corpus), trains stage 1
once (configs/main/stage1.yaml, default eval_metric), then trains the main job's recipes with
``eval_metric: token_loss`` (the validation token loss only, as before) and with
``eval_metric: occupation_perplexity`` (the loss plus the fused scorer on the validation split at
every evaluation), in one process as ``labor_jax.main`` does, alternating the order over
``--repeats`` rounds. Prints the wall and CPU time of every run, the ratios of medians, the CPU and
the date, the cost of the perplexity itself (building it, its first call, which compiles, and a
later call), and the stage-2 run's validation losses and perplexities.

``--main-job`` times the whole main job instead (``python -m labor_jax.main``, each in its own process):
with every stage on ``token_loss`` (the behaviour before eval_metric), then with the recipes as
shipped.

  python scripts/bench_eval_metric.py --out /tmp/bench_eval_metric --repeats 2
  python scripts/bench_eval_metric.py --out /tmp/bench_eval_metric --main-job
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _reference import cpu_line  # noqa: E402
from labor_jax import runtime  # noqa: E402

METRICS = ("token_loss", "occupation_perplexity")


def perplexity_cost(run_dir, calls=5):
  """(validation workers, seconds to build the function, its first call, a later call, median of ``calls``)
  for a run's best model, as the trainer builds it (batch_size workers per call, one device)."""
  from labor_jax import sharding
  from labor_jax.training import validation
  from labor_jax.rundir import RunDir
  run = RunDir(run_dir)
  cfg = run.train_config()
  data = run.dataset()
  config, params, _ = run.load_model()
  mesh = sharding.make_mesh(1, 1, 1)
  t0 = time.perf_counter()
  fn = validation.occupation_metrics(config, data, run.tokenizer(), mesh, batch_workers=cfg.batch_size,
                                     token_loss=(cfg.data.seq_len, cfg.data.loss_on))
  t1 = time.perf_counter()
  fn(params)
  t2 = time.perf_counter()
  later = []
  for _ in range(calls):
    t = time.perf_counter()
    fn(params)
    later.append(time.perf_counter() - t)
  return len(data.source("validation")), t1 - t0, t2 - t1, statistics.median(later)


OLD_MAIN = ("import sys; from labor_jax.cli import main; from labor_jax.training import config as train_config; "
            "u = train_config.updated; "
            "train_config.updated = lambda cfg, ch: u(cfg, {**ch, 'eval_metric': 'token_loss'}); "
            "sys.exit(main.main(sys.argv[1:]))")
# The main job as shipped, timing every validation pass of the perplexity (wall and process CPU seconds).
NEW_MAIN = """
import json, sys, time
from labor_jax.cli import main
from labor_jax.training import validation
build, spent = validation.occupation_metrics, {"calls": 0, "wall": 0.0, "cpu": 0.0}
def timed_build(*a, **k):
  fn = build(*a, **k)
  def timed(params):
    t, c = time.perf_counter(), time.process_time()
    out = fn(params)
    spent["calls"] += 1
    spent["wall"] += time.perf_counter() - t
    spent["cpu"] += time.process_time() - c
    return out
  return fn and timed
validation.occupation_metrics = timed_build
code = main.main(sys.argv[1:])
print("PERPLEXITY " + json.dumps(spent))
sys.exit(code)
"""


def time_main_job(out: Path, seeds: int) -> None:
  """Wall and CPU seconds of the whole main job, before (token_loss everywhere) and as shipped, and
  the seconds the shipped job spent in the validation perplexity's passes (which give its token loss too)."""
  import resource
  root = Path(__file__).resolve().parent.parent
  rows, spent = {}, {}
  for name, code, sub in (("token_loss everywhere", OLD_MAIN, "before"), ("as shipped", NEW_MAIN, "shipped")):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, "--out", str(out / sub), "--seeds", str(seeds)], cwd=root,
                       check=True, stdout=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows[name] = (time.perf_counter() - t0, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    spent.update(next((json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines()
                       if line.startswith("PERPLEXITY ")), {}))
  print(f"\n{cpu_line()}; {datetime.date.today().isoformat()}; python {platform.python_version()}")
  print("| main job | wall s | CPU s |\n| --- | ---: | ---: |")
  for name, (wall, cpu_s) in rows.items():
    print(f"| {name} | {wall:.1f} | {cpu_s:.1f} |")
  (a, ca), (b, cb) = rows.values()
  print(f"ratio (shipped / before): wall {b / a:.3f}, CPU {cb / ca:.3f}")
  print(f"the shipped job spent {spent['wall']:.1f} s wall ({spent['cpu']:.1f} s CPU) in {spent['calls']} validation "
        f"passes (perplexity and, unpacked, the token loss): {spent['wall'] / (b - spent['wall']):.1%} wall "
        f"({spent['cpu'] / (cb - spent['cpu']):.1%} CPU) of the rest of it")


def main(argv=None) -> int:
  runtime.tune_malloc()
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/bench_eval_metric")
  ap.add_argument("--repeats", type=int, default=2, help="rounds of (token_loss, occupation_perplexity) per recipe")
  ap.add_argument("--recipes", nargs="+", default=["stage2", "scratch"], choices=["stage1", "stage2", "scratch"],
                  help="recipes to time (stage 1 is trained once anyway, as stage 2's start)")
  ap.add_argument("--main-job", action="store_true", help="time the whole main job, before and as shipped")
  ap.add_argument("--seeds", type=int, default=3, help="--main-job: the main job's --seeds")
  args = ap.parse_args(argv)
  if args.main_job:
    time_main_job(Path(args.out), args.seeds)
    return 0

  from data_pipeline.dataset_dir import DatasetDir, build_default
  from labor_jax.training import recipes

  out = Path(args.out)
  load0 = f"{os.getloadavg()[0]:.2f}"
  nlsy = DatasetDir(out / "data")
  build_default(nlsy.path)
  synth = out / "data_stage1"
  recipes.build_stage1_data(synth, nlsy.titles(), nlsy.tokenizer_dir)

  def train(recipe, run_dir, **changes):
    shutil.rmtree(run_dir, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    recipes.train(f"main/{recipe}", run_dir, synth if recipe == "stage1" else nlsy.path, **changes)
    return time.perf_counter() - t0, time.process_time() - c0

  stage1 = out / "stage1"
  times = {r: {m: [] for m in METRICS} for r in args.recipes}
  if "stage1" in args.recipes:
    for k in range(args.repeats):
      for m in (METRICS if k % 2 == 0 else METRICS[::-1]):
        times["stage1"][m].append(train("stage1", out / f"stage1_{m}", eval_metric=m))
    shutil.copytree(out / "stage1_occupation_perplexity", stage1, dirs_exist_ok=True)
  else:
    train("stage1", stage1)
  ppl = {}
  for recipe in [r for r in args.recipes if r != "stage1"]:
    extra = {"model.init_from": str(stage1)} if recipe == "stage2" else {}
    for k in range(args.repeats):
      for m in (METRICS if k % 2 == 0 else METRICS[::-1]):
        run_dir = out / f"{recipe}_{m}"
        times[recipe][m].append(train(recipe, run_dir, eval_metric=m, **extra))
        if recipe == "stage2" and m == "occupation_perplexity":
          rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
          ppl = {r["step"]: (r["val_loss"], r["val_occupation_ppl"]) for r in rows if "val_occupation_ppl" in r}

  costs = {r: perplexity_cost(d) for r, d in (("stage1", stage1), ("stage2", out / "stage2_occupation_perplexity"))
           if (d / "checkpoints").exists()}

  print(f"\n{cpu_line()}; {datetime.date.today().isoformat()}; python {platform.python_version()}; "
        f"load average before {load0}, after {os.getloadavg()[0]:.2f}")
  print("| recipe | token_loss: wall s (CPU s) | occupation_perplexity: wall s (CPU s) | ratio of medians, wall (CPU) |")
  print("| --- | --- | --- | ---: |")
  for recipe, by in times.items():
    med = {m: [statistics.median(x[i] for x in by[m]) for i in (0, 1)] for m in METRICS}
    fmt = lambda xs: ", ".join(f"{w:.1f} ({c:.1f})" for w, c in xs)  # noqa: E731
    a, b = med["token_loss"], med["occupation_perplexity"]
    print(f"| {recipe} | {fmt(by['token_loss'])} | {fmt(by['occupation_perplexity'])} | "
          f"{b[0] / a[0]:.3f} ({b[1] / a[1]:.3f}) |")
  for recipe, (workers, build, first, call) in costs.items():
    print(f"{recipe}: perplexity and token loss of {workers} validation workers in one pass: build {build:.2f} s, first call (compiles) "
          f"{first:.2f} s, then {call:.3f} s per evaluation")
  if ppl:
    best = min(ppl, key=lambda s: ppl[s][1])
    best_loss = min(ppl, key=lambda s: ppl[s][0])
    print("\nstage 2 (seed 0), step: validation loss, validation occupation perplexity")
    print("\n".join(f"  {s}: {l:.4f}, {p:.4f}" for s, (l, p) in ppl.items()))
    print(f"best by occupation perplexity: step {best} ({ppl[best][1]:.4f}); "
          f"by validation loss: step {best_loss} ({ppl[best_loss][1]:.4f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
