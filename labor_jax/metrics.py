"""What evaluation reports for one model: perplexities and the move/stay task.

``model_metrics(probs_NJ, table)`` scores a [N, J] matrix of next-occupation probabilities
against a transition table (:func:`labor_jax.baselines.transition_table`: N rows of
``occ``, ``prev``, ``t``, ``dataset``). N transitions, J occupations.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def perplexity(logp: np.ndarray) -> float:
  """exp(-mean log P); NaN for no rows."""
  return float(math.exp(-np.mean(logp))) if len(logp) else float("nan")


def true_logp(probs_NJ: np.ndarray, y_N: np.ndarray) -> np.ndarray:
  """log P(true occupation) of each transition [N], probabilities clipped at 1e-12."""
  return np.log(np.clip(probs_NJ[np.arange(len(y_N)), y_N], 1e-12, None))


def worker_keys(table: pd.DataFrame) -> np.ndarray:
  """The worker of each transition (survey and person id): the clusters of :func:`bootstrap_intervals`."""
  return (table["dataset"].astype(str) + "\x00" + table["person_id"].astype(str)).to_numpy()


def auc(y: np.ndarray, p: np.ndarray) -> float:
  return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def model_metrics(probs_NJ: np.ndarray, table: pd.DataFrame) -> dict:
  """Perplexity overall, for stays and moves, by dataset and by years of history; the move task
  (P(move) = 1 - P(same occupation)): log-loss and AUC."""
  y = table["occ"].to_numpy()
  rows = np.arange(len(y))
  lp = true_logp(probs_NJ, y)
  stay = (table["prev"].to_numpy() == y)
  p_move = np.clip(1 - probs_NJ[rows, table["prev"].to_numpy()], 1e-6, 1 - 1e-6)
  moved = (~stay).astype(float)
  return {
      "perplexity": perplexity(lp), "n": int(len(y)),
      "perplexity_stays": perplexity(lp[stay]), "perplexity_moves": perplexity(lp[~stay]),
      "by_dataset": {d: perplexity(lp[table["dataset"].to_numpy() == d]) for d in sorted(table["dataset"].unique())},
      "by_history_years": {int(t): perplexity(lp[table["t"].to_numpy() == t]) for t in sorted(table["t"].unique())},
      "move_logloss": float(-np.mean(moved * np.log(p_move) + (1 - moved) * np.log(1 - p_move))),
      "move_auc": auc(moved, p_move),
  }


def bootstrap_intervals(logp: dict[str, np.ndarray], clusters: np.ndarray, reference: str, *,
                        resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
  """Percentile intervals from a bootstrap over clusters (workers: a worker's transitions move
  together), the same resamples for every model.

  ``logp``: model -> log P(true occupation) per transition [N]; ``clusters``: the worker of each
  transition. For each model: ``perplexity_ci`` [lo, hi]; for each model but ``reference``, the
  paired interval of ``log ppl(model) - log ppl(reference)`` (``log_ppl_diff``,
  ``log_ppl_diff_ci``) and whether it excludes zero.
  """
  ids, inverse = np.unique(clusters, return_inverse=True)
  w = len(ids)
  n_w = np.bincount(inverse, minlength=w).astype(float)
  counts = np.random.default_rng(seed).multinomial(w, np.full(w, 1.0 / w), size=resamples).astype(float)  # [R, W]
  tokens = counts @ n_w
  alpha = (1 - level) / 2
  log_ppl = {}
  for name, lp in logp.items():
    log_ppl[name] = -(counts @ np.bincount(inverse, weights=lp, minlength=w)) / tokens  # [R]
  out = {}
  for name, lp in logp.items():
    lo, hi = np.exp(np.quantile(log_ppl[name], [alpha, 1 - alpha]))
    out[name] = {"perplexity_ci": [float(lo), float(hi)]}
    if name != reference:
      diff = log_ppl[name] - log_ppl[reference]
      point = float(-np.mean(lp) + np.mean(logp[reference]))
      lo, hi = np.quantile(diff, [alpha, 1 - alpha])
      out[name].update(log_ppl_diff=point, log_ppl_diff_ci=[float(lo), float(hi)], excludes_zero=bool(lo > 0 or hi < 0))
  return out
