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
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from labor_jax import labels, model
from labor_jax import sharding as shard_lib
from labor_jax.config import LlamaConfig


def add_adapters(config: LlamaConfig, params: Any, rng: jax.Array, *, rank: int, alpha: float = 16.0,
                 dropout: float = 0.0, targets: str | None = None, mesh: jax.sharding.Mesh | None = None,
                 rules: shard_lib.Rules = shard_lib.DEFAULT_RULES) -> tuple[LlamaConfig, Any]:
  """(config with adapters, params with new lora_a ~ N(0, 1/d_in) and lora_b = 0).

  Only the adapter leaves are created: their shapes come from ``jax.eval_shape`` of the model
  and their values from one jitted initialiser whose outputs are born in their shardings on
  ``mesh`` (the default device without one). The base weights are passed through untouched
  (the same arrays), so no full-size array is ever allocated here. Each leaf's key is
  ``rng`` folded with a hash of its path, independent of the mesh.
  """
  if config.lora_rank:
    raise ValueError("the model already has LoRA adapters (lora_rank > 0)")
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  cfg = config.replace(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout,
                       **({} if targets is None else {"lora_targets": targets}))
  shapes = model.param_shapes(cfg)
  adapter_shapes, base_shapes = labels.split(shapes, labels.label_tree(shapes, labels.ADAPTERS))
  if not adapter_shapes:
    raise ValueError(f"lora_targets {cfg.lora_targets!r} matches no layer")
  have = {labels.path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  for p, want in jax.tree_util.tree_leaves_with_path(base_shapes):
    path = labels.path_str(p)
    if have.get(path) != want.shape:
      raise ValueError(f"{path}: shape {have.get(path)} does not match the config's {want.shape}")
  shardings = None
  if mesh is not None:
    shardings = labels.split(model.param_shardings(cfg, mesh, rules), labels.label_tree(shapes, labels.ADAPTERS))[0]

  def init(rng):
    def leaf(p, sds):
      path = labels.path_str(p)
      if path.endswith("lora_b"):
        return jnp.zeros(sds.shape, sds.dtype)
      key = jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)
      return (jax.random.normal(key, sds.shape, jnp.float32) * sds.shape[-2] ** -0.5).astype(sds.dtype)
    return jax.tree_util.tree_map_with_path(leaf, adapter_shapes)
  adapters = jax.jit(init, out_shardings=shardings)(rng)
  return cfg, labels.merge(params, adapters)


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
  return merged_config(config), fold(params)


def merged_config(config: LlamaConfig) -> LlamaConfig:
  """The config of a model whose adapters were folded in (the LoRA fields at their defaults)."""
  return config.replace(**{f.name: f.default for f in dataclasses.fields(LlamaConfig) if f.name.startswith("lora_")})
