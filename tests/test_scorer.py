"""The fused occupation scorer equals naive scoring and is an ordinary JAX function."""

import jax
import numpy as np
import pytest

from labor_jax import model, scorer
from labor_jax.config import llama_tiny
from tests import numerics

CONFIG = llama_tiny(rope_theta=500000.0)
# Candidates with shared leading tokens, one that is a token-prefix of another's input, different lengths.
CANDS = [[5, 7, 2], [5, 8, 2], [9, 2], [5, 7, 11, 2], [12, 13, 14, 15, 2]]
# Fused, chunked, vmapped and naive scoring run one forward pass over 24 tokens (+ candidates) in other
# orders: the float32 bound of that pass (tests.numerics).
DEPTH = numerics.forward_terms(CONFIG, tokens=24 + 5)


@pytest.fixture(scope="module")
def setup():
  params = model.init_params(CONFIG, jax.random.key(0))
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, CONFIG.vocab_size, (3, 24)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 17:] = 0  # different history lengths, right padding
  mask[2, 11:] = 0
  ends = np.array([[4, 9, 24], [3, 10, 17], [5, 11, 11]], np.int32)
  return params, scorer.CandidateTree.build(CANDS), tokens, mask, ends


def test_tree_shares_leading_tokens():
  tree = scorer.CandidateTree.build(CANDS)
  # inputs: [5], [5,7], [5,8]... -> nodes 5, 7, 8, 9, 11, 12, 13, 14, 15 (5 shared by three titles)
  assert len(tree.nodes_L) == 9 and tree.nodes_L.tolist().count(5) == 1
  node_11 = tree.path_JK[3, 2]
  assert tree.depth_L[node_11] == 2
  assert tree.ancestors_LA[node_11][:3].tolist() == [tree.path_JK[3, 0], tree.path_JK[3, 1], node_11]  # 5 -> 7 -> 11
  with pytest.raises(ValueError, match="identical"):
    scorer.CandidateTree.build([[1, 2], [1, 2]])


def test_fused_equals_naive(setup):
  params, tree, tokens, mask, ends = setup
  fused = np.asarray(jax.jit(lambda p: scorer.score(CONFIG, p, tree, tokens, mask, ends))(params))
  prompts = [tokens[b, :ends[b, t]] for b in range(3) for t in range(3)]
  naive = scorer.naive_score(CONFIG, params, CANDS, prompts).reshape(3, 3, len(CANDS))
  numerics.assert_close(fused, naive, **DEPTH, what="fused")
  chunked = np.asarray(scorer.score(CONFIG, params, tree, tokens, mask, ends, chunk=1))
  numerics.assert_close(chunked, naive, **DEPTH, what="chunk=1")
  with pytest.raises(AssertionError, match="bound"):  # candidates scored against the wrong prompts fail it
    numerics.assert_close(fused[::-1], naive, **DEPTH, what="rows reversed")


def test_scores_from_the_lower_blocks_output_equal_the_whole_pass(setup):
  """encode_lower + score(lower=, first_layer=): the frozen first blocks' states computed once give the whole
  pass's scores (in one chunk and per worker); states of another lower half, or of one block fewer, do not."""
  _, tree, tokens, mask, ends = setup
  config = CONFIG.replace(num_hidden_layers=4)
  params = model.init_params(config, jax.random.key(0))
  depth = numerics.forward_terms(config, tokens=24 + 5)
  n = 2
  want = np.asarray(scorer.score(config, params, tree, tokens, mask, ends))
  for chunk in (None, 1):
    lower = scorer.encode_lower(config, params, tree, tokens, mask, ends, n, chunk=chunk)
    assert lower.tree_BTLD.shape == (3, 3, len(tree.nodes_L), config.hidden_size)
    got = jax.jit(lambda p, lo: scorer.score(config, p, tree, tokens, mask, ends, chunk=chunk, lower=lo,
                                             first_layer=n))(params, lower)
    numerics.assert_close(got, want, **depth, what=f"lower half computed apart, chunk={chunk}")
  other = model.init_params(config, jax.random.key(1))
  wrong_half = scorer.encode_lower(config, other, tree, tokens, mask, ends, n)
  short = scorer.encode_lower(config, params, tree, tokens, mask, ends, n - 1)
  for lower, what in ((wrong_half, "another model's lower blocks"), (short, "one block short")):
    bad = scorer.score(config, params, tree, tokens, mask, ends, lower=lower, first_layer=n)
    with pytest.raises(AssertionError, match="bound"):
      numerics.assert_close(bad, want, **depth, what=what)
  with pytest.raises(ValueError, match="first_layer"):
    scorer.score(config, params, tree, tokens, mask, ends, lower=short)


