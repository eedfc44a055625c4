"""The pure pieces of fine-tuning: loss, optimizer, sharded state, train and eval steps.

Freezing is one label tree (:mod:`labor_jax.labels`): leaves labelled FROZEN go through
``optax.set_to_zero`` inside ``optax.multi_transform``, so they keep no optimizer state, and
get no weight gradient. The train state is created already sharded (``jax.jit`` of the
initialiser with ``out_shardings``), and the step is jitted once with explicit in/out
shardings and the state donated.

The trainer around these pieces (config, data, checkpoints, logging) is labor_jax.training.loop.
Shape suffixes: B batch, T positions, V vocabulary, D hidden size.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from labor_jax import losses, model
from labor_jax import sharding as shard_lib
from labor_jax.config import LlamaConfig
from labor_jax.labels import FROZEN, TRAIN, path_str


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken (int32 scalar)
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data (jax.random.key_data), folded with the step for dropout


def make_optimizer(labels: Any, *, lr: float | optax.Schedule, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
  """AdamW (with global-norm clipping) on TRAIN parameters; FROZEN ones get zero updates and no state.

  The first moment is kept in float32 whatever the parameter dtype (optax would otherwise
  store it in the parameter dtype at init and return it promoted to float32 after the
  first step, which changed the train state's dtypes and recompiled the step once with
  bfloat16 parameters). The second moment follows the parameter dtype, as in optax."""
  inner = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  inner.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mu_dtype=jnp.float32))
  return optax.multi_transform({TRAIN: optax.chain(*inner), FROZEN: optax.set_to_zero()}, labels)


def loss_sums(config: LlamaConfig, params: Any, batch: dict[str, jax.Array],
              dropout_rng: jax.Array | None = None, mesh: Mesh | None = None, *,
              head_grad: bool = True, first_layer: int = 0) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross-entropy over ``loss_mask``, number of loss tokens).

  The head and the loss run fused (:func:`labor_jax.losses.linear_cross_entropy`,
  ``config.loss_chunk`` positions at a time), so the [B, T, V] logits are never materialised;
  ``head_grad=False`` skips the head's weight gradient (a frozen head). A head with LoRA
  adapters goes through the plain logits path instead. ``first_layer > 0``: the batch carries
  ``hidden``, the frozen first ``first_layer`` blocks' output for its rows
  (:mod:`labor_jax.training.frozen_cache`), and only the blocks above run.
  """
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  kwargs = dict(segment_ids_BT=batch["segment_ids"], positions_BT=batch["positions"], dropout_rng=dropout_rng,
                mesh=mesh)
  if first_layer:
    kwargs.update(hidden_BTD=batch["hidden"], first_layer=first_layer)
  w_DV = model.head_weight(config, params)
  if w_DV is None:
    logits_BTV = model.forward(config, params, batch["inputs"], **kwargs)
    xent_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    return (xent_BT * mask_BT).sum(), mask_BT.sum()
  x_BTD = model.forward(config, params, batch["inputs"], return_hidden=True, **kwargs)
  total = losses.linear_cross_entropy(x_BTD, w_DV, batch["targets"], mask_BT, config.loss_chunk, head_grad,
                                      config.jnp_dtype)
  return total, mask_BT.sum()


def head_trainable(config: LlamaConfig, labels: Any) -> bool:
  """Whether the output projection trains under ``labels`` (None: everything trains)."""
  if labels is None:
    return True
  leaf = labels["embed_tokens"]["embedding"] if config.tie_word_embeddings else labels["lm_head"]["kernel"]
  return leaf == TRAIN


def state_shardings(config: LlamaConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: shard_lib.Rules = shard_lib.DEFAULT_RULES) -> TrainState:
  """NamedShardings of the whole train state: optimizer moments follow their parameters."""
  param_sh = model.param_shardings(config, mesh, rules)
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
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def _init_state(config: LlamaConfig, optimizer: optax.GradientTransformation, rng: jax.Array, params: Any):
  init_rng, train_rng = jax.random.split(rng)
  p = model.init_params(config, init_rng) if params is None else params
  return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                    rng=jax.random.key_data(train_rng))


