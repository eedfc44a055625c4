"""Which checkpoint a run reports: the one place that knows the validation metrics' names.

``eval_metric`` (a run config field) names the validation metric whose lowest value picks the
best checkpoint (orbax ``BestN`` while training, ``"best"`` when a run is read back):

* ``occupation_perplexity`` (the default): exp(-mean log P(true title | history)) over every
  validation worker's entries after the first, normalised over the titles, as evaluation reports
  it (:mod:`labor_jax.training.validation`); recorded as ``val_occupation_ppl``;
* ``token_loss``: the mean validation token cross-entropy; recorded as ``val_loss``.

Every evaluation records ``val_loss``. A step without the run's metric (checkpoints of runs from
before ``eval_metric`` existed, or of a dataset without title spans) is judged by ``val_loss``.
No JAX here: the run config imports it.
"""

from __future__ import annotations

EVAL_METRICS = {"occupation_perplexity": "val_occupation_ppl", "token_loss": "val_loss"}  # choice -> recorded key
DEFAULT = "occupation_perplexity"
TOKEN_LOSS = EVAL_METRICS["token_loss"]
TB_TAGS = {"val_loss": "eval/loss", "val_occupation_ppl": "eval/occupation_perplexity"}  # recorded key -> TensorBoard
LABELS = {"val_loss": "validation loss", "val_occupation_ppl": "validation occupation perplexity"}  # -> printed line


def key(eval_metric: str) -> str:
  """The recorded key of an ``eval_metric`` choice."""
  return EVAL_METRICS[eval_metric]


def best_step(metrics_by_step: dict[int, dict | None], metric: str = EVAL_METRICS[DEFAULT]) -> int | None:
  """The step with the lowest ``metric`` among the steps that recorded it; when none did, the lowest
  ``val_loss`` (runs from before ``eval_metric``); None when no step has either. Ties: the earliest."""
  for k in dict.fromkeys((metric, TOKEN_LOSS)):
    have = {s: m[k] for s, m in sorted(metrics_by_step.items()) if m and k in m}
    if have:
      return min(have, key=have.get)
  return None
