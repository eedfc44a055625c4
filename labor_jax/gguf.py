"""``python -m labor_jax.gguf``: a shim for the command in :mod:`labor_jax.cli.gguf`."""

import sys

from labor_jax.cli.gguf import main

if __name__ == "__main__":
  sys.exit(main())
