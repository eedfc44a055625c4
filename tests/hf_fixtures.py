"""Random tiny Hugging Face models, built locally (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# name -> transformers config kwargs. Every variant the port claims to cover.
VARIANTS = {
    "llama2_mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "llama3_gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    "llama31_rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear_rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                    head_dim=24),
}


def make_hf_model(torch, variant: str, seed: int = 0):
  import transformers
  kw = dict(VARIANTS[variant])
  model_type = kw.pop("model_type")
  kw.setdefault("rms_norm_eps", 1e-5)
  cfg = transformers.AutoConfig.for_model(
      model_type, vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
      max_position_embeddings=256, **kw)
  torch.manual_seed(seed)
  m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # norms start at 1: perturb them so that a wrong norm mapping shows.
    for name, p in m.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  return m


def padded_batch(vocab: int, seed: int = 0):
  """Three rows: full length, right padded, left padded. Returns tokens, mask, positions."""
  rng = np.random.RandomState(seed)
  b, t = 3, 24
  tokens = rng.randint(0, vocab, size=(b, t)).astype(np.int64)
  mask = np.ones((b, t), np.int64)
  mask[1, 17:] = 0
  mask[2, :6] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def hf_logits(torch, m, tokens, mask, positions):
  with torch.no_grad():
    return m(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions)).logits.float().numpy()


def edit_json(path: Path, **changes) -> None:
  """Sets ``changes`` in the JSON file ``path`` (a config.json, an adapter_config.json) in place."""
  meta = json.loads(Path(path).read_text())
  meta.update(changes)
  Path(path).write_text(json.dumps(meta))


def edit_safetensors(path: Path, fn) -> None:
  """Rewrites the safetensors file ``path`` after ``fn(tensors)`` edits its dict of numpy arrays in place."""
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path))
  fn(tensors)
  save_file(tensors, str(path))
