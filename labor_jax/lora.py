"""LoRA adapters: add them to a loaded model, merge them back for export.

Adapters live next to the kernel they adapt (``.../q_proj/{kernel, lora_a, lora_b}``);
``lora_b`` starts at zero so a fresh adapter leaves the model unchanged. Which modules get
adapters, which leaves are adapters and what trains is decided in :mod:`labor_jax.labels`
(``labels.run_labels(params, lora=True)``: the base weights go through ``optax.set_to_zero``
and keep no optimizer state).

Shape suffixes: I / O the adapted kernel's input / output width, R the rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from labor_jax import labels, model
from labor_jax.config import LlamaConfig


def add_adapters(config: LlamaConfig, params: Any, rng: jax.Array, *, rank: int, alpha: float = 16.0,
                 dropout: float = 0.0, targets: str | None = None) -> tuple[LlamaConfig, Any]:
  """(config with adapters, params with new lora_a ~ N(0, 1/d_in) and lora_b = 0)."""
  if config.lora_rank:
    raise ValueError("the model already has LoRA adapters (lora_rank > 0)")
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  cfg = config.replace(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
                       **({} if targets is None else {"lora_targets": targets}))
  fresh = model.init_params(cfg, rng)
  added = 0

  def pick(path, new):
    nonlocal added
    keys = [str(k.key) for k in path]
    if labels.is_adapter(labels.path_str(path)):
      added += 1
      return new.astype(cfg.jnp_param_dtype)
    node = params
    for k in keys:
      node = node[k]
    if node.shape != new.shape:
      raise ValueError(f"{'/'.join(keys)}: shape {node.shape} does not match the config's {new.shape}")
    return node
  out = jax.tree_util.tree_map_with_path(pick, fresh)
  if not added:
    raise ValueError(f"lora_targets {cfg.lora_targets!r} matches no layer")
  return cfg, out


def merge(config: LlamaConfig, params: Any) -> tuple[LlamaConfig, Any]:
  """Folds every adapter into its kernel: W + (alpha / r) * A @ B. Returns a plain model."""
  if not config.lora_rank:
    return config, params
  scale = config.lora_alpha / config.lora_rank

  def fold(node):
    if isinstance(node, dict) and labels.has_adapters(node):
      a_IR = node["lora_a"].astype(jnp.float32)
      b_RO = node["lora_b"].astype(jnp.float32)
      w_IO = node["kernel"].astype(jnp.float32) + scale * (a_IR @ b_RO)
      return {"kernel": w_IO.astype(node["kernel"].dtype)}
    if isinstance(node, dict):
      return {k: fold(v) for k, v in node.items()}
    return node
  defaults = {f.name: f.default for f in dataclasses.fields(LlamaConfig) if f.name.startswith("lora_")}
  return config.replace(**defaults), fold(params)
