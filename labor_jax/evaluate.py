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

from labor_jax import cli, evaluation, report, runtime
from labor_jax.config import ConfigError
from labor_jax.rundir import RunDir
from labor_jax.sharding import ShardingError


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="run directory of labor_jax.train")
  ap.add_argument("--split", default="test", choices=("train", "validation", "test"))
  ap.add_argument("--out", help="output directory (default RUN/eval_SPLIT)")
  ap.add_argument("--no-career", action="store_true", help="skip the CAREER-style transformer baseline")
  cli.add_mesh_flags(ap)
  args = ap.parse_args(argv)

  try:
    cli.start(args)
    mesh = cli.mesh(args, RunDir(args.run).model_config())
    metrics = evaluation.evaluate(args.run, args.split, args.out, career=not args.no_career, mesh=mesh,
                                  batch_workers=args.batch_workers, chunk=args.chunk, progress=not args.no_progress)
  except (FileNotFoundError, ConfigError, ShardingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index():
    return 0
  out = Path(args.out) if args.out else RunDir(args.run).eval_dir(args.split)
  print("\n".join(report.perplexity_table(metrics)))
  print(f"\nfull report: {out / 'report.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
