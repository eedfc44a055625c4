"""The hand-written gradients (fused head + loss, attention) against plain autodiff, and the
CPU allocator set-up."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from labor_jax import attention, labels, losses, model, sharding
from labor_jax.training import core as train_core
from labor_jax.config import llama_tiny
from tests import numerics
from tests.attention_inputs import attention_inputs, close


# ------------------------------------------------------------------ fused head + loss
def _head_inputs(b=3, t=12, d=16, v=50, seed=0):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(b, t, d), jnp.float32)
  w = jnp.asarray(r.randn(d, v) * 0.3, jnp.float32)
  y = jnp.asarray(r.randint(0, v, (b, t)), jnp.int32)
  m = jnp.asarray(r.rand(b, t) > 0.3, jnp.int32)
  return x, w, y, m


@pytest.mark.parametrize("chunk", [None, 1, 4, 5, 12, 100])
def test_linear_cross_entropy_matches_optax(chunk):
  x, w, y, m = _head_inputs()
  ref = jax.value_and_grad(lambda x, w: losses.reference_cross_entropy(x, w, y, m), argnums=(0, 1))(x, w)
  ours = jax.jit(jax.value_and_grad(lambda x, w: losses.linear_cross_entropy(x, w, y, m, chunk),
                                    argnums=(0, 1)))(x, w)
  close(ours, ref, terms=50)  # log-sum-exps over 50 classes; the head's gradient sums over 36 tokens
  # the value without differentiation (the eval path) is the same sum, over 36 tokens in other chunks
  numerics.assert_close(losses.linear_cross_entropy(x, w, y, m, chunk), ref[0], terms=50, what="eval path")


def test_linear_cross_entropy_frozen_head_and_cotangent():
  x, w, y, m = _head_inputs(seed=1)
  gx_ref, gw_ref = jax.grad(lambda x, w: 2.5 * losses.reference_cross_entropy(x, w, y, m), argnums=(0, 1))(x, w)
  gx, gw = jax.grad(lambda x, w: 2.5 * losses.linear_cross_entropy(x, w, y, m, 4, False), argnums=(0, 1))(x, w)
  close(gx, gx_ref, terms=50)  # each input's gradient sums over 50 classes
  assert not np.any(np.asarray(gw)), "weight_grad=False reports a zero head gradient"
  assert np.abs(np.asarray(gw_ref)).max() > 1e-3


def test_linear_cross_entropy_bfloat16_isclose():
  x, w, y, m = _head_inputs(seed=2)
  ref, gx_ref = jax.value_and_grad(lambda x: losses.reference_cross_entropy(x, w, y, m))(x)
  ours, gx = jax.value_and_grad(lambda x: losses.linear_cross_entropy(x.astype(jnp.bfloat16), w, y, m, 4,
                                                                      dtype=jnp.bfloat16))(x)
  assert gx.dtype == jnp.float32
  # bfloat16 inputs, float32 sums: each position's log-sum-exp is good to a few roundings of eps_bf16 times the
  # logits' magnitude; the loss sums the masked positions' (24 here), so their errors add up as a random walk.
  # (One position more or less moves the loss by about 3, the bound is 0.7.)
  positions = int(np.asarray(m).sum())
  numerics.assert_close(ours, ref, terms=positions, eps=numerics.EPS_BF16, scale=float(jnp.abs(x @ w).max()),
                        what="bfloat16 loss")
  # each input's gradient sums over the 50 classes' (softmax - one-hot) times bfloat16-rounded weights
  numerics.assert_close(gx, gx_ref, terms=w.shape[1], eps=numerics.EPS_BF16, what="bfloat16 input gradient")


@pytest.mark.parametrize("variant", ["untied", "tied", "lora_head"])
def test_loss_sums_equals_the_logits_path(variant):
  config = llama_tiny(vocab_size=96, tie_word_embeddings=variant == "tied")
  if variant == "lora_head":
    config = config.replace(lora_rank=4, lora_targets="lm_head")
  params = model.init_params(config, jax.random.key(0))
  if variant == "lora_head":
    params["lm_head"]["lora_b"] = jnp.full_like(params["lm_head"]["lora_b"], 0.01)
    assert model.head_weight(config, params) is None
  r = np.random.RandomState(0)
  tok = r.randint(0, config.vocab_size, (2, 17)).astype(np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": (r.rand(2, 16) > 0.2).astype(np.int32),
           "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))}

  def plain(p):
    logits = model.forward(config, p, batch["inputs"], segment_ids_BT=batch["segment_ids"],
                           positions_BT=batch["positions"])
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["loss_mask"])

  ref = jax.value_and_grad(plain)(params)
  ours = jax.value_and_grad(lambda p: train_core.loss_sums(config.replace(loss_chunk=4), p, batch)[0])(params)
  # One forward and backward pass over 32 tokens, chunked head versus logits: its float32 bound, relative to
  # each gradient's magnitude.
  close(ours, ref, **numerics.forward_terms(config, tokens=32), floor=0.0)


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("blocks", [1, 2, 4, 8])
def test_attention_matches_autodiff_reference(blocks):
  q, k, v, pass_mask, _ = attention_inputs()
  mask = pass_mask.dense_BTS
  do = jnp.asarray(np.random.RandomState(9).randn(*q.shape), jnp.float32)
  ref_out = attention.reference_attention(q, k, v, mask)
  ref = jax.grad(lambda *a: jnp.sum(attention.reference_attention(*a, mask) * do), argnums=(0, 1, 2))(q, k, v)
  out = jax.jit(lambda *a: attention.attention(*a, mask, blocks))(q, k, v)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(attention.attention(*a, mask, blocks) * do), argnums=(0, 1, 2)))(q, k, v)
  assert np.all(np.isfinite(np.asarray(out)))
  close(out, ref_out, terms=16)  # softmax sums over 16 keys
  close(grads, ref, terms=16 * 4)  # keys' gradients sum over 16 queries x 4 heads


def test_attention_with_prefix_keys_and_bad_blocks():
  q, k, v, pass_mask, _ = attention_inputs(prefix=5)
  mask = pass_mask.dense_BTS
  assert mask.shape == (2, 16, 21)
  close(attention.attention(q, k, v, mask), attention.reference_attention(q, k, v, mask), terms=21)  # 21 keys
  with pytest.raises(ValueError, match="causal_blocks=2"):
    attention.attention(q, k, v, mask, 2)  # a prefix makes S != T: block skipping would be wrong


def test_causal_block_count():
  assert attention.causal_block_count(224, 64) == 2
  assert attention.causal_block_count(256, 64) == 4
  assert attention.causal_block_count(2048, 64) == 8
  assert attention.causal_block_count(31, 8) == 1  # a prime length cannot be cut
  assert attention.causal_block_count(256, 0) == 1


def test_sharded_step_with_blocks_and_chunks_matches_one_device():
  """Block-skipping attention and a chunked head on a (fsdp=4, tensor=2) mesh give the
  losses and gradient norms of the plain settings on one device."""
  config = llama_tiny(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2)
  r = np.random.RandomState(0)
  tok = r.randint(0, 128, (8, 33)).astype(np.int32)
  seg = np.ones((8, 32), np.int32)
  seg[:, 28:] = 0
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": seg.copy(), "segment_ids": seg,
           "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy()}

  def run(cfg, mesh, loss_chunk):
    cfg = cfg.replace(loss_chunk=loss_chunk)
    label_tree = labels.label_tree(model.param_shapes(cfg), None)
    opt = train_core.make_optimizer(label_tree, lr=3e-3)
    sh = train_core.state_shardings(cfg, opt, mesh)
    state = train_core.create_state(cfg, opt, sh, jax.random.key(0))
    step = train_core.make_train_step(cfg, opt, sh, train_core.batch_sharding(mesh), labels=label_tree)
    out = []
    for _ in range(3):
      state, m = step(state, batch)
      out.append((float(m["loss"]), float(m["grad_norm"])))
    return np.asarray(out)

  one = run(config.replace(attention_query_block=0), sharding.make_mesh(devices=jax.devices()[:1]), None)
  blocked = config.replace(attention_query_block=8)  # 4 query blocks of 8
  assert attention.causal_block_count(32, blocked.attention_query_block) == 4
  many = run(blocked, sharding.make_mesh(fsdp=4, tensor=2), 8)
  # Three steps on fsdp=4,tensor=2 with blocks and chunks: each step's forward and backward pass over 8 x 32 tokens
  # sums in other orders, and its error passes through the layers again at each later step (layers x 3). The
  # gradient norm (before clipping) is compared too: AdamW's steps hardly notice a wrongly scaled gradient.
  depth = numerics.forward_terms(config, tokens=8 * 32)
  for i, what in enumerate(("losses", "gradient norms")):
    numerics.assert_close(many[:, i], one[:, i], terms=depth["terms"], layers=3 * depth["layers"], what=what)
  assert one[-1, 0] < one[0, 0]


# ------------------------------------------------------------------ allocator
@pytest.mark.parametrize("setting, expected", [("1", "True"), ("0", "False")])
def test_tune_malloc(setting, expected):
  if not sys.platform.startswith("linux"):
    pytest.skip("glibc only")
  env = {**os.environ, "LABOR_JAX_MALLOC_TUNING": setting}
  code = "from labor_jax import runtime; print(runtime.tune_malloc(), runtime.tune_malloc())"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
  assert out.split() == [expected, expected]


def test_bfloat16_state_keeps_its_dtypes_across_steps():
  """The step's output state has the input state's dtypes, so it never recompiles (a bf16
  model once came out of step 1 with a float32 AdamW first moment)."""
  config = llama_tiny(param_dtype="bfloat16", dtype="bfloat16")
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  label_tree = labels.label_tree(model.param_shapes(config), None)
  opt = train_core.make_optimizer(label_tree, lr=1e-3, weight_decay=0.01)
  sh = train_core.state_shardings(config, opt, mesh)
  state = train_core.create_state(config, opt, sh, jax.random.key(0))
  step = train_core.make_train_step(config, opt, sh, train_core.batch_sharding(mesh), labels=label_tree)
  tok = np.random.RandomState(0).randint(0, config.vocab_size, (2, 17)).astype(np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((2, 16), np.int32),
           "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))}
  before = [x.dtype for x in jax.tree.leaves(state)]
  state, _ = step(state, batch)
  assert [x.dtype for x in jax.tree.leaves(state)] == before
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
