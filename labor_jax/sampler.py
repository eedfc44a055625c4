"""Career forecasts: S sampled future paths of Y years per worker, continued from a key/value cache.

:func:`sample_paths` is a pure JAX function (jit it with ``config``, ``tree`` and ``samples``
closed over). Per worker it

1. encodes the prompt (the resume with the first future entry opened, as
   :meth:`data_pipeline.resume.Resume.prompt` renders it) once, scores every title from the
   cache (:func:`labor_jax.scorer.score_from_cache`), renormalises over the titles and draws
   year 1 for all S samples; then copies the cache S times (samples are a batch axis:
   row r = b * S + s);
2. per year after the first, per row:
   appends the sampled title's tokens, the entry terminator and the next entry's prefix
   (``"1983 (some college):"``) to the cache with one ``model.forward(prefix=...)`` call,
   written in place into a cache preallocated for all Y years (:func:`append`), then scores
   every title from the cache and draws the year's title; years 2 .. Y run in a ``lax.scan``.

The appended tokens are exactly those of the re-rendered, re-tokenised resume of the sampled
history (tested), so the model sees nothing it would not see in training. Every row's cache is
kept contiguous: row r's first ``length_R[r]`` slots are its tokens in order, and each append
writes at the row's own length, so padding is overwritten by the next append and never attended to.

The runs and their output files are :mod:`labor_jax.forecasting`; the command is
``python -m labor_jax.forecast`` (:mod:`labor_jax.cli.forecast`).

Shape suffixes: B workers, S samples per worker, R = B * S rows, N prompt tokens, M cache slots,
W tokens appended per year (longest candidate + longest entry prefix), P entry-prefix tokens,
Y future years, J titles, C a candidate's tokens, D hidden size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from labor_jax import model, scorer
from labor_jax.config import LlamaConfig


class Cache(NamedTuple):
  """Per row: keys/values of its tokens so far, how many there are, and the final normed hidden
  state of the last one (it predicts the next title's first token)."""
  kv: tuple  # model.KV per layer, [R, M, K, E] each; slots >= length_R[r] are unused
  length_R: jax.Array  # int32 [R]
  hidden_RD: jax.Array  # [R, D]


class Forecast(NamedTuple):
  titles_BSY: jax.Array  # int32: the title sampled for worker b, sample s, future year y
  probs_BSYJ: jax.Array  # float32: the model's distribution over titles at year y given sample s's path before y


def init_cache(config: LlamaConfig, params: Any, tokens_BN: jax.Array, mask_BN: jax.Array, capacity: int) -> Cache:
  """Encodes right-padded prompts once, into caches of ``capacity`` slots per row."""
  b, n = tokens_BN.shape
  if capacity < n:
    raise ValueError(f"capacity {capacity} is below the prompt width {n}")
  x_BND, kv = scorer.encode(config, params, tokens_BN, mask_BN)
  length_B = jnp.sum(mask_BN, axis=1).astype(jnp.int32)
  grow = lambda x_BNKE: jnp.pad(x_BNKE, ((0, 0), (0, capacity - n), (0, 0), (0, 0)))  # noqa: E731
  return Cache(tuple(model.KV(grow(layer.k), grow(layer.v)) for layer in kv), length_B,
               x_BND[jnp.arange(b), length_B - 1])


def append(config: LlamaConfig, params: Any, cache: Cache, tokens_RW: jax.Array, count_R: jax.Array) -> Cache:
  """The cache with the first ``count_R[r]`` (>= 1) tokens of ``tokens_RW[r]`` appended to row r.

  One forward pass over the W new tokens against the cached ones, at positions
  ``length_R + 0, 1, ...`` (what re-encoding the whole text would give); their keys/values are
  written at each row's length. The caller keeps ``length_R + W`` within the capacity."""
  r, w = tokens_RW.shape
  m = cache.kv[0].k.shape[1]
  mask_RW = jnp.arange(w)[None, :] < count_R[:, None]
  positions_RW = cache.length_R[:, None] + jnp.arange(w)[None, :]
  prefix_mask_RM = jnp.arange(m)[None, :] < cache.length_R[:, None]
  x_RWD, new = model.forward(config, params, tokens_RW, mask_BT=mask_RW, positions_BT=positions_RW,
                             prefix=cache.kv, prefix_mask_BS=prefix_mask_RM, return_kv=True, return_hidden=True)
  write = jax.vmap(lambda old, upd, at: jax.lax.dynamic_update_slice_in_dim(old, upd.astype(old.dtype), at, axis=0))
  kv = tuple(model.KV(write(old.k, upd.k, cache.length_R), write(old.v, upd.v, cache.length_R))
             for old, upd in zip(cache.kv, new))
  return Cache(kv, cache.length_R + count_R, x_RWD[jnp.arange(r), count_R - 1])


def next_logprobs(config: LlamaConfig, params: Any, tree: scorer.CandidateTree, cache: Cache) -> jax.Array:
  """log P(title j is each row's next entry), renormalised over the titles: [R, J]."""
  return scorer.score_from_cache(config, params, tree, cache.kv, cache.hidden_RD[:, None], cache.length_R[:, None],
                                 normalize=True)[:, 0]


def continuation(tree: scorer.CandidateTree, j_R: jax.Array, prefix_RP: jax.Array, prefix_len_R: jax.Array):
  """(tokens [R, W], count [R]) appended after sampling title ``j_R``: the title's candidate tokens (title +
  entry terminator) then the next entry's prefix tokens; W = longest candidate + P."""
  tokens_JC = jnp.asarray(tree.tokens_JC)
  c, p = tokens_JC.shape[1], prefix_RP.shape[1]
  len_R = jnp.asarray(tree.lengths_J)[j_R]
  i_W = jnp.arange(c + p)
  title_RW = jnp.pad(tokens_JC[j_R], ((0, 0), (0, p)))
  prefix_RW = jnp.take_along_axis(prefix_RP, jnp.clip(i_W[None] - len_R[:, None], 0, p - 1), axis=1)
  count_R = len_R + prefix_len_R
  tokens_RW = jnp.where(i_W[None] < len_R[:, None], title_RW, prefix_RW)
  return jnp.where(i_W[None] < count_R[:, None], tokens_RW, 0), count_R


def sample_paths(config: LlamaConfig, params: Any, tree: scorer.CandidateTree, tokens_BN: jax.Array,
                 mask_BN: jax.Array, next_prefix_BYP: jax.Array, next_prefix_len_BY: jax.Array, samples: int,
                 rng: jax.Array) -> Forecast:
  """Samples ``samples`` future paths of Y = ``next_prefix_BYP.shape[1] + 1`` years per worker.

  Args:
    config, params, tree: the model and the titles' candidate tree (:class:`labor_jax.scorer.CandidateTree`).
    tokens_BN, mask_BN: right-padded prompts, each ending with the first future entry opened
      (``tokenizer.encode_resume(resume.prompt(year, education)).ids``).
    next_prefix_BYP, next_prefix_len_BY: the tokens (right padded) of the entry prefixes of future
      years 2 .. Y (``tokenizer.encode_piece(resume.entry_prefix(year, education))``), Y - 1 per worker.
      They do not depend on the sampled titles, so the host computes them.
    samples: S, paths per worker (a static batch axis).
    rng: a typed key (``jax.random.key``), or one per worker ([B]) so that a worker's paths do not
      depend on which other workers share its batch.

  Returns a :class:`Forecast`. The cache holds N + (Y - 1) * W slots per row.
  """
  tokens_BN = jnp.asarray(tokens_BN)
  b, n = tokens_BN.shape
  y = next_prefix_BYP.shape[1] + 1
  keys_B = rng if rng.shape == (b,) else jax.random.split(rng, b)
  keys_YB = jax.vmap(lambda k: jax.random.split(k, y), out_axes=1)(keys_B)
  w = tree.tokens_JC.shape[1] + next_prefix_BYP.shape[2]
  cache = init_cache(config, params, tokens_BN, mask_BN, n + (y - 1) * w)
  # Year 1: one distribution per worker (its S rows would share one cache), S draws from it.
  logp_BJ = next_logprobs(config, params, tree, cache)
  j_BS = jax.vmap(lambda k, logp_J: jax.random.categorical(k, logp_J, shape=(samples,)))(keys_YB[0], logp_BJ)
  p_BSJ = jnp.broadcast_to(jnp.exp(logp_BJ)[:, None], (b, samples, logp_BJ.shape[1]))
  if y == 1:
    return Forecast(j_BS[:, :, None].astype(jnp.int32), p_BSJ[:, :, None])
  cache = jax.tree.map(lambda x: jnp.repeat(x, samples, axis=0), cache)  # rows r = b * S + s

  def year(carry, xs):
    cache, j_BS = carry
    keys_B, prefix_BP, prefix_len_B = xs
    tokens_RW, count_R = continuation(tree, j_BS.reshape(-1), jnp.repeat(prefix_BP, samples, axis=0),
                                      jnp.repeat(prefix_len_B, samples))
    cache = append(config, params, cache, tokens_RW, count_R)
    logp_BSJ = next_logprobs(config, params, tree, cache).reshape(b, samples, -1)
    j_BS = jax.vmap(lambda k, logp_SJ: jax.random.categorical(k, logp_SJ, axis=-1))(keys_B, logp_BSJ)
    return (cache, j_BS), (j_BS, jnp.exp(logp_BSJ))

  _, (j_YBS, p_YBSJ) = jax.lax.scan(year, (cache, j_BS), (keys_YB[1:], jnp.swapaxes(next_prefix_BYP, 0, 1),
                                                         jnp.swapaxes(next_prefix_len_BY, 0, 1)))
  j_YBS = jnp.concatenate([j_BS[None], j_YBS], axis=0).astype(jnp.int32)
  p_YBSJ = jnp.concatenate([p_BSJ[None], p_YBSJ], axis=0)
  return Forecast(jnp.transpose(j_YBS, (1, 2, 0)), jnp.transpose(p_YBSJ, (1, 2, 0, 3)))


# ----------------------------------------------------------------------------- host side
