"""Tokenizers for resumes: a model's own (tokenizer.json or SentencePiece tokenizer.model)
or a SentencePiece model trained here on the training resumes.

Resume tokens are the concatenation of each segment's tokens (see resume.py), where a
segment is encoded as a *continuation*: ``encode(sentinel + text)`` minus the tokens of the
sentinel. This removes tokenizer artefacts at segment starts (SentencePiece's dummy
prefix) and makes two promises the scorer relies on:

* at every entry boundary, the tokens of a resume prefix are exactly a prefix of the
  whole resume's tokens (true by construction, checked in tests);
* each entry's title is a known token span, identical to the title encoded alone.

The sentinel is chosen per tokenizer: the first of :data:`SENTINELS` that keeps its own tokens
in front of every kind of segment (a newline, an entry prefix, a title, the end marker, a
header). ``"\\n"`` comes first and serves SentencePiece models (the newline is never merged);
byte-level BPE vocabularies that learned ``"\\n\\n"`` (GPT-2, Llama-3, SmolLM) merge a newline
sentinel with a newline segment, so they get ``"a"``, which their pre-tokenizers always split
from what follows here. For such tokenizers, whose pre-tokenizer also splits at every segment
boundary (GPT-2's and SmolLM's regex), the resume's tokens equal the whole text's tokens;
Llama-3's regex glues a newline to punctuation before it (``".\\n"``), so a title ending in
punctuation is tokenized apart from its newline there (the promises still hold).

Library roles: ``tokenizers`` reads tokenizer.json, ``sentencepiece`` reads and trains
tokenizer.model files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers

from data_pipeline.errors import PanelError
from data_pipeline.resume import END_OF_DATA, NEWLINE, Resume

# Texts a segment may be encoded after, in order of preference (see the module docstring).
SENTINELS = ("\n", "a", "\u00a7")
# One of each kind of segment a resume is made of (resume.py); a sentinel must survive before all.
_PROBES = (NEWLINE, "1980 (some college):", " Service workers", END_OF_DATA, "<NLSY79 resume>\nThe worker.")
# Files that make up a model's tokenizer (copied with datasets and exported checkpoints).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


class TokenizerError(ValueError):
  """A tokenizer that cannot keep resume entry boundaries; ``str()`` is one line saying why."""


class ResumeTokenizer:
  """Wraps a tokenizers.Tokenizer or a sentencepiece.SentencePieceProcessor."""

  def __init__(self, backend, bos_id: int | None, eos_id: int | None, pad_id: int, source: str):
    self.backend, self.bos_id, self.eos_id, self.pad_id, self.source = backend, bos_id, eos_id, pad_id, source
    self.sentinel = self._choose_sentinel()
    self._sentinel = self._raw(self.sentinel)
    self._cache: dict[str, list[int]] = {}

  def _choose_sentinel(self) -> str:
    for s in SENTINELS:
      n = len(self._raw(s))
      if all(self._raw(s + p)[:n] == self._raw(s) and self.decode(self._raw(s + p)) == s + p for p in _PROBES):
        return s
    raise TokenizerError(f"{self.source}: no sentinel {SENTINELS} keeps its own tokens before every kind of resume "
                     "segment (this tokenizer merges across segment starts or does not decode back to the text), "
                     "so resume entries would have no token boundary")

  # ------------------------------------------------------------------ loading
  @classmethod
  def from_dir(cls, path: str | Path) -> "ResumeTokenizer":
    """Loads tokenizer.json (preferred) or tokenizer.model from a model directory."""
    path = Path(path)
    cfg = {}
    if (path / "tokenizer_config.json").exists():
      try:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
      except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PanelError(path / "tokenizer_config.json", f"cannot read the tokenizer config ({e})") from None
    if (path / "tokenizer.json").exists():
      try:
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
      except Exception as e:  # the tokenizers library raises plain Exceptions for files it cannot parse
        raise PanelError(path / "tokenizer.json", f"not a tokenizers file ({str(e).splitlines()[0][:200]})") from None

      def tid(name):
        v = cfg.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return tok.token_to_id(v) if v else None
      bos, eos = tid("bos_token"), tid("eos_token")
      if cfg.get("add_bos_token") is False:  # the tokenizer's own choice (SmolLM2's): no BOS before a text
        bos = None
      pad = tid("pad_token")
      return cls(tok, bos, eos, pad if pad is not None else (eos or 0), str(path / "tokenizer.json"))
    if (path / "tokenizer.model").exists():
      return cls.from_sentencepiece(path / "tokenizer.model")
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")

  @classmethod
  def from_sentencepiece(cls, model_file: str | Path) -> "ResumeTokenizer":
    try:
      sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
      raise PanelError(model_file, f"not a SentencePiece model ({str(e).splitlines()[0][:200]})") from None
    opt = lambda i: i if i >= 0 else None  # noqa: E731
    pad = sp.pad_id() if sp.pad_id() >= 0 else max(sp.eos_id(), 0)
    return cls(sp, opt(sp.bos_id()), opt(sp.eos_id()), pad, str(model_file))

  @property
  def vocab_size(self) -> int:
    b = self.backend
    return b.get_vocab_size() if hasattr(b, "get_vocab_size") else b.get_piece_size()

  # ----------------------------------------------------------------- encoding
  def _raw(self, text: str) -> list[int]:
    b = self.backend
    if hasattr(b, "encode_as_ids"):
      return list(b.encode_as_ids(text))
    return list(b.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    b = self.backend
    ids = [int(i) for i in ids]
    return b.decode_ids(ids) if hasattr(b, "decode_ids") else b.decode(ids, skip_special_tokens=False)

  def encode_piece(self, text: str) -> list[int]:
    """Tokens of ``text`` as a continuation of earlier text (memoised)."""
    hit = self._cache.get(text)
    if hit is not None:
      return hit
    ids = self._raw(self.sentinel + text)
    n = len(self._sentinel)
    if ids[:n] != self._sentinel:
      raise TokenizerError(f"{self.source}: tokenizer merges the segment sentinel {self.sentinel!r} with the text that "
                       f"follows ({text[:30]!r}); resume segments need a token boundary there")
    out = ids[n:]
    if len(self._cache) < 200_000:
      self._cache[text] = out
    return out

  def encode_resume(self, resume: Resume) -> "TokenizedResume":
    """A resume's tokens, segment by segment. A prompt (``resume.next_prefix`` set) ends after the
    opened entry's prefix, where the next title would start: no end marker and no EOS."""
    ids: list[int] = [] if self.bos_id is None else [self.bos_id]
    ids += self.encode_piece(resume.header)
    title_spans, entry_starts = [], []
    for e in resume.entries:
      entry_starts.append(len(ids))
      ids += self.encode_piece(NEWLINE) + self.encode_piece(e.prefix)
      title_start = len(ids)
      ids += self.encode_piece(e.title)
      title_spans.append((title_start, len(ids)))
    entry_starts.append(len(ids))
    if resume.next_prefix is not None:
      ids += self.encode_piece(NEWLINE) + self.encode_piece(resume.next_prefix)
    else:
      ids += self.encode_piece(NEWLINE) + self.encode_piece(END_OF_DATA)
      if self.eos_id is not None:
        ids.append(self.eos_id)
    return TokenizedResume(np.asarray(ids, np.int32), np.asarray(title_spans, np.int32).reshape(-1, 2),
                           np.asarray(entry_starts, np.int32))

  def verify(self, resume: Resume, tokenized: "TokenizedResume") -> None:
    """Raises TokenizerError (one line) unless ``tokenized`` decodes back to the resume's text: a tokenizer
    that normalises text (lower case, Unicode forms) cannot keep the entry boundaries of a resume."""
    ids = list(tokenized.ids)
    start = 1 if self.bos_id is not None else 0
    end = len(ids) - (resume.next_prefix is None and self.eos_id is not None)
    text = self.decode(ids[start:end])
    if text != resume.text:
      at = next((i for i, (a, b) in enumerate(zip(text, resume.text)) if a != b), min(len(text), len(resume.text)))
      raise TokenizerError(f"{self.source}: resume {resume.person_id} does not decode back to its text "
                           f"(first difference at character {at}: {resume.text[at:at + 20]!r} came back as "
                           f"{text[at:at + 20]!r}); this tokenizer cannot give resume entry boundaries")

  def candidate_tokens(self, candidates: Iterable[str]) -> list[list[int]]:
    """Each candidate title's tokens followed by the entry terminator (a newline)."""
    nl = self.encode_piece(NEWLINE)
    return [self.encode_piece(c) + nl for c in candidates]


