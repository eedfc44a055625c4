"""Sharded training steps on 8 fake CPU devices match one device; freezing keeps no state."""

import jax
import numpy as np
import pytest

from labor_jax import labels, runtime, sharding
from labor_jax.training import core as train_core
from labor_jax.config import llama_tiny
from tests import numerics

CONFIG = llama_tiny(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2)
# Losses and gradient norms of 3 steps taken on other meshes, batch splits or layouts: each step's forward and
# backward pass over 8 x 32 tokens sums in other orders, and the error passes through the layers again at each
# later step.
_DEPTH = numerics.forward_terms(CONFIG, tokens=8 * 32)
LOSSES = dict(terms=_DEPTH["terms"], layers=3 * _DEPTH["layers"])


def _batch(step):
  """8 rows of 28 real tokens, of which rows 0..7 have 20..27 in the loss: micro-batches of unequal token counts,
  so the loss and gradient are a mean over tokens only if each micro-batch is weighted by its tokens."""
  rng = np.random.RandomState(step)
  tokens = rng.randint(0, CONFIG.vocab_size, size=(8, 33)).astype(np.int32)
  seg = np.ones((8, 32), np.int32)
  seg[:, 28:] = 0
  loss_mask = seg.copy()
  for row in range(8):
    loss_mask[row, 20 + row:] = 0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask, "segment_ids": seg,
          "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy()}


def _assert_same_steps(got, want, what):
  """The losses and the gradient norms (before clipping) of two runs within :data:`LOSSES`: AdamW with clipping
  hardly notices a gradient scaled by a constant (a wrong divisor, micro-batch sums), its norm does."""
  for key in ("loss", "grad_norm"):
    numerics.assert_close(got[key], want[key], **LOSSES, what=f"{what}: {key}")


def _train(mesh, pattern=None, steps=3, grad_accum=1, config=CONFIG):
  label_tree = labels.label_tree(jax.eval_shape(lambda: train_core.model.init_params(config, jax.random.key(0))),
                                 pattern)
  opt = train_core.make_optimizer(label_tree, lr=3e-3, weight_decay=0.01)
  sh = train_core.state_shardings(config, opt, mesh)
  params = None
  if config.scan_layers:  # the same initial weights as the unrolled reference
    params = train_core.model.stack_layers(
        train_core.model.init_params(CONFIG, jax.random.split(jax.random.key(0))[0]), config.num_hidden_layers)
  state = train_core.create_state(config, opt, sh, jax.random.key(0), params=params)
  step = train_core.make_train_step(config, opt, sh, train_core.batch_sharding(mesh), labels=label_tree,
                                    grad_accum=grad_accum)
  out = {"loss": [], "grad_norm": []}
  for _ in range(steps):
    state, m = step(state, _batch(0))  # one fixed batch: the loss must fall
    for key in out:
      out[key].append(float(m[key]))
  return state, out


@pytest.fixture(scope="module")
def reference():
  return _train(sharding.make_mesh(devices=jax.devices()[:1]))


@pytest.mark.devices(8)
@pytest.mark.parametrize("shape", [dict(data=8), dict(fsdp=8), dict(fsdp=4, tensor=2)])
def test_sharded_losses_match_one_device(reference, shape):
  _, want = reference
  state, got = _train(sharding.make_mesh(**shape))
  _assert_same_steps(got, want, str(shape))
  assert want["loss"][2] < want["loss"][0]  # it learns
  if shape != dict(data=8):  # parameters really are split across devices
    assert sharding.unsharded_params(state.params, min_size=2 ** 12) == []
    emb = state.params["embed_tokens"]["embedding"]
    assert emb.addressable_shards[0].data.size * 8 == emb.size


def test_frozen_parameters_keep_no_optimizer_state_and_do_not_move(reference):
  start, _ = _train(sharding.make_mesh(devices=jax.devices()[:1]), pattern=r"layers_\d+/self_attn/", steps=0)
  state, _ = _train(sharding.make_mesh(devices=jax.devices()[:1]), pattern=r"layers_\d+/self_attn/")
  full, _ = reference
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
  assert nbytes(state.opt_state) < 0.5 * nbytes(full.opt_state)
  np.testing.assert_array_equal(state.params["layers_0"]["mlp"]["up_proj"]["kernel"],
                                start.params["layers_0"]["mlp"]["up_proj"]["kernel"])
  assert not np.array_equal(state.params["layers_0"]["self_attn"]["q_proj"]["kernel"],
                            start.params["layers_0"]["self_attn"]["q_proj"]["kernel"])
  label_tree = labels.label_tree(state.params, r"layers_\d+/self_attn/")
  frac = labels.trainable_fraction(state.params, label_tree)
  attn = sum(x.size for k, l in state.params.items() if k.startswith("layers_")
             for x in jax.tree.leaves(l["self_attn"]))
  assert frac == pytest.approx(attn / sum(x.size for x in jax.tree.leaves(state.params)))


@pytest.mark.devices(8)
def test_optimizer_moments_follow_parameter_shardings():
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  label_tree = labels.label_tree(train_core.model.param_shapes(CONFIG), None)
  sh = train_core.state_shardings(CONFIG, train_core.make_optimizer(label_tree, lr=1e-3), mesh)
  specs = {s.spec for s in jax.tree.leaves(sh.opt_state)}
  assert jax.sharding.PartitionSpec("fsdp", "tensor") in specs  # q_proj's moments
  n_params = len(jax.tree.leaves(sh.params))
  assert sum(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(sh.opt_state)) >= 2 * (n_params - 5)


