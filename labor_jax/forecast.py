"""``python -m labor_jax.forecast``: a shim for the command in :mod:`labor_jax.cli.forecast` (also ``labor-jax forecast``)."""

import sys

from labor_jax.cli.forecast import main

if __name__ == "__main__":
  sys.exit(main())
