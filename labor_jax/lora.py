"""LoRA adapters: add them to a loaded model, merge them back for export.

Adapters live next to the kernel they adapt (``.../q_proj/{kernel, lora_a, lora_b}``);
``lora_b`` starts at zero so a fresh adapter leaves the model unchanged. Training them
alone is a label tree (``train_core.trainable_labels(params, LORA_PATTERN)``): the base
weights go through ``optax.set_to_zero`` and keep no optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from labor_jax import model
from labor_jax.config import LlamaConfig

LORA_PATTERN = r"/lora_(a|b)$"


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
    if keys[-1] in ("lora_a", "lora_b"):
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
    if isinstance(node, dict) and "lora_a" in node:
      a = node["lora_a"].astype(jnp.float32)
      b = node["lora_b"].astype(jnp.float32)
      w = node["kernel"].astype(jnp.float32) + scale * (a @ b)
      return {"kernel": w.astype(node["kernel"].dtype)}
    if isinstance(node, dict):
      return {k: fold(v) for k, v in node.items()}
    return node
  defaults = {f.name: f.default for f in dataclasses.fields(LlamaConfig) if f.name.startswith("lora_")}
  return config.replace(**defaults), fold(params)


def adapter_params(params: Any) -> Any:
  """Only the adapter leaves (for small adapter-only exports)."""
  def keep(node):
    if isinstance(node, dict):
      out = {k: keep(v) for k, v in node.items() if k in ("lora_a", "lora_b") or isinstance(v, dict)}
      return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    return node
  return keep(params)
