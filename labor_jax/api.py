"""The Python API for economists: ``labor_jax.load(source)`` and a :class:`Model` that answers in DataFrames.

::

  import labor_jax
  m = labor_jax.load("runs/demo")                        # a run (best checkpoint), an HF directory or a .gguf
  scores = m.score(panel)                                 # one row per transition of the panel
  dist = m.next_distribution(history)                     # one row per worker, one column per title

Both take pandas DataFrames in the panel schema (:mod:`data_pipeline.panel`: ``person_id``,
``year``, ``occupation`` (a code or a title of the model's titles table) and optionally
``dataset``, ``education``, ``sex``, ``race``, ``ethnicity``, ``region``, ``birth_year``), render
each worker's resume exactly as training did (:mod:`data_pipeline.resume`), and score every title
through the inference layer's one scoring step (:mod:`labor_jax.inference`). Bad rows stop with
one :class:`data_pipeline.errors.PanelError` line naming row and column.

The scorer stays a plain JAX function: ``labor_jax.scorer.score(m.config, m.params,
m.candidate_tree(), tokens, mask, ends)`` jits, vmaps and differentiates.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from data_pipeline import resume
from data_pipeline.errors import PanelError
from data_pipeline.panel import YEAR_RANGE, validate
from data_pipeline.titles import TitleTable, load_titles, text_problem
from labor_jax import inference, scorer
from labor_jax.config import ConfigError

FRAME = "<DataFrame>"  # how errors name a DataFrame argument


class Model:
  """A model with its titles: what :func:`load` returns."""

  def __init__(self, loaded: inference.Loaded, titles: TitleTable, variant: str, dataset: str, *,
               batch_workers: int = 16, chunk: int | None = None):
    self.loaded = loaded
    self.titles = titles  # the occupation titles scored (code -> title)
    self.variant = variant  # "titles" or "codes": how occupations appear in the resumes
    self.dataset = dataset  # survey name for rows without a ``dataset`` column
    self.batch_workers = batch_workers  # workers per call of the scoring step
    self.chunk = chunk  # workers per tree pass (None: the inference layer's default)

  def __repr__(self):
    return f"Model({self.loaded.description}, {len(self.titles)} titles, {self.variant})"

  @property
  def config(self):
    return self.loaded.config

  @property
  def params(self):
    return self.loaded.params

  @property
  def tokenizer(self):
    return self.loaded.tokenizer

  def candidate_tree(self) -> scorer.CandidateTree:
    """The titles as the scorer's candidate tree (for calling :func:`labor_jax.scorer.score` directly)."""
    return scorer.CandidateTree.build(self.loaded.candidates(self.titles, self.variant))

  def _panel(self, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` validated against the titles (occupations given as titles are mapped to their codes)."""
    if not isinstance(df, pd.DataFrame):
      raise TypeError(f"expected a pandas DataFrame in the panel schema, got {type(df).__name__}")
    twice = df.columns[df.columns.duplicated()]
    if len(twice):
      raise PanelError(FRAME, f"column {twice[0]!r} appears more than once")
    df = df.astype({c: object for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)})
    if "occupation" in df.columns:
      by_title = dict(zip(self.titles.titles, self.titles.codes))
      by_folded = {t.casefold(): c for t, c in by_title.items()}

      def code(v):  # a title (padded, in any case) as its code; a whole float (5.0 after a merge) as the integer
        if isinstance(v, str):
          v = v.strip()
          return by_title.get(v, by_folded.get(v.casefold(), v))
        if isinstance(v, float) and v.is_integer():
          return int(v)
        return v
      df["occupation"] = df["occupation"].map(code)
    panel, _ = validate(df, FRAME, self.titles, dataset=self.dataset)
    return panel

  @staticmethod
  def _ids(df: pd.DataFrame) -> dict:
    """The caller's person_id values by the text id the panel uses (``str(v).strip()``), where each text id
    comes from one value: the results then carry the caller's ids (integers stay integers, so they merge back)."""
    if not isinstance(df, pd.DataFrame) or "person_id" not in df.columns:
      return {}
    found: dict = {}
    for v in df["person_id"].dropna().unique():
      found.setdefault(str(v).strip(), set()).add(v)
    return {k: next(iter(vs)) for k, vs in found.items() if len(vs) == 1}

  def _score(self, rows: list[tuple[np.ndarray, np.ndarray]], progress: bool, desc: str):
    return inference.score_examples(self.loaded, self.titles, self.variant, rows, progress=progress, desc=desc,
                                    batch_workers=max(self.batch_workers, inference.batch_size(self.loaded.mesh)),
                                    chunk=self.chunk)

  def score(self, panel: pd.DataFrame, *, top_k: int = 5, progress: bool = False) -> pd.DataFrame:
    """One row per scored transition (every entry after a worker's first) of ``panel``.

    Columns: ``dataset``, ``person_id``, ``year``, ``t`` (entries before this one), ``occupation``
    (the true code), ``title``, ``prob`` and ``logprob`` (of the true title given the worker's history,
    normalised over the titles), then ``top1`` .. ``top{k}`` (titles) with ``top1_prob`` .. Rows are
    sorted by dataset, person and year."""
    _check_integer("top_k", top_k, 0, "a count of titles (an integer >= 0)")
    ids = self._ids(panel)
    panel = self._panel(panel)
    resumes = resume.render_panel(panel, self.titles, self.variant)
    encoded = [self.tokenizer.encode_resume(r) for r in resumes]
    scores = self._score([(e.ids, e.title_spans[:, 0]) for e in encoded], progress, "scoring")
    index = self.titles.index
    out = []
    for r, (logp_TJ, _) in zip(resumes, scores):
      for t in range(1, len(r.entries)):
        e = r.entries[t]
        p_J = np.exp(logp_TJ[t])
        j = index[e.code]
        row = {"dataset": r.dataset, "person_id": ids.get(r.person_id, r.person_id), "year": e.year, "t": t,
               "occupation": e.code,
               "title": self.titles.titles[j], "prob": float(p_J[j]), "logprob": float(logp_TJ[t, j])}
        for k, top in enumerate(np.argsort(-p_J)[:top_k], start=1):
          row[f"top{k}"], row[f"top{k}_prob"] = self.titles.titles[top], float(p_J[top])
        out.append(row)
    columns = ["dataset", "person_id", "year", "t", "occupation", "title", "prob", "logprob"]
    columns += [f"top{k}{s}" for k in range(1, min(top_k, len(self.titles)) + 1) for s in ("", "_prob")]
    return pd.DataFrame(out, columns=columns)  # the columns also when no worker has a transition

  def next_distribution(self, history: pd.DataFrame, *, next_year: int | None = None,
                        next_education: str | None = None, progress: bool = False) -> pd.DataFrame:
    """P(next occupation | history) over every title, one row per worker of ``history``.

    The next entry is ``next_year`` (default: each worker's last year + 1) with ``next_education``
    (default: the worker's last). Returns a DataFrame indexed by ``person_id`` with one column per
    title (table order); each row sums to 1."""
    ids = self._ids(history)
    panel = self._panel(history)
    if next_year is not None:
      if isinstance(next_year, bool) or not isinstance(next_year, numbers.Integral) or not (
          YEAR_RANGE[0] <= next_year <= YEAR_RANGE[1]):
        raise PanelError(FRAME, f"next_year must be a year (an integer in [{YEAR_RANGE[0]}, {YEAR_RANGE[1]}])",
                         column="next_year", value=next_year, has_value=True)
      late = panel[panel["year"] >= next_year]
      if len(late):
        raise PanelError(FRAME, f"next_year must come after every worker's last year (person_id "
                                f"{late['person_id'].iloc[0]!r} has {int(late['year'].max())})",
                         column="next_year", value=next_year, has_value=True)
    if next_education is not None:  # cleaned as the panel's education column is
      problem = None if isinstance(next_education, str) else "expected text"
      next_education = next_education.strip() if isinstance(next_education, str) else next_education
      problem = problem or text_problem(next_education)
      if problem:
        raise PanelError(FRAME, problem, column="next_education", value=next_education, has_value=True)
      next_education = next_education or None  # empty: no education, as an empty cell
    people = panel.drop_duplicates(["dataset", "person_id"])
    if people["person_id"].duplicated().any():
      pid = people.loc[people["person_id"].duplicated(), "person_id"].iloc[0]
      raise PanelError(FRAME, f"person_id {pid!r} appears in two datasets; ask one dataset at a time",
                       column="person_id")
    last = panel.groupby(["dataset", "person_id"], sort=False).tail(1).set_index(["dataset", "person_id"])
    rows, out_ids = [], []
    for r in resume.render_panel(panel, self.titles, self.variant):
      row = last.loc[(r.dataset, r.person_id)]
      year = int(next_year) if next_year is not None else int(row["year"]) + 1  # (next_year checked above)
      education = next_education if next_education is not None else row.get("education")
      tokens = prompt_tokens(r, self.tokenizer, year, education)
      rows.append((tokens, np.asarray([len(tokens)], np.int32)))
      out_ids.append(ids.get(r.person_id, r.person_id))
    scores = self._score(rows, progress, "next occupation")
    probs_WJ = np.exp(np.stack([logp_TJ[0] for logp_TJ, _ in scores]).astype(np.float64))
    probs_WJ /= probs_WJ.sum(axis=1, keepdims=True)  # exact normalisation in float64
    return pd.DataFrame(probs_WJ, index=pd.Index(out_ids, name="person_id"), columns=list(self.titles.titles))


def _check_integer(name: str, value, low: int, what: str) -> None:
  """ConfigError ``"{name}: {what}, got {value!r}"`` unless ``value`` is an integer (numpy's too, not a bool)
  of at least ``low``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ConfigError(f"{name}: {what}, got {value!r}")


def prompt_tokens(worker: resume.Resume | pd.DataFrame, tokenizer, next_year: int, next_education=None, *,
                  titles: TitleTable | None = None, variant: str = "titles") -> np.ndarray:
  """The tokens a prediction continues: the worker's resume (a Resume, or one person's validated panel
  rows with ``titles``) as rendered for training, with the entry of ``next_year`` opened. They equal the
  training tokens before that entry's title."""
  if isinstance(worker, pd.DataFrame):
    worker = resume.render_person(worker, titles, variant)
  return tokenizer.encode_resume(worker.prompt(next_year, next_education)).ids


def load(source: str | os.PathLike, *, step: int | str | None = None, adapter: str | os.PathLike | None = None,
         titles: str | os.PathLike | TitleTable | None = None, variant: str | None = None, dataset: str | None = None,
         mesh: jax.sharding.Mesh | None = None, batch_workers: int = 16, chunk: int | None = None,
         dtype: str | None = None) -> Model:
  """Opens a model for scoring careers (:func:`labor_jax.inference.open_model`: a run directory, a
  Hugging Face directory with an optional PEFT ``adapter``, or a .gguf file).

  A run brings its titles, template variant and survey name (its dataset); for other sources give
  ``titles`` (a TitleTable, a ``code,title`` CSV, or ``"occ1990dd"``, the built-in table) and,
  if not "titles", ``variant``. ``step``: a run's "best" (default), "last" or an int. ``mesh``:
  parameters restored straight into its shardings, batches split over its batch axes. ``dtype``: the compute
  dtype of a Hugging Face or GGUF source ("float32", the default, "bfloat16" or "auto"; a run computes in its
  own ``model.dtype``)."""
  for name, v in (("batch_workers", batch_workers), ("chunk", chunk)):
    if v is not None:
      _check_integer(name, v, 1, "a positive integer")
  loaded = inference.open_model(source, step=step, adapter=adapter, mesh=mesh, dtype=dtype)
  if loaded.kind == inference.RUN:
    data = loaded.dataset()
    table = data.titles() if titles is None else _titles(titles)
    variant = variant or data.variant
    dataset = dataset or (data.datasets or ["worker"])[0]
  elif titles is None:
    raise ConfigError(f"{source}: a {loaded.kind.upper()} model needs titles= (a TitleTable, a code,title CSV or "
                      "'occ1990dd')")
  else:
    table, variant, dataset = _titles(titles), variant or "titles", dataset or "worker"
  if variant not in resume.VARIANTS:
    raise ConfigError(f"variant must be one of {resume.VARIANTS}, got {variant!r}")
  return Model(loaded, table, variant, dataset, batch_workers=batch_workers, chunk=chunk)


def _titles(titles: str | os.PathLike | TitleTable) -> TitleTable:
  return titles if isinstance(titles, TitleTable) else load_titles(titles if isinstance(titles, str) else Path(titles))
