"""A seeded generator of synthetic career panels, for scale tests and benchmarks.

Synthetic data, never to be reported as survey evidence. Each worker gets a birth year,
sex, race, region and an education path; occupations follow a sticky Markov chain:
stay with probability ``stay``, otherwise move to an occupation drawn from a per-origin
Dirichlet distribution concentrated on ``neighbours`` nearby codes (so transitions have
structure for models to learn). Some worker-years are dropped to create gaps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_pipeline.titles import TitleTable

_EDU = ("less than high school", "high school diploma", "some college", "bachelor's degree", "graduate studies")
_REGIONS = ("the northeast", "the north central region", "the south", "the west")
_RACE = ("black", "white", "asian", None)


def simulate(workers: int, years: int, titles: TitleTable, seed: int = 0, start_year: int = 1990,
             stay: float = 0.7, neighbours: int = 12, gap_rate: float = 0.03,
             dataset: str = "SIMULATED") -> pd.DataFrame:
  """A panel in the generic format with ``workers`` x ``years`` rows (minus gaps)."""
  rng = np.random.default_rng(seed)
  j = len(titles)
  # Transition structure: each origin moves mostly to a few "neighbouring" codes.
  nb = np.stack([(np.arange(neighbours) + rng.integers(1, j, neighbours)) % j for _ in range(j)])
  nb_p = rng.dirichlet(np.full(neighbours, 0.5), size=j)
  popularity = rng.dirichlet(np.full(j, 0.8))
  occ = np.empty((workers, years), np.int32)
  occ[:, 0] = rng.choice(j, size=workers, p=popularity)
  for t in range(1, years):
    prev = occ[:, t - 1]
    move = rng.random(workers) >= stay
    pick = (nb_p[prev].cumsum(1) > rng.random((workers, 1))).argmax(1)
    occ[:, t] = np.where(move, nb[prev, pick], prev)
  edu0 = rng.integers(0, 3, workers)
  edu_up = rng.random((workers, years)) < 0.05
  edu = np.minimum(edu0[:, None] + np.cumsum(edu_up, 1), len(_EDU) - 1)
  year_grid = start_year + np.arange(years)
  keep = rng.random((workers, years)) >= gap_rate
  keep[:, 0] = True
  w_idx, t_idx = np.nonzero(keep)
  codes = np.asarray(titles.codes)
  birth = rng.integers(start_year - 35, start_year - 17, workers)
  return pd.DataFrame({
      "dataset": dataset,
      "person_id": np.char.add("w", w_idx.astype(str)),
      "year": year_grid[t_idx],
      "occupation": codes[occ[w_idx, t_idx]],
      "education": np.asarray(_EDU)[edu[w_idx, t_idx]],
      "sex": np.where(rng.random(workers) < 0.5, "female", "male")[w_idx],
      "race": np.asarray(_RACE, dtype=object)[rng.integers(0, len(_RACE), workers)][w_idx],
      "region": np.asarray(_REGIONS)[rng.integers(0, len(_REGIONS), workers)][w_idx],
      "birth_year": birth[w_idx],
  })
