"""Evaluation: the LLM's next-occupation scores on a split against the econometric baselines.

:func:`evaluate` scores every transition of the split (each worker's entries after the
first) with the fused scorer (:mod:`labor_jax.scorer`), fits the baselines on the same
split's train/validation people (:mod:`labor_jax.baselines`, :mod:`labor_jax.career`),
computes :func:`labor_jax.metrics.model_metrics` for each, and writes to ``OUT``
(default ``RUN/eval_<split>/``):

* ``metrics.json``: perplexities (over valid occupations; raw for the LLM) overall, by
  dataset, for stays vs moves and per year of history; the move/stay task (log-loss, AUC);
* ``report.md``: the same as tables, with the calibration plots (:mod:`labor_jax.report`);
* ``calibration_occupation.png``, ``calibration_subgroup.png``;
* ``predictions.csv``: one row per transition: person, year, true occupation, its
  log-probability under the LLM, and the LLM's top 5.

Resumes are scored whole (never truncated to the training ``seq_len``). The survey panels
here record employed people only, so the paper's labour-force-exit task has no data to
run on; the report says so. Shape suffixes: B workers, N tokens, T entries, J titles.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from data_pipeline.dataset_dir import DatasetDir
from labor_jax import baselines as bl
from labor_jax import report, scorer
from labor_jax.career import CareerBaseline
from labor_jax.metrics import model_metrics, perplexity
from labor_jax.rundir import RunDir

MAIN_LLM = "LABOR-LLM (this run)"


def llm_scores(config, params, tokenizer, titles, variant: str, dataset: DatasetDir, split: str,
               batch_workers: int = 16) -> pd.DataFrame:
  """Normalised and raw log-probs [J] for every entry (t >= 0) of every worker of ``split``."""
  src = dataset.source(split)
  examples = [src[i] for i in range(len(src))]
  tree = scorer.CandidateTree.for_titles(tokenizer, titles, variant)
  n_max = max(len(e["tokens"]) for e in examples)
  t_max = max(len(e["years"]) for e in examples)

  @jax.jit
  def both(params, tokens_BN, mask_BN, ends_BT):
    raw_BTJ = scorer.score(config, params, tree, tokens_BN, mask_BN, ends_BT)
    return jax.nn.log_softmax(raw_BTJ, -1), raw_BTJ

  rows = []
  for s in range(0, len(examples), batch_workers):
    chunk = examples[s:s + batch_workers]
    b = batch_workers
    tokens_BN = np.zeros((b, n_max), np.int32)
    mask_BN = np.zeros_like(tokens_BN)
    ends_BT = np.ones((b, t_max), np.int32)
    for i, e in enumerate(chunk):
      tokens_BN[i, :len(e["tokens"])], mask_BN[i, :len(e["tokens"])] = e["tokens"], 1
      ends_BT[i, :len(e["years"])] = e["title_spans"][:, 0]
    norm, raw = (np.asarray(x) for x in both(params, tokens_BN, mask_BN, ends_BT))
    for i, e in enumerate(chunk):
      for t in range(len(e["years"])):
        rows.append({"dataset": e["dataset"].decode(), "person_id": e["person_id"].decode(), "t": t,
                     "llm_norm": norm[i, t], "llm_raw": raw[i, t]})
  return pd.DataFrame(rows)


def evaluate(run_dir: str | Path, split: str = "test", out_dir: str | Path | None = None, *,
             career: bool = True, extra_llms: dict | None = None, log=print) -> dict:
  """Scores the run's LLM (and ``extra_llms``: name -> run directory) and every baseline on
  ``split`` of the run's dataset; writes the report. Returns the metrics."""
  run = RunDir(run_dir).check()
  out_dir = Path(out_dir) if out_dir else run.eval_dir(split)
  out_dir.mkdir(parents=True, exist_ok=True)
  data = run.dataset()
  titles = data.titles()
  panel = data.panel()
  table = bl.transition_table(panel, titles.index)
  train, valid, test = (table[table["split"] == s] for s in ("train", "validation", split))
  test = test.reset_index(drop=True)
  j = len(titles)

  probs: dict[str, np.ndarray] = {}
  raw_ppl: dict[str, float] = {}
  llms = {MAIN_LLM: run.path}
  llms.update(extra_llms or {})
  for name, rd in llms.items():
    other = RunDir(rd)
    config, params, step = other.load_model()
    scores = llm_scores(config, params, other.tokenizer(), titles, data.variant, data, split)
    merged = test.merge(scores, on=["dataset", "person_id", "t"], how="left", validate="one_to_one")
    if merged["llm_norm"].isna().any():
      raise RuntimeError("some transitions have no LLM score")
    probs[name] = np.exp(np.stack(merged["llm_norm"].to_numpy()))
    y = test["occ"].to_numpy()
    raw_ppl[name] = perplexity(np.stack(merged["llm_raw"].to_numpy())[np.arange(len(y)), y])
    log(f"{name}: step {step}, perplexity {model_metrics(probs[name], test)['perplexity']:.3f}")
  for cls in (bl.EmpiricalFrequency, bl.Markov, bl.MultinomialLogit):
    m = cls().fit(train, valid, j)
    probs[m.name] = m.predict(test)
  if career:
    cb = CareerBaseline().fit(panel, titles.index, log=log)
    probs[cb.name] = cb.predict(test, panel[panel["split"] == split])

  metrics = {"split": split, "transitions": int(len(test)), "workers": int(test.groupby(["dataset", "person_id"]).ngroups),
             "models": {name: model_metrics(p, test) for name, p in probs.items()}}
  for name, r in raw_ppl.items():
    metrics["models"][name]["perplexity_raw"] = r
  metrics["labour_force_task"] = "not available: the panel records employed person-years only"
  (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

  p = probs[MAIN_LLM]
  order = np.argsort(-p, axis=1)[:, :5]
  pred = pd.DataFrame({
      "dataset": test["dataset"], "person_id": test["person_id"], "year": test["year"],
      "true_occupation": [titles.titles[i] for i in test["occ"]],
      "logprob": np.log(p[np.arange(len(test)), test["occ"].to_numpy()]),
      "top5": ["; ".join(f"{titles.titles[k]} ({p[r, k]:.3f})" for k in order[r]) for r in range(len(test))],
  })
  pred.to_csv(out_dir / "predictions.csv", index=False)
  report.calibration_plots(out_dir, test, {k: probs[k] for k in probs
                                          if k in (MAIN_LLM, "multinomial logit", "first-order Markov")}, titles)
  (out_dir / "report.md").write_text(report.markdown(metrics, data.summary))
  return metrics