@dataclasses.dataclass(frozen=True)
class TokenizedResume:
  ids: np.ndarray  # [N] int32 token ids (BOS ... EOS; a prompt ends after the opened entry's prefix)
  title_spans: np.ndarray  # [E, 2] (start, end) of each entry's title tokens
  entry_starts: np.ndarray  # [E + 1] index of each entry's leading newline, then of the end marker / opened entry


def train_sentencepiece(texts: Iterable[str], out_prefix: str | Path, vocab_size: int = 1024,
                        seed_sentences: int = 200_000) -> Path:
  """Trains a Llama-style BPE SentencePiece model (byte fallback, digits split) on ``texts``.

  The newline is a user-defined piece, so it is never merged with its neighbours (the
  segment boundary rule above needs that); identity normalisation keeps text as is.
  Writes ``{out_prefix}.model``.
  """
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
    raise PanelError("--vocab-size", f"must be a positive integer, got {vocab_size!r}")
  out_prefix = Path(out_prefix)
  out_prefix.parent.mkdir(parents=True, exist_ok=True)
  try:
    _train_spm(texts, out_prefix, vocab_size, seed_sentences)
  except RuntimeError as e:
    need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
    if need is None:
      raise
    raise PanelError("--vocab-size", f"{vocab_size} is smaller than the {need.group(1)} characters and special pieces "
                     f"the training resumes need; use at least {need.group(1)}") from None
  return out_prefix.with_suffix(".model")


def _train_spm(texts: Iterable[str], out_prefix: Path, vocab_size: int, seed_sentences: int) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_prefix=str(out_prefix), vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=True, user_defined_symbols=[NEWLINE],
      unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=seed_sentences,
      shuffle_input_sentence=True, max_sentence_length=1 << 16, minloglevel=2,
      hard_vocab_limit=False, allow_whitespace_only_pieces=True, train_extremely_large_corpus=False)
