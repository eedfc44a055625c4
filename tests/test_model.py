"""Model behaviour that needs no reference implementation: caching, padding, dtype, remat, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labor_jax import model, sharding
from labor_jax.interop import hf
from labor_jax.config import llama_tiny
from tests import numerics
from tests.compiled import forward


@pytest.fixture(scope="module")
def tiny():
  config = llama_tiny(rope_theta=500000.0)
  return config, model.init_params(config, jax.random.key(1))


def test_forward_on_plain_int_array(tiny):
  config, params = tiny
  logits = forward(config, params, np.arange(10, dtype=np.int32)[None])
  assert logits.shape == (1, 10, config.vocab_size) and logits.dtype == jnp.float32


def test_cached_prefix_equals_full_sequence(tiny):
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, config.vocab_size)
  full = forward(config, params, tokens)
  _, kv = forward(config, params, tokens[:, :10], return_kv=True)
  rest = forward(config, params, tokens[:, 10:], prefix=kv)
  # Cached keys/values versus one pass: attention over 16 positions summed in another order.
  numerics.assert_close(rest, full[:, 10:], **numerics.forward_terms(config, tokens=16), what="cached prefix")


def test_masked_prefix_equals_shorter_history(tiny):
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(3), (1, 12), 0, config.vocab_size)
  _, kv = forward(config, params, tokens, return_kv=True)
  prefix_mask = (jnp.arange(12) < 7)[None].astype(jnp.int32)
  cont = jax.random.randint(jax.random.key(4), (1, 3), 0, config.vocab_size)
  cached = forward(config, params, cont, prefix=kv, prefix_mask_BS=prefix_mask)
  direct = forward(config, params, jnp.concatenate([tokens[:, :7], cont], axis=1))[:, 7:]
  # A masked cache of 12 versus 10 tokens run whole: softmax sums of other lengths and orders.
  numerics.assert_close(cached, direct, **numerics.forward_terms(config, tokens=15), what="masked prefix")


def test_padding_does_not_change_real_tokens(tiny):
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(5), (1, 9), 0, config.vocab_size)
  alone = forward(config, params, tokens)
  padded = jnp.concatenate([jnp.zeros((1, 4), tokens.dtype), tokens], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 4)), jnp.ones((1, 9))], axis=1).astype(jnp.int32)
  # Masked padding adds exact zeros to the softmax sums, but other shapes tile the sums in other orders.
  numerics.assert_close(forward(config, params, padded, mask_BT=mask)[:, 4:], alone,
                        **numerics.forward_terms(config, tokens=13), what="left padding")


def test_remat_changes_nothing_but_memory(tiny):
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, config.vocab_size)

  def loss(p, cfg):
    return jnp.mean(forward(cfg, p, tokens) ** 2)

  g0 = jax.grad(loss)(params, config)
  g1 = jax.grad(loss)(params, config.replace(remat=True))
  # Recomputed activations fuse differently: gradients (sums over the 16 tokens too) to the float32 bound,
  # relative to each leaf's magnitude (floor 0: the gradients are small).
  jax.tree.map(lambda a, b: numerics.assert_close(b, a, **numerics.forward_terms(config, tokens=16), floor=0.0,
                                                  what="remat gradient"), g0, g1)


def test_bf16_policy(tiny):
  config, params = tiny
  cfg16 = config.replace(param_dtype="bfloat16", dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = jax.random.randint(jax.random.key(7), (2, 8), 0, config.vocab_size)
  hidden_dtypes = jax.tree.leaves(jax.tree.map(lambda x: x.dtype, model.param_shapes(cfg16)))
  assert set(hidden_dtypes) == {jnp.dtype(jnp.bfloat16)}
  out16 = forward(cfg16, p16, tokens)
  out32 = forward(config, params, tokens)
  assert out16.dtype == jnp.float32
  # bfloat16 operands, float32 accumulation: each product's inputs and each output rounded to 8 bits, a
  # relative eps_bf16 per rounding that does not grow with the sum's length (terms=1), through every layer, at the
  # logits' magnitude (floor 0: a fresh model's logits are below 1).
  bf16 = dict(terms=1, layers=config.num_hidden_layers, eps=numerics.EPS_BF16, floor=0.0)
  numerics.assert_close(out16, out32, **bf16, what="bfloat16 forward")
  assert np.abs(out16 - out32).max() > 0  # really computed in bf16
  # broken: the last block's attention left out of the bfloat16 model
  p16["layers_1"] = {**p16["layers_1"], "self_attn": jax.tree.map(jnp.zeros_like, p16["layers_1"]["self_attn"])}
  with pytest.raises(AssertionError, match="bound"):
    numerics.assert_close(forward(cfg16, p16, tokens), out32, **bf16, what="bfloat16 forward, an attention short")


def test_every_param_has_logical_axes(tiny):
  config, _ = tiny
  shapes = model.param_shapes(config)
  axes = model.param_logical_axes(config)
  for (path, sds), spec in zip(jax.tree_util.tree_leaves_with_path(shapes),
                               jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    assert len(spec) == len(sds.shape) and all(spec), jax.tree_util.keystr(path)


def test_sharding_rules_reject_gaps_and_collisions():
  with pytest.raises(sharding.ShardingError, match="'nonsense' has no sharding rule"):
    sharding.logical_to_mesh(("embed", "nonsense"))
  rules = dict(sharding.DEFAULT_RULES)
  rules["mlp"] = "fsdp"
  with pytest.raises(sharding.ShardingError, match="both map to mesh axis 'fsdp'"):
    sharding.logical_to_mesh(("embed", "mlp"), tuple(rules.items()))


def test_load_places_tensors_into_mesh_shardings(tiny, tmp_path):
  config, params = tiny
  assert jax.device_count() == 8
  hf.save(config, params, tmp_path / "ck")
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  _, sharded = hf.load(tmp_path / "ck", mesh=mesh)
  assert sharding.unsharded_params(sharded) == []
  q = sharded["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (16, 32)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  # fsdp=4,tensor=2 contractions reduced across devices: another order of the same float32 sums.
  numerics.assert_close(forward(config, sharded, tokens), forward(config, params, tokens),
                        **numerics.forward_terms(config, tokens=8), what="sharded forward")


def test_mesh_must_divide_dimensions(tiny, tmp_path):
  config, params = tiny
  hf.save(config, params, tmp_path / "ck")
  mesh = sharding.make_mesh(tensor=8)  # 2 kv heads * 16 = 32 columns split 8 ways is fine, vocab 256 too
  hf.load(tmp_path / "ck", mesh=mesh)
  with pytest.raises(sharding.ShardingError, match="not divisible"):
    model.param_shardings(config.replace(intermediate_size=100), mesh)


def test_packed_segments_equal_separate_sequences(tiny):
  config, params = tiny
  a = jax.random.randint(jax.random.key(8), (1, 5), 0, config.vocab_size)
  b = jax.random.randint(jax.random.key(9), (1, 7), 0, config.vocab_size)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 4), a.dtype)], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4])
  pos = jnp.asarray([list(range(5)) + list(range(7)) + [0] * 4])
  out = forward(config, params, packed, segment_ids_BT=seg, positions_BT=pos)
  # Segment masks zero the other segment's terms; the packed shape sums in another order.
  numerics.assert_close(out[:, :5], forward(config, params, a), **numerics.forward_terms(config, tokens=16), what="a")
  numerics.assert_close(out[:, 5:12], forward(config, params, b), **numerics.forward_terms(config, tokens=16), what="b")


def test_bfloat16_checkpoint_round_trip(tiny, tmp_path):
  config, params = tiny
  cfg16 = config.replace(param_dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  hf.save(cfg16, p16, tmp_path / "bf16")
  from safetensors import safe_open
  with safe_open(str(tmp_path / "bf16" / hf.SAFETENSORS_SINGLE), framework="numpy") as f:
    assert f.get_tensor("model.norm.weight").dtype == jnp.bfloat16
  got_cfg, got = hf.load(tmp_path / "bf16", param_dtype="bfloat16")
  assert got_cfg == cfg16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p16, got)
  _, up = hf.load(tmp_path / "bf16")  # default policy: float32 parameters
  assert up["norm"]["weight"].dtype == jnp.float32


def test_scanned_layers_equal_unrolled_and_round_trip_hf(tiny, tmp_path):
  config, params = tiny
  scanned_cfg = config.replace(scan_layers=True, remat=True)
  stacked = model.stack_layers(params, config.num_hidden_layers)
  assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 128)
  tokens = jax.random.randint(jax.random.key(10), (2, 9), 0, config.vocab_size)
  # Scanned and unrolled blocks compile to other fusions of the same sums.
  depth = numerics.forward_terms(config, tokens=13)
  numerics.assert_close(forward(scanned_cfg, stacked, tokens), forward(config, params, tokens), **depth,
                        what="scanned forward")
  g = jax.grad(lambda p: forward(config, p, tokens).mean())(params)
  gs = jax.grad(lambda p: forward(scanned_cfg, p, tokens).mean())(stacked)
  jax.tree.map(lambda a, b: numerics.assert_close(b, a, **depth, floor=0.0, what="scanned gradient"),
               model.stack_layers(g, 2), gs)  # gradients: relative to each leaf's magnitude
  # HF export from the stacked layout, import into it on a mesh, and back to per-layer params.
  hf.save(scanned_cfg, stacked, tmp_path / "scan", max_shard_size="100KB")
  _, plain = hf.load(tmp_path / "scan")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, plain)
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  got_cfg, got = hf.load(tmp_path / "scan", mesh=mesh, scan_layers=True)
  assert got_cfg.scan_layers and got["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), stacked, got)
  # Cached prefixes work with both layouts of both: the scanned model continues an unrolled cache and its own.
  cont = jax.random.randint(jax.random.key(11), (2, 4), 0, config.vocab_size)
  full = forward(config, params, jnp.concatenate([tokens, cont], axis=1))[:, -4:]
  _, kv = forward(config, params, tokens, return_kv=True)
  _, kv_scanned = forward(scanned_cfg, stacked, tokens, return_kv=True)
  assert isinstance(kv_scanned, model.KV) and kv_scanned.k.shape[0] == config.num_hidden_layers
  for cfg, p, cache in [(scanned_cfg, stacked, kv), (scanned_cfg, stacked, kv_scanned), (config, params, kv_scanned)]:
    numerics.assert_close(forward(cfg, p, cont, prefix=cache), full, **depth, what="scanned cache")
