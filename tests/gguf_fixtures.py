"""Tiny random GGUF files written with gguf.GGUFWriter (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Every tensor type the converter claims; K-quants need rows (the input width) that are multiples of 256.
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# Byte offsets of the float16 scales inside one block of the types filled with random bytes.
_F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,)}
HIDDEN, FFN, HEADS, LAYERS = 256, 512, 4, 2
TEXTS = ["<NLSY79 resume>\nThe following information is available about the work history of a male black worker.",
         "The worker was born in 1959.\nThe worker has the following records of work experience, one entry per line:",
         "1980 (some college): Service workers\n1981 (some college): Sales workers\n<END OF DATA>",
         "1982 (high school diploma): Managers and administrators, n.e.c.\n\n1983: Craftsmen (skilled) workers"] * 8


def gpt2_vocab() -> dict:
  """tokenizer.ggml.* of a byte-level BPE trained here (Llama-3 pre-tokenizer name, GPT-2 style ids)."""
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  specials = ["<|begin_of_text|>", "<|end_of_text|>"]
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  model = json.loads(tok.to_str())["model"]
  tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "merges": merges,
          "token_type": [3 if t.startswith("<|") else 1 for t in tokens], "bos": 0, "eos": 1, "pad": 1}


def llama_vocab(tmp: Path) -> dict:
  """tokenizer.ggml.* of a SentencePiece BPE model trained here (scores, byte pieces, '\\n' user-defined)."""
  import sentencepiece as spm
  from data_pipeline.tokenizer import train_sentencepiece
  sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(TEXTS, tmp / "sp", vocab_size=360)))
  n = sp.get_piece_size()
  kind = lambda i: (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)  # noqa: E731
                    else 4 if sp.id_to_piece(i) == "\n" else 1)
  return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
          "scores": [float(sp.get_score(i)) for i in range(n)], "token_type": [kind(i) for i in range(n)],
          "bos": 1, "eos": 2, "unk": 0, "pad": 3}


def _tensor(rng, shape, kind: str):
  """(data, raw type) for ``gguf.GGUFWriter.add_tensor``: a random float tensor in type ``kind``."""
  import gguf
  qtype = gguf.GGMLQuantizationType[kind]
  if kind in _F16_FIELDS:  # no quantizer in gguf-py: random blocks with small valid float16 scales
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in _F16_FIELDS[kind]:
      scale = rng.uniform(2e-5, 1e-4, size=(rows, cols // block)).astype(np.float16)
      data[..., off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1), qtype
  w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
  if kind == "F32":
    return w, None
  if kind == "F16":
    return w.astype(np.float16), None
  return gguf.quants.quantize(w, qtype), qtype


def write_tiny(path: Path, vocab: dict, *, kv_heads: int = 2, tied: bool = True, types=TYPES, offset: int = 0,
               arch: str = "llama", drop: tuple[str, ...] = (), seed: int = 0) -> Path:
  """A random 2-layer Llama GGUF (hidden 256) whose matrices cycle through ``types`` from ``offset``.

  ``drop``: metadata keys left out (bad-file tests); llama.cpp's query/key permutation is part of the
  random data (the converter must undo it for logits to match transformers' own GGUF loader)."""
  import gguf
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(str(path), arch)
  put = lambda key, fn, *a: key not in drop and fn(key, *a)  # noqa: E731
  put(f"{arch}.block_count", w.add_uint32, LAYERS)
  put(f"{arch}.context_length", w.add_uint32, 256)
  put(f"{arch}.embedding_length", w.add_uint32, HIDDEN)
  put(f"{arch}.feed_forward_length", w.add_uint32, FFN)
  put(f"{arch}.attention.head_count", w.add_uint32, HEADS)
  put(f"{arch}.attention.head_count_kv", w.add_uint32, kv_heads)
  put(f"{arch}.rope.freq_base", w.add_float32, 500000.0)
  put(f"{arch}.attention.layer_norm_rms_epsilon", w.add_float32, 1e-5)
  put(f"{arch}.rope.dimension_count", w.add_uint32, HIDDEN // HEADS)
  put("tokenizer.ggml.model", w.add_string, vocab["model"])
  if "pre" in vocab:
    put("tokenizer.ggml.pre", w.add_string, vocab["pre"])
  put("tokenizer.ggml.tokens", w.add_array, vocab["tokens"])
  put("tokenizer.ggml.token_type", w.add_array, vocab["token_type"])
  if "merges" in vocab:
    put("tokenizer.ggml.merges", w.add_array, vocab["merges"])
  if "scores" in vocab:
    put("tokenizer.ggml.scores", w.add_array, vocab["scores"])
  for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
    if name in vocab:
      put(f"tokenizer.ggml.{key}_token_id", w.add_uint32, vocab[name])
  v, d, hd = len(vocab["tokens"]), HIDDEN, HIDDEN // HEADS
  shapes = {"token_embd.weight": (v, d)}
  for i in range(LAYERS):
    shapes.update({f"blk.{i}.attn_q.weight": (HEADS * hd, d), f"blk.{i}.attn_k.weight": (kv_heads * hd, d),
                   f"blk.{i}.attn_v.weight": (kv_heads * hd, d), f"blk.{i}.attn_output.weight": (d, HEADS * hd),
                   f"blk.{i}.ffn_gate.weight": (FFN, d), f"blk.{i}.ffn_up.weight": (FFN, d),
                   f"blk.{i}.ffn_down.weight": (d, FFN)})
  if not tied:
    shapes["output.weight"] = (v, d)
  for k, (name, shape) in enumerate(shapes.items()):
    data, raw = _tensor(rng, shape, types[(k + offset) % len(types)])
    w.add_tensor(name, data, raw_dtype=raw)
  norms = ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(LAYERS) for n in ("attn", "ffn")]
  for name in norms:
    w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path

