"""``python -m labor_jax.train --config configs/demo.yaml [--set optim.lr=1e-4 ...]``

Fine-tunes (or trains from scratch) a Llama-family model on a resume dataset. The run
directory (layout in labor_jax.rundir) receives the resolved ``config.yaml``, the
tokenizer, orbax ``checkpoints/``, ``metrics.jsonl`` and TensorBoard events (``tb/``).
Re-running the same command resumes from the newest readable checkpoint. SIGTERM saves a
checkpoint and exits 0.

Exit codes: 0 done (or stopped by SIGTERM after saving), 2 configuration error (one line
on stderr, before anything compiles), 3 non-finite loss (the last good checkpoint is kept), 4 a
checkpoint could not be written, the disk being full (one line; the step's partial files are removed
and re-running resumes from the last good step).
"""

from __future__ import annotations

import argparse
import sys

from labor_jax import distributed, runtime
from labor_jax.cli import common as cli
from labor_jax.training import config as train_config
from labor_jax.training import loop as trainer

EXIT_CONFIG, EXIT_NAN, EXIT_WRITE = cli.EXIT_CONFIG, cli.EXIT_NAN, cli.EXIT_WRITE


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="YAML run config (see configs/)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")
  args = ap.parse_args(argv)

  def train():
    cfg = train_config.load(args.config, args.set)
    distributed.initialize(cfg.distributed)
    trainer.run(cfg)
  return cli.run_training(train)


if __name__ == "__main__":
  sys.exit(main())
