"""Llama-family decoder in Flax Linen, used through pure functions.

Shape suffixes: B batch, T query length, S key length (prefix + T), D hidden_size,
H query heads, K key/value heads (N either), E head_dim, F intermediate_size, V vocab_size,
I / O a linear layer's input / output width (N its flattened rows), R LoRA rank, X hidden
size or vocabulary (whichever is returned). In the token tree of :func:`forward_tree`:
G prefix groups per row, L tree nodes, A ancestors per node.

Parameter names follow Hugging Face (``q_proj``, ``gate_proj``, ``input_layernorm``)
so that :mod:`labor_jax.interop.hf` maps them almost one to one. Every parameter carries
logical axis names (see :mod:`labor_jax.sharding` for the table that maps them to a
device mesh); so do the main activations.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from labor_jax import attention as attention_lib
from labor_jax import labels
from labor_jax import sharding as shard_lib
from labor_jax.config import LlamaConfig

Params = Any


class KV(NamedTuple):
  """Keys and values after RoPE: [B, S, K, E] each for one decoder block, or [L, B, S, K, E] for all
  blocks of a ``scan_layers`` model (a "stacked" KV)."""
  k: jax.Array
  v: jax.Array


Cache = Any  # per-layer keys/values: a sequence of KV ([B, S, K, E]) or one stacked KV ([L, B, S, K, E])


def cache_layers(cache: Cache) -> int:
  return cache.k.shape[0] if isinstance(cache, KV) else len(cache)


def cache_layer(cache: Cache, i: int) -> KV:
  return KV(cache.k[i], cache.v[i]) if isinstance(cache, KV) else cache[i]


def cache_stacked(cache: Cache) -> KV:
  return cache if isinstance(cache, KV) else KV(jnp.stack([c.k for c in cache]), jnp.stack([c.v for c in cache]))


def cache_map(cache: Cache, fn) -> Cache:
  """``fn(x, batch_axis)`` applied to every key/value array of a cache (its batch axis is 1 when stacked)."""
  if isinstance(cache, KV):
    return KV(fn(cache.k, 1), fn(cache.v, 1))
  return tuple(KV(fn(c.k, 0), fn(c.v, 0)) for c in cache)


def _matmul(x_NI, w_IO, out_dtype=None):
  """``x @ w`` over the last axis of ``x``, with the leading axes flattened into one.

  XLA:CPU runs a 2-D matmul and, above all, its weight gradient (a contraction over the
  token axis) much faster than the same product with [B, T] leading axes (figures in
  docs/benchmarks.md)."""
  lead = x_NI.shape[:-1]
  return _dot(x_NI.reshape(-1, x_NI.shape[-1]), w_IO, out_dtype).reshape(*lead, w_IO.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot(x_NI, w_IO, out_dtype=None):
  """``x @ w`` for 2-D operands of one dtype, accumulated in float32 and returned in that dtype
  (or ``out_dtype``); its two gradient products are written the same way.

  Autodiff of a plain ``jnp.dot`` in bfloat16 gives products with a bfloat16 result and
  operands that are separate transposes; XLA:CPU runs neither on its bfloat16 kernels, so it
  upcast them, operands included, to float32 matmuls (and converted back and forth around
  them). Asking for a float32 result from bfloat16 operands, with the gradients' contractions
  written as ``dot_general`` dimensions, keeps every product on the CPU's bfloat16 instructions
  (AVX-512-BF16, AMX) and is what GPUs and TPUs do anyway. In float32 nothing changes."""
  return jnp.dot(x_NI, w_IO, preferred_element_type=jnp.float32).astype(out_dtype or x_NI.dtype)


def _dot_nt(g_NO, w_IO):
  """``g @ w^T`` in float32, written as contracting dimensions, not a separate transpose (see :func:`_dot`)."""
  return jax.lax.dot_general(g_NO, w_IO, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(x_NI, g_NO):
  """``x^T @ g`` (a contraction over the token axis) in float32, written the same way."""
  return jax.lax.dot_general(x_NI, g_NO, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_fwd(x_NI, w_IO, out_dtype):
  return _dot(x_NI, w_IO, out_dtype), (x_NI, w_IO)


def _dot_bwd(out_dtype, res, g_NO):
  x_NI, w_IO = res
  g_NO = g_NO.astype(x_NI.dtype)
  dx_NI = _dot_nt(g_NO, w_IO)
  dw_IO = _dot_tn(x_NI, g_NO)  # a frozen weight's gradient is never used: jit drops this product
  return dx_NI.astype(x_NI.dtype), dw_IO.astype(w_IO.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)


class Linear(nn.Module):
  """``x @ kernel`` (no bias), plus a LoRA branch ``scale * dropout(x) @ lora_a @ lora_b`` on the
  layers whose path matches ``cfg.lora_targets`` when ``cfg.lora_rank > 0``."""
  features: int
  axes: tuple[str, str]
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTI):
    cfg = self.cfg
    d_in = x_BTI.shape[-1]
    kernel_IO = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
                           (d_in, self.features), cfg.jnp_param_dtype)
    x_BTI = x_BTI.astype(cfg.jnp_dtype)
    w_IO = kernel_IO.astype(cfg.jnp_dtype)
    if not (cfg.lora_rank and labels.adapted("/".join(self.scope.path), cfg.lora_targets)):
      return _matmul(x_BTI, w_IO)
    r = cfg.lora_rank
    a_IR = self.param("lora_a", nn.with_logical_partitioning(nn.initializers.normal(d_in ** -0.5),
                                                             (self.axes[0], "lora_rank")),
                      (d_in, r), cfg.jnp_param_dtype)
    b_RO = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.axes[1])),
                      (r, self.features), cfg.jnp_param_dtype)
    a_IR, b_RO = a_IR.astype(cfg.jnp_dtype), b_RO.astype(cfg.jnp_dtype)
    scale = cfg.lora_alpha / r
    dropout = self.has_rng("dropout") and cfg.lora_dropout > 0
    if not dropout and cfg.jnp_dtype == jnp.float32:
      lead = x_BTI.shape[:-1]
      return _lora_dot(x_BTI.reshape(-1, d_in), w_IO, a_IR, b_RO, scale).reshape(*lead, self.features)
    # The two branches are added in float32 and rounded once: in bfloat16, a small adapter output
    # added to the rounded base output would be rounded away (docs/benchmarks.md).
    xd_BTI = nn.Dropout(cfg.lora_dropout, deterministic=not self.has_rng("dropout"))(x_BTI)
    y_BTO = _matmul(x_BTI, w_IO, jnp.float32) + scale * _matmul(_matmul(xd_BTI, a_IR), b_RO, jnp.float32)
    return y_BTO.astype(cfg.jnp_dtype)


def _merged(w_IO, a_IR, b_RO, scale: float):
  return w_IO + (scale * jnp.dot(a_IR, b_RO, preferred_element_type=jnp.float32)).astype(w_IO.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lora_dot(x_NI, w_IO, a_IR, b_RO, scale: float):
  """``x @ w + scale * x @ a @ b`` as one product with the merged weight ``w + scale * a @ b``
  (float32 compute without dropout, where the two are equal to rounding; in bfloat16 an update
  smaller than half a bfloat16 step of ``w`` would vanish in the merged weight, so bfloat16 and
  dropout keep the separate branch). The backward pass rebuilds the merged weight instead of
  keeping it: dx = g @ w'^T, d a = scale * x^T (g b^T), d b = scale * (x a)^T g.

  On the CPU this replaces two thin products of every adapted layer (and an addition over its
  [N, O] output and [N, I] input gradient) by one product of [I, R] x [R, O] and an addition over
  the weight (docs/benchmarks.md)."""
  return _dot(x_NI, _merged(w_IO, a_IR, b_RO, scale), None)


def _lora_dot_fwd(x_NI, w_IO, a_IR, b_RO, scale):
  return _lora_dot(x_NI, w_IO, a_IR, b_RO, scale), (x_NI, w_IO, a_IR, b_RO)


def _lora_dot_bwd(scale, res, g_NO):
  x_NI, w_IO, a_IR, b_RO = res
  # dx and the (frozen, dropped) dw are the plain product's, through the rebuilt merged weight.
  dx_NI, dw_IO = _dot_bwd(None, (x_NI, _merged(w_IO, a_IR, b_RO, scale)), g_NO)
  g_NO = g_NO.astype(x_NI.dtype)
  gb_NR = _dot_nt(g_NO, b_RO).astype(x_NI.dtype)
  xa_NR = jnp.dot(x_NI, a_IR, preferred_element_type=jnp.float32).astype(x_NI.dtype)
  da_IR = scale * _dot_tn(x_NI, gb_NR)
  db_RO = scale * _dot_tn(xa_NR, g_NO)
  return dx_NI, dw_IO, da_IR.astype(a_IR.dtype), db_RO.astype(b_RO.dtype)


_lora_dot.defvjp(_lora_dot_fwd, _lora_dot_bwd)


def _dense(features: int, name: str, axes: tuple[str, str], cfg: LlamaConfig) -> Linear:
  return Linear(features, axes, cfg, name=name)


class RMSNorm(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD):
    weight_D = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                          (x_BTD.shape[-1],), self.cfg.jnp_param_dtype)
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    return weight_D.astype(self.cfg.jnp_dtype) * x32.astype(self.cfg.jnp_dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Per-pair inverse RoPE frequencies [E // 2] in float32, as in HF's rope init functions
  ("default", "linear" and "llama3" scaling)."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  if config.rope_type == "linear":
    inv = inv / config.rope_factor
  elif config.rope_type == "llama3":
    old_ctx = config.rope_original_max_position
    low_wl = old_ctx / config.rope_low_freq_factor
    high_wl = old_ctx / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / config.rope_factor, inv)
    smooth = (old_ctx / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _apply_rope(x_BTNE, cos_BTE, sin_BTE):
  x32 = x_BTNE.astype(jnp.float32)
  out = x32 * cos_BTE[:, :, None, :] + _rotate_half(x32) * sin_BTE[:, :, None, :]
  return out.astype(x_BTNE.dtype)


class Tree(NamedTuple):
  """Tokens laid out as G groups of the same L-node token tree, per batch row.

  Every group of row b attends to the first ``prefix_len_BG[b, g]`` keys of row b's
  prefix cache and, within its own nodes, to the node's path from the root:
  ``ancestors_LA[l, a]`` is the node at depth a on node l's path (valid for
  a <= depth of l; the last valid one is l itself). The scorer uses it to run every
  candidate title, for every time step, against one cached encoding of each resume.
  """
  ancestors_LA: jax.Array  # int [L, A]
  ancestor_ok_LA: jax.Array  # bool [L, A]
  prefix_len_BG: jax.Array  # int [B, G]


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask: attention_lib.Mask, prefix: KV | None, tree: Tree | None = None):
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    h, k, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_BTHE = _dense(h * e, "q_proj", ("embed", "q_heads"), cfg)(x_BTD).reshape(b, t, h, e)
    k_BTKE = _dense(k * e, "k_proj", ("embed", "kv_heads"), cfg)(x_BTD).reshape(b, t, k, e)
    v_BTKE = _dense(k * e, "v_proj", ("embed", "kv_heads"), cfg)(x_BTD).reshape(b, t, k, e)
    q_BTHE = nn.with_logical_constraint(q_BTHE, ("batch", "length", "act_heads", "head_dim"))
    q_BTHE = _apply_rope(q_BTHE, cos_BTE, sin_BTE)
    k_BTKE = _apply_rope(k_BTKE, cos_BTE, sin_BTE)
    new_kv = KV(k_BTKE, v_BTKE)
    if tree is not None:
      out_BTHE = attention_lib.tree_attention(q_BTHE, k_BTKE, v_BTKE, prefix.k, prefix.v, tree.ancestors_LA,
                                              tree.ancestor_ok_LA, tree.prefix_len_BG)
      out_BTD = _dense(cfg.hidden_size, "o_proj", ("q_heads", "embed"), cfg)(out_BTHE.reshape(b, t, h * e))
      return out_BTD, new_kv
    if prefix is not None:
      k_BSKE = jnp.concatenate([prefix.k.astype(k_BTKE.dtype), k_BTKE], axis=1)
      v_BSKE = jnp.concatenate([prefix.v.astype(v_BTKE.dtype), v_BTKE], axis=1)
    else:
      k_BSKE, v_BSKE = k_BTKE, v_BTKE
    # Without a prefix the mask is causal, so query blocks can skip the key blocks above them.
    blocks = 1 if prefix is not None else attention_lib.causal_block_count(t, cfg.attention_query_block)
    spec_BTHE = None  # on a mesh, kernels that shard themselves (splash) need the activations' layout
    if not jax.sharding.get_abstract_mesh().empty:
      spec_BTHE = nn.logical_to_mesh_axes(("batch", "length", "act_heads", "head_dim"))
    out_BTHE = attention_lib.attend(q_BTHE, k_BSKE, v_BSKE, mask, cfg.attention_impl, blocks, spec_BTHE)
    out_BTD = _dense(cfg.hidden_size, "o_proj", ("q_heads", "embed"), cfg)(out_BTHE.reshape(b, t, h * e))
    return out_BTD, new_kv


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    gate_BTF = _dense(cfg.intermediate_size, "gate_proj", ("embed", "mlp"), cfg)(x_BTD)
    up_BTF = _dense(cfg.intermediate_size, "up_proj", ("embed", "mlp"), cfg)(x_BTD)
    h_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("batch", "length", "act_mlp"))
    return _dense(cfg.hidden_size, "down_proj", ("mlp", "embed"), cfg)(h_BTF)


class DecoderLayer(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask, prefix=None, tree=None):
    attn_BTD, kv = Attention(self.cfg, name="self_attn")(
        RMSNorm(self.cfg, name="input_layernorm")(x_BTD), cos_BTE, sin_BTE, mask, prefix, tree)
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attention_layernorm")(x_BTD))
    return nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed")), kv


class Llama(nn.Module):
  """The decoder. Call through :func:`forward`; parameters live outside the module."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, mask: attention_lib.Mask, prefix: Cache | None,
               tree: Tree | None = None, head: bool = True, hidden_BTD=None, first_layer: int = 0,
               stop_layer: int | None = None):
    cfg = self.cfg
    embed = nn.Embed(cfg.embedding_rows, cfg.hidden_size, name="embed_tokens", dtype=cfg.jnp_dtype,
                     param_dtype=cfg.jnp_param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("vocab", "embed")))
    x_BTD = embed(tokens_BT) if hidden_BTD is None else hidden_BTD.astype(cfg.jnp_dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))
    inv_freq_E2 = jnp.asarray(rope_inv_freq(cfg))
    angles_BTE2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_E2
    angles_BTE = jnp.concatenate([angles_BTE2, angles_BTE2], axis=-1)
    cos_BTE, sin_BTE = jnp.cos(angles_BTE), jnp.sin(angles_BTE)
    layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
    if cfg.scan_layers:  # one block scanned over stacked weights; a prefix cache is scanned along with them
      # nn.scan drops None arguments, so only present ones are passed (a tree always comes with a prefix).
      args = (cos_BTE, sin_BTE, mask) + (() if prefix is None else (cache_stacked(prefix),)) + (
          () if tree is None else (tree,))
      in_axes = (nn.broadcast,) * 3 + (() if prefix is None else (0,)) + (() if tree is None else (nn.broadcast,))
      stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=in_axes, length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, kvs = stack(cfg, name="layers")(x_BTD, *args)
    else:
      kvs = []
      for i in range(first_layer, cfg.num_hidden_layers if stop_layer is None else stop_layer):
        # a prefix holds the keys/values of this call's blocks only: block i's are its entry i - first_layer
        x_BTD, kv = layer_cls(cfg, name=f"layers_{i}")(
            x_BTD, cos_BTE, sin_BTE, mask, None if prefix is None else cache_layer(prefix, i - first_layer), tree)
        kvs.append(kv)
      kvs = tuple(kvs)
    if stop_layer is not None:  # the residual stream after block stop_layer - 1 (lower_hidden)
      return x_BTD, kvs
    x_BTD = RMSNorm(cfg, name="norm")(x_BTD)
    if not head:  # the final hidden states, for a loss fused with the head (labor_jax.losses)
      return x_BTD, kvs
    if cfg.tie_word_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      logits_BTV = _dense(cfg.embedding_rows, "lm_head", ("embed", "vocab"), cfg)(x_BTD)
    logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))
    return mask_padded_vocab(cfg, logits_BTV.astype(jnp.float32)), kvs


