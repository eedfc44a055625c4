"""``python -m labor_jax.evaluate --run RUN --split test``: the LLM against the econometric baselines.

Scores every transition of the split (each worker's entries after the first) with the
fused scorer, fits the baselines on the same split's train/validation people, and writes
to ``RUN/eval_<split>/``:

* ``metrics.json``: perplexities (over valid occupations; raw for the LLM) overall, by
  dataset, for stays vs moves and per year of history; the move/stay task (log-loss, AUC);
* ``report.md``: the same as tables, with the calibration plots;
* ``calibration_occupation.png``, ``calibration_subgroup.png``;
* ``predictions.csv``: one row per transition: person, year, true occupation, its
  log-probability under the LLM, and the LLM's top 5.

The survey panels here record employed people only, so the paper's labour-force-exit
task has no data to run on; the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from labor_jax import baselines as bl
from labor_jax import runtime


def run_dataset_dir(run_dir: Path) -> Path:
  import yaml
  cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
  d = cfg.get("data", {}).get("dataset_dir")
  return Path(d) if d else run_dir / "data"


def llm_scores(config, params, tokenizer, titles, variant: str, dataset_dir: Path, split: str,
               batch_workers: int = 16) -> pd.DataFrame:
  """Normalised and raw log-probs [n, J] for every entry (t >= 0) of every worker of ``split``."""
  from data_pipeline import tfds_builder
  from labor_jax import scorer
  src = tfds_builder.data_source(dataset_dir / "labor_resumes" / "1.0.0", split)
  examples = [src[i] for i in range(len(src))]
  tree = scorer.CandidateTree.for_titles(tokenizer, titles, variant)
  n_max = max(len(e["tokens"]) for e in examples)
  t_max = max(len(e["years"]) for e in examples)

  @jax.jit
  def both(params, tokens, mask, ends):
    raw = scorer.score(config, params, tree, tokens, mask, ends)
    return jax.nn.log_softmax(raw, -1), raw

  rows = []
  for s in range(0, len(examples), batch_workers):
    chunk = examples[s:s + batch_workers]
    b = batch_workers
    tokens = np.zeros((b, n_max), np.int32)
    mask = np.zeros_like(tokens)
    ends = np.ones((b, t_max), np.int32)
    for i, e in enumerate(chunk):
      tokens[i, :len(e["tokens"])], mask[i, :len(e["tokens"])] = e["tokens"], 1
      ends[i, :len(e["years"])] = e["title_spans"][:, 0]
    norm, raw = (np.asarray(x) for x in both(params, tokens, mask, ends))
    for i, e in enumerate(chunk):
      for t in range(len(e["years"])):
        rows.append({"dataset": e["dataset"].decode(), "person_id": e["person_id"].decode(), "t": t,
                     "llm_norm": norm[i, t], "llm_raw": raw[i, t]})
  return pd.DataFrame(rows)


def _ppl(logp: np.ndarray) -> float:
  return float(math.exp(-np.mean(logp))) if len(logp) else float("nan")


def _auc(y: np.ndarray, p: np.ndarray) -> float:
  from sklearn.metrics import roc_auc_score
  return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def model_metrics(probs: np.ndarray, table: pd.DataFrame) -> dict:
  y = table["occ"].to_numpy()
  lp = np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))
  stay = (table["prev"].to_numpy() == y)
  p_move = np.clip(1 - probs[np.arange(len(y)), table["prev"].to_numpy()], 1e-6, 1 - 1e-6)
  moved = (~stay).astype(float)
  out = {
      "perplexity": _ppl(lp), "n": int(len(y)),
      "perplexity_stays": _ppl(lp[stay]), "perplexity_moves": _ppl(lp[~stay]),
      "by_dataset": {d: _ppl(lp[table["dataset"].to_numpy() == d]) for d in sorted(table["dataset"].unique())},
      "by_history_years": {int(t): _ppl(lp[table["t"].to_numpy() == t]) for t in sorted(table["t"].unique())},
      "move_logloss": float(-np.mean(moved * np.log(p_move) + (1 - moved) * np.log(1 - p_move))),
      "move_auc": _auc(moved, p_move),
  }
  return out


def _calibration_plots(out_dir: Path, table: pd.DataFrame, probs: dict[str, np.ndarray], titles):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  j = len(titles)
  observed = np.bincount(table["occ"], minlength=j) / len(table)
  fig, ax = plt.subplots(figsize=(6, 6))
  for name, p in probs.items():
    ax.scatter(observed, p.mean(0), label=name, s=25)
  top = max(observed.max(), max(p.mean(0).max() for p in probs.values())) * 1.1
  ax.plot([0, top], [0, top], "k--", lw=1)
  ax.set_xlabel("observed share of transitions into occupation")
  ax.set_ylabel("mean predicted probability")
  ax.set_title("Calibration by destination occupation")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_dir / "calibration_occupation.png", dpi=110)
  plt.close(fig)

  groups = {}
  for col in ("education", "race", "ethnicity", "region"):
    if col in table.columns:
      for v in table[col].dropna().unique():
        groups[f"{col}={v}"] = (table[col] == v).to_numpy()
  groups = {k: m for k, m in groups.items() if m.sum() >= 20}
  fig, ax = plt.subplots(figsize=(6, 6))
  y = table["occ"].to_numpy()
  prev = table["prev"].to_numpy()
  pts = []
  for name, p in probs.items():
    pm = 1 - p[np.arange(len(y)), prev]
    xs = [float((y[m] != prev[m]).mean()) for m in groups.values()]
    ys = [float(pm[m].mean()) for m in groups.values()]
    ax.scatter(xs, ys, label=name, s=25)
    pts += xs + ys
  lo, hi = (max(0.0, min(pts) - 0.05), min(1.0, max(pts) + 0.05)) if pts else (0.0, 1.0)
  ax.plot([lo, hi], [lo, hi], "k--", lw=1)
  ax.set_xlim(lo, hi)
  ax.set_ylim(lo, hi)
  ax.set_xlabel("observed move rate in subgroup")
  ax.set_ylabel("mean predicted move probability")
  ax.set_title(f"Calibration of occupation changes by subgroup ({len(groups)} groups, n >= 20)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_dir / "calibration_subgroup.png", dpi=110)
  plt.close(fig)


def evaluate(run_dir: str | Path, split: str = "test", out_dir: str | Path | None = None, *,
             career: bool = True, extra_llms: dict | None = None, log=print) -> dict:
  """Scores the run's LLM and every baseline on ``split``; writes the report. Returns metrics."""
  from data_pipeline.titles import load_titles
  from data_pipeline.tokenizer import ResumeTokenizer
  from labor_jax import export
  run_dir = Path(run_dir)
  out_dir = Path(out_dir) if out_dir else run_dir / f"eval_{split}"
  out_dir.mkdir(parents=True, exist_ok=True)
  data_dir = run_dataset_dir(run_dir)
  summary = json.loads((data_dir / "summary.json").read_text())
  titles = load_titles(data_dir / "titles.csv")
  panel = pd.read_parquet(data_dir / "panel.parquet")
  table = bl.transition_table(panel, titles.index)
  train, valid, test = (table[table["split"] == s] for s in ("train", "validation", split))
  test = test.reset_index(drop=True)
  j = len(titles)

  probs: dict[str, np.ndarray] = {}
  raw_ppl: dict[str, float] = {}
  llms = {"LABOR-LLM (this run)": run_dir}
  llms.update(extra_llms or {})
  for name, rd in llms.items():
    config, params, step = export.load_run(rd)
    tok = ResumeTokenizer.from_dir(Path(rd) / "tokenizer")
    scores = llm_scores(config, params, tok, titles, summary.get("variant", "titles"), data_dir, split)
    merged = test.merge(scores, on=["dataset", "person_id", "t"], how="left", validate="one_to_one")
    if merged["llm_norm"].isna().any():
      raise RuntimeError("some transitions have no LLM score")
    probs[name] = np.exp(np.stack(merged["llm_norm"].to_numpy()))
    y = test["occ"].to_numpy()
    raw_ppl[name] = _ppl(np.stack(merged["llm_raw"].to_numpy())[np.arange(len(y)), y])
    log(f"{name}: step {step}, perplexity {model_metrics(probs[name], test)['perplexity']:.3f}")
  for cls in (bl.EmpiricalFrequency, bl.Markov, bl.MultinomialLogit):
    m = cls().fit(train, valid, j)
    probs[m.name] = m.predict(test)
  if career:
    from labor_jax.career import CareerBaseline
    cb = CareerBaseline().fit(panel, titles.index, log=log)
    probs[cb.name] = cb.predict(test, panel[panel["split"] == split])

  metrics = {"split": split, "transitions": int(len(test)), "workers": int(test.groupby(["dataset", "person_id"]).ngroups),
             "models": {name: model_metrics(p, test) for name, p in probs.items()}}
  for name, r in raw_ppl.items():
    metrics["models"][name]["perplexity_raw"] = r
  metrics["labour_force_task"] = "not available: the panel records employed person-years only"
  (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

  main_llm = next(iter(llms))
  p = probs[main_llm]
  order = np.argsort(-p, axis=1)[:, :5]
  pred = pd.DataFrame({
      "dataset": test["dataset"], "person_id": test["person_id"], "year": test["year"],
      "true_occupation": [titles.titles[i] for i in test["occ"]],
      "logprob": np.log(p[np.arange(len(test)), test["occ"].to_numpy()]),
      "top5": ["; ".join(f"{titles.titles[k]} ({p[r, k]:.3f})" for k in order[r]) for r in range(len(test))],
  })
  pred.to_csv(out_dir / "predictions.csv", index=False)
  _calibration_plots(out_dir, test, {k: probs[k] for k in probs if k in (main_llm, "multinomial logit", "first-order Markov")}, titles)
  (out_dir / "report.md").write_text(report_markdown(metrics, summary))
  return metrics


def report_markdown(metrics: dict, summary: dict) -> str:
  models = metrics["models"]
  lines = [f"# Next-occupation prediction: {metrics['split']} split", "",
           f"{metrics['transitions']:,} transitions of {metrics['workers']:,} workers; data: {summary.get('source', '')}, "
           f"template {summary.get('template')} ({summary.get('variant')}).", "",
           "## Perplexity (lower is better)", "",
           "| model | perplexity | raw (LLM) | stays | moves | move log-loss | move AUC |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, m in sorted(models.items(), key=lambda kv: kv[1]["perplexity"]):
    raw = f"{m['perplexity_raw']:.3f}" if "perplexity_raw" in m else ""
    lines.append(f"| {name} | {m['perplexity']:.3f} | {raw} | {m['perplexity_stays']:.3f} | {m['perplexity_moves']:.3f} "
                 f"| {m['move_logloss']:.4f} | {m['move_auc']:.3f} |")
  years = sorted({y for m in models.values() for y in m["by_history_years"]})
  lines += ["", "## Perplexity by years of history", "",
            "| model | " + " | ".join(str(y) for y in years) + " |", "| --- |" + " ---: |" * len(years)]
  for name, m in models.items():
    lines.append(f"| {name} | " + " | ".join(f"{m['by_history_years'].get(y, float('nan')):.3f}" for y in years) + " |")
  datasets = sorted({d for m in models.values() for d in m["by_dataset"]})
  lines += ["", "## Perplexity by dataset", "", "| model | " + " | ".join(datasets) + " |",
            "| --- |" + " ---: |" * len(datasets)]
  for name, m in models.items():
    lines.append(f"| {name} | " + " | ".join(f"{m['by_dataset'][d]:.3f}" for d in datasets) + " |")
  lines += ["", "Perplexity is exp(-mean log P(true next occupation)) over the valid occupations; 'raw' uses the",
            "LLM's probability of the title's tokens before renormalising over titles. The move task predicts",
            "whether the next occupation differs from the current one (P(move) = 1 - P(same occupation)).",
            f"Labour-force exits: {metrics['labour_force_task']}.", "",
            "## Calibration", "", "![by occupation](calibration_occupation.png)", "",
            "![by subgroup](calibration_subgroup.png)", ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="run directory of labor_jax.train")
  ap.add_argument("--split", default="test", choices=("train", "validation", "test"))
  ap.add_argument("--out", help="output directory (default RUN/eval_SPLIT)")
  ap.add_argument("--no-career", action="store_true", help="skip the CAREER-style transformer baseline")
  args = ap.parse_args(argv)
  try:
    evaluate(args.run, args.split, args.out, career=not args.no_career)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  report = Path(args.out or Path(args.run) / f"eval_{args.split}") / "report.md"
  print(report.read_text().split("## Perplexity by years")[0].strip())
  print(f"\nfull report: {report}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