@pytest.mark.devices(8)
def test_gradient_accumulation_matches_one_big_batch(reference):
  _, want = reference
  _, got = _train(sharding.make_mesh(fsdp=8), grad_accum=1)
  _, acc = _train(sharding.make_mesh(devices=jax.devices()[:1]), grad_accum=4)
  _assert_same_steps(acc, want, "4 micro-batches")
  _assert_same_steps(got, want, "fsdp=8, one micro-batch")


def test_a_mean_of_micro_batch_means_fails_the_comparison(reference, monkeypatch):
  """The broken accumulation this comparison is there to catch: each micro-batch weighted as one token (the mean
  of their means) is off by more than the bound on _batch's unequal micro-batches (0.003 against 0.0002)."""
  _, want = reference
  loss_sums = train_core.loss_sums
  monkeypatch.setattr(train_core, "loss_sums", lambda *a, **k: (lambda s, n: (s / n, 1.0))(*loss_sums(*a, **k)))
  _, broken = _train(sharding.make_mesh(devices=jax.devices()[:1]), grad_accum=4)
  with pytest.raises(AssertionError, match="bound"):
    _assert_same_steps(broken, want, "mean of micro-batch means")


def test_schedule_warmup_then_decay():
  s = train_core.make_schedule(1.0, 100, 10, "cosine", 0.1)
  assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0) and float(s(100)) == pytest.approx(0.1)
  assert float(train_core.make_schedule(1.0, 100, 0, "linear", 0.0)(50)) == pytest.approx(0.5)


@pytest.mark.devices(8)
def test_scanned_layers_train_like_unrolled(reference):
  _, want = reference
  state, got = _train(sharding.make_mesh(fsdp=4, tensor=2), config=CONFIG.replace(scan_layers=True, remat=True))
  _assert_same_steps(got, want, "scanned")
  assert sharding.unsharded_params(state.params, min_size=2 ** 12) == []


def _dots(hlo: str) -> list[tuple[str, str, tuple[int, ...], str]]:
  """(element type of each operand, result shape, op_name) of every dot in an HLO module's text (optimized,
  whose names start with %, or as lowered, whose names do not)."""
  import re
  types = dict(re.findall(r"%?(\S+) = (\w+)\[", hlo))
  dots = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(%?(\S+), %?(\S+)\)[^\n]*", hlo):
    op = re.search(r'op_name="([^"]*)"', m.group(0))
    shape = tuple(int(d) for d in m.group(1).split(",") if d)
    dots.append((types[m.group(2).rstrip(",")], types[m.group(3)], shape, op.group(1) if op else ""))
  return dots


def _cpu_runs_bf16() -> bool:
  """Whether this CPU has bfloat16 dot instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), from Linux's
  /proc/cpuinfo (False elsewhere)."""
  return bool(runtime.cpu_flags() & {*runtime.BF16_CPU_FLAGS, "bf16"})


def test_bf16_lora_step_runs_every_matmul_on_bf16_operands_where_the_cpu_has_bf16():
  """With bfloat16 compute and float32 parameters, the products of the LoRA step (projections, adapters,
  attention, the fused head and loss; forward and input gradients) read bfloat16 operands: on every CPU in
  the program JAX lowers, and where the CPU has bfloat16 instructions (AVX512-BF16, AMX) in the program
  XLA:CPU compiles. Before labor_jax.model._dot and the fused loss's single dot_generals, XLA:CPU upcast every
  projection, its gradient and the head's gradient to float32 matmuls (docs/benchmarks.md has what that
  cost). The one exception is XLA's: it runs the adapters' weight gradients ([I, R] and [R, O], R the rank)
  in float32. A CPU without bfloat16 instructions may upcast more: there only the lowered program is checked."""
  from labor_jax import lora
  config = CONFIG.replace(dtype="bfloat16")
  params = train_core.model.init_params(config, jax.random.key(0))
  rank = 16
  config, params = lora.add_adapters(config, params, jax.random.key(1), rank=rank,
                                     targets=r"(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)")
  label_tree = labels.run_labels(params, lora=True)
  opt = train_core.make_optimizer(label_tree, lr=1e-3)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  sh = train_core.state_shardings(config, opt, mesh)
  state = train_core.create_state(config, opt, sh, jax.random.key(2), params=params)
  step = train_core.make_train_step(config, opt, sh, train_core.batch_sharding(mesh), labels=label_tree)
  lowered = step.lower(state, _batch(0))
  asked = _dots(lowered.as_text(dialect="hlo"))
  assert len(asked) > 4 * 7 * CONFIG.num_hidden_layers and all(d[:2] == ("bf16", "bf16") for d in asked), \
      [d for d in asked if d[:2] != ("bf16", "bf16")][:5]
  dots = _dots(lowered.compile().as_text())
  if not _cpu_runs_bf16():
    return  # XLA:CPU's choice of kernels on this CPU; the lowered program above is what labor_jax controls
  tokens = _batch(0)["inputs"].size
  adapter_grads = [d for d in dots if len(d[2]) == 2 and rank in d[2] and tokens not in d[2]]
  assert len(adapter_grads) == 2 * 7 * CONFIG.num_hidden_layers
  upcast = [d for d in dots if d[:2] != ("bf16", "bf16") and d not in adapter_grads]
  assert len(dots) > 4 * 7 * CONFIG.num_hidden_layers and not upcast, upcast[:5]
