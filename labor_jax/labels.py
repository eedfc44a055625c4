"""The label tree: which parameter leaves train, which are frozen, which are LoRA adapters.

Every question of that kind is answered here, once:

* which modules get adapters: :func:`adapted` (a regex over module paths, ``lora_targets``);
* whether a leaf is an adapter: :func:`is_adapter` (its name is ``lora_a`` or ``lora_b``);
* whether a module carries adapters: :func:`has_adapters`;
* what trains: :func:`label_tree` turns one predicate over parameter paths (a regex; the
  adapters alone for LoRA, everything for full fine-tuning) into a tree of TRAIN / FROZEN.

That tree drives ``optax.multi_transform`` (frozen leaves keep no optimizer state, see
:mod:`labor_jax.training.core`), splits what a checkpoint stores, and selects what an
adapter export writes (:func:`split`, :func:`merge`).
"""

from __future__ import annotations

import re
from typing import Any

import jax

TRAIN, FROZEN = "train", "frozen"
ADAPTER_LEAVES = ("lora_a", "lora_b")
ADAPTERS = r"/lora_(a|b)$"  # the trainable pattern of LoRA fine-tuning: the adapters alone


def path_str(path) -> str:
  """A jax key path as ``layers_0/self_attn/q_proj/kernel``."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def is_adapter(path: str) -> bool:
  """Whether the leaf at ``path`` (``.../q_proj/lora_a``) is a LoRA adapter."""
  return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def adapted(module_path: str, targets: str) -> bool:
  """Whether the module at ``module_path`` (``layers_0/self_attn/q_proj``) gets adapters under
  the ``targets`` regex (``LlamaConfig.lora_targets``)."""
  return re.search(targets, module_path) is not None


def has_adapters(module: dict) -> bool:
  """Whether a module's parameter dict (``{"kernel", "lora_a", "lora_b"}``) carries adapters."""
  return any(k in module for k in ADAPTER_LEAVES)


def label_tree(params: Any, trainable: str | None) -> Any:
  """TRAIN where the parameter path matches the ``trainable`` regex (every leaf when None), else FROZEN.

  ``params`` may be arrays or ShapeDtypeStructs; the result has the same structure."""
  rx = None if trainable is None else re.compile(trainable)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: TRAIN if rx is None or rx.search(path_str(p)) else FROZEN, params)


def run_labels(params: Any, lora: bool) -> Any:
  """The label tree of a run: the adapters alone train under LoRA, everything otherwise."""
  return label_tree(params, ADAPTERS if lora else None)


def trainable_fraction(params: Any, labels: Any) -> float:
  """Share of parameter elements labelled TRAIN."""
  sizes = [(x.size, l == TRAIN) for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels))]
  total = sum(s for s, _ in sizes)
  return sum(s for s, t in sizes if t) / max(total, 1)


def split(tree: Any, labels: Any) -> tuple[dict, dict]:
  """(the TRAIN leaves, the FROZEN leaves) of a nested-dict ``tree``, as two nested dicts
  holding only their own leaves (empty modules dropped)."""
  def part(node, lab, want):
    if isinstance(node, dict):
      out = {k: part(node[k], lab[k], want) for k in node}
      return {k: v for k, v in out.items() if v is not None} or None
    return node if lab == want else None
  return part(tree, labels, TRAIN) or {}, part(tree, labels, FROZEN) or {}


def merge(a: dict, b: dict) -> dict:
  """The union of two nested dicts with disjoint leaves (the inverse of :func:`split`)."""
  out = dict(a)
  for k, v in b.items():
    if k in out:
      if not (isinstance(out[k], dict) and isinstance(v, dict)):
        raise ValueError(f"{k}: present in both trees")
      out[k] = merge(out[k], v)
    else:
      out[k] = v
  return out
