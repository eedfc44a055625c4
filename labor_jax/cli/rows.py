"""The rows of a comparison table on the NLSY test split: the main job's and ``experiments foundation``'s.

Each row is a model's log-probability of every test transition's true next occupation, on the same
transitions whatever its tokenizer (a model scored on another dataset directory must hold the same test
workers, years and occupations: :func:`labor_jax.evaluation.check_same_transitions`). The table gives each
row its perplexity, a bootstrap interval over test workers, and the paired interval of its
log-perplexity minus the reference row's (the multinomial logit), from the same resamples for every row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipeline.dataset_dir import DatasetDir
from labor_jax import baselines, evaluation, inference
from labor_jax.career import CareerBaseline, CareerConfig
from labor_jax.cli import common as cli
from labor_jax.metrics import bootstrap_intervals, perplexity, worker_keys

REFERENCE = "multinomial logit"


class Rows:
  """Rows keyed by a short name (``zero_shot``, ``multinomial_logit``, ...), each with its display name and
  the log-probability [N] of the true occupation of each of the N test transitions of ``data``."""

  def __init__(self, data: DatasetDir, *, log: Callable[[str], None] = print, shared_layers: int = 0):
    """``shared_layers``: the first blocks' output is computed once per dataset and shared by the rows whose
    models have the same first blocks (:class:`labor_jax.inference.SharedLower`: SmolLM2 and its fine-tunes with
    adapters in the top blocks only, on titles and on codes)."""
    self.data = data
    self.shared_layers = shared_layers
    self.shared: dict[Path, inference.SharedLower] = {}  # by dataset directory
    self.surveys = data.datasets
    self.ref = evaluation.transitions_of(data, self.surveys)
    self.y = self.ref["occ"].to_numpy()
    self.logp: dict[str, np.ndarray] = {}
    self.names: dict[str, str] = {}
    self.log = log

  def add(self, key: str, name: str, logp: np.ndarray) -> None:
    """A row from log-probabilities of the true occupations [N]."""
    if key in self.logp:
      raise ValueError(f"row {key!r} given twice")
    self.logp[key], self.names[key] = np.asarray(logp, np.float64), name

  def score(self, key: str, name: str, source: str | Path, data: DatasetDir | None = None, *,
            context: np.ndarray | None = None) -> np.ndarray:
    """Scores the model ``source`` (a run or Hugging Face directory) on ``data`` (default: the table's),
    with ``context`` tokens before every resume, adds its row, says its perplexity, and returns its
    normalised log-probabilities [N, J]. A run computes in its own ``model.dtype``, a Hugging Face model
    in ``model.dtype: auto``'s (bfloat16 where the hardware runs it natively), as a fine-tune of it does."""
    data = self.data if data is None else data
    table = evaluation.transitions_of(data, self.surveys)
    evaluation.check_same_transitions(self.ref, table, f"{name} ({data.path})")
    dtype = inference.source_dtype(source, "auto")
    shared = None
    if self.shared_layers and context is None:
      shared = self.shared.setdefault(Path(data.path).resolve(), inference.SharedLower(self.shared_layers))
    norm, _, what = evaluation.score_transitions(source, data, table, "test", context=context, dtype=dtype,
                                                 shared=shared)
    self.add(key, name, norm[np.arange(len(self.y)), self.y])
    self.log(f"{name} ({what}): perplexity {perplexity(self.logp[key]):.3f}")
    return norm

  def ensemble(self, key: str, name: str, members: list[np.ndarray]) -> None:
    """The mixture (mean of probabilities) of the members' normalised log-probabilities [N, J]."""
    probs = np.mean([np.exp(m) for m in members], axis=0)
    self.add(key, name, np.log(probs[np.arange(len(self.y)), self.y]))
    self.log(f"{name}: perplexity {perplexity(self.logp[key]):.3f}")

  def add_baselines(self, career: bool = True, career_epochs: int | None = None) -> None:
    """The multinomial logit, first-order Markov and empirical frequencies (fitted on the training split,
    tuned on validation) and, with ``career``, the CAREER-style transformer (``career_epochs``: at most that
    many passes, in place of its config's 60 early-stopped ones: the jobs' ``--quick``)."""
    titles = self.data.titles()
    panel = self.data.panel()
    full = baselines.transition_table(panel, titles.index)
    train, valid = (full[full["split"] == s] for s in ("train", "validation"))
    rows = np.arange(len(self.y))
    for cls in (baselines.MultinomialLogit, baselines.Markov, baselines.EmpiricalFrequency):
      m = cls().fit(train, valid, len(titles))
      self.add(m.name.replace(" ", "_"), m.name, np.log(m.predict(self.ref)[rows, self.y]))
    if career:
      cfg = CareerConfig() if career_epochs is None else CareerConfig(epochs=career_epochs)
      cb = CareerBaseline(cfg).fit(panel, titles.index, log=lambda *a: None)
      self.add("career", cb.name, np.log(cb.predict(self.ref, panel[panel["split"] == "test"])[rows, self.y]))

  def result(self, bootstrap: int, seed: int = 0, reference: str = REFERENCE) -> dict:
    """Every row's perplexity and intervals (``bootstrap`` resamples of the test workers, paired against
    the row ``reference``), with the split's size."""
    ref_key = reference.replace(" ", "_")
    workers = worker_keys(self.ref)
    ci = bootstrap_intervals(self.logp, workers, ref_key, resamples=bootstrap, seed=seed) if bootstrap else {}
    return {"transitions": len(self.ref), "workers": int(len(np.unique(workers))), "reference": reference,
            "bootstrap": {"resamples": bootstrap, "seed": seed, "cluster": "worker"},
            "rows": {k: {"name": self.names[k], "perplexity": perplexity(v), **ci.get(k, {})}
                     for k, v in self.logp.items()}}


def table_lines(result: dict) -> list[str]:
  """The markdown table of ``result`` (:meth:`Rows.result`), best row first, with the interval legend."""
  ref_key = result["reference"].replace(" ", "_")
  lines = ["| model | perplexity [95% CI] | log-ppl difference to the multinomial logit [95% CI] |",
           "| --- | ---: | ---: |"]
  for k, r in sorted(result["rows"].items(), key=lambda kv: kv[1]["perplexity"]):
    diff = "(reference)" if k == ref_key else cli.diff_cell(r, star=True)
    ci = r.get("perplexity_ci")
    ppl = f"{r['perplexity']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    lines.append(f"| {r['name']} | {ppl} | {diff} |")
  resamples = result["bootstrap"]["resamples"]
  lines += ["", (f"Intervals from {resamples:,} bootstrap resamples of the test workers (the same for every row); "
                 "* the paired interval excludes zero; a positive difference is worse than the logit.")]
  return lines
