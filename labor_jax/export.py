"""``python -m labor_jax.export``: a shim for the command in :mod:`labor_jax.cli.export` (also ``labor-jax export``)."""

import sys

from labor_jax.cli.export import main

if __name__ == "__main__":
  sys.exit(main())
