"""``python -m labor_jax.experiments``: a shim for the command in :mod:`labor_jax.cli.experiments` (also ``labor-jax experiments``)."""

import sys

from labor_jax.cli.experiments import main

if __name__ == "__main__":
  sys.exit(main())
