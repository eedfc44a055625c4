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
adapter weight.
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


def matmul_params(config: LlamaConfig) -> tuple[int, int]:
  """(base matmul weights, LoRA adapter weights) a token passes through."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  shapes = {"self_attn/q_proj": (d, q), "self_attn/k_proj": (d, kv), "self_attn/v_proj": (d, kv),
            "self_attn/o_proj": (q, d), "mlp/gate_proj": (d, f), "mlp/up_proj": (d, f), "mlp/down_proj": (f, d)}
  base = config.num_hidden_layers * sum(i * o for i, o in shapes.values()) + d * v
  adapters = 0
  if config.lora_rank:
    r = config.lora_rank
    for name, (i, o) in shapes.items():
      if labels.adapted(f"layers_0/{name}", config.lora_targets):
        adapters += config.num_hidden_layers * r * (i + o)
    if labels.adapted("lm_head", config.lora_targets):
      adapters += r * (d + v)
  return base, adapters


def train_flops_per_token(config: LlamaConfig, seq_len: int, *, frozen_base: bool = False) -> float:
  """Model FLOPs of one trained token (forward + backward) at ``seq_len`` tokens per row;
  see the module docstring for the convention."""
  base, adapters = matmul_params(config)
  weights = (4 if frozen_base else 6) * base + 6 * adapters
  attn = 12 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
  return float(weights + attn)


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
