"""The model's functions compiled once per config and shapes, for tests that call them many times: the same
functions run whole instead of op by op (eager dispatch of every small op dominated those tests' time)."""

import jax

from labor_jax import model

forward = jax.jit(model.forward, static_argnums=0, static_argnames=("mesh", "rules", "return_kv", "return_hidden"))
