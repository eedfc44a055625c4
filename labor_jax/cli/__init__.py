"""The command lines, one module each; ``labor-jax COMMAND ...`` (a console script) and
``python -m labor_jax.COMMAND ...`` (shims beside the library) both reach them.

Every command parses its flags and calls the library; no library module imports this package.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> what it does (its module is labor_jax.cli.<command>)
    "train": "fine-tune or train a model from a YAML run config",
    "evaluate": "score a model on a split against the econometric baselines",
    "predict": "top-k next occupations of one worker",
    "forecast": "sample future career paths",
    "export": "a run as a Hugging Face checkpoint or a PEFT adapter",
    "gguf": "a GGUF file as a Hugging Face directory",
    "plan": "will a run fit on a chip? compiled ahead of time on fake devices",
    "experiments": "the paper's ablations in one command",
    "main": "the main job on the embedded NLSY data",
}


def run(argv: list[str] | None = None) -> int:
  """``labor-jax COMMAND [flags]``: runs ``labor_jax.cli.COMMAND.main(flags)``."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    width = max(map(len, COMMANDS))
    print("usage: labor-jax COMMAND [flags]   (labor-jax COMMAND --help for its flags)\n\ncommands:\n"
          + "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()),
          file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
    if argv and argv[0] not in ("-h", "--help"):
      print(f"labor-jax: unknown command {argv[0]!r}", file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  return importlib.import_module(f"labor_jax.cli.{argv[0]}").main(argv[1:])
