"""The resume dataset as a TFDS dataset in array_record format (no TensorFlow needed).

Each example is one worker: text, tokens, the token span of every entry's title, the
entry start offsets, years and occupation indices (into the titles table). Read it
back with ``tfds.builder_from_directory(dir).as_data_source()`` (random access, what
grain consumes) or :func:`data_source`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

NAME = "labor_resumes"
VERSION = "1.0.0"


def features() -> tfds.features.FeaturesDict:
  i32 = lambda shape: tfds.features.Tensor(shape=shape, dtype=np.int32)  # noqa: E731
  return tfds.features.FeaturesDict({
      "dataset": tfds.features.Text(),
      "person_id": tfds.features.Text(),
      "text": tfds.features.Text(),
      "tokens": i32((None,)),
      "title_spans": i32((None, 2)),
      "entry_starts": i32((None,)),
      "years": i32((None,)),
      "occupations": i32((None,)),
  })


class LaborResumes(tfds.core.GeneratorBasedBuilder):
  """Resume examples handed over in memory (``examples`` maps split -> list of dicts)."""

  VERSION = tfds.core.Version(VERSION)
  name = NAME

  def __init__(self, *, examples: dict[str, list[dict[str, Any]]], description: str = "", **kwargs):
    self._examples = examples
    self._description = description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self._description, features=features())

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(rows) for split, rows in self._examples.items() if rows}

  def _generate_examples(self, rows):
    for row in rows:
      yield example_key(row["dataset"], row["person_id"]), row


def example_key(dataset: str, person_id: str) -> str:
  """``DATASET/PERSON``, unique per worker: a dataset name holding ``/`` or ``%`` is %-escaped
  (``a/b`` + ``c`` and ``a`` + ``b/c`` would otherwise share ``a/b/c``). Plain names keep the plain
  key, so the example order (TFDS hashes the keys) of existing datasets does not change."""
  if "/" in dataset or "%" in dataset:
    dataset = dataset.replace("%", "%25").replace("/", "%2F")
  return f"{dataset}/{person_id}"


def write(examples: dict[str, list[dict[str, Any]]], data_dir: str | Path, description: str = "") -> Path:
  """Writes the dataset under ``data_dir/labor_resumes/1.0.0``; returns that directory."""
  tfds.disable_progress_bar()
  builder = LaborResumes(examples=examples, description=description, data_dir=str(data_dir),
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS))
  shutil.rmtree(Path(data_dir) / "downloads", ignore_errors=True)  # empty: nothing is downloaded
  return Path(builder.data_dir)


def data_source(dataset_dir: str | Path, split: str):
  """Random-access source of one split (a grain-compatible ``__len__``/``__getitem__``)."""
  builder = tfds.builder_from_directory(str(dataset_dir))
  if split not in builder.info.splits:
    raise KeyError(f"{dataset_dir}: no split {split!r} (have {sorted(builder.info.splits)})")
  return builder.as_data_source(split=split)
