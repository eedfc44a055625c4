"""LoRA adapters: start as a no-op, train alone through the optax label tree, merge for export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labor_jax import labels, lora, model, sharding
from labor_jax.interop import hf
from labor_jax.training import core as train_core
from labor_jax.config import llama_tiny
from tests import numerics
from tests.compiled import forward

CONFIG = llama_tiny(vocab_size=128)


@pytest.fixture(scope="module")
def base():
  return model.init_params(CONFIG, jax.random.key(0))


def test_fresh_adapters_leave_the_model_unchanged(base):
  cfg, params = lora.add_adapters(CONFIG, base, jax.random.key(1), rank=4)
  q = params["layers_0"]["self_attn"]["q_proj"]
  assert q["lora_a"].shape == (64, 4) and q["lora_b"].shape == (4, 64) and not q["lora_b"].any()
  assert "lora_a" not in params["layers_0"]["mlp"]["up_proj"]  # default targets: attention only
  tokens = jnp.arange(12, dtype=jnp.int32)[None]
  np.testing.assert_array_equal(forward(cfg, params, tokens), forward(CONFIG, base, tokens))


def test_lora_trains_only_adapters_and_merges_exactly(base, tmp_path):
  cfg, params = lora.add_adapters(CONFIG, base, jax.random.key(1), rank=4, alpha=8.0,
                                  targets=r"(self_attn/(q|v)_proj|mlp/down_proj)")
  label_tree = labels.label_tree(params, labels.ADAPTERS)
  frac = labels.trainable_fraction(params, label_tree)
  assert 0 < frac < 0.1
  opt = train_core.make_optimizer(label_tree, lr=1e-2)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  sh = train_core.state_shardings(cfg, opt, mesh)
  state = train_core.create_state(cfg, opt, sh, jax.random.key(2), params=params)
  full_opt = train_core.make_optimizer(labels.label_tree(params, None), lr=1e-2)
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  full_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(full_opt.init, params)))
  assert opt_bytes < 0.1 * full_bytes
  step = train_core.make_train_step(cfg, opt, sh, train_core.batch_sharding(mesh), labels=label_tree)
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 128, size=(4, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((4, 16), np.int32),
           "segment_ids": np.ones((4, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}
  for _ in range(3):
    state, m = step(state, batch)
  trained = state.params
  np.testing.assert_array_equal(trained["layers_1"]["self_attn"]["q_proj"]["kernel"],
                                params["layers_1"]["self_attn"]["q_proj"]["kernel"])
  assert np.abs(trained["layers_1"]["self_attn"]["q_proj"]["lora_b"]).max() > 0
  merged_cfg, merged = lora.merge(cfg, trained)
  assert merged_cfg.lora_rank == 0 and merged_cfg == CONFIG
  x = jnp.asarray(tokens[:, :-1])
  # w + scale * a @ b rounded once per weight, then the same forward pass: one forward pass's float32 bound.
  depth = numerics.forward_terms(CONFIG, tokens=x.shape[1])
  numerics.assert_close(forward(merged_cfg, merged, x), forward(cfg, trained, x), **depth, what="merged")
  with pytest.raises(hf.CheckpointError, match="lora.merge"):
    hf.save(cfg, trained, tmp_path / "unmerged")
  out = hf.save(merged_cfg, merged, tmp_path / "merged")
  numerics.assert_close(forward(*hf.load(out), x), forward(cfg, trained, x), **depth, what="merged, exported")
  with pytest.raises(AssertionError, match="bound"):  # the base weights without the trained adapters fail it
    numerics.assert_close(forward(CONFIG, params, x), forward(cfg, trained, x), **depth, what="adapters dropped")
  adapter_tree, frozen_tree = labels.split(trained, label_tree)
  adapters = jax.tree_util.tree_leaves_with_path(adapter_tree)
  assert len(adapters) == 2 * 3 * 2  # 2 layers x (q, v, down) x (a, b)
  assert all(str(p[-1].key) in ("lora_a", "lora_b") for p, _ in adapters)
  assert not any(labels.is_adapter(labels.path_str(p)) for p, _ in jax.tree_util.tree_leaves_with_path(frozen_tree))
  rebuilt = labels.merge(adapter_tree, frozen_tree)
  assert jax.tree.structure(rebuilt) == jax.tree.structure(trained)


def test_dropout_only_with_an_rng(base):
  cfg, params = lora.add_adapters(CONFIG, base, jax.random.key(1), rank=4, dropout=0.5)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if str(p[-1].key) == "lora_b" else x, params)  # make the branch non-zero
  tokens = jnp.arange(12, dtype=jnp.int32)[None]
  a = forward(cfg, params, tokens)
  np.testing.assert_array_equal(a, forward(cfg, params, tokens))
  assert not np.allclose(a, forward(cfg, params, tokens, dropout_rng=jax.random.key(3)))


def test_adapters_are_born_sharded_without_a_full_size_array(monkeypatch):
  """On an (fsdp=8) mesh, adding adapters allocates only the adapter leaves, in their shardings: the base
  weights pass through as the same arrays, no model is initialised, and every array created by the call
  has an adapter's shape."""
  from labor_jax.config import llama_tiny
  config = llama_tiny(vocab_size=256, hidden_size=64, intermediate_size=128)
  mesh = sharding.make_mesh(fsdp=8)
  base = jax.jit(lambda r: model.init_params(config, r), out_shardings=model.param_shardings(config, mesh))(
      jax.random.key(0))
  base_shapes = {x.shape for x in jax.tree.leaves(base)}
  alive = jax.live_arrays()  # held, so no array freed here can lend its id to a new one
  before = {id(x) for x in alive}

  def no_init(*args, **kwargs):
    raise AssertionError("add_adapters initialised a whole model")
  monkeypatch.setattr(model, "init_params", no_init)
  cfg, params = lora.add_adapters(config, base, jax.random.key(1), rank=4, mesh=mesh,
                                  targets=r"(self_attn/(q|v)_proj|mlp/down_proj)")
  created = [x for x in jax.live_arrays() if id(x) not in before]
  adapters, frozen = labels.split(params, labels.label_tree(params, labels.ADAPTERS))
  adapter_leaves = jax.tree.leaves(adapters)
  assert len(adapter_leaves) == 2 * 3 * 2 and {id(x) for x in created} == {id(x) for x in adapter_leaves}
  assert not any(x.shape in base_shapes for x in created)
  for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
    assert x is y
  q = params["layers_0"]["self_attn"]["q_proj"]["lora_a"]
  assert q.sharding.spec[0] == "fsdp" and len(q.sharding.device_set) == 8


