"""``python -m labor_jax.predict``: a shim for the command in :mod:`labor_jax.cli.predict` (also ``labor-jax predict``)."""

import sys

from labor_jax.cli.predict import main

if __name__ == "__main__":
  sys.exit(main())
