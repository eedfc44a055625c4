"""``python -m labor_jax.evaluate --run RUN --split test``: the LLM against the econometric baselines.

Writes ``metrics.json``, ``report.md``, the calibration plots and ``predictions.csv`` to
``RUN/eval_<split>/`` (see labor_jax.evaluation) and prints the perplexity table.

On several devices the model is restored straight into the shardings of ``--mesh`` and the
workers of each batch are split over its batch axes; on several processes (a TPU pod, SLURM,
or ``--coordinator-address``) each process scores its devices' share and process 0 writes
the one set of files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from labor_jax import evaluation, report, runtime
from labor_jax.cli import common as cli
from labor_jax.config import ConfigError
from labor_jax.rundir import RunDir


def _named(items: list[str]) -> dict[str, str]:
  out = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ConfigError(f"--compare-hf {item!r}: expected NAME=DIR")
    out[name] = path
  return out


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_model_flags(ap, run_help="run directory of labor_jax.train (scored at its best checkpoint)")
  ap.add_argument("--data", help="dataset directory (data_pipeline.build); default: the run's own; required with --hf")
  ap.add_argument("--split", default="test", choices=("train", "validation", "test"))
  ap.add_argument("--out", help="output directory (default RUN/eval_SPLIT; required with --hf)")
  ap.add_argument("--compare-hf", action="append", default=[], metavar="NAME=DIR",
                  help="add a Hugging Face model (or another run) as a row of the report (repeatable)")
  ap.add_argument("--ensemble", nargs="+", metavar="RUN",
                  help="add the mixture (mean of probabilities) of the main model and these runs as a row")
  ap.add_argument("--bootstrap", type=cli.count, default=1000, help="bootstrap resamples of workers for the intervals (0: none)")
  ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  ap.add_argument("--no-career", action="store_true", help="skip the CAREER-style transformer baseline")
  cli.add_mesh_flags(ap)
  args = ap.parse_args(argv)

  try:
    model = cli.model_source(args)
    cli.start(args)
    ensembles = {f"ensemble of {1 + len(args.ensemble)} models": [model, *args.ensemble]} if args.ensemble else None
    metrics = evaluation.evaluate(
        model, args.split, args.out, data=args.data, adapter=args.adapter, career=not args.no_career,
        extra_llms=_named(args.compare_hf), ensembles=ensembles, mesh=cli.mesh(args, model),
        batch_workers=args.batch_workers, chunk=args.chunk, progress=not args.no_progress,
        bootstrap=args.bootstrap, seed=args.seed, dtype=args.dtype)
  except cli.INPUT_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index():
    return 0
  out = Path(args.out) if args.out else RunDir(args.run).eval_dir(args.split)
  print("\n".join(report.perplexity_table(metrics)))
  print("\n".join(report.differences_in_words(metrics)))
  print(f"\nfull report: {out / 'report.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