def test_normalised_over_candidates(setup):
  params, tree, tokens, mask, ends = setup
  raw = scorer.score(CONFIG, params, tree, tokens, mask, ends)
  norm = scorer.score(CONFIG, params, tree, tokens, mask, ends, normalize=True)
  # A log-sum-exp over the 5 candidates: absolute error ~ eps * max|raw| per log-prob, and so per probability.
  scale = np.abs(np.asarray(raw)).max()
  numerics.assert_close(np.exp(norm).sum(-1), np.ones(norm.shape[:-1]), terms=len(CANDS), scale=scale, what="sum")
  numerics.assert_close(norm, raw - jax.nn.logsumexp(raw, -1, keepdims=True), terms=len(CANDS), what="normalised")
  assert (np.exp(raw).sum(-1) < 1).all()  # raw: other continuations keep probability mass


def test_vmap_over_batches_and_grad(setup):
  params, tree, tokens, mask, ends = setup
  # jitted: the same transformations, one compilation each instead of op-by-op dispatch
  f = jax.jit(lambda p, t, m, e: scorer.score(CONFIG, p, tree, t, m, e, normalize=True))
  stacked = [np.stack([x, x[::-1]]) for x in (tokens, mask, ends)]
  v = jax.vmap(f, in_axes=(None, 0, 0, 0))(params, *stacked)
  numerics.assert_close(v[0], f(params, tokens, mask, ends), **DEPTH, what="vmapped 0")
  numerics.assert_close(v[1], f(params, tokens[::-1], mask[::-1], ends[::-1]), **DEPTH, what="vmapped 1")

  # Gradient of a log-likelihood through the scorer equals the finite difference.
  def nll(scale):
    p = jax.tree.map(lambda x: x, params)
    p["lm_head"]["kernel"] = p["lm_head"]["kernel"] * scale
    return -f(p, tokens, mask, ends)[:, :, 0].sum()
  g = jax.jit(jax.grad(nll))(1.0)
  eps = 1e-3
  fd = (jax.jit(nll)(1.0 + eps) - jax.jit(nll)(1.0 - eps)) / (2 * eps)
  assert np.isfinite(g) and abs(g - fd) <= 1e-2 * max(1.0, abs(fd))
  grads = jax.jit(jax.grad(lambda p: f(p, tokens, mask, ends)[:, :, 1].sum()))(params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
  assert np.abs(grads["layers_0"]["self_attn"]["q_proj"]["kernel"]).max() > 0


def test_chunked_normaliser_and_lora_head(setup, monkeypatch):
  """The node log-normaliser in small chunks (ragged last chunk) and a LoRA head (merged for
  scoring) give naive scoring's numbers."""
  params, tree, tokens, mask, ends = setup
  prompts = [tokens[b, :ends[b, t]] for b in range(3) for t in range(3)]
  monkeypatch.setattr(scorer, "LOGITS_PER_CHUNK", 7 * CONFIG.vocab_size)  # 7 rows per chunk
  cfg = CONFIG.replace(lora_rank=2, lora_targets="lm_head")
  p = jax.tree.map(lambda x: x, params)
  r = np.random.RandomState(1)
  p["lm_head"] = {"kernel": params["lm_head"]["kernel"],
                  "lora_a": r.randn(CONFIG.hidden_size, 2).astype(np.float32) * 0.1,
                  "lora_b": r.randn(2, CONFIG.vocab_size).astype(np.float32) * 0.1}
  fused = np.asarray(scorer.score(cfg, p, tree, tokens, mask, ends, chunk=1))
  naive = scorer.naive_score(cfg, p, CANDS, prompts).reshape(3, 3, len(CANDS))
  numerics.assert_close(fused, naive, **DEPTH, what="chunked normaliser, LoRA head")
  base = scorer.naive_score(CONFIG, params, CANDS, prompts).reshape(3, 3, len(CANDS))
  with pytest.raises(AssertionError, match="bound"):  # the adapters change the scores beyond the bound
    numerics.assert_close(base, fused, **DEPTH, what="head without its adapters")