def mask_padded_vocab(config: LlamaConfig, logits_NV: jax.Array) -> jax.Array:
  """``logits`` with the padded vocabulary rows (``config.padded_vocab_size``) at -inf: they never
  receive probability."""
  if config.embedding_rows == config.vocab_size:
    return logits_NV
  return jnp.where(jnp.arange(logits_NV.shape[-1]) < config.vocab_size, logits_NV, -jnp.inf)


def head_weight(config: LlamaConfig, params: Params) -> jax.Array | None:
  """The output projection [D, V] (``lm_head`` kernel, or the embedding transposed when tied),
  or None when the head carries LoRA adapters (training: only the logits path applies their
  dropout; inference can fold them in with ``labor_jax.lora.merge``)."""
  if config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  head = params["lm_head"]
  return None if labels.has_adapters(head) else head["kernel"]


def attention_mask(mask_BT: jax.Array, prefix_mask_BS: jax.Array | None = None,
                   segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """Boolean [B, T, S]: causal within the T new tokens, padding keys masked, prefix keys per row,
  and (for packed rows) no attention across segments."""
  t = mask_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((t, t), dtype=bool))
  mask_BTT = causal_TT[None] & mask_BT.astype(bool)[:, None, :]
  if segment_ids_BT is not None:
    mask_BTT &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  if prefix_mask_BS is None:
    return mask_BTT
  b, s = prefix_mask_BS.shape
  prefix_BTS = jnp.broadcast_to(prefix_mask_BS.astype(bool)[:, None, :], (b, t, s))
  return jnp.concatenate([prefix_BTS, mask_BTT], axis=-1)


