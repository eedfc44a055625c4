"""Econometric baselines for P(next occupation | history), on the same split as the LLM.

Every model is fitted on the train split's transitions, tuned on validation, and returns
a [n, J] probability matrix for a transition table (:func:`transition_table`):

* ``EmpiricalFrequency``: the share of each occupation among training destinations.
* ``Markov``: first-order transition counts plus additive smoothing (alpha tuned).
* ``MultinomialLogit``: the paper's econometric benchmark: multinomial logit on the
  previous and second-previous occupation (second-order Markov terms), education,
  race/ethnicity, region, birth cohort, years of history and year fixed effects,
  with an L2 penalty tuned on validation (scikit-learn's lbfgs solver).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COVARIATES = ("education", "race", "ethnicity", "region", "sex")


def transition_table(panel: pd.DataFrame, titles_index: dict[str, int]) -> pd.DataFrame:
  """One row per (worker, entry t >= 1): the target, its history and covariates.

  Columns: dataset, person_id, split, year, t (entries before this one), occ (target index),
  prev, prev2 (-1 when t < 2), gap, and the covariates present in the panel.
  """
  p = panel.sort_values(["dataset", "person_id", "year"], kind="stable").reset_index(drop=True)
  key = p["dataset"].astype(str) + "\x00" + p["person_id"].astype(str)
  t = p.groupby(key, sort=False).cumcount().to_numpy()
  occ = p["occupation"].map(titles_index).to_numpy()
  prev = np.r_[-1, occ[:-1]]
  prev2 = np.r_[-1, -1, occ[:-2]]
  year = p["year"].to_numpy()
  gap = year - np.r_[year[0], year[:-1]] - 1
  out = pd.DataFrame({"dataset": p["dataset"], "person_id": p["person_id"], "year": year, "t": t, "occ": occ,
                      "prev": prev, "prev2": np.where(t >= 2, prev2, -1), "gap": gap})
  if "split" in p.columns:
    out["split"] = p["split"]
  for c in COVARIATES + ("birth_year",):
    if c in p.columns:
      out[c] = p[c]
  return out[t >= 1].reset_index(drop=True)


def categorical(values: pd.Series) -> pd.Series:
  """Values as category labels (strings), missing ones as "NA"."""
  return values.map(lambda v: "NA" if pd.isna(v) else str(v))


def log_likelihood(probs: np.ndarray, y: np.ndarray) -> float:
  return float(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


class EmpiricalFrequency:
  name = "empirical frequencies"

  def fit(self, train: pd.DataFrame, valid: pd.DataFrame, j: int):
    counts = np.bincount(train["occ"], minlength=j) + 1.0
    self.p = counts / counts.sum()
    return self

  def predict(self, df: pd.DataFrame) -> np.ndarray:
    return np.tile(self.p, (len(df), 1))


class Markov:
  name = "first-order Markov"

  def fit(self, train: pd.DataFrame, valid: pd.DataFrame, j: int):
    counts = np.zeros((j, j))
    np.add.at(counts, (train["prev"].to_numpy(), train["occ"].to_numpy()), 1.0)
    self.counts, best = counts, None
    for alpha in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0):
      self.alpha = alpha
      ll = log_likelihood(self.predict(valid), valid["occ"].to_numpy()) if len(valid) else 0.0
      if best is None or ll > best[0]:
        best = (ll, alpha)
    self.alpha = best[1]
    return self

  def predict(self, df: pd.DataFrame) -> np.ndarray:
    rows = self.counts[df["prev"].to_numpy()] + self.alpha
    return rows / rows.sum(1, keepdims=True)


class MultinomialLogit:
  name = "multinomial logit"

  def _design(self, df: pd.DataFrame, fit: bool = False):
    from scipy import sparse
    cat = categorical
    cols = {"prev": cat(df["prev"]), "prev2": cat(df["prev2"]), "year": cat(df["year"]),
            "t": cat(df["t"].clip(upper=10))}
    for c in COVARIATES:
      if c in df.columns:
        cols[c] = cat(df[c])
    if "birth_year" in df.columns:
      by = pd.to_numeric(df["birth_year"], errors="coerce")
      cols["cohort"] = cat(by // 3 * 3)
    if fit:
      self.levels = {k: sorted(v.unique()) for k, v in cols.items()}
    blocks = []
    for k, v in cols.items():
      idx = pd.Categorical(v, categories=self.levels[k]).codes
      m = sparse.csr_matrix((np.ones((idx >= 0).sum()), (np.flatnonzero(idx >= 0), idx[idx >= 0])),
                            shape=(len(df), len(self.levels[k])))
      blocks.append(m)
    return sparse.hstack(blocks).tocsr()

  def fit(self, train: pd.DataFrame, valid: pd.DataFrame, j: int):
    from sklearn.linear_model import LogisticRegression
    self.j = j
    x = self._design(train, fit=True)
    xv = self._design(valid) if len(valid) else None
    best = None
    for c in (0.03, 0.1, 0.3, 1.0, 3.0):
      m = LogisticRegression(C=c, max_iter=2000).fit(x, train["occ"])
      if xv is None:
        best = (0.0, m)
        break
      ll = log_likelihood(self._full(m, xv), valid["occ"].to_numpy())
      if best is None or ll > best[0]:
        best = (ll, m)
    self.model = best[1]
    return self

  def _full(self, m, x) -> np.ndarray:
    out = np.full((x.shape[0], self.j), 1e-9)
    out[:, m.classes_] = m.predict_proba(x)
    return out / out.sum(1, keepdims=True)

  def predict(self, df: pd.DataFrame) -> np.ndarray:
    return self._full(self.model, self._design(df))
