"""The building blocks the main job and the ablations share: recipes and synthetic careers.

A recipe is a YAML run config under ``configs/`` named by its path without the suffix
(``main/stage1`` is ``configs/main/stage1.yaml``). :func:`train` runs one into a run
directory on a dataset and prints the equivalent ``python -m labor_jax.train`` command.
:func:`build_stage1_data` writes the synthetic, non-representative careers stage 1 trains
on (:mod:`data_pipeline.simulator`: other dynamics and cohorts, the same titles and template),
and :func:`synthetic_careers` draws such careers for other uses (a second data source).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data_pipeline import loader, simulator
from data_pipeline.dataset_dir import build_dataset
from data_pipeline.panel import validate
from data_pipeline.titles import TitleTable
from labor_jax.config import LlamaConfig
from labor_jax.training import config as train_config
from labor_jax.training import frozen_cache
from labor_jax.training import loop as trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGE1_WORKERS = 5000  # synthetic careers in the stage-1 corpus
STAGE1_YEARS = 8  # years per synthetic career


def recipe_config(recipe: str) -> train_config.TrainConfig:
  """The run config ``configs/<recipe>.yaml``."""
  return train_config.load(CONFIGS / f"{recipe}.yaml")


def train(recipe: str, run_dir: str | Path, data_dir: str | Path, hooks=None, **changes) -> dict:
  """Trains ``configs/<recipe>.yaml`` into ``run_dir`` on ``data_dir`` with dotted ``changes``
  (a finished run resumes at its end at once) and ``hooks`` (default: the trainer's); returns the last
  step's metrics record."""
  changes = {"run_dir": str(run_dir), "data.dataset_dir": str(data_dir), **changes}
  path = CONFIGS / f"{recipe}.yaml"
  print("  python -m labor_jax.train --config " + str(path.relative_to(CONFIGS.parent)) + "".join(
      f" --set {k}={v}" for k, v in changes.items()), flush=True)
  return trainer.run(train_config.updated(train_config.load(path), changes), hooks)


def planned_steps(recipe: str, data_dir: str | Path, changes: dict | None = None) -> int:
  """The optimizer steps ``configs/<recipe>.yaml`` with dotted ``changes`` runs on ``data_dir``: its
  ``steps``, or its ``epochs`` over the training split's rows (one process, as the trainer resolves them)."""
  cfg = train_config.updated(recipe_config(recipe), {"data.dataset_dir": str(data_dir), **(changes or {})})
  if train_config.needs_rows(cfg):
    rows = loader.rows_per_epoch(data_dir, "train", seq_len=cfg.data.seq_len, batch_size=cfg.batch_size,
                                 seed=cfg.seed, pack=cfg.data.pack)
    cfg = train_config.resolve_epochs(cfg, rows)
  return int(cfg.steps)


def frozen_layers(recipe: str, hf_dir: str | Path) -> int:
  """The blocks below the adapters that ``configs/<recipe>.yaml`` leaves frozen in the Hugging Face model at
  ``hf_dir`` (``lora.top_layers`` of its blocks adapted): what its fine-tunes share with the model itself
  (0 for full fine-tuning, adapters in every block, or fewer blocks than ``top_layers``)."""
  cfg = recipe_config(recipe)
  if not cfg.lora.enabled or cfg.lora.top_layers is None:
    return 0
  layers = LlamaConfig.from_hf_file(Path(hf_dir) / "config.json").num_hidden_layers
  return frozen_cache.first_trained_layer(layers, cfg.lora.top_layers)


def finished_steps(run_dir: str | Path) -> int:
  """The last step ``run_dir``'s metrics record (0 for a new run): what a resumed run does not repeat."""
  metrics = Path(run_dir) / "metrics.jsonl"
  if not metrics.exists():
    return 0
  return max((json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()), default=0)


def synthetic_careers(titles: TitleTable, workers: int, years: int = STAGE1_YEARS, *, seed: int = 1,
                      start_year: int = 1975, dataset: str = "SYNTHETIC") -> tuple[pd.DataFrame, TitleTable]:
  """A validated panel of ``workers`` simulated careers over the titles of ``titles`` (sticky moves
  to a few neighbouring occupations, cohorts born 18-35 years before ``start_year``)."""
  raw = simulator.simulate(workers, years, titles, seed=seed, start_year=start_year, stay=0.6, neighbours=4,
                           dataset=dataset)
  return validate(raw, "simulated panel", titles)


def build_stage1_data(out: str | Path, titles: TitleTable, tokenizer_dir: str | Path, *,
                      workers: int = STAGE1_WORKERS) -> dict:
  """The stage-1 corpus (``workers`` synthetic careers, tokenised with ``tokenizer_dir``) in ``out``;
  returns the dataset summary."""
  panel, titles = synthetic_careers(titles, workers)
  return build_dataset(panel, titles, out, tokenizer_dir=tokenizer_dir,
                       source="synthetic careers (data_pipeline.simulator), not survey data")
