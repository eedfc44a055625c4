"""Model FLOPs per trained token, chip peak FLOP/s, and MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B): a training token costs

    6 * N  +  12 * L * T * H * E

FLOPs, where N is the number of matmul weights a token passes through (the q/k/v/o and
SwiGLU projections of every layer plus the LM head; the embedding lookup is not a matmul),
L layers, T the sequence length, H query heads, E the head dim. A multiply-add is 2 FLOPs;
the forward pass is 2N + 4LTHE (scores q.k and the weighted sum p.v), the backward pass
twice that. Causal attention is counted whole, not halved, although causal kernels
(blocked with query blocks, cuDNN, splash) skip the masked half; norms, softmax, RoPE and
the optimizer are not counted; rematerialisation is not counted either, so MFU does not
rise when a run recomputes activations.

With frozen base weights (LoRA), the backward pass has no weight gradient for them:
``frozen_base=True`` counts 4 FLOPs per frozen weight (forward and input gradient) and 6 per
adapter weight, in the blocks from the lowest one with adapters up (in that block, what only feeds
work below it needs no gradient: q/k/v count 2; with no adapter in its attention, the whole attention
sublayer and gate/up run forward only); the blocks below it have no
backward pass at all (2 FLOPs per weight and 4LTHE for attention: the forward pass), and blocks
whose output is cached (``lora.cache_frozen``: ``cached_layers``) none.
"""

from __future__ import annotations

import re

from labor_jax import labels
from labor_jax.config import LlamaConfig

# Dense bfloat16 peak FLOP/s per chip (no structured sparsity), matched against
# jax.devices()[0].device_kind (lower case) in this order.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"^tpu v4$", 275e12),  # cloud.google.com/tpu/docs/v4
    (r"^tpu v5( lite|e)$", 197e12),  # cloud.google.com/tpu/docs/v5e
    (r"^tpu v5p?$", 459e12),  # cloud.google.com/tpu/docs/v5p
    (r"^tpu v6( lite|e)$", 918e12),  # cloud.google.com/tpu/docs/v6e (Trillium)
    (r"a100", 312e12),  # NVIDIA A100 datasheet (SXM and PCIe alike)
    (r"h100.*pcie", 756e12),  # NVIDIA H100 datasheet: 1,513 TFLOPS with sparsity, halved
    (r"h100.*nvl", 835e12),  # NVIDIA H100 NVL datasheet: 1,671 with sparsity, halved
    (r"h100|gh200|h200", 989e12),  # H100 SXM datasheet: 1,979 with sparsity, halved; H200 and GH200 share the die
)


_BLOCK = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
          "mlp/up_proj", "mlp/down_proj")


def _block_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  return dict(zip(_BLOCK, ((d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d))))


def _layer_adapters(config: LlamaConfig) -> list[int]:
  """Adapter weights in each block (0 without LoRA)."""
  if not config.lora_rank:
    return [0] * config.num_hidden_layers
  r = config.lora_rank
  return [sum(r * (i + o) for name, (i, o) in _block_shapes(config).items()
              if labels.adapted(f"layers_{layer}/{name}", config.lora_targets))
          for layer in range(config.num_hidden_layers)]


def _first_trained_block(config: LlamaConfig, layer: int) -> tuple[int, int]:
  """(weights that need no input gradient, attention passes) of the lowest block with adapters: its input comes from
  frozen work, so q/k/v need none; when its attention has no adapters, nothing in the attention sublayer needs a
  gradient (o too, and its score and value matmuls run forward only) and gate/up need none either."""
  shapes = _block_shapes(config)
  attention_trained = any(labels.adapted(f"layers_{layer}/{name}", config.lora_targets) for name in _BLOCK[:4])
  names = _BLOCK[:3] if attention_trained else _BLOCK[:6]
  return sum(shapes[name][0] * shapes[name][1] for name in names), 3 if attention_trained else 1


def _head_adapters(config: LlamaConfig) -> int:
  """Adapter weights on the LM head (0 without LoRA there)."""
  if not config.lora_rank or not labels.adapted("lm_head", config.lora_targets):
    return 0
  return config.lora_rank * (config.hidden_size + config.vocab_size)


def matmul_params(config: LlamaConfig) -> tuple[int, int]:
  """(base matmul weights, LoRA adapter weights) a token passes through."""
  d, v = config.hidden_size, config.vocab_size
  base = config.num_hidden_layers * sum(i * o for i, o in _block_shapes(config).values()) + d * v
  return base, sum(_layer_adapters(config)) + _head_adapters(config)


def train_flops_per_token(config: LlamaConfig, seq_len: int, *, frozen_base: bool = False,
                          cached_layers: int = 0) -> float:
  """Model FLOPs of one trained token (forward + backward) at ``seq_len`` tokens per row;
  see the module docstring for the convention. ``cached_layers``: the first blocks, whose output
  the step reads instead of computing (``lora.cache_frozen``; frozen, so with ``frozen_base``).

  The lowest adapted block is counted as with adapters on its attention projections (q/k/v need no input
  gradient) or on none of them (the attention sublayer forward only); narrower targets there (q/v only, o only,
  down only) and each ``lora_a``'s input gradient in it are counted as needing more gradient than they do, so the
  count is an upper bound by a fraction of that one block's backward pass."""
  if cached_layers and not frozen_base:
    raise ValueError("cached_layers: only frozen blocks' output can be cached (frozen_base=True)")
  block = sum(i * o for i, o in _block_shapes(config).values())
  attn = 4 * seq_len * config.num_attention_heads * config.head_dim  # the forward pass's score and value matmuls
  per_layer = _layer_adapters(config)
  trained = [a > 0 for a in per_layer]
  first = (trained.index(True) if any(trained) else config.num_hidden_layers) if frozen_base else 0
  if cached_layers > first:
    raise ValueError(f"cached_layers={cached_layers}: block {first} has adapters; only blocks below it can be cached")
  # the head: its input gradient is needed when a block below it trains (or the base is not frozen)
  total = (6 if not frozen_base else 4 if any(trained) else 2) * config.hidden_size * config.vocab_size
  total += 6 * _head_adapters(config)
  for layer, a in enumerate(per_layer):
    if layer < cached_layers:
      continue
    if layer < first:  # below every adapter: forward only
      total += 2 * block + attn
    elif frozen_base and layer == first:  # nothing below trains: no gradient for what only feeds the block's input
      no_grad, passes = _first_trained_block(config, layer)
      total += 2 * no_grad + 4 * (block - no_grad) + 6 * a + passes * attn
    else:
      total += (4 if frozen_base else 6) * block + 6 * a + 3 * attn
  return float(total)


def peak_flops(device_kind: str, override: float | None = None) -> float | None:
  """Peak bfloat16 FLOP/s of one chip named ``device_kind`` (``jax.devices()[0].device_kind``);
  ``override`` wins; None when the chip is not in :data:`PEAK_BF16_FLOPS` (the CPU)."""
  if override:
    return float(override)
  kind = device_kind.lower().strip()
  for pattern, value in PEAK_BF16_FLOPS:
    if re.search(pattern, kind):
      return value
  return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation: achieved model FLOP/s over ``peak`` (the peak of all chips that
  produced ``tokens_per_s``, e.g. ``peak_flops(kind) * jax.device_count()``); None without a peak."""
  if not peak:
    return None
  return tokens_per_s * flops_per_token / peak
