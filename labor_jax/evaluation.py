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
from labor_jax import inference, report
from labor_jax.config import ConfigError
from labor_jax.fileio import atomic_dir, check_replaceable
from labor_jax.career import CareerBaseline
from labor_jax.metrics import bootstrap_intervals, model_metrics, perplexity, true_logp, worker_keys
from labor_jax.rundir import RunDir

MAIN_LLM = "LABOR-LLM (this run)"
REPORT_MARKER = "metrics.json"  # every evaluation report holds it: an output directory holding it may be replaced


def llm_scores(loaded: inference.Loaded, titles, variant: str, dataset: DatasetDir, split: str, *,
               batch_workers: int = 16, chunk: int | None = None, progress: bool = False,
               context: np.ndarray | None = None, shared: inference.SharedLower | None = None,
               first_entry: int = 0) -> pd.DataFrame:
  """Normalised and raw log-probs [J] for every entry t >= ``first_entry`` of every worker of ``split`` (1: the
  transitions only; the first entry has no earlier occupation, and leaving it out spares its tree pass), from the
  scoring step of the inference layer (:func:`labor_jax.inference.score_examples`): ``batch_workers``
  workers a call, split over the mesh's batch axes; every process receives all scores. ``context``:
  tokens placed before every worker's resume (in-context examples); the scores are the same entries'.
  ``shared``: first blocks' output shared with other models scored alike (:class:`labor_jax.inference.SharedLower`)."""
  src = dataset.source(split)
  examples = [src[i] for i in range(len(src))]
  pre = np.zeros(0, np.int32) if context is None else np.asarray(context, np.int32)
  rows = [(np.concatenate([pre, np.asarray(e["tokens"], np.int32)]), e["title_spans"][first_entry:, 0] + len(pre))
          for e in examples]
  scores = inference.score_examples(loaded, titles, variant, rows,
                                    batch_workers=batch_workers, chunk=chunk, progress=progress,
                                    desc=f"scoring {split}", shared=shared)
  rows = []
  for e, (norm, raw) in zip(examples, scores):
    for t in range(first_entry, len(e["years"])):
      rows.append({"dataset": e["dataset"].decode(), "person_id": e["person_id"].decode(), "t": t,
                   "llm_norm": norm[t - first_entry], "llm_raw": raw[t - first_entry]})
  return pd.DataFrame(rows)


def score_transitions(source: str | Path, data: DatasetDir, table: pd.DataFrame, split: str, *,
                      adapter: str | Path | None = None, mesh: jax.sharding.Mesh | None = None,
                      batch_workers: int = 16, chunk: int | None = None, progress: bool = False,
                      context: np.ndarray | None = None, dtype: str | None = None,
                      shared: inference.SharedLower | None = None) -> tuple[np.ndarray, np.ndarray, str]:
  """(normalised log-probs, raw log-probs, what was loaded) of the model ``source`` (any source
  :func:`labor_jax.inference.open_model` opens) for each row of ``table``: transitions of ``split``
  of ``data`` (:func:`labor_jax.baselines.transition_table`, any subset of them): [len(table), J]
  each, in ``table``'s order. ``context``: tokens before every resume (:func:`llm_scores`); ``dtype``: the
  compute dtype of a Hugging Face source (:func:`labor_jax.inference.open_model`); ``shared``: as in
  :func:`llm_scores` (the description then says whether this model used it)."""
  loaded = inference.open_model(source, adapter=adapter, mesh=mesh, dtype=dtype)
  loaded.check_dataset(data)
  scores = llm_scores(loaded, data.titles(), data.variant, data, split, batch_workers=batch_workers, chunk=chunk,
                      progress=progress, context=context, shared=shared,
                      first_entry=int(table["t"].min()) if len(table) else 0)  # transitions: t >= 1
  what = loaded.description + (f"; blocks 0-{shared.n_layers - 1} as computed for the first model scored with them"
                                if shared is not None and shared.last_used else "")
  del loaded
  merged = table.merge(scores, on=["dataset", "person_id", "t"], how="left", validate="one_to_one")
  if merged["llm_norm"].isna().any():
    raise RuntimeError("some transitions have no LLM score")
  return np.stack(merged["llm_norm"].to_numpy()), np.stack(merged["llm_raw"].to_numpy()), what


def transitions_of(data: DatasetDir, datasets: list[str]) -> pd.DataFrame:
  """The test split's transitions of the surveys ``datasets`` (the order is the panel's)."""
  t = bl.transition_table(data.panel(), data.titles().index)
  return t[(t["split"] == "test") & t["dataset"].isin(datasets)].reset_index(drop=True)


def check_same_transitions(ref: pd.DataFrame, table: pd.DataFrame, what: str) -> None:
  """Stops unless ``table`` holds the transitions of ``ref`` (same workers, years, occupations)."""
  cols = ["dataset", "person_id", "year", "t", "occ", "prev", "gap"]
  if len(table) != len(ref) or not table[cols].equals(ref[cols]):
    raise RuntimeError(f"{what}: its test split holds other transitions than the main dataset's ({len(table)} vs "
                       f"{len(ref)}); the paired comparison needs the same workers")


