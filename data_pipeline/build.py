"""``python -m data_pipeline.build``: panel file -> validated records -> resumes -> tokens -> dataset.

With no arguments it builds the embedded NLSY panel (545 young men, 1980-1987). The
output directory's layout is described in :mod:`data_pipeline.dataset_dir`; it appears
atomically (nothing is written if any step fails).
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline import resume
from data_pipeline.dataset_dir import build_dataset, format_summary, load_default
from data_pipeline.errors import PanelError
from data_pipeline.panel import read_panel
from data_pipeline.titles import load_titles


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
