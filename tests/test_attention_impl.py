"""Attention per backend: the dispatch (model.attention_impl), its logged fallbacks, and the
implementations against the blocked kernel (values and gradients, GQA, padded and packed rows)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from labor_jax import attention, model, scorer, sharding
from labor_jax.config import ConfigError, llama_tiny
from tests import numerics
from tests.attention_inputs import attention_inputs, close


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
  monkeypatch.setattr(attention, "_LOGGED", set())


# ------------------------------------------------------------------ dispatch
def test_auto_picks_blocked_on_cpu_and_the_kernel_of_each_accelerator():
  assert jax.default_backend() == "cpu"
  assert attention.resolve("auto", backend="cpu") == ("blocked", None)
  h100 = dict(backend="gpu", device_kind="NVIDIA H100 80GB HBM3", head_dim=128, q_len=2048, kv_len=2048)
  assert attention.resolve("auto", dtype=jnp.bfloat16, **h100) == ("cudnn", None)
  assert attention.resolve("auto", backend="tpu", device_kind="TPU v5 lite", q_len=2048) == ("splash", None)
  assert attention.resolve("auto", backend="gpu", device_kind="AMD Instinct MI300X") == ("blocked", None)
  for impl in ("xla", "blocked"):  # run anywhere
    assert attention.resolve(impl, backend="tpu", causal=False) == (impl, None)
  with pytest.raises(ValueError, match="flash"):
    attention.resolve("flash", backend="cpu")
  with pytest.raises(ConfigError, match="attention_impl"):
    llama_tiny(attention_impl="flash")


@pytest.mark.parametrize("requested, features, reason", [
    ("cudnn", dict(backend="cpu"), "cudnn needs an NVIDIA GPU; this is cpu"),
    ("auto", dict(backend="gpu", device_kind="NVIDIA H100 80GB HBM3", dtype=jnp.float32),
     "cudnn runs bfloat16/float16 only; the model computes in float32"),
    ("cudnn", dict(backend="gpu", device_kind="NVIDIA A100-SXM4-80GB", dtype=jnp.bfloat16, head_dim=100),
     "multiple of 8"),
    ("cudnn", dict(backend="gpu", device_kind="NVIDIA A100-SXM4-80GB", dtype=jnp.bfloat16, q_len=7, kv_len=7),
     "even lengths"),
    ("splash", dict(backend="cpu"), "splash needs a TPU; this is cpu"),
    ("splash", dict(backend="tpu", q_len=256, causal=False), "attends to a cached prefix"),
    ("splash", dict(backend="tpu", q_len=200), "multiple of 128"),
    ("splash", dict(backend="tpu", q_len=256, kv_heads=2, head_shards=4), "do not split over 4"),
])
def test_unsupported_features_fall_back_to_blocked_with_a_reason(requested, features, reason):
  impl, why = attention.resolve(requested, **features)
  assert impl == "blocked" and reason in why


def test_a_fallback_is_logged_once_per_reason(caplog):
  with caplog.at_level(logging.WARNING, logger="labor_jax.attention"):
    for _ in range(3):
      assert attention.choose("splash", backend="cpu") == "blocked"
    attention.choose("cudnn", backend="cpu")
  lines = [r.getMessage() for r in caplog.records]
  assert lines == ["attention_impl=splash: splash needs a TPU; this is cpu; using blocked",
                   "attention_impl=cudnn: cudnn needs an NVIDIA GPU; this is cpu; using blocked"]


def test_model_with_an_unavailable_kernel_runs_blocked_and_says_why(caplog):
  config = llama_tiny()
  params = model.init_params(config, jax.random.key(0))
  tok = np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)).astype(np.int32)
  ref = jax.jit(lambda p: model.forward(config, p, tok))(params)
  cudnn = config.replace(attention_impl="cudnn")
  with caplog.at_level(logging.WARNING, logger="labor_jax.attention"):
    out = jax.jit(lambda p: model.forward(cudnn, p, tok))(params)
    jax.jit(lambda p: model.forward(cudnn, p, tok[:, :8]))(params)
  np.testing.assert_array_equal(out, ref)
  assert [r.getMessage() for r in caplog.records] == [
      "attention_impl=cudnn: cudnn needs an NVIDIA GPU; this is cpu; using blocked"]


# ------------------------------------------------------------------ implementations vs blocked
def _value_and_grads(fn, q, k, v, do):
  out = jax.jit(fn)(q, k, v)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * do), argnums=(0, 1, 2)))(q, k, v)
  return out, grads


@pytest.mark.parametrize("prefix", [0, 5])
def test_xla_equals_blocked_values_and_gradients(prefix):
  q, k, v, mask, do = attention_inputs(prefix=prefix)
  blocks = 1 if prefix else 4
  ref = _value_and_grads(lambda *a: attention.attention(*a, mask.dense_BTS, blocks), q, k, v, do)
  out = _value_and_grads(lambda *a: attention.attend(*a, mask, "xla"), q, k, v, do)
  assert not prefix or not mask.causal
  close(out, ref, terms=16 * 4)  # keys' gradients sum over 16 queries x 4 heads; values over <= 21 keys
  assert not np.any(np.asarray(out[0])[1, -3:]) or prefix  # padding queries (no visible key) output zeros
  assert np.abs(np.asarray(out[1][0])).max() > 1e-2


def _splash_inputs():
  q, k, v, _, do = attention_inputs(b=2, t=128, h=4, k=2, e=16, seed=1)
  seg = np.ones((2, 128), np.int32)
  seg[0, 50:] = 2
  seg[0, 90:] = 3
  seg[1, 100:] = 0
  mask = model._pass_mask(jnp.asarray(seg > 0), None, jnp.asarray(seg))
  return q, k, v, mask, do


def test_splash_kernel_equals_blocked_in_the_pallas_interpreter():
  """The TPU kernel's code path, run by the Pallas interpreter on the CPU."""
  q, k, v, mask, do = _splash_inputs()
  ref = _value_and_grads(lambda *a: attention.attention(*a, mask.dense_BTS, 2), q, k, v, do)
  out = _value_and_grads(lambda *a: attention.splash_attention(*a, mask.segments_BT, interpret=True), q, k, v, do)
  close(out, ref, terms=128 * 4)  # keys' gradients sum over 128 queries x 4 heads


