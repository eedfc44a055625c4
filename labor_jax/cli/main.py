"""``python -m labor_jax.main``: the end-to-end job on the embedded NLSY panel, on a laptop CPU.

LABOR-LLM starts from a foundation model trained on other, non-representative text and
fine-tunes it on survey resumes. This job reproduces that two-stage shape at CPU scale:

1. data: the embedded NLSY panel -> resumes -> tokens (SentencePiece trained on the
   training resumes), split 70/10/20 by person;
2. stage 1 ("foundation"): a tiny Llama trained from scratch on a larger, synthetic,
   non-representative career corpus (data_pipeline.simulator: other dynamics, other
   cohorts, the same occupation titles and resume template);
3. stage 2: fine-tuned on the NLSY training resumes from the stage-1 weights;
4. the same architecture fine-tuned on NLSY alone, to show what stage 1 is worth;
5. evaluation on the NLSY test split against empirical frequencies, first-order Markov,
   multinomial logit and a CAREER-style transformer, with the stage-1 model scored zero-shot
   (the stand-in for the paper's off-the-shelf rows), the mixture of the stage-2 seeds, and
   bootstrap intervals; report in RUN/llm/eval_test/.

Stages 3 and 4 run ``--seeds`` times (data order, and for stage 4 the initial weights,
change with the seed), and the job reports each seed and the mean and standard deviation:
at this size one run's perplexity moves by up to 0.2 with rounding alone.

Every stage is an ordinary ``labor_jax.train`` run of a recipe in ``configs/main/`` (the
equivalent command is printed), so each can be inspected, resumed or rerun on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from data_pipeline.dataset_dir import DatasetDir, build_default, format_summary
from labor_jax import evaluation, report, runtime
from labor_jax.cli import common as cli
from labor_jax.training.recipes import STAGE1_WORKERS, build_stage1_data, train

FOUNDATION = "foundation model before fine-tuning (stage 1, zero-shot)"


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/main", help="directory for every stage's run")
  ap.add_argument("--seeds", type=int, default=3, help="seeds of stages 3 and 4 (each adds two runs; timings in docs/benchmarks.md)")
  args = ap.parse_args(argv)
  if args.seeds < 1:
    ap.error("--seeds must be at least 1")
  return cli.run_training(lambda: run(Path(args.out), args.seeds))


def run(out: Path, n_seeds: int) -> int:
  """The five steps of the module docstring; every run directory under ``out``."""
  t0 = time.perf_counter()

  print("== 1/5 data: embedded NLSY panel -> resumes -> tokens", flush=True)
  nlsy = DatasetDir(out / "data")
  print(format_summary(build_default(nlsy.path)), flush=True)
  titles = nlsy.titles()

  print(f"\n== 2/5 stage 1: {STAGE1_WORKERS:,} synthetic careers (non-representative), trained from scratch",
        flush=True)
  synth_dir = out / "data_stage1"
  print(format_summary(build_stage1_data(synth_dir, titles, nlsy.tokenizer_dir)), flush=True)
  train("main/stage1", out / "stage1", synth_dir)

  seeds = range(n_seeds)
  llm_dir = lambda k: out / ("llm" if k == 0 else f"llm_seed{k}")  # noqa: E731
  alone_dir = lambda k: out / ("llm_nlsy_only" if k == 0 else f"llm_nlsy_only_seed{k}")  # noqa: E731
  print(f"\n== 3/5 stage 2: fine-tune on NLSY from the stage-1 weights ({n_seeds} seed(s))", flush=True)
  for k in seeds:
    train("main/stage2", llm_dir(k), nlsy.path, **{"model.init_from": str(out / "stage1"), "seed": k})

  print(f"\n== 4/5 ablation: the same model trained on NLSY alone ({n_seeds} seed(s))", flush=True)
  for k in seeds:
    train("main/scratch", alone_dir(k), nlsy.path, seed=k)

  print("\n== 5/5 evaluation on the NLSY test split", flush=True)
  ours_name, alone_name = evaluation.MAIN_LLM, "LLM without stage 1 (NLSY only)"
  name = lambda base, k: base if k == 0 else f"{base}, seed {k}"  # noqa: E731
  extra = {name(alone_name, k): alone_dir(k) for k in seeds}
  extra.update({name("LABOR-LLM", k): llm_dir(k) for k in seeds if k})
  extra[FOUNDATION] = out / "stage1"  # the stand-in for the paper's off-the-shelf rows: stage 1, zero-shot
  ensembles = {f"LABOR-LLM, ensemble of {n_seeds} seeds": [llm_dir(k) for k in seeds]} if n_seeds > 1 else None
  metrics = evaluation.evaluate(llm_dir(0), "test", extra_llms=extra, ensembles=ensembles)
  print()
  print("\n".join(report.headline(metrics, nlsy.summary)))
  print("\nPaired 95% intervals (bootstrap over workers) of each model's log-perplexity minus LABOR-LLM's (seed 0):")
  print("\n".join(f"- {line}" for line in report.differences_in_words(metrics)))
  ppl = {k: v["perplexity"] for k, v in metrics["models"].items()}
  ours = np.asarray([ppl[ours_name if k == 0 else name("LABOR-LLM", k)] for k in seeds])
  alone = np.asarray([ppl[name(alone_name, k)] for k in seeds])
  mnl = ppl["multinomial logit"]

  def ms(x):
    return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x[0]:.3f}"
  print(f"\nover {n_seeds} seed(s) (mean ± standard deviation): LABOR-LLM {ms(ours)}; NLSY only {ms(alone)}; "
        f"stage-1 gain {ms(alone - ours)}; LABOR-LLM minus multinomial logit ({mnl:.3f}) {ms(ours - mnl)}.")
  print(f"report: {out / 'llm' / 'eval_test' / 'report.md'}   total time {time.perf_counter() - t0:.0f}s")
  summary = {"perplexity": ppl, "seeds": n_seeds,
             "by_seed": {"labor_llm": ours.tolist(), "nlsy_only": alone.tolist()},
             "mean": {"labor_llm": float(ours.mean()), "nlsy_only": float(alone.mean())},
             "std": {"labor_llm": float(ours.std(ddof=1)) if n_seeds > 1 else None,
                     "nlsy_only": float(alone.std(ddof=1)) if n_seeds > 1 else None},
             "seconds": time.perf_counter() - t0}
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
