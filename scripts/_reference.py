"""Shared set-up of the benchmarks: one random Llama, in PyTorch transformers and in labor_jax."""

import tempfile


def random_llama_pair(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                      max_positions: int, seed: int = 0):
  """(transformers LlamaForCausalLM, labor_jax config, labor_jax params) with the same random weights.

  The PyTorch model is saved and reloaded, and labor_jax imports the same files
  (labor_jax.hf.load), so both sides start from identical tensors."""
  import torch
  import transformers

  from labor_jax import hf

  cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                 max_position_embeddings=max_positions)
  torch.manual_seed(seed)
  with tempfile.TemporaryDirectory() as ck:
    transformers.LlamaForCausalLM(cfg).save_pretrained(ck)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ck)
    config, params = hf.load(ck)
  return ref, config, params
