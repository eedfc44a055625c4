"""labor_jax: LABOR-LLM in JAX (Llama port, fine-tuning, occupation scoring, evaluation)."""

__version__ = "0.1.0"
