"""``python -m labor_jax.predict --run RUN --history worker.json``: top-k next occupations of one worker.

The history is JSON (or a CSV in the panel format, one row per year, for one person), read by
:func:`data_pipeline.history.load_history` (the format is described there; ``labor_jax.forecast``
reads the same files). The prompt is the worker's resume rendered as in training, with the next entry
opened (data_pipeline.resume.Resume.prompt). Probabilities are normalised over the run's
occupation titles; the Python API gives the same as a DataFrame (``labor_jax.load(...).next_distribution``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from data_pipeline import resume
from data_pipeline.history import load_history
from labor_jax import api, runtime
from labor_jax.cli import common as cli
from labor_jax.rundir import RunDir


def predict(model: str | Path, history: str | Path, top_k: int = 5, *, titles: str | Path | None = None,
            variant: str | None = None, adapter: str | Path | None = None, step: int | str | None = None, mesh=None,
            chunk: int | None = None, dtype: str | None = None) -> list[tuple[str, float]]:
  """The ``top_k`` most likely next occupations (title, probability) of the worker in ``history``.

  ``model`` is any source :func:`labor_jax.load` opens: a run directory (titles, template variant
  and survey name from its dataset) or a Hugging Face directory / .gguf file (with a PEFT
  ``adapter``; ``titles`` is then required: a ``code,title`` CSV or "occ1990dd"; ``dtype``: its compute dtype)."""
  m = api.load(model, step=step, adapter=adapter, titles=titles, variant=variant, mesh=mesh, chunk=chunk,
               batch_workers=1, dtype=dtype)
  panel, next_year, next_edu = load_history(history, m.titles, m.dataset)
  p = m.next_distribution(panel, next_year=next_year, next_education=next_edu).iloc[0]
  top = p.sort_values(ascending=False, kind="stable")[:top_k]
  return [(str(title), float(prob)) for title, prob in top.items()]


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_flags(ap)
  ap.add_argument("--titles", help="with --hf: the occupation titles (code,title CSV, or occ1990dd)")
  ap.add_argument("--variant", choices=resume.VARIANTS, help="with --hf: titles (default) or codes")
  ap.add_argument("--history", required=True, help="worker history: JSON or panel-format CSV")
  ap.add_argument("--top-k", type=cli.positive, default=5, help="titles to print, most likely first")
  cli.add_step_flag(ap)
  cli.add_mesh_flags(ap, batch=False)
  args = ap.parse_args(argv)
  try:
    model = cli.model_source(args, hf_only=("adapter", "dtype", "titles", "variant"))
    if args.run:
      RunDir(args.run).check()
    cli.start(args)
    top = predict(model, args.history, args.top_k, titles=args.titles, variant=args.variant, adapter=args.adapter,
                  step=cli.step(args) if args.run else None, mesh=cli.mesh(args, model), chunk=args.chunk,
                  dtype=args.dtype)
  except cli.INPUT_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index():
    return 0
  for title, prob in top:
    print(f"{prob:7.3f}  {title}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