@pytest.mark.devices(4)
def test_splash_kernel_sharded_over_batch_and_heads():
  q, k, v, mask, do = _splash_inputs()
  mesh = sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
  spec = PartitionSpec("data", None, "tensor", None)
  ref = attention.attention(q, k, v, mask.dense_BTS)
  q, k, v = (jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v))
  seg = jax.device_put(mask.segments_BT, jax.sharding.NamedSharding(mesh, PartitionSpec("data")))

  def fn(q, k, v, seg):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as inside model.forward(mesh=...)
      return attention.splash_attention(q, k, v, seg, spec_BTHE=spec, mesh=mesh.abstract_mesh, interpret=True)
  out = jax.jit(fn)(q, k, v, seg)
  assert out.sharding.spec == spec
  close(out, ref, terms=128)  # softmax sums over up to 128 keys


def test_tiny_model_with_xla_attention_equals_blocked():
  config = llama_tiny(attention_query_block=4)
  params = model.init_params(config, jax.random.key(1))
  r = np.random.RandomState(1)
  tok = r.randint(0, config.vocab_size, (2, 16)).astype(np.int32)
  seg = np.ones((2, 16), np.int32)
  seg[0, 7:] = 2
  seg[1, 12:] = 0
  pos = np.where(seg[0] == 1, np.arange(16), np.arange(16) - 7)[None].repeat(2, 0)

  def loss(cfg, p):  # mean next-token log-likelihood of the real tokens
    logp = jax.nn.log_softmax(model.forward(cfg, p, tok, segment_ids_BT=seg, positions_BT=pos))
    return jnp.sum(jnp.take_along_axis(logp[:, :-1], tok[:, 1:, None], -1)[..., 0] * (seg[:, 1:] > 0)) / 29
  ref = jax.jit(jax.value_and_grad(lambda p: loss(config, p)))(params)
  out = jax.jit(jax.value_and_grad(lambda p: loss(config.replace(attention_impl="xla"), p)))(params)
  # One forward and backward pass over 32 tokens: its float32 bound, relative to each gradient's magnitude.
  close(out, ref, **numerics.forward_terms(config, tokens=32), floor=0.0)


def test_scorer_tree_attention_unaffected():
  config = llama_tiny(rope_theta=500000.0)
  params = model.init_params(config, jax.random.key(0))
  cands = [[5, 7, 2], [5, 8, 2], [9, 2], [12, 13, 14, 2]]
  r = np.random.RandomState(0)
  tokens = r.randint(3, config.vocab_size, (2, 20)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 13:] = 0
  ends = np.array([[4, 12], [3, 13]], np.int32)
  tree = scorer.CandidateTree.build(cands)
  runs = {impl: np.asarray(jax.jit(lambda p, c=config.replace(attention_impl=impl): scorer.score(
      c, p, tree, tokens, mask, ends))(params)) for impl in ("blocked", "xla")}
  prompts = [tokens[b, :ends[b, t]] for b in range(2) for t in range(2)]
  naive = scorer.naive_score(config, params, cands, prompts).reshape(2, 2, len(cands))
  for impl, got in runs.items():  # one forward pass in other orders: its float32 bound
    numerics.assert_close(got, naive, **numerics.forward_terms(config, tokens=20 + 4), what=impl)
