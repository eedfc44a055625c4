"""Next-occupation scores: log P(title j is worker b's entry at step t | history), every j, t, b at once.

One fused pass (:func:`score` = :func:`encode` + :func:`score_from_cache`):

1. each resume is encoded once, keeping every layer's keys/values and the log-probabilities
   at every position (the first token of every candidate title is read off these);
2. the candidate titles (title tokens + the entry terminator) form one token tree
   (:class:`CandidateTree`): titles sharing leading tokens share nodes;
3. the tree is run once per (worker, step) group against the cached prefix of that
   worker's resume, masked to the step's history (``model.forward_tree``).

``score(config, params, tree, batch)`` is a pure JAX function: it jits, vmaps and
differentiates (see tests/test_scorer.py), so economists can embed it in estimation code.
:func:`naive_score` is the reference: every prompt + candidate run on its own, no cache.

Shape suffixes: B workers, N resume tokens, T steps (entries), J candidate titles, K a
candidate's tokens after its first, L tree nodes, A ancestors per node, E distinct
(node, next token) edges, C workers per tree pass, R rows, D hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import resume
from labor_jax import lora, model
from labor_jax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class CandidateTree:
  """The candidates' tokens as a prefix tree over their *input* tokens (all but the last)."""
  first_J: np.ndarray  # int32 [J]: each candidate's first token
  nodes_L: np.ndarray  # int32 [L]: token of each tree node
  depth_L: np.ndarray  # int32 [L]: node depth (0 = a candidate's first token)
  ancestors_LA: np.ndarray  # int32 [L, A]: node at depth a on node l's root path (a <= depth_l; itself last)
  path_JK: np.ndarray  # int32 [J, K]: node whose output predicts the candidate's token k + 1
  target_JK: np.ndarray  # int32 [J, K]: that token
  valid_JK: np.ndarray  # bool [J, K]: k + 1 < len(candidate)
  lengths_J: np.ndarray  # int32 [J]: tokens per candidate
  edge_node_E: np.ndarray  # int32 [E]: the distinct (node, next token) pairs of (path_JK, target_JK) ...
  edge_token_E: np.ndarray  # int32 [E]: ... their next token
  edge_JK: np.ndarray  # int32 [J, K]: the edge of (path_JK, target_JK)

  @classmethod
  def build(cls, candidates: Sequence[Sequence[int]]) -> "CandidateTree":
    if not candidates or any(len(c) == 0 for c in candidates):
      raise ValueError("every candidate needs at least one token")
    if len({tuple(c) for c in candidates}) != len(candidates):
      raise ValueError("two candidates have identical tokens")
    index: dict[tuple[int, ...], int] = {}
    parents: list[int] = []
    tokens: list[int] = []
    k = max(len(c) for c in candidates) - 1
    path = np.zeros((len(candidates), max(k, 1)), np.int32)
    target = np.zeros_like(path)
    valid = np.zeros(path.shape, bool)
    for j, c in enumerate(candidates):
      for i in range(len(c) - 1):
        key = tuple(c[:i + 1])
        if key not in index:
          index[key] = len(tokens)
          tokens.append(int(c[i]))
          parents.append(index[key[:-1]] if i else -1)
        path[j, i], target[j, i], valid[j, i] = index[key], c[i + 1], True
    n = max(len(tokens), 1)
    tokens = tokens or [0]
    parents = parents or [-1]
    depth = np.zeros(n, np.int32)
    for i, p in enumerate(parents):  # parents precede children
      if p >= 0:
        depth[i] = depth[p] + 1
    anc = np.zeros((n, int(depth.max()) + 1), np.int32)
    for i, p in enumerate(parents):
      if p >= 0:
        anc[i] = anc[p]
      anc[i, depth[i]] = i
    edges = {}
    edge = np.zeros_like(path)
    for j, kk in zip(*np.nonzero(valid)):
      edge[j, kk] = edges.setdefault((int(path[j, kk]), int(target[j, kk])), len(edges))
    pairs = np.asarray(list(edges) or [(0, 0)], np.int32).reshape(-1, 2)
    return cls(np.asarray([c[0] for c in candidates], np.int32), np.asarray(tokens, np.int32), depth, anc,
               path, target, valid, np.asarray([len(c) for c in candidates], np.int32),
               pairs[:, 0].copy(), pairs[:, 1].copy(), edge)

  @classmethod
  def for_titles(cls, tokenizer, titles, variant: str = "titles") -> "CandidateTree":
    """The tree of a titles table's candidates (title segment + entry terminator) under ``tokenizer``."""
    return cls.build(tokenizer.candidate_tokens(resume.candidate_texts(titles, variant)))

  @property
  def num_candidates(self) -> int:
    return len(self.first_J)

  @property
  def tokens_JC(self) -> np.ndarray:
    """int32 [J, C]: each candidate's tokens, padded with zeros after ``lengths_J[j]`` (C = K + 1)."""
    tokens = np.concatenate([self.first_J[:, None], self.target_JK], axis=1)
    return np.where(np.arange(tokens.shape[1]) < self.lengths_J[:, None], tokens, 0).astype(np.int32)


