"""Econometric baselines for P(next occupation | history), on the same split as the LLM.

Every model is fitted on the train split's transitions, tuned on validation, and returns
a [n, J] probability matrix for a transition table (:func:`transition_table`):

* ``EmpiricalFrequency``: the share of each occupation among training destinations.
* ``Markov``: first-order transition counts plus additive smoothing (alpha tuned).
* ``MultinomialLogit``: the paper's econometric benchmark: multinomial logit on the
  previous and second-previous occupation (second-order Markov terms) and the covariates
  of :func:`covariate_features` (year fixed effects, years of history, education, sex,
  race/ethnicity, region, birth cohort), with an L2 penalty tuned on validation
  (scikit-learn's lbfgs solver).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.linear_model import LogisticRegression

from data_pipeline.panel import entry_table
from labor_jax.metrics import true_logp

COVARIATES = ("education", "race", "ethnicity", "region", "sex")  # demographic columns a panel may carry


def transition_table(panel: pd.DataFrame, titles_index: dict[str, int]) -> pd.DataFrame:
  """The transitions of :func:`data_pipeline.panel.entry_table` (entries t >= 1) as model inputs.

  Columns: dataset, person_id, year, t, occ (target index), prev, prev2 (indices; -1 when
  t < 2), gap, split (when the panel has one), and the covariates and birth year present.
  """
  e = entry_table(panel)
  index = lambda col: e[col].map(titles_index).fillna(-1).astype(int).to_numpy()  # noqa: E731
  out = pd.DataFrame({"dataset": e["dataset"], "person_id": e["person_id"], "year": e["year"].to_numpy(),
                      "t": e["t"].to_numpy(), "occ": index("occupation"), "prev": index("prev_occupation"),
                      "prev2": index("prev2_occupation"), "gap": e["gap"].to_numpy()})
  for c in ("split",) + COVARIATES + ("birth_year",):
    if c in e.columns:
      out[c] = e[c]
  return out[out["t"] >= 1].reset_index(drop=True)


def categorical(values: pd.Series) -> pd.Series:
  """Values as category labels (strings), missing ones as "NA"."""
  return values.map(lambda v: "NA" if pd.isna(v) else str(v))


def covariate_features(table: pd.DataFrame) -> dict[str, pd.Series]:
  """The covariates every model conditions on, as category labels, in a fixed order: calendar
  year, education, years of history (``t``, capped at 10), the demographic columns present,
  and birth cohort (3-year bins) when the panel has birth years. Used by the multinomial logit
  (one-hot of every level seen in training) and by the CAREER-style transformer (one embedding
  each, for the covariates that vary in its training data: :func:`informative`)."""
  cols = {"year": categorical(table["year"])}
  if "education" in table.columns:
    cols["education"] = categorical(table["education"])
  cols["t"] = categorical(table["t"].clip(upper=10))
  for c in COVARIATES[1:]:
    if c in table.columns:
      cols[c] = categorical(table[c])
  if "birth_year" in table.columns:
    cols["cohort"] = categorical(pd.to_numeric(table["birth_year"], errors="coerce") // 3 * 3)
  return cols


def informative(features: dict[str, pd.Series]) -> dict[str, list[str]]:
  """The sorted levels of each feature that takes more than one value. A constant covariate (sex
  in an all-male panel) carries nothing; the logit's unpenalised intercept absorbs its one-hot
  column, but a transformer would learn it as one more bias vector."""
  return {k: sorted(v.unique()) for k, v in features.items() if v.nunique() > 1}


def log_likelihood(probs: np.ndarray, y: np.ndarray) -> float:
  return float(true_logp(probs, y).mean())


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
    cols = {"prev": categorical(df["prev"]), "prev2": categorical(df["prev2"]), **covariate_features(df)}
    if fit:
      self.levels = {k: sorted(v.unique()) for k, v in cols.items()}
    blocks = []
    for k, levels in self.levels.items():
      idx = pd.Categorical(cols[k], categories=levels).codes
      m = sparse.csr_matrix((np.ones((idx >= 0).sum()), (np.flatnonzero(idx >= 0), idx[idx >= 0])),
                            shape=(len(df), len(levels)))
      blocks.append(m)
    return sparse.hstack(blocks).tocsr()

  def fit(self, train: pd.DataFrame, valid: pd.DataFrame, j: int):
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
