"""labor_jax: LABOR-LLM in JAX (Llama port, fine-tuning, occupation scoring, evaluation).

``labor_jax.load(source)`` opens a model for scoring careers (:mod:`labor_jax.api`); the command
lines are ``python -m labor_jax.<command>`` or ``labor-jax <command>`` (:mod:`labor_jax.cli`).
"""

__version__ = "0.1.0"
__all__ = ["load", "Model"]


def __getattr__(name):  # the API loads JAX and the model code on first use, not on `import labor_jax`
  if name in __all__:
    from labor_jax import api
    return getattr(api, name)
  raise AttributeError(f"module 'labor_jax' has no attribute {name!r}")
