"""``python -m labor_jax.main``: a shim for the command in :mod:`labor_jax.cli.main` (also ``labor-jax main``)."""

import sys

from labor_jax.cli.main import main

if __name__ == "__main__":
  sys.exit(main())
