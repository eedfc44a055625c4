"""``python -m data_pipeline.build``: panel files -> validated records -> resumes -> tokens -> dataset.

With no arguments it builds the embedded NLSY panel (545 young men, 1980-1987). Several
``--panel FILE:DATASET`` build one pooled dataset (one tokenizer, per-dataset splits).
The output directory's layout is described in :mod:`data_pipeline.dataset_dir`; it
appears atomically (nothing is written if any step fails).

Exit codes: 0 built; 2 invalid input (one line on stderr naming file, row, column and value);
3 the output could not be written (one line: what, and why, e.g. the disk is full).
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline import resume
from data_pipeline.crosswalk import UNMAPPED, VINTAGES
from data_pipeline.dataset_dir import build_dataset, format_summary, load_default
from data_pipeline.errors import PanelError, WriteError
from data_pipeline.gguf_tokenizer import GGUFError
from data_pipeline.inputs import PanelInput, read_inputs
from data_pipeline.titles import load_titles
from data_pipeline.tokenizer import TokenizerError
from data_pipeline.wide import LAYOUTS

EXIT_INPUT, EXIT_WRITE = 2, 3


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--panel", action="append", metavar="FILE[:DATASET]",
                  help="person-year panel (CSV or Parquet), repeatable; DATASET tags its rows. "
                  "Default: the embedded NLSY panel")
  ap.add_argument("--titles", help="occ1990dd (built in) or a code,title CSV; without it the panel's "
                  "occupation values are titles (occ1990dd when --crosswalk is given)")
  ap.add_argument("--crosswalk", action="append", choices=VINTAGES + ("none",),
                  help="map raw Census codes of this vintage to occ1990dd first; once for every panel or "
                  "once per --panel, in order (none: codes already in the titles table)")
  ap.add_argument("--unmapped", choices=UNMAPPED, default="error",
                  help="a code with no occ1990dd title: stop (error), or drop the person-year and count it")
  ap.add_argument("--layout", choices=LAYOUTS, default="auto",
                  help="long (a row per person-year), wide (a row per person, occupation_1980, ...), or auto")
  ap.add_argument("--dataset", help="dataset name for rows without a `dataset` column (default: file stem)")
  ap.add_argument("--out", default="runs/data/nlsy", help="output directory")
  ap.add_argument("--tokenizer-dir", help="use this model's tokenizer (a Hugging Face directory or a .gguf "
                  "file) instead of training SentencePiece")
  ap.add_argument("--variant", choices=resume.VARIANTS, default="titles", help="titles, or codes (ablation)")
  ap.add_argument("--seed", type=int, default=0, help="split seed")
  ap.add_argument("--vocab-size", type=int, default=1024, help="SentencePiece vocabulary when training one")
  args = ap.parse_args(argv)
  panels = args.panel or []
  walks = args.crosswalk or []
  if not panels:
    for flag, given in (("--titles", args.titles), ("--crosswalk", walks), ("--unmapped", args.unmapped != "error"),
                        ("--layout", args.layout != "auto")):
      if given:
        ap.error(f"{flag} needs --panel")
  if len(walks) not in (0, 1, len(panels)):
    ap.error(f"--crosswalk given {len(walks)} times for {len(panels)} panels: give it once or once per --panel")
  walks = [None if w == "none" else w for w in (walks * len(panels) if len(walks) == 1 else walks)]
  titles_spec = args.titles or ("occ1990dd" if any(walks) else None)
  if args.unmapped == "drop" and titles_spec is None:
    ap.error("--unmapped drop needs --titles or --crosswalk")
  try:
    inputs = None
    if panels:
      titles = load_titles(titles_spec) if titles_spec else None
      specs = [PanelInput.parse(p, w) for p, w in zip(panels, walks or [None] * len(panels))]
      panel, titles, inputs = read_inputs(specs, titles, dataset=args.dataset, layout=args.layout,
                                          unmapped=args.unmapped)
      source = ", ".join(s.path for s in specs)
    else:
      panel, titles, source = load_default()
    info = build_dataset(panel, titles, args.out, tokenizer_dir=args.tokenizer_dir, variant=args.variant,
                         seed=args.seed, vocab_size=args.vocab_size, source=source, inputs=inputs)
  except (PanelError, GGUFError, TokenizerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_INPUT
  except WriteError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_WRITE
  except OSError as e:  # creating the output's parent or temporary directory
    print(f"error: cannot write the dataset {args.out}: {e}".replace("\n", " "), file=sys.stderr)
    return EXIT_WRITE
  print(format_summary(info))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
