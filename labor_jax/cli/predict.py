"""``python -m labor_jax.predict --run RUN --history worker.json``: top-k next occupations of one worker.

The history is JSON (or a CSV in the panel format, one row per year, for one person), read by
:func:`data_pipeline.history.load_history` (the format is described there; ``labor_jax.forecast``
reads the same files). The prompt is the worker's resume rendered as in training, with the next entry
opened (data_pipeline.resume.Resume.prompt). Probabilities are normalised over the run's
occupation titles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from data_pipeline import resume
from data_pipeline.errors import PanelError
from data_pipeline.history import load_history
from data_pipeline.titles import TitleTable, load_titles
from data_pipeline.tokenizer import ResumeTokenizer
from labor_jax import evaluation, runtime, scorer, sharding
from labor_jax.cli import common as cli
from labor_jax.interop import hf
from labor_jax.config import ConfigError, LlamaConfig
from labor_jax.rundir import RunDir


def prompt_tokens(history: pd.DataFrame, titles: TitleTable, variant: str, tokenizer: ResumeTokenizer,
                  next_year: int, next_education: str | None) -> np.ndarray:
  """The tokens a prediction continues: the worker's resume (as rendered for training) with the
  entry of ``next_year`` opened. They equal the training tokens before that entry's title."""
  prompt = resume.render_person(history, titles, variant).prompt(next_year, next_education)
  return tokenizer.encode_resume(prompt).ids


def predict(model: str | Path, history: str | Path, top_k: int = 5, *, titles: str | Path | None = None,
            variant: str = "titles", adapter: str | Path | None = None, mesh=None,
            chunk: int | None = None) -> list[tuple[str, float]]:
  """The ``top_k`` most likely next occupations (title, probability) of the worker in ``history``.

  ``model`` is a run directory (its best checkpoint; titles, template variant and survey name
  from its dataset) or a Hugging Face checkpoint directory (with a PEFT ``adapter``; ``titles``
  is then required: a ``code,title`` CSV or "occ1990dd"). With a ``mesh`` the model is restored
  into its shardings and the worker's prompt is scored on it (repeated over the mesh's batch axes)."""
  if RunDir(model).is_run:
    data = RunDir(model).dataset()
    table, variant, dataset = data.titles(), data.variant, (data.datasets or ["worker"])[0]
  elif titles is None:
    raise ConfigError(f"{model}: a Hugging Face model needs --titles (a code,title CSV or occ1990dd)")
  else:
    table, dataset = load_titles(titles), "worker"
  config, params, tok, _ = evaluation.load_model(model, adapter=adapter, mesh=mesh)
  panel, next_year, next_edu = load_history(history, table, dataset)
  tokens = prompt_tokens(panel, table, variant, tok, next_year, next_edu)[None]
  tree = scorer.CandidateTree.for_titles(tok, table, variant)
  ends = np.asarray([[tokens.shape[1]]], np.int32)
  if mesh is not None:  # one row per device of the batch axes
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    tokens, ends = np.repeat(tokens, rows, 0), np.repeat(ends, rows, 0)
  fn = jax.jit(lambda p, t, m, e: scorer.score(config, p, tree, t, m, e, normalize=True, chunk=chunk, mesh=mesh))
  p = np.exp(sharding.to_host(fn(params, tokens, np.ones_like(tokens), ends))[0, 0])
  order = np.argsort(-p)[:top_k]
  return [(table.titles[j], float(p[j])) for j in order]


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  which = ap.add_mutually_exclusive_group(required=True)
  which.add_argument("--run", help="run directory of labor_jax.train")
  which.add_argument("--hf", help="a Hugging Face checkpoint directory")
  ap.add_argument("--adapter", help="with --hf: a PEFT LoRA adapter directory")
  ap.add_argument("--titles", help="with --hf: the occupation titles (code,title CSV, or occ1990dd)")
  ap.add_argument("--variant", choices=resume.VARIANTS, default="titles", help="with --hf: titles or codes")
  ap.add_argument("--history", required=True, help="worker history: JSON or panel-format CSV")
  ap.add_argument("--top-k", type=int, default=5)
  cli.add_mesh_flags(ap, batch=False)
  args = ap.parse_args(argv)
  model = args.run or args.hf
  try:
    if (args.adapter or args.titles) and not args.hf:
      raise ConfigError("--adapter and --titles apply to --hf models (a run has its own)")
    cli.start(args)
    config = RunDir(model).check().model_config() if args.run else LlamaConfig.from_hf_file(Path(model) / "config.json")
    top = predict(model, args.history, args.top_k, titles=args.titles, variant=args.variant, adapter=args.adapter,
                  mesh=cli.mesh(args, config), chunk=args.chunk)
  except (PanelError, FileNotFoundError, ConfigError, sharding.ShardingError, hf.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index():
    return 0
  for title, prob in top:
    print(f"{prob:7.3f}  {title}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