def _pass_mask(mask_BT, prefix_mask_BS=None, segment_ids_BT=None) -> attention_lib.Mask:
  """The dense mask and, without a prefix, the same mask as segment ids (padding 0)."""
  segments_BT = None
  if prefix_mask_BS is None:
    seg = jnp.ones(mask_BT.shape, jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    segments_BT = jnp.where(mask_BT.astype(bool), seg, 0)
  return attention_lib.Mask(attention_mask(mask_BT, prefix_mask_BS, segment_ids_BT), segments_BT)


def forward(config: LlamaConfig, params: Params, tokens_BT: jax.Array, *,
            mask_BT: jax.Array | None = None,
            positions_BT: jax.Array | None = None,
            prefix: Cache | None = None,
            prefix_mask_BS: jax.Array | None = None,
            segment_ids_BT: jax.Array | None = None,
            dropout_rng: jax.Array | None = None,
            mesh: jax.sharding.Mesh | None = None,
            rules=None,
            return_kv: bool = False,
            return_hidden: bool = False,
            hidden_BTD: jax.Array | None = None,
            first_layer: int = 0,
            stop_layer: int | None = None):
  """Logits [B, T, V] (float32) of a Llama model: a pure function of (config, params, tokens).

  Args:
    config: the architecture and dtype policy.
    params: the parameter tree (``params["layers_0"]["self_attn"]["q_proj"]["kernel"]``...).
    tokens_BT: int token ids.
    mask_BT: 1 for real tokens, 0 for padding (keys at padding are never attended to).
      Defaults to all ones.
    positions_BT: RoPE positions. Defaults to ``cumsum(mask_BT) - 1`` (so left and right
      padding both give real tokens positions 0, 1, ...), offset by the number of valid
      prefix tokens when a prefix is given.
    prefix: cached keys/values of earlier tokens, as returned by ``forward(..., return_kv=True)``:
      one :class:`KV` per layer ([B, S, K, E]), or one KV stacked over layers ([L, B, S, K, E]),
      which ``scan_layers`` models return (either works with either layout). New tokens attend
      to all valid prefix keys and causally to each other.
    prefix_mask_BS: which prefix keys are valid (defaults to all).
    segment_ids_BT: for packed rows, the resume each token belongs to (1, 2, ...; 0 is
      padding). Tokens attend only within their segment; pass the packer's positions too.
    dropout_rng: enables LoRA dropout (training); None is deterministic.
    mesh, rules: inside jit on a device mesh, pin the activations' logical axes to mesh axes
      (``rules`` defaults to :data:`labor_jax.sharding.DEFAULT_RULES`), so that the batch stays
      split and FSDP gathers weights instead of activations. Without a mesh: no constraints.
    return_kv: also return this call's keys/values, to be reused as a prefix (a tuple of per-layer
      KVs, or one stacked KV for ``scan_layers`` models; see :func:`cache_map`).
    return_hidden: return the final normed hidden states [B, T, D] (compute dtype) in place
      of the logits; :func:`head_weight` gives the matching output projection.
    hidden_BTD, first_layer: start from the residual stream after the first ``first_layer``
      blocks, as ``stop_layer=first_layer`` (or :func:`lower_hidden`) returns it for these tokens
      (``tokens_BT`` may then be None; the mask, positions, segment ids and prefix must be the ones
      it was computed with). Blocks below ``first_layer`` are not run, and their parameters need not
      be in ``params``; a ``prefix`` holds the keys/values of blocks ``first_layer`` and above.
    stop_layer: return the residual stream [B, T, D] after block ``stop_layer - 1`` (compute dtype, not
      normed) in place of the logits: the frozen lower blocks' output that a later call continues with
      ``first_layer``. With ``return_kv``, the keys/values of the blocks run.
  """
  stop = check_layers(config, first_layer, stop_layer)
  if hidden_BTD is not None:
    b, t = hidden_BTD.shape[:2]
  elif first_layer:
    raise ValueError("first_layer needs hidden_BTD, the lower blocks' output")
  else:
    tokens_BT = jnp.asarray(tokens_BT)
    if tokens_BT.ndim != 2:
      raise ValueError(f"tokens_BT must be [batch, length], got shape {tokens_BT.shape}")
    b, t = tokens_BT.shape
  if mask_BT is None:
    mask_BT = jnp.ones((b, t), dtype=jnp.int32) if segment_ids_BT is None else (segment_ids_BT > 0)
  if segment_ids_BT is not None and prefix is not None:
    raise ValueError("segment_ids_BT (packed rows) cannot be combined with a cached prefix")
  if prefix is not None and cache_layers(prefix) != stop - first_layer:
    raise ValueError(f"prefix has {cache_layers(prefix)} layers, the call runs {stop - first_layer} "
                     f"(blocks {first_layer} to {stop - 1})")
  if prefix is not None and prefix_mask_BS is None:
    prefix_mask_BS = jnp.ones(cache_layer(prefix, 0).k.shape[:2], dtype=jnp.int32)
  if positions_BT is None:
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    if prefix_mask_BS is not None:
      positions_BT = positions_BT + jnp.sum(prefix_mask_BS, axis=1, keepdims=True)
  mask = _pass_mask(mask_BT, prefix_mask_BS, segment_ids_BT)
  with _constraints(mesh, rules):
    logits_BTV, kvs = Llama(config).apply({"params": params}, tokens_BT, positions_BT, mask,
                                          prefix, None, not return_hidden, hidden_BTD, first_layer, stop_layer,
                                          rngs=None if dropout_rng is None else {"dropout": dropout_rng})
  return (logits_BTV, kvs) if return_kv else logits_BTV


def check_layers(config: LlamaConfig, first_layer: int = 0, stop_layer: int | None = None) -> int:
  """The end of the block range [first_layer, stop_layer) of a call (ValueError when it is not one of the
  model's unscanned blocks, or empty)."""
  n = config.num_hidden_layers
  stop = n if stop_layer is None else stop_layer
  if (first_layer or stop_layer is not None) and config.scan_layers:
    raise ValueError("a block range (first_layer, stop_layer) needs unscanned layers (model.scan_layers: false)")
  if not 0 <= first_layer <= stop <= n or (stop_layer is not None and stop_layer <= first_layer):
    raise ValueError(f"blocks {first_layer} to {stop} are not a range of the model's {n} blocks")
  return stop


def lower_hidden(config: LlamaConfig, params: Params, tokens_BT: jax.Array, n_layers: int, *,
                 mask_BT: jax.Array | None = None, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, mesh: jax.sharding.Mesh | None = None,
                 rules=None) -> jax.Array:
  """The residual stream [B, T, D] (compute dtype) after the first ``n_layers`` blocks: what
  ``forward(..., hidden_BTD=..., first_layer=n_layers)`` continues from. When those blocks and the
  embedding are frozen, a row's output here never changes during training, so it can be computed
  once and cached (``lora.cache_frozen``). Arguments as in :func:`forward` (no prefix)."""
  return forward(config, params, tokens_BT, mask_BT=mask_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                 mesh=mesh, rules=rules, stop_layer=n_layers)


@contextlib.contextmanager
def _constraints(mesh: jax.sharding.Mesh | None, rules):
  """Inside: activations' logical axes are pinned to ``mesh`` axes (no-op without a mesh)."""
  if mesh is None:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules or shard_lib.DEFAULT_RULES):
    yield


