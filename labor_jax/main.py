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
   multinomial logit and a CAREER-style transformer; report in RUN/llm/eval_test/.

Every stage is an ordinary ``labor_jax.train`` run (configs/demo.yaml plus the overrides
printed below), so each can be inspected, resumed or rerun on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from labor_jax import runtime

STAGE1_WORKERS = 5000  # synthetic careers in the stage-1 corpus
STAGE1_YEARS = 8  # years per synthetic career
COMMON = ["progress=false", "data.loss_on=history", "log_every=50"]
STAGE1 = ["steps=800", "eval_every=200", "ckpt_every=200"]
STAGE2 = ["steps=800", "eval_every=50", "ckpt_every=50", "optim.lr=5.0e-4", "optim.warmup_steps=20"]
SCRATCH = ["steps=600", "eval_every=50", "ckpt_every=50"]


def _train(run_dir: Path, data_dir: Path, overrides: list[str]) -> None:
  from labor_jax import train
  args = ["--config", str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")]
  for s in COMMON + overrides + [f"run_dir={run_dir}", f"data.dataset_dir={data_dir}"]:
    args += ["--set", s]
  print("  python -m labor_jax.train " + " ".join(a if a.startswith("--") else repr(a) if " " in a else a for a in args),
        flush=True)
  code = train.main(args)
  if code:
    raise SystemExit(f"training {run_dir} failed with exit code {code}")


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/main", help="directory for every stage's run")
  args = ap.parse_args(argv)
  out = Path(args.out)
  t0 = time.perf_counter()

  from data_pipeline import build, simulator
  from data_pipeline.panel import validate
  from data_pipeline.titles import load_titles
  from labor_jax import evaluate

  print("== 1/5 data: embedded NLSY panel -> resumes -> tokens", flush=True)
  nlsy_dir = out / "data"
  if build.main(["--out", str(nlsy_dir)]) != 0:
    return 1
  titles = load_titles(nlsy_dir / "titles.csv")

  print(f"\n== 2/5 stage 1: {STAGE1_WORKERS:,} synthetic careers (non-representative), trained from scratch",
        flush=True)
  synth_dir = out / "data_stage1"
  raw = simulator.simulate(STAGE1_WORKERS, STAGE1_YEARS, titles, seed=1, start_year=1975, stay=0.6, neighbours=4,
                           dataset="SYNTHETIC")
  panel, titles = validate(raw, "simulated panel", titles)
  info = build.build_dataset(panel, titles, synth_dir, tokenizer_dir=nlsy_dir / "tokenizer",
                             source="synthetic careers (data_pipeline.simulator), not survey data")
  print(build.format_summary(info), flush=True)
  _train(out / "stage1", synth_dir, STAGE1)

  print("\n== 3/5 stage 2: fine-tune on NLSY from the stage-1 weights", flush=True)
  _train(out / "llm", nlsy_dir, STAGE2 + [f"model.init_from={out / 'stage1'}"])

  print("\n== 4/5 ablation: the same model trained on NLSY alone", flush=True)
  _train(out / "llm_nlsy_only", nlsy_dir, SCRATCH)

  print("\n== 5/5 evaluation on the NLSY test split", flush=True)
  metrics = evaluate.evaluate(out / "llm", "test", extra_llms={"LLM without stage 1 (NLSY only)": out / "llm_nlsy_only"})
  report = out / "llm" / "eval_test" / "report.md"
  print()
  print(report.read_text().split("## Perplexity by years")[0].strip())
  ours = metrics["models"]["LABOR-LLM (this run)"]["perplexity"]
  alone = metrics["models"]["LLM without stage 1 (NLSY only)"]["perplexity"]
  mnl = metrics["models"]["multinomial logit"]["perplexity"]
  print(f"\nstage 1 is worth {alone - ours:+.3f} perplexity ({alone:.3f} without it, {ours:.3f} with it); "
        f"the multinomial logit gets {mnl:.3f}.")
  print(f"report: {report}   total time {time.perf_counter() - t0:.0f}s")
  (out / "summary.json").write_text(json.dumps({"perplexity": {k: v["perplexity"] for k, v in metrics["models"].items()},
                                                 "seconds": time.perf_counter() - t0}, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
