"""``python -m labor_jax.train``: a shim for the command in :mod:`labor_jax.cli.train` (also ``labor-jax train``)."""

import sys

from labor_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