def forward_tree(config: LlamaConfig, params: Params, tree_tokens_L: jax.Array, tree_depth_L: jax.Array,
                 tree_ancestors_LA: jax.Array, prefix: Cache, prefix_len_BG: jax.Array,
                 return_hidden: bool = False, mesh: jax.sharding.Mesh | None = None, rules=None,
                 hidden_BGLD: jax.Array | None = None, first_layer: int = 0,
                 stop_layer: int | None = None) -> jax.Array:
  """Logits [B, G, L, V] of one token tree continued from G prefixes of each row's cache
  (with ``return_hidden``, the final normed hidden states [B, G, L, D] instead).

  ``tree_tokens_L`` are the tree's nodes (shared by every row and group), ``tree_depth_L``
  their depth (0 for roots), ``tree_ancestors_LA[l, a]`` the node at depth a on node l's
  path from its root (entries past ``depth_l`` are ignored). Group g of row b continues
  the first ``prefix_len_BG[b, g]`` tokens of ``prefix`` (keys/values from
  ``forward(..., return_kv=True)``); node l sits at position ``prefix_len + depth_l``.
  Equivalent to running every root-to-node path after every prefix separately, in one pass.
  ``mesh``, ``rules``, ``first_layer`` (with ``hidden_BGLD``, the nodes' residual stream after block
  ``first_layer - 1``) and ``stop_layer`` (returns that residual stream [B, G, L, D]): as in :func:`forward`;
  ``prefix`` holds the keys/values of the blocks the call runs.
  """
  stop = check_layers(config, first_layer, stop_layer)
  if cache_layers(prefix) != stop - first_layer:
    raise ValueError(f"prefix has {cache_layers(prefix)} layers, the call runs {stop - first_layer}")
  if first_layer and hidden_BGLD is None:
    raise ValueError("first_layer needs hidden_BGLD, the lower blocks' output")
  b, g = prefix_len_BG.shape
  l = tree_tokens_L.shape[0]
  depth_L = jnp.asarray(tree_depth_L)
  tokens_BT = jnp.broadcast_to(jnp.asarray(tree_tokens_L)[None, None], (b, g, l)).reshape(b, g * l)
  positions_BT = (prefix_len_BG[:, :, None] + depth_L[None, None]).reshape(b, g * l)
  anc_LA = jnp.asarray(tree_ancestors_LA)
  ok_LA = jnp.arange(anc_LA.shape[1])[None, :] <= depth_L[:, None]
  tree = Tree(jnp.where(ok_LA, anc_LA, 0), ok_LA, prefix_len_BG)
  dummy_mask = attention_lib.Mask(jnp.ones((1, 1, 1), bool), None)  # unused in tree mode
  with _constraints(mesh, rules):
    out_BTX, _ = Llama(config).apply({"params": params}, tokens_BT, positions_BT, dummy_mask, prefix, tree,
                                     not return_hidden, None if hidden_BGLD is None else hidden_BGLD.reshape(b, g * l, -1),
                                     first_layer, stop_layer)
  return out_BTX.reshape(b, g, l, -1)