def test_merged_weight_product_equals_the_adapter_branch_with_its_gradients():
  """float32 without dropout runs an adapted layer as one product with w + scale * a @ b
  (model._lora_dot, a hand-written backward pass); its value and all four gradients equal autodiff
  of the two-branch form x @ w + scale * (x @ a) @ b."""
  rng = np.random.RandomState(0)
  x, w = rng.randn(48, 24).astype(np.float32), rng.randn(24, 40).astype(np.float32) * 0.1
  a, b = rng.randn(24, 4).astype(np.float32) * 0.2, rng.randn(4, 40).astype(np.float32) * 0.2
  ct = rng.randn(48, 40).astype(np.float32)

  def branches(x, w, a, b):
    return x @ w + 2.0 * (x @ a) @ b

  want, want_vjp = jax.vjp(branches, x, w, a, b)
  got, got_vjp = jax.vjp(lambda *p: model._lora_dot(*p, 2.0), x, w, a, b)
  # One product over 24 inputs with a weight rounded once versus two: the float32 bound of sums of 24 terms.
  numerics.assert_close(got, want, terms=24, what="value")
  # Gradients contract over the 48 rows or 40 outputs: that bound, relative to each gradient's magnitude.
  for name, g, wg in zip("xwab", got_vjp(ct), want_vjp(ct)):
    numerics.assert_close(g, wg, terms=48, floor=0.0, what=f"d/d{name}")


def test_dropout_keeps_the_adapter_branch():
  """With dropout in training the adapters see dropped-out inputs, which a merged weight cannot express:
  two dropout keys give two outputs, and without a key the output is the merged product's."""
  config = llama_tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2)
  params = model.init_params(config, jax.random.key(0))
  config, params = lora.add_adapters(config, params, jax.random.key(1), rank=4, dropout=0.5)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if labels.path_str(p).endswith("lora_b") else v, params)  # adapters that do something
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  plain = model.forward(config, params, tokens)
  one = model.forward(config, params, tokens, dropout_rng=jax.random.key(2))
  two = model.forward(config, params, tokens, dropout_rng=jax.random.key(3))
  assert not np.allclose(one, two) and not np.allclose(one, plain)
  merged = model.forward(config.replace(lora_dropout=0.0), params, tokens, dropout_rng=jax.random.key(2))
  # Both run the merged product (no dropout key and rate 0 alike): one forward pass's float32 bound.
  numerics.assert_close(merged, plain, **numerics.forward_terms(config, tokens=8), what="rate 0 versus no key")


def test_top_layers_adapts_the_last_blocks_and_leaves_no_backward_pass_below():
  """lora.top_layers: adapters in the last N blocks only (every block of a smaller model); the gradient with
  respect to them has no products below those blocks (fewer dot products in its program than with adapters
  everywhere); scanned layers, which share one set of adapters, are refused."""
  from labor_jax.config import ConfigError
  from labor_jax.training import config as train_config
  config = llama_tiny(vocab_size=128, num_hidden_layers=4)
  params = model.init_params(config, jax.random.key(0))
  targets = r"(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"

  def adapted_blocks(top):
    rx = train_config.lora_targets(train_config.LoraConfig(enabled=True, targets=targets, top_layers=top), config)
    cfg, p = lora.add_adapters(config, params, jax.random.key(1), rank=4, targets=rx)
    blocks = sorted(k for k, v in p.items() if k.startswith("layers_") and any(
        labels.is_adapter(labels.path_str(path)) for path, _ in jax.tree_util.tree_flatten_with_path(v)[0]))
    return cfg, p, blocks

  cfg_top, p_top, blocks = adapted_blocks(1)
  assert blocks == ["layers_3"]
  assert adapted_blocks(2)[2] == ["layers_2", "layers_3"] and adapted_blocks(9)[2] == [f"layers_{i}" for i in range(4)]
  cfg_all, p_all, _ = adapted_blocks(None)
  tokens = jnp.arange(12, dtype=jnp.int32)[None] % 128

  def grad_dots(cfg, p):
    tree = labels.label_tree(p, labels.ADAPTERS)
    train, frozen = labels.split(p, tree)
    loss = lambda t: model.forward(cfg, labels.merge(t, frozen), tokens).astype(jnp.float32).sum()  # noqa: E731
    return str(jax.make_jaxpr(jax.grad(loss))(train)).count("dot_general")

  # the forward pass's products are the same in both; the backward pass of 3 more blocks adds products
  assert grad_dots(cfg_top, p_top) < grad_dots(cfg_all, p_all)
  with pytest.raises(ConfigError, match="scan_layers"):
    train_config.lora_targets(train_config.LoraConfig(enabled=True, top_layers=1), config.replace(scan_layers=True))
  with pytest.raises(ConfigError, match="positive"):
    train_config.lora_targets(train_config.LoraConfig(enabled=True, top_layers=0), config)
