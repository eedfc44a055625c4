"""``python -m labor_jax.forecast --run RUN (--history worker.json | --split test) --years 5 --samples 200 --out DIR``

Career forecasts: S sampled future paths of Y years per worker (:mod:`labor_jax.sampler`), summarised
in ``--out`` (forecast.json, paths.csv and, for a split, the transition matrix with its heatmaps;
see :mod:`labor_jax.forecasting`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.errors import PanelError
from labor_jax import forecasting, runtime
from labor_jax.cli import common as cli
from labor_jax.config import ConfigError


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="run directory of labor_jax.train")
  ap.add_argument("--history", help="one worker's history (JSON or panel CSV, as labor_jax.predict reads it)")
  ap.add_argument("--data", help="dataset directory (titles, and the split's workers); default: the run's own")
  ap.add_argument("--split", choices=("train", "validation", "test"),
                  help="without --history: forecast every worker of this split (default test)")
  ap.add_argument("--years", type=cli.positive, default=5, help="future years per path (Y)")
  ap.add_argument("--samples", type=cli.positive, default=100, help="sampled paths per worker (S)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--education", help="education written in every future entry (default: carried forward)")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--batch-workers", type=cli.positive, default=8, help="workers per sampler call (each with S rows)")
  ap.add_argument("--show-paths", type=cli.count, default=5, help="sample paths per worker in forecast.json")
  cli.add_step_flag(ap)
  args = ap.parse_args(argv)
  if args.history and args.split:
    ap.error("--split forecasts a split's workers and --history one worker: give one of them")
  try:
    doc = forecasting.run_forecast(args.run, args.out, history=args.history, data_dir=args.data,
                                   split=args.split or "test",
                       years=args.years, samples=args.samples, seed=args.seed, education=args.education,
                       batch_workers=args.batch_workers, show_paths=args.show_paths, step=cli.step(args))
  except (PanelError, OSError, ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.history:
    for year in doc["workers"][0]["forecast"]:
      top = list(year["probability"].items())[:3]
      print(f"{year['year']}: " + "; ".join(f"{t} {p:.3f}" for t, p in top))
  print(f"{len(doc['workers'])} worker(s), {args.samples} paths of {args.years} years each: {Path(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
