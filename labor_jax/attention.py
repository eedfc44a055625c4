"""Masked multi-head (grouped-query) attention with a FlashAttention-style backward pass.

``attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS)`` is
``softmax(where(mask, q k^T / sqrt(E), -1e30)) v`` per head, with H = K * G query heads
sharing each key/value head (GQA). It is plain XLA, so it runs and shards like the rest
of the model, but its gradient is written by hand the way FlashAttention's is:

* the forward pass keeps only the output and the row log-sum-exp ([B, K, G, T]), not
  the [B, K, G, T, S] probabilities; the backward pass recomputes them with one matmul;
* the softmax backward uses ``rowsum(dout * out)`` ([T, E] work) in place of
  ``rowsum(p * dp)`` ([T, S] work);
* heads are laid out head-major ([B, K, G, T, E]) once, so every matmul is a plain
  batched matmul without per-op transposes.

``causal_blocks > 1`` (only valid when the mask is causal, i.e. no prefix cache: S == T
and key s > query t is always masked) cuts the queries into that many blocks and lets
block i see only keys of blocks <= i, skipping the masked upper triangle: with 4 blocks
the score matmuls and softmax do 10/16 of the full work.

:func:`tree_attention` is the scorer's variant: G groups of the same L-node token tree per
row, each attending to a per-group prefix of the row's cached keys and to its own root path.

Shape suffixes: B batch, T queries, S keys, H query heads, K key/value heads, G = H // K
query heads per key/value head (in :func:`tree_attention`: G prefix groups per row), E head
dim; L tree nodes, A ancestors per node, N cached prefix keys.

Its training-step times against autodiff of the plain softmax are in docs/benchmarks.md.

**One entry point per backend.** :func:`attend` runs the implementation that
``LlamaConfig.attention_impl`` names (:data:`labor_jax.config.ATTENTION_IMPLS`), chosen by :func:`choose`:

* ``blocked``: :func:`attention` above (the default on the CPU);
* ``xla``: :func:`xla_attention`, ``jax.nn.dot_product_attention(implementation="xla")``;
* ``cudnn``: :func:`cudnn_attention`, cuDNN flash attention through
  ``jax.nn.dot_product_attention(implementation="cudnn")`` (``auto`` on NVIDIA GPUs);
* ``splash``: :func:`splash_attention`, the Pallas splash-attention kernel (``auto`` on TPUs).

All four give a zero output (and no gradient) to a query that sees no key. A choice that
cannot run a call (wrong backend or dtype, a cached prefix for splash, lengths the kernel
cannot tile) runs ``blocked`` instead and logs one warning per reason.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from labor_jax.config import ATTENTION_IMPLS

NEG = -1e30  # additive mask value: finite, so that fully masked (padding) rows stay finite


def _group_heads(x_BTHE, k: int):
  """[B, T, H, E] -> [B, K, G, T, E]: the H = K * G query heads grouped by key/value head."""
  b, t, h, e = x_BTHE.shape
  return jnp.transpose(x_BTHE.reshape(b, t, k, h // k, e), (0, 2, 3, 1, 4))


def _heads_major(q_BTHE, k_BSKE, v_BSKE):
  e = q_BTHE.shape[-1]
  q_BKGTE = _group_heads(q_BTHE, k_BSKE.shape[2]) * jnp.asarray(e ** -0.5, q_BTHE.dtype)
  return q_BKGTE, jnp.transpose(k_BSKE, (0, 2, 1, 3)), jnp.transpose(v_BSKE, (0, 2, 1, 3))


def _tokens_major(x_BKGTE):
  b, k, g, t, e = x_BKGTE.shape
  return jnp.transpose(x_BKGTE, (0, 3, 1, 2, 4)).reshape(b, t, k * g, e)


MAX_CAUSAL_BLOCKS = 8


def causal_block_count(length: int, min_block: int) -> int:
  """Query blocks for a causal sequence of ``length``: the most (up to MAX_CAUSAL_BLOCKS) that
  divide it into blocks of at least ``min_block`` positions; 1 when ``min_block`` is 0."""
  if min_block <= 0:
    return 1
  return max(n for n in range(1, MAX_CAUSAL_BLOCKS + 1) if length % n == 0 and (n == 1 or length // n >= min_block))


def _blocks(t: int, s: int, n: int):
  """(query start, query end, key end) per block; one full block when n <= 1."""
  if n <= 1:
    return [(0, t, s)]
  if s != t or t % n:
    raise ValueError(f"causal_blocks={n} needs an unprefixed sequence whose length ({t}) it divides")
  size = t // n
  return [(i * size, (i + 1) * size, (i + 1) * size) for i in range(n)]


def _scores(q_BKGTE, k_BKSE, mask_BTS):
  s_BKGTS = jnp.einsum("bkgte,bkse->bkgts", q_BKGTE, k_BKSE, preferred_element_type=jnp.float32)
  return jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG)


def _forward(q_BTHE, k_BSKE, v_BSKE, mask_BTS, causal_blocks):
  q, k, v = _heads_major(q_BTHE, k_BSKE, v_BSKE)
  outs, lses = [], []
  for t0, t1, s1 in _blocks(q.shape[3], k.shape[2], causal_blocks):
    s_BKGTS = _scores(q[:, :, :, t0:t1], k[:, :, :s1], mask_BTS[:, t0:t1, :s1])
    m_BKGT1 = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT1)
    l_BKGT1 = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    o = jnp.einsum("bkgts,bkse->bkgte", p_BKGTS.astype(v.dtype), v[:, :, :s1], preferred_element_type=jnp.float32)
    # A query with no visible key outputs zeros; its log-sum-exp is set so high that the
    # backward pass recomputes all-zero probabilities for it.
    seen_BKGT1 = m_BKGT1 > NEG / 2
    outs.append(jnp.where(seen_BKGT1, o / l_BKGT1, 0.0).astype(v.dtype))
    lses.append(jnp.where(seen_BKGT1, m_BKGT1 + jnp.log(l_BKGT1), -NEG))
  o_BKGTE = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  lse_BKGT1 = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=3)
  return o_BKGTE, lse_BKGT1, (q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask_BTS: jax.Array,
              causal_blocks: int = 1) -> jax.Array:
  """Attention output [B, T, H, E] (the dtype of ``v``).

  Args:
    q_BTHE: queries (after RoPE). H must be a multiple of K.
    k_BSKE, v_BSKE: keys (after RoPE) and values.
    mask_BTS: bool, True where query t may attend to key s. A query with no True entry
      (padding) outputs zeros and passes no gradient.
    causal_blocks: see the module docstring (1: no block skipping).
  """
  o_BKGTE, _, _ = _forward(q_BTHE, k_BSKE, v_BSKE, mask_BTS, causal_blocks)
  return _tokens_major(o_BKGTE)


def _fwd(q_BTHE, k_BSKE, v_BSKE, mask_BTS, causal_blocks):
  o_BKGTE, lse_BKGT1, (q, k, v) = _forward(q_BTHE, k_BSKE, v_BSKE, mask_BTS, causal_blocks)
  return _tokens_major(o_BKGTE), (q, k, v, mask_BTS, o_BKGTE, lse_BKGT1)


def _bwd(causal_blocks, res, do_BTHE):
  q, k, v, mask_BTS, o_BKGTE, lse_BKGT1 = res
  t, e = q.shape[3], q.shape[4]
  do_BKGTE = _group_heads(do_BTHE, k.shape[1])
  # rowsum(dout * out) = rowsum(p * dp): the softmax backward's correction term, per query.
  d_BKGT1 = jnp.sum(do_BKGTE.astype(jnp.float32) * o_BKGTE.astype(jnp.float32), axis=-1, keepdims=True)
  dqs = []
  dk_BKSE = jnp.zeros(k.shape, jnp.float32)
  dv_BKSE = jnp.zeros(v.shape, jnp.float32)
  for t0, t1, s1 in _blocks(t, k.shape[2], causal_blocks):
    s_BKGTS = _scores(q[:, :, :, t0:t1], k[:, :, :s1], mask_BTS[:, t0:t1, :s1])
    p_BKGTS = jnp.exp(s_BKGTS - lse_BKGT1[:, :, :, t0:t1])
    do = do_BKGTE[:, :, :, t0:t1]
    dv = jnp.einsum("bkgts,bkgte->bkse", p_BKGTS.astype(v.dtype), do, preferred_element_type=jnp.float32)
    dp_BKGTS = jnp.einsum("bkgte,bkse->bkgts", do, v[:, :, :s1], preferred_element_type=jnp.float32)
    ds_BKGTS = (p_BKGTS * (dp_BKGTS - d_BKGT1[:, :, :, t0:t1])).astype(q.dtype)
    dqs.append(jnp.einsum("bkgts,bkse->bkgte", ds_BKGTS, k[:, :, :s1], preferred_element_type=jnp.float32))
    dk = jnp.einsum("bkgts,bkgte->bkse", ds_BKGTS, q[:, :, :, t0:t1], preferred_element_type=jnp.float32)
    if s1 == k.shape[2]:
      dk_BKSE, dv_BKSE = dk_BKSE + dk, dv_BKSE + dv
    else:
      dk_BKSE = dk_BKSE.at[:, :, :s1].add(dk)
      dv_BKSE = dv_BKSE.at[:, :, :s1].add(dv)
  dq_BKGTE = (dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=3)) * (e ** -0.5)
  dq_BTHE = _tokens_major(dq_BKGTE).astype(do_BTHE.dtype)
  dk_BSKE = jnp.transpose(dk_BKSE, (0, 2, 1, 3)).astype(k.dtype)
  dv_BSKE = jnp.transpose(dv_BKSE, (0, 2, 1, 3)).astype(v.dtype)
  return dq_BTHE, dk_BSKE, dv_BSKE, None


attention.defvjp(_fwd, _bwd)


def reference_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  """The same function written plainly (autodiff through softmax), for tests."""
  b, t, h, e = q_BTHE.shape
  k = k_BSKE.shape[2]
  q_BTKGE = q_BTHE.reshape(b, t, k, h // k, e)
  s_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE, preferred_element_type=jnp.float32) * (e ** -0.5)
  p_BKGTS = jax.nn.softmax(jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG), axis=-1).astype(v_BSKE.dtype)
  out_BTKGE = jnp.einsum("bkgts,bske->btkge", p_BKGTS, v_BSKE)
  seen_BT = jnp.any(mask_BTS, axis=-1)
  return jnp.where(seen_BT[:, :, None, None, None], out_BTKGE, 0).reshape(b, t, h, e)


def tree_attention(q_BTHE, k_BTKE, v_BTKE, prefix_k_BNKE, prefix_v_BNKE, ancestors_LA, ancestor_ok_LA,
                   prefix_len_BG):
  """Attention of G groups x L tree nodes (T = G * L queries per row) to a per-group prefix of the
  row's cached keys/values and, within the group, to each node's root path.

  Node l of group g in row b sees the first ``prefix_len_BG[b, g]`` prefix keys of row b and the
  nodes ``ancestors_LA[l, a]`` where ``ancestor_ok_LA[l, a]`` (its path from the root, itself
  last). Plain softmax (no custom gradient): the scorer runs it at inference or under ``grad``.
  The keys and values of the root paths are gathered one depth at a time (``lax.map`` over
  the A depths), so no [B, G, L, A, K, E] copy of them exists (for Llama-2-7B with 335 titles it
  would dominate the scoring plan's memory: docs/training.md).
  """
  b, t, h, e = q_BTHE.shape
  k = k_BTKE.shape[2]
  l = ancestors_LA.shape[0]
  g = t // l
  q = q_BTHE.reshape(b, g, l, k, h // k, e)
  ks, vs = k_BTKE.reshape(b, g, l, k, e), v_BTKE.reshape(b, g, l, k, e)
  pk, pv = prefix_k_BNKE.astype(ks.dtype), prefix_v_BNKE.astype(vs.dtype)
  n = pk.shape[1]
  scale = e ** -0.5
  s_pre = jnp.einsum("bglkqe,bnke->bkqgln", q, pk, preferred_element_type=jnp.float32) * scale
  # One depth a at a time: the scores of every node against its ancestor at depth a.
  s_self_ABKQGL = jax.lax.map(
      lambda idx_L: jnp.einsum("bglkqe,bglke->bkqgl", q, ks[:, :, idx_L], preferred_element_type=jnp.float32),
      ancestors_LA.T) * scale
  s_self = jnp.moveaxis(s_self_ABKQGL, 0, -1)  # [b, k, q, g, l, a]
  pre_ok_BGN = jnp.arange(n)[None, None, :] < prefix_len_BG[:, :, None]
  s_pre = jnp.where(pre_ok_BGN[:, None, None, :, None, :], s_pre, NEG)
  s_self = jnp.where(ancestor_ok_LA, s_self, NEG)
  probs = jax.nn.softmax(jnp.concatenate([s_pre, s_self], axis=-1), axis=-1).astype(vs.dtype)
  out = jnp.einsum("bkqgln,bnke->bglkqe", probs[..., :n], pv)

  def add_depth(acc, xs):
    idx_L, p_BKQGL = xs
    return acc + jnp.einsum("bkqgl,bglke->bglkqe", p_BKQGL, vs[:, :, idx_L]), None
  out, _ = jax.lax.scan(add_depth, out, (ancestors_LA.T, jnp.moveaxis(probs[..., n:], -1, 0)))
  return out.reshape(b, t, h, e)


# ------------------------------------------------------------------ one entry point per backend
SPLASH_BLOCK = 128  # splash tiles queries and keys in blocks of at least this many positions (the TPU lane width)

logger = logging.getLogger(__name__)
_LOGGED: set[tuple[str, str]] = set()


class Mask(NamedTuple):
  """The attention mask of one forward pass, handed to every layer.

  ``dense_BTS`` is the whole mask (what ``blocked``, ``xla`` and ``cudnn`` take). ``segments_BT``
  is set when the mask is causal self-attention within segments, i.e. key s is visible to query
  t iff s <= t and both carry the same segment id > 0 (0 marks padding): the form splash
  takes. It is None with a cached prefix (S > T), where the mask is arbitrary.
  """
  dense_BTS: jax.Array  # bool [B, T, S]
  segments_BT: jax.Array | None  # int32 [B, T], or None

  @property
  def causal(self) -> bool:
    return self.segments_BT is not None


def resolve(requested: str, *, backend: str, device_kind: str = "", dtype=jnp.float32, head_dim: int = 128,
            q_len: int = 0, kv_len: int = 0, causal: bool = True, kv_heads: int = 1,
            head_shards: int = 1) -> tuple[str, str | None]:
  """(implementation to run, why ``requested`` cannot run this call or None): a pure function.

  ``auto`` means cudnn on NVIDIA GPUs, splash on TPUs and blocked elsewhere. ``xla`` and
  ``blocked`` run anywhere. When the wanted kernel cannot run the call, the answer is blocked
  and the reason says why.
  """
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={requested!r} is not one of {ATTENTION_IMPLS}")
  want = requested
  if want == "auto":
    want = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "blocked")
    if want == "cudnn" and not device_kind.startswith("NVIDIA"):
      want = "blocked"  # a ROCm GPU: no cuDNN, and nothing to report
  if want in ("xla", "blocked"):
    return want, None
  dt = jnp.dtype(dtype)
  why = None
  if want == "cudnn":
    if backend != "gpu" or not device_kind.startswith("NVIDIA"):
      why = f"cudnn needs an NVIDIA GPU; this is {device_kind or backend}"
    elif dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      why = f"cudnn runs bfloat16/float16 only; the model computes in {dt.name} (set model.dtype: bfloat16)"
    elif head_dim % 8 or head_dim > 256:
      why = f"cudnn needs a head dim that is a multiple of 8 and at most 256; got {head_dim}"
    elif q_len % 2 or kv_len % 2:
      why = f"cudnn with a mask needs even lengths; got {q_len} queries and {kv_len} keys"
  elif want == "splash":
    if backend != "tpu":
      why = f"splash needs a TPU; this is {device_kind or backend}"
    elif not causal:
      why = "splash takes causal masks with segment ids only; this call attends to a cached prefix"
    elif q_len % SPLASH_BLOCK:
      why = f"splash needs a sequence length that is a multiple of {SPLASH_BLOCK}; got {q_len}"
    elif kv_heads % head_shards:
      why = f"splash shards whole key/value heads; {kv_heads} do not split over {head_shards} devices"
  return ("blocked", why) if why else (want, None)


def choose(requested: str, **features) -> str:
  """:func:`resolve`, logging each distinct fallback once per process (a warning)."""
  impl, why = resolve(requested, **features)
  if why is not None and (requested, why) not in _LOGGED:
    _LOGGED.add((requested, why))
    logger.warning("attention_impl=%s: %s; using blocked", requested, why)
  return impl


def _zero_unseen(out_BTHE, seen_BT):
  return jnp.where(seen_BT[:, :, None, None], out_BTHE, 0).astype(out_BTHE.dtype)


def xla_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  """``jax.nn.dot_product_attention(implementation="xla")`` with :func:`attention`'s mask semantics
  (a query that sees no key outputs zeros). Autodiff through the softmax: it keeps the
  [B, H, T, S] probabilities for the backward pass."""
  out_BTHE = jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask_BTS[:, None], implementation="xla")
  return _zero_unseen(out_BTHE, jnp.any(mask_BTS, axis=-1))


def cudnn_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, causal: bool):
  """cuDNN flash attention (NVIDIA GPUs, bfloat16/float16).

  The mask goes in whole (cuDNN adds it as a bias, and computes that bias's gradient, which
  is thrown away); ``causal`` also tells cuDNN to skip the blocks above the diagonal. GQA is
  native. Packed segments and padding are in the mask."""
  out_BTHE = jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask_BTS[:, None], is_causal=causal,
                                          implementation="cudnn")
  return _zero_unseen(out_BTHE, jnp.any(mask_BTS, axis=-1))


def _splash_block(n: int) -> int:
  return next(b for b in (512, 256, SPLASH_BLOCK) if n % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  bq, bkv = _splash_block(q_len), _splash_block(kv_len)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                            block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  mask = splash.MultiHeadMask([splash.CausalMask((q_len, kv_len))] * heads)
  with jax.ensure_compile_time_eval():  # the mask tables are constants, also when first built inside a trace
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTHE, k_BSKE, v_BSKE, segments_BT, *, spec_BTHE: PartitionSpec | None = None,
                     mesh=None, interpret: bool = False):
  """The Pallas splash-attention kernel (TPU): causal within segments (``segments_BT``, 0 for
  padding, whose queries output zeros). GQA is native (query head h reads key/value head h // G).

  On a device mesh (``spec_BTHE`` gives the [B, T, H, E] activations' PartitionSpec) the kernel
  runs per shard under ``shard_map``: batch and heads split, sequence whole. ``interpret``
  runs the kernel in the Pallas interpreter (tests on the CPU)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  def local(q_BTHE, k_BSKE, v_BSKE, seg_BT):
    e = q_BTHE.shape[-1]
    q_BHTE = jnp.transpose(q_BTHE * jnp.asarray(e ** -0.5, q_BTHE.dtype), (0, 2, 1, 3))  # splash does not scale
    k_BKSE, v_BKSE = jnp.transpose(k_BSKE, (0, 2, 1, 3)), jnp.transpose(v_BSKE, (0, 2, 1, 3))
    kernel = _splash_kernel(q_BHTE.shape[1], q_BHTE.shape[2], k_BKSE.shape[2], interpret)
    out_BHTE = jax.vmap(kernel)(q_BHTE, k_BKSE, v_BKSE, segment_ids=splash.SegmentIds(seg_BT, seg_BT))
    return _zero_unseen(jnp.transpose(out_BHTE, (0, 2, 1, 3)).astype(v_BSKE.dtype), seg_BT > 0)

  segments_BT = segments_BT.astype(jnp.int32)
  if spec_BTHE is None:
    return local(q_BTHE, k_BSKE, v_BSKE, segments_BT)
  seg_spec = PartitionSpec(spec_BTHE[0], spec_BTHE[1])
  return jax.shard_map(local, mesh=mesh, in_specs=(spec_BTHE, spec_BTHE, spec_BTHE, seg_spec), out_specs=spec_BTHE,
                       check_vma=False)(q_BTHE, k_BSKE, v_BSKE, segments_BT)


def _head_shards(spec_BTHE: PartitionSpec | None, mesh) -> int:
  if spec_BTHE is None or mesh is None or len(spec_BTHE) < 3 or spec_BTHE[2] is None:
    return 1
  axes = spec_BTHE[2] if isinstance(spec_BTHE[2], tuple) else (spec_BTHE[2],)
  return int(np.prod([mesh.shape[a] for a in axes]))


def attend(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: Mask, implementation: str = "auto",
           causal_blocks: int = 1, spec_BTHE: PartitionSpec | None = None) -> jax.Array:
  """Attention output [B, T, H, E] by the implementation :func:`choose` picks for this call.

  Args:
    q_BTHE, k_BSKE, v_BSKE: queries, keys, values after RoPE (H a multiple of K).
    mask: the pass's :class:`Mask`.
    implementation: one of :data:`labor_jax.config.ATTENTION_IMPLS` (``LlamaConfig.attention_impl``).
    causal_blocks: query blocks of the ``blocked`` kernel (causal masks only).
    spec_BTHE: PartitionSpec of the activations inside ``model.forward(mesh=...)`` (splash
      shards itself with it); None off a mesh.
  """
  mesh = jax.sharding.get_abstract_mesh() if spec_BTHE is not None else None
  device = jax.devices()[0]
  impl = choose(implementation, backend=jax.default_backend(), device_kind=device.device_kind, dtype=q_BTHE.dtype,
                head_dim=q_BTHE.shape[-1], q_len=q_BTHE.shape[1], kv_len=k_BSKE.shape[1], causal=mask.causal,
                kv_heads=k_BSKE.shape[2], head_shards=_head_shards(spec_BTHE, mesh))
  if impl == "xla":
    return xla_attention(q_BTHE, k_BSKE, v_BSKE, mask.dense_BTS)
  if impl == "cudnn":
    return cudnn_attention(q_BTHE, k_BSKE, v_BSKE, mask.dense_BTS, mask.causal)
  if impl == "splash":
    return splash_attention(q_BTHE, k_BSKE, v_BSKE, mask.segments_BT, spec_BTHE=spec_BTHE, mesh=mesh)
  return attention(q_BTHE, k_BSKE, v_BSKE, mask.dense_BTS, causal_blocks if mask.causal else 1)