def evaluate(model: str | Path, split: str = "test", out_dir: str | Path | None = None, *,
             data: str | Path | DatasetDir | None = None, adapter: str | Path | None = None, career: bool = True,
             extra_llms: dict | None = None, ensembles: dict | None = None, log=print,
             mesh: jax.sharding.Mesh | None = None, batch_workers: int = 16, chunk: int | None = None,
             progress: bool = False, bootstrap: int = 1000, seed: int = 0, dtype: str | None = None) -> dict:
  """Scores a model and every baseline on ``split``; writes the report; returns the metrics.

  ``model`` is a run directory (scored at its best checkpoint, on the run's dataset unless
  ``data`` names another) or a Hugging Face checkpoint directory (with ``adapter``; ``data``
  required). ``extra_llms`` (name -> run or HF directory) adds rows; ``ensembles`` (name -> list
  of them) adds the mixture of their probabilities (the mean over the models) as a row. Every
  row gets a 95% interval of its perplexity from a bootstrap over workers (``bootstrap``
  resamples, seeded), and the paired interval of its log-perplexity difference to ``model``.
  ``dtype``: the compute dtype of the Hugging Face sources among them (runs compute in their own).

  With a ``mesh`` each model is restored straight into its shardings and scored on the mesh
  (see :func:`llm_scores`); with several processes every process computes the same metrics
  and process 0 alone writes the files."""
  writer = jax.process_index() == 0
  log = log if writer else (lambda *a: None)
  run = RunDir(model)
  is_run = inference.source_kind(model) == inference.RUN
  if data is None:
    if not is_run:
      raise ConfigError(f"{model}: a Hugging Face model needs --data DATASET_DIR")
    data = run.dataset()
  data = data if isinstance(data, DatasetDir) else DatasetDir(data)
  data.check()
  if out_dir is None:
    if not is_run:
      raise ConfigError(f"{model}: name an output directory (--out) for a Hugging Face model")
    out_dir = run.eval_dir(split)
  out_dir = Path(out_dir)
  check_replaceable(out_dir, REPORT_MARKER, "evaluation report", writer)  # before minutes of scoring
  titles = data.titles()
  panel = data.panel()
  table = bl.transition_table(panel, titles.index)
  train, valid, test = (table[table["split"] == s] for s in ("train", "validation", split))
  test = test.reset_index(drop=True)
  j = len(titles)

  probs: dict[str, np.ndarray] = {}
  raw_ppl: dict[str, float] = {}
  sources = {MAIN_LLM: (model, adapter)}
  sources.update({name: (src, None) for name, src in (extra_llms or {}).items()})
  for members in (ensembles or {}).values():
    sources.update({f"{src}": (src, None) for src in members if all(str(v[0]) != str(src) for v in sources.values())})
  for name, (src, _) in sources.items():  # a missing model or another tokenizer: said before scoring the first
    try:
      inference.check_dataset(src, data)
    except inference.TokenizerMismatch:
      if name == MAIN_LLM:
        raise
      raise ConfigError(f"{src}: its tokenizer is not the one {data.path} was tokenised with (the main model's); "
                        "the models compared or ensembled must share one") from None
  by_source = {}
  for name, (src, adp) in sources.items():
    norm, raw, what = score_transitions(src, data, test, split, adapter=adp, mesh=mesh,
                                        batch_workers=batch_workers, chunk=chunk, progress=progress,
                                        dtype=inference.source_dtype(src, dtype))
    by_source[str(src)] = np.exp(norm)
    if name in (MAIN_LLM, *(extra_llms or {})):
      probs[name] = by_source[str(src)]
      y = test["occ"].to_numpy()
      raw_ppl[name] = perplexity(raw[np.arange(len(y)), y])
      log(f"{name}: {what}, perplexity {model_metrics(probs[name], test)['perplexity']:.3f}")
  for name, members in (ensembles or {}).items():
    probs[name] = np.mean([by_source[str(m)] for m in members], axis=0)
    log(f"{name} (mean of {len(members)} models' probabilities): perplexity "
        f"{model_metrics(probs[name], test)['perplexity']:.3f}")
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
  metrics["bootstrap"] = {"resamples": bootstrap, "seed": seed, "cluster": "worker", "reference": MAIN_LLM}
  if bootstrap:
    y = test["occ"].to_numpy()
    logp = {name: true_logp(p, y) for name, p in probs.items()}
    intervals = bootstrap_intervals(logp, worker_keys(test), MAIN_LLM, resamples=bootstrap, seed=seed)
    for name, ci in intervals.items():
      metrics["models"][name].update(ci)
  metrics["labour_force_task"] = "not available: the panel records employed person-years only"
  if writer:
    # the directory appears whole; a failure or a second writer leaves no mix
    with atomic_dir(out_dir, marker=REPORT_MARKER, what="evaluation report") as tmp:
      write_report(tmp, metrics, probs, test, titles, data.summary)
  return metrics


def write_report(out_dir: Path, metrics: dict, probs: dict[str, np.ndarray], test: pd.DataFrame, titles,
                 summary: dict) -> None:
  """metrics.json, predictions.csv (the main LLM's), the calibration plots and report.md."""
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
  (out_dir / "report.md").write_text(report.markdown(metrics, summary))
