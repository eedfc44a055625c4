"""Train / validation / test split by person, deterministic from a seed and the person id.

A person's bucket is ``sha256(f"{seed}:{dataset}:{person_id}")`` read as a number in
[0, 1): below ``train`` goes to train, below ``train + validation`` to validation, the
rest to test. The assignment does not depend on row order, on which other people are
in the file, or on the machine; adding people never moves existing ones.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def person_uniform(dataset: str, person_id: str, seed: int) -> float:
  h = hashlib.sha256(f"{seed}:{dataset}:{person_id}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2.0 ** 64


def assign(panel: pd.DataFrame, seed: int = 0, fractions=DEFAULT_FRACTIONS) -> pd.Series:
  """Split name for every row of ``panel`` (all rows of a person share it)."""
  if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) < 0:
    raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
  people = panel[["dataset", "person_id"]].drop_duplicates()
  u = np.array([person_uniform(d, p, seed) for d, p in zip(people["dataset"], people["person_id"])])
  edges = np.cumsum(fractions)[:2]
  names = np.asarray(SPLITS)[np.searchsorted(edges, u, side="right")]
  lookup = pd.Series(names, index=pd.MultiIndex.from_frame(people))
  return pd.Series(lookup.reindex(pd.MultiIndex.from_frame(panel[["dataset", "person_id"]])).to_numpy(),
                   index=panel.index, name="split")
