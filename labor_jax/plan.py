"""``python -m labor_jax.plan``: a shim for the command in :mod:`labor_jax.cli.plan` (also ``labor-jax plan``)."""

import sys

from labor_jax.cli.plan import main

if __name__ == "__main__":
  sys.exit(main())
