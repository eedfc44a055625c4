"""``python -m labor_jax.evaluate``: a shim for the command in :mod:`labor_jax.cli.evaluate` (also ``labor-jax evaluate``)."""

import sys

from labor_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