LOGITS_PER_CHUNK = 2 ** 24  # bounds the logits held at once by the log-normaliser (64 MiB in float32)


def _logits(config: LlamaConfig, x_ND, w_DV):
  """``x @ w`` in float32, padded vocabulary rows at -inf."""
  return model.mask_padded_vocab(config, jnp.dot(x_ND, w_DV.astype(x_ND.dtype), preferred_element_type=jnp.float32))


def _log_normalizer(config: LlamaConfig, x_RD, w_DV):
  """logsumexp over the vocabulary of ``x @ w``, [R], holding at most LOGITS_PER_CHUNK logits at a time."""
  r, d = x_RD.shape
  rows = max(1, min(r, LOGITS_PER_CHUNK // w_DV.shape[1]))
  if rows >= r:
    return jax.nn.logsumexp(_logits(config, x_RD, w_DV), axis=-1)
  n = -(-r // rows)
  x_CRD = jnp.pad(x_RD, ((0, n * rows - r), (0, 0))).reshape(n, rows, d)
  return jax.lax.map(lambda x: jax.nn.logsumexp(_logits(config, x, w_DV), axis=-1), x_CRD).reshape(-1)[:r]


def head_weight(config: LlamaConfig, params: Any) -> jax.Array:
  """The output projection [D, V]; a LoRA head is scored with its adapters folded in (no dropout at inference)."""
  w_DV = model.head_weight(config, params)
  if w_DV is None:
    w_DV = lora.merge(config, {"lm_head": params["lm_head"]})[1]["lm_head"]["kernel"]
  return w_DV


class Lower(NamedTuple):
  """The frozen lower blocks' output for a batch of resumes (:func:`encode_lower`): the residual stream
  after the first ``first_layer`` blocks at every resume token and at every tree node of every step. It
  depends only on those blocks, so one computation serves every scoring of models that share them (the
  validation passes of a run with adapters in its top blocks only)."""
  resume_BND: jax.Array
  tree_BTLD: jax.Array


def _by_chunks(fn, b: int, chunk: int | None, kv, *rows):
  """``fn((kv_c, *rows_c))`` over chunks of ``chunk`` of the ``b`` workers (all at once without a chunk):
  chunk i holds workers i, i + b / chunk, ..., so a batch split over devices in contiguous blocks stays
  split within every chunk. ``rows``: arrays with the workers on axis 0 (None passes through)."""
  c = b if chunk is None else max(1, min(chunk, b))
  if b % c:
    raise ValueError(f"chunk={c} must divide the batch of {b} workers")
  if c == b:
    return fn((kv, *rows))
  k = b // c  # chunks

  def strided(x, axis):  # [.., B, ..] -> [k, .., c, ..]
    return jnp.moveaxis(x.reshape(*x.shape[:axis], c, k, *x.shape[axis + 1:]), axis + 1, 0)
  out_KC = jax.lax.map(fn, (model.cache_map(kv, strided), *(None if r is None else strided(r, 0) for r in rows)))
  return jnp.moveaxis(out_KC, 0, 1).reshape(b, *out_KC.shape[2:])


def encode(config: LlamaConfig, params: Any, tokens_BN: jax.Array, mask_BN: jax.Array, *,
           mesh: jax.sharding.Mesh | None = None, rules=None, lower: Lower | None = None, first_layer: int = 0):
  """(final normed hidden states [B, N, D], keys/values per layer): the resumes encoded once, the cache
  that :func:`score_from_cache` continues. With ``lower`` (from :func:`encode_lower`), the blocks from
  ``first_layer`` up only, from its resume states (the keys/values are then those blocks')."""
  if lower is None:
    return model.forward(config, params, tokens_BN, mask_BT=mask_BN, return_kv=True, return_hidden=True,
                         mesh=mesh, rules=rules)
  if not first_layer:
    raise ValueError("lower (the first blocks' output) needs first_layer, the number of blocks it ran")
  return model.forward(config, params, None, mask_BT=mask_BN, return_kv=True, return_hidden=True, mesh=mesh,
                       rules=rules, hidden_BTD=lower.resume_BND, first_layer=first_layer)


def encode_lower(config: LlamaConfig, params: Any, tree: CandidateTree, tokens_BN: jax.Array, mask_BN: jax.Array,
                 prefix_ends_BT: jax.Array, n_layers: int, *, chunk: int | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules=None) -> Lower:
  """The first ``n_layers`` blocks' output for the resumes and for the tree after each step's prefix
  (arguments as in :func:`score`): ``score(..., lower=, first_layer=n_layers)`` continues from it and
  gives what :func:`score` gives, without running those blocks again."""
  x_BND, kv = model.forward(config, params, tokens_BN, mask_BT=mask_BN, return_kv=True, stop_layer=n_layers,
                            mesh=mesh, rules=rules)

  def nodes(args):
    kv_c, ends_c = args
    return model.forward_tree(config, params, tree.nodes_L, tree.depth_L, tree.ancestors_LA, kv_c, ends_c,
                              mesh=mesh, rules=rules, stop_layer=n_layers)
  return Lower(x_BND, _by_chunks(nodes, x_BND.shape[0], chunk, kv, prefix_ends_BT))


def score_from_cache(config: LlamaConfig, params: Any, tree: CandidateTree, kv, hidden_BTD: jax.Array,
                     prefix_len_BT: jax.Array, *, normalize: bool = False, chunk: int | None = None,
                     mesh: jax.sharding.Mesh | None = None, rules=None, tree_BTLD: jax.Array | None = None,
                     first_layer: int = 0) -> jax.Array:
  """log P(candidate j | the first ``prefix_len_BT[b, t]`` cached tokens of row b): [B, T, J] float32.

  Args:
    kv: the cache of :func:`encode` or ``model.forward(..., return_kv=True)`` (per-layer or
      stacked keys/values); keys at or after a row's ``prefix_len`` are never attended to.
    hidden_BTD: the final normed hidden state at position ``prefix_len_BT[b, t] - 1`` (it predicts each
      candidate's first token).
    prefix_len_BT: cached tokens before each step's candidate (positions 0 .. prefix_len - 1 must be the
      row's tokens in order: the candidates sit at positions prefix_len, prefix_len + 1, ...).
    normalize, chunk, mesh, rules: as in :func:`score`.
    tree_BTLD, first_layer: the tree nodes' states after the first ``first_layer`` blocks
      (:attr:`Lower.tree_BTLD`); ``kv`` then holds the blocks from ``first_layer`` up.
  """
  w_DV = head_weight(config, params)
  logits_BTV = _logits(config, hidden_BTD, w_DV)
  first_BTJ = logits_BTV[:, :, tree.first_J] - jax.nn.logsumexp(logits_BTV, axis=-1)[:, :, None]
  w_edges_DE = w_DV[:, tree.edge_token_E]

  def rest(args):
    kv_c, ends_c, lower_c = args
    x_CTLD = model.forward_tree(config, params, tree.nodes_L, tree.depth_L, tree.ancestors_LA, kv_c, ends_c,
                                return_hidden=True, mesh=mesh, rules=rules, hidden_BGLD=lower_c,
                                first_layer=first_layer)
    c, t, l, d = x_CTLD.shape
    logz_CTL = _log_normalizer(config, x_CTLD.reshape(c * t * l, d), w_DV).reshape(c, t, l)
    edge_CTE = jnp.einsum("cted,de->cte", x_CTLD[:, :, tree.edge_node_E], w_edges_DE.astype(x_CTLD.dtype),
                          preferred_element_type=jnp.float32)
    picked_CTJK = edge_CTE[:, :, tree.edge_JK] - logz_CTL[:, :, tree.path_JK]
    return jnp.sum(jnp.where(tree.valid_JK, picked_CTJK, 0.0), axis=-1)

  rest_BTJ = _by_chunks(rest, hidden_BTD.shape[0], chunk, kv, prefix_len_BT, tree_BTLD)
  logp_BTJ = first_BTJ + rest_BTJ
  return jax.nn.log_softmax(logp_BTJ, axis=-1) if normalize else logp_BTJ


def score(config: LlamaConfig, params: Any, tree: CandidateTree, tokens_BN: jax.Array, mask_BN: jax.Array,
          prefix_ends_BT: jax.Array, *, normalize: bool = False, chunk: int | None = None,
          mesh: jax.sharding.Mesh | None = None, rules=None, return_hidden: bool = False,
          lower: Lower | None = None, first_layer: int = 0):
  """log P(candidate j | the first ``prefix_ends_BT[b, t]`` tokens of resume b): [B, T, J] float32
  (and, with ``return_hidden``, the resumes' final normed hidden states [B, N, D], from which a token
  loss of the same pass can be read).

  :func:`encode` followed by :func:`score_from_cache` at every step's title position.

  Args:
    tokens_BN, mask_BN: the resumes' tokens (right padded) and their validity mask.
    prefix_ends_BT: for each step, the number of resume tokens before its title (the
      ``title_spans[:, 0]`` of data_pipeline.tokenizer.TokenizedResume); pad unused steps
      with any value in [1, N] and ignore their scores.
    normalize: log-probabilities renormalised over the J candidates (``log_softmax`` over j).
    chunk: workers per tree pass (bounds memory: a tree pass holds [chunk, T, L, D] hidden
      states and the keys/values of its L nodes). Chunk i takes workers i, i + B / chunk, ...,
      so a batch split over devices in contiguous blocks stays split within every chunk
      (``chunk`` must then be a multiple of the batch's device count).
    mesh, rules: on a device mesh, inside ``jit``: activations carry the logical-axis
      constraints of training (workers on the batch axes ``data`` and ``fsdp``, heads and MLP
      on ``tensor``), so parameters sharded by :func:`labor_jax.model.param_shardings` stay
      sharded. Without a mesh: no constraints.
    lower, first_layer: the first ``first_layer`` blocks' output for this batch (:func:`encode_lower`,
      with the same parameters in those blocks): only the blocks above run.

  Full [.., V] logits are only formed at the T title positions of each resume and, for the
  log-normaliser of each tree node, LOGITS_PER_CHUNK at a time; the candidates' own tokens
  are scored as E distinct (node, token) dot products: far less temporary memory than forming
  every node's logits at a large vocabulary (figures in docs/benchmarks.md).
  """
  tokens_BN = jnp.asarray(tokens_BN)
  b, n = tokens_BN.shape
  x_BND, kv = encode(config, params, tokens_BN, mask_BN, mesh=mesh, rules=rules, lower=lower, first_layer=first_layer)
  last_BT = jnp.clip(prefix_ends_BT - 1, 0, n - 1)
  logp_BTJ = score_from_cache(config, params, tree, kv, x_BND[jnp.arange(b)[:, None], last_BT], prefix_ends_BT,
                              normalize=normalize, chunk=chunk, mesh=mesh, rules=rules,
                              tree_BTLD=None if lower is None else lower.tree_BTLD, first_layer=first_layer)
  return (logp_BTJ, x_BND) if return_hidden else logp_BTJ


@functools.lru_cache(maxsize=8)
def _naive_forward(config: LlamaConfig):
  return jax.jit(lambda p, t, m: jax.nn.log_softmax(model.forward(config, p, t, mask_BT=m), axis=-1))


def naive_score(config: LlamaConfig, params: Any, candidates: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]],
                width: int | None = None) -> np.ndarray:
  """Reference: each prompt + each candidate as its own sequence, no cache. [P, J] log-probs.

  Sequences are right-padded to ``width`` (default: longest prompt + longest candidate)."""
  width = width or max(len(p) for p in prompts) + max(len(c) for c in candidates)
  fwd = _naive_forward(config)
  out = np.zeros((len(prompts), len(candidates)), np.float64)
  for i, prompt in enumerate(prompts):
    toks = np.zeros((len(candidates), width), np.int32)
    mask = np.zeros_like(toks)
    for j, c in enumerate(candidates):
      seq = list(prompt) + list(c)
      toks[j, :len(seq)], mask[j, :len(seq)] = seq, 1
    logp = np.asarray(fwd(params, toks, mask))
    for j, c in enumerate(candidates):
      pos = np.arange(len(prompt) - 1, len(prompt) + len(c) - 1)
      out[i, j] = logp[j, pos, np.asarray(c)].sum()
  return out