def create_state(config: LlamaConfig, optimizer: optax.GradientTransformation, shardings: TrainState,
                 rng: jax.Array, params: Any = None) -> TrainState:
  """A train state born sharded (random init unless ``params`` are given, e.g. from hf.load)."""
  return jax.jit(lambda r, p: _init_state(config, optimizer, r, p), out_shardings=shardings)(rng, params)


def abstract_state(config: LlamaConfig, optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """The train state as ShapeDtypeStructs in ``shardings``: what a checkpoint restores into. Nothing is allocated."""
  shapes = jax.eval_shape(lambda r: _init_state(config, optimizer, r, None), jax.random.key(0))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def batch_sharding(mesh: Mesh, rules: shard_lib.Rules = shard_lib.DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, shard_lib.logical_to_mesh(("batch", "length"), rules, "batch"))


def make_train_step(config: LlamaConfig, optimizer: optax.GradientTransformation, shardings: TrainState,
                    batch_sh: NamedSharding, *, labels: Any = None, grad_accum: int = 1,
                    schedule: optax.Schedule | None = None,
                    first_layer: int = 0) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``step(state, batch) -> (state, metrics)``, jitted with explicit shardings; ``state`` is donated.

  ``labels`` (from :func:`labor_jax.labels.label_tree`) stops gradients at frozen parameters, so their
  weight gradients are never computed. ``grad_accum`` splits the batch into that many
  micro-batches, run one after another (``lax.scan``) with gradients summed before one
  optimizer update; the loss is the token-weighted mean over the whole batch either way.
  ``first_layer``: batches carry the frozen lower blocks' output as ``hidden`` (see :func:`loss_sums`).
  """
  replicated = NamedSharding(batch_sh.mesh, PartitionSpec())
  head_grad = head_trainable(config, labels)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def sums(params, mb, i):
      if labels is not None:
        params = jax.tree.map(lambda p, l: p if l == TRAIN else jax.lax.stop_gradient(p), params, labels)
      return loss_sums(config, params, mb, jax.random.fold_in(rng, i), mesh=batch_sh.mesh, head_grad=head_grad,
                       first_layer=first_layer)

    def body(carry, xs):
      g_acc, loss_acc, tok_acc = carry
      mb, i = xs
      (loss_sum, tokens), g = jax.value_and_grad(lambda p: sums(p, mb, i), has_aux=True)(state.params)
      return (jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g), loss_acc + loss_sum, tok_acc + tokens), None

    if grad_accum == 1:  # a single micro-batch: no loop
      (loss_sum, tokens), g_sum = jax.value_and_grad(lambda p: sums(p, batch, 0), has_aux=True)(state.params)
    else:  # micro-batch gradients are summed in float32, whatever the parameter dtype
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      (g_sum, loss_sum, tokens), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, jnp.arange(grad_accum)))
    denom = jnp.maximum(tokens, 1.0)
    # Gradients end in their parameter's dtype (a bf16 model's would otherwise be promoted to a
    # float32 copy of the whole model by the division).
    grads = jax.tree.map(lambda g, p: (g * (1.0 / denom)).astype(p.dtype), g_sum, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                 donate_argnames=("state",))


def make_eval_step(config: LlamaConfig, shardings: TrainState, batch_sh: NamedSharding):
  """``eval_step(params, batch) -> (loss sum, tokens)``, jitted."""
  replicated = NamedSharding(batch_sh.mesh, PartitionSpec())
  return jax.jit(lambda p, b: loss_sums(config, p, b, mesh=batch_sh.mesh),
                 in_shardings=(shardings.params, batch_sh),
                 out_shardings=(replicated, replicated))


def make_schedule(lr: float, steps: int, warmup_steps: int, decay: str, min_lr_ratio: float) -> optax.Schedule:
  """Linear warmup to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio`` (or constant)."""
  warmup = max(0, min(warmup_steps, steps))
  rest = max(1, steps - warmup)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=min_lr_ratio)
  elif decay == "linear":
    after = optax.linear_schedule(lr, lr * min_lr_ratio, rest)
  else:
    after = optax.constant_schedule(lr)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