def _init_boxed(config: LlamaConfig, rng: jax.Array):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Llama(config).init(rng, tokens, jnp.zeros((1, 1), jnp.int32), _pass_mask(tokens), None)["params"]


def init_params(config: LlamaConfig, rng: jax.Array) -> Params:
  """Random parameters (normal(0.02) matrices, unit norms), for from-scratch training and tests."""
  return nn.meta.unbox(_init_boxed(config, rng))


def param_shapes(config: LlamaConfig) -> Params:
  """ShapeDtypeStructs of every parameter, computed without allocating."""
  return nn.meta.unbox(jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0))))


def stack_layers(params: Params, num_layers: int) -> Params:
  """Per-layer params (``layers_0`` ... ) -> the ``scan_layers`` layout (``layers`` with a leading axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)])
  return out


def unstack_layers(params: Params) -> Params:
  """The ``scan_layers`` layout -> per-layer params (``layers_0`` ...)."""
  if "layers" not in params:
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


def param_logical_axes(config: LlamaConfig) -> Params:
  """Logical axis names (a PartitionSpec of names) for every parameter."""
  boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))
  return nn.get_partition_spec(boxed)


def param_shardings(config: LlamaConfig, mesh: jax.sharding.Mesh,
                    rules: shard_lib.Rules = shard_lib.DEFAULT_RULES) -> Params:
  """NamedSharding of every parameter of ``config`` on ``mesh`` (through the logical-axis table)."""
  return shard_lib.tree_shardings(param_shapes(config), param_logical_axes(config), mesh, rules)
