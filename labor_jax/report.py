"""The evaluation report: markdown tables and calibration plots from evaluation's metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _ci(m: dict) -> str:
  return f"[{m['perplexity_ci'][0]:.3f}, {m['perplexity_ci'][1]:.3f}]" if "perplexity_ci" in m else ""


def _diff(m: dict) -> str:
  if "log_ppl_diff" not in m:
    return ""
  lo, hi = m["log_ppl_diff_ci"]
  return f"{m['log_ppl_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if m["excludes_zero"] else "")


def perplexity_table(metrics: dict) -> list[str]:
  """The main table (models sorted by perplexity) as markdown lines."""
  ref = metrics.get("bootstrap", {}).get("reference", "the main model")
  lines = [f"| model | perplexity | 95% CI | log-ppl difference to {ref} [95% CI] | raw (LLM) | stays | moves "
           "| move log-loss | move AUC |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, m in sorted(metrics["models"].items(), key=lambda kv: kv[1]["perplexity"]):
    raw = f"{m['perplexity_raw']:.3f}" if "perplexity_raw" in m else ""
    lines.append(f"| {name} | {m['perplexity']:.3f} | {_ci(m)} | {_diff(m)} | {raw} | {m['perplexity_stays']:.3f} "
                 f"| {m['perplexity_moves']:.3f} | {m['move_logloss']:.4f} | {m['move_auc']:.3f} |")
  return lines


def differences_in_words(metrics: dict) -> list[str]:
  """One sentence per model: whether its paired interval against the reference excludes zero."""
  b = metrics.get("bootstrap", {})
  ref, out = b.get("reference"), []
  for name, m in sorted(metrics["models"].items(), key=lambda kv: kv[1]["perplexity"]):
    if "log_ppl_diff" not in m:
      continue
    lo, hi = m["log_ppl_diff_ci"]
    if m["excludes_zero"]:
      verdict = f"{name} is {'worse' if lo > 0 else 'better'} than {ref}"
    else:
      verdict = f"{name} and {ref} cannot be told apart"
    out.append(f"{verdict}: log-perplexity difference {m['log_ppl_diff']:+.3f}, 95% interval [{lo:+.3f}, {hi:+.3f}] "
               f"({'excludes' if m['excludes_zero'] else 'includes'} zero)")
  return out


def headline(metrics: dict, summary: dict) -> list[str]:
  """The report's title, the data line and the perplexity table."""
  return [f"# Next-occupation prediction: {metrics['split']} split", "",
          f"{metrics['transitions']:,} transitions of {metrics['workers']:,} workers; data: {summary.get('source', '')}, "
          f"template {summary.get('template')} ({summary.get('variant')}).", "",
          "## Perplexity (lower is better)", "", *perplexity_table(metrics)]


def markdown(metrics: dict, summary: dict) -> str:
  models = metrics["models"]
  lines = headline(metrics, summary)
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
  b = metrics.get("bootstrap")
  if b and b.get("resamples"):
    lines += ["", f"Intervals: 95% percentile intervals from {b['resamples']:,} bootstrap resamples of the workers "
              f"(a worker's transitions are resampled together; seed {b['seed']}); the difference column is "
              f"log ppl(model) - log ppl({b['reference']}) on the same resamples, * where its interval excludes zero.",
              "", *[f"- {line}." for line in differences_in_words(metrics)]]
  lines += ["", "Perplexity is exp(-mean log P(true next occupation)) over the valid occupations; 'raw' uses the",
            "LLM's probability of the title's tokens before renormalising over titles. The move task predicts",
            "whether the next occupation differs from the current one (P(move) = 1 - P(same occupation)).",
            f"Labour-force exits: {metrics['labour_force_task']}.", "",
            "## Calibration", "", "![by occupation](calibration_occupation.png)", "",
            "![by subgroup](calibration_subgroup.png)", ""]
  return "\n".join(lines)


def calibration_plots(out_dir: Path, table: pd.DataFrame, probs: dict[str, np.ndarray], titles) -> None:
  """``calibration_occupation.png`` (mean predicted vs observed share of each destination) and
  ``calibration_subgroup.png`` (predicted vs observed move rate in subgroups of at least 20)."""
  import matplotlib  # imported here: the Agg backend is chosen for this process only when plotting
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
