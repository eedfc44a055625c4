"""The tokenizer a GGUF file describes, rebuilt as ``tokenizer.json`` + ``tokenizer_config.json``.

A GGUF file carries no tokenizer.json: llama.cpp stores the vocabulary, merges, scores and
special-token ids as metadata (``tokenizer.ggml.*``). Two vocabulary types are rebuilt here with
the ``tokenizers`` library:

* ``gpt2``: byte-level BPE (vocabulary + merges), split first the way ``tokenizer.ggml.pre`` names
  (GPT-2's regex, digits one by one for SmolLM/StarCoder, Llama-3's regex, Qwen2's);
* ``llama``: SentencePiece BPE (merges ranked by the pieces' scores, byte fallback, the dummy
  prefix unless ``tokenizer.ggml.add_space_prefix`` is false).

This module lives in data_pipeline, not labor_jax, so that ``data_pipeline.build --tokenizer-dir
FILE.gguf`` needs neither the model code nor the weights; :mod:`labor_jax.interop.gguf` reuses it
(and :class:`GGUFError`) for whole-model conversion.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how llama.cpp splits text before byte-level BPE (its llama-vocab.cpp).
PRE_TOKENIZERS = {
    **{name: "gpt2" for name in ("default", "gpt2", "gpt-2")},
    **{name: "digits+gpt2" for name in ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva",
                                         "command-r")},
    **{name: "llama3" for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")},
    **{name: "qwen2" for name in ("qwen2", "deepseek-r1-qwen")},
}
VOCAB_TYPES = ("gpt2", "llama")


class GGUFError(ValueError):
  """A GGUF file that cannot be converted; ``str()`` is one line naming the file and the field."""


def open_gguf(path: str | os.PathLike):
  """A ``gguf.GGUFReader`` over ``path`` (memory-mapped); unreadable files raise GGUFError."""
  import gguf  # the reader parses every field at open: only the GGUF paths pay for it

  path = Path(path)
  if path.is_dir():
    raise GGUFError(f"{path}: a directory, not a .gguf file (a Hugging Face directory goes where --hf or "
                    "model.hf_path takes one)")
  if not path.is_file():
    raise GGUFError(f"{path}: no such file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, TypeError) as e:
    raise GGUFError(f"{path}: unreadable GGUF (truncated or corrupt: {e})".replace("\n", " ")) from None
  reader.source = path  # named in every error about this file
  return reader


def field(reader, key: str, default=KeyError):
  """The value of metadata field ``key`` (arrays as lists); ``default`` when absent, else GGUFError."""
  f = reader.fields.get(key)
  if f is None:
    if default is KeyError:
      raise GGUFError(f"{reader.source}: missing metadata field {key}")
    return default
  return f.contents()


def build_tokenizer(reader) -> tuple[tokenizers.Tokenizer, dict]:
  """``(tokenizer, tokenizer_config)`` from the ``tokenizer.ggml.*`` metadata of an open GGUF."""
  src = reader.source
  vocab_type = field(reader, "tokenizer.ggml.model")
  if vocab_type not in VOCAB_TYPES:
    raise GGUFError(f"{src}: tokenizer.ggml.model={vocab_type!r} is not supported (supported: {VOCAB_TYPES})")
  tokens = field(reader, "tokenizer.ggml.tokens")
  if len(set(tokens)) != len(tokens):
    raise GGUFError(f"{src}: tokenizer.ggml.tokens repeats a token; ids would not be one to one")
  types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  ids = {name: field(reader, f"tokenizer.ggml.{key}_token_id", None)
         for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
  for name, i in ids.items():
    if i is not None and not 0 <= i < len(tokens):
      raise GGUFError(f"{src}: tokenizer.ggml.{name}_token_id={i} is outside the {len(tokens)}-token vocabulary")
  add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", vocab_type == "llama"))
  add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
  vocab = {t: i for i, t in enumerate(tokens)}
  if vocab_type == "gpt2":
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = field(reader, "tokenizer.ggml.pre", "default")
    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
      raise GGUFError(f"{src}: tokenizer.ggml.pre={pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)})")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2", "digits+gpt2"))
    tok.pre_tokenizer = {
        "gpt2": byte_level,
        "digits+gpt2": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"), byte_level]),
    }[kind]
    tok.decoder = decoders.ByteLevel()
  else:
    scores = field(reader, "tokenizer.ggml.scores")
    unk = tokens[ids["unk"]] if ids["unk"] is not None else None
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores), unk_token=unk,
                                          fuse_unk=True, byte_fallback=True))
    prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (_UNKNOWN, _CONTROL)]
  tok.add_special_tokens(specials)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
  edges = [ids["bos"] if add_bos else None, ids["eos"] if add_eos else None]
  if any(i is not None for i in edges):  # what AutoTokenizer adds with add_special_tokens=True
    single = ([tokens[edges[0]]] if edges[0] is not None else []) + ["$A"] + (
        [tokens[edges[1]]] if edges[1] is not None else [])
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(tokens[i], i) for i in dict.fromkeys(edges) if i is not None])
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
            "clean_up_tokenization_spaces": False}
  for name, i in ids.items():
    config[f"{name}_token"] = tokens[i] if i is not None else None
  template = field(reader, "tokenizer.chat_template", None)
  if template:
    config["chat_template"] = template
  return tok, config


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """SentencePiece BPE merges: every split of a piece into two pieces, best-scoring result first
  (the order transformers' ``generate_merges`` gives, so both tokenizers agree)."""
  rank = {t: i for i, t in enumerate(tokens)}
  merges = []
  for piece, score in zip(tokens, scores):
    local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in rank and piece[k:] in rank]
    merges += sorted(local, key=lambda m: (rank[m[0]], rank[m[1]]))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(a, b) for a, b, _ in merges]


def write_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike, reader=None) -> Path:
  """Writes ``tokenizer.json`` and ``tokenizer_config.json`` for the GGUF file ``path`` into ``out_dir``."""
  reader = reader if reader is not None else open_gguf(path)
  tok, config = build_tokenizer(reader)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tok.save(str(out_dir / "tokenizer.json"))
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return out_dir
