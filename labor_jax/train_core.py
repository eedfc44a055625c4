"""The pure pieces of fine-tuning: loss, trainable-parameter labels, optimizer, sharded state, step.

Freezing is one label tree: a regex over parameter paths ("layers_.*/self_attn/.*") marks
what trains; everything else is "frozen" and goes through ``optax.set_to_zero`` inside
``optax.multi_transform``, so it keeps no optimizer state. The train state is created
already sharded (``jax.jit`` of the initialiser with ``out_shardings``), and the step is
jitted once with explicit in/out shardings and the state donated.

This module does not yet hold the trainer around it (config file, CLI, checkpoints,
LoRA adapters, multi-host launch): see the open training issue.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from labor_jax import model
from labor_jax import sharding as shard_lib
from labor_jax.config import LlamaConfig

TRAIN, FROZEN = "train", "frozen"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_labels(params: Any, pattern: str | None) -> Any:
  """TRAIN where the parameter path matches ``pattern`` (all when None), else FROZEN."""
  rx = None if pattern is None else re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: TRAIN if rx is None or rx.search(path_str(p)) else FROZEN, params)


def trainable_fraction(params: Any, labels: Any) -> float:
  sizes = jax.tree.leaves(jax.tree.map(lambda x, l: (x.size, l == TRAIN), params, labels),
                          is_leaf=lambda x: isinstance(x, tuple))
  total = sum(s for s, _ in sizes)
  return sum(s for s, t in sizes if t) / total


def make_optimizer(labels: Any, *, lr: float | optax.Schedule, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
  """AdamW (with global-norm clipping) on TRAIN parameters; FROZEN ones get zero updates and no state."""
  inner = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  inner.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.multi_transform({TRAIN: optax.chain(*inner), FROZEN: optax.set_to_zero()}, labels)


def loss_fn(config: LlamaConfig, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Mean next-token cross-entropy over ``loss_mask`` (batches from data_pipeline.loader)."""
  logits_BTV = model.forward(config, params, batch["inputs"], segment_ids_BT=batch["segment_ids"],
                             positions_BT=batch["positions"])
  xent_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.maximum(mask_BT.sum(), 1.0)
  return (xent_BT * mask_BT).sum() / tokens, {"tokens": mask_BT.sum()}


def state_shardings(config: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: shard_lib.Rules = shard_lib.DEFAULT_RULES) -> TrainState:
  """NamedShardings of the whole train state: optimizer moments follow their parameters."""
  param_sh = shard_lib.param_shardings(config, mesh, rules)
  shapes = model.param_shapes(config)
  opt_shapes = jax.eval_shape(optimizer.init, shapes)
  replicated = NamedSharding(mesh, PartitionSpec())
  by_path = {path_str(p): (sh, shapes_leaf.shape) for (p, sh), shapes_leaf in zip(
      jax.tree_util.tree_leaves_with_path(param_sh), jax.tree.leaves(shapes))}

  def follow(path, leaf):
    # An optimizer leaf whose key path ends in a parameter's path and has its shape (AdamW's
    # mu and nu) takes that parameter's sharding; counts and scalars are replicated.
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, str(k.key))
    hit = by_path.get("/".join(keys))
    return hit[0] if hit is not None and hit[1] == leaf.shape else replicated

  opt_sh = jax.tree_util.tree_map_with_path(follow, opt_shapes)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def create_state(config: LlamaConfig, optimizer: optax.GradientTransformation, shardings: TrainState,
                 rng: jax.Array, params: Any = None) -> TrainState:
  """A train state born sharded (random init unless ``params`` are given, e.g. from hf.load)."""
  def init(rng, params):
    p = model.init_params(config, rng) if params is None else params
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))
  return jax.jit(init, out_shardings=shardings)(rng, params)


def batch_sharding(mesh: Mesh, rules: shard_lib.Rules = shard_lib.DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, shard_lib.logical_to_mesh(("batch", "length"), rules, "batch"))


def make_train_step(config: LlamaConfig, optimizer: optax.GradientTransformation, shardings: TrainState,
                    batch_sh: NamedSharding) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``step(state, batch) -> (state, metrics)``, jitted with explicit shardings; ``state`` is donated."""
  replicated = NamedSharding(batch_sh.mesh, PartitionSpec())

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    (loss, aux), grads = jax.value_and_grad(lambda p: loss_fn(config, p, batch), has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": aux["tokens"]}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                 donate_argnames=("state",))
