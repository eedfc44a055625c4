"""Occupation code -> title tables.

Built in: the 9 occupation groups of the NLSY young-men panel (Vella & Verbeek 1998),
with readable titles. Users bring any other table (for example the Autor-Dorn
occ1990dd titles, from David Dorn's data page) as a CSV with columns ``code,title``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.errors import PanelError

# Ecdat/plm `Males` factor label -> (code, readable title). Codes follow the order of
# the occ1..occ9 dummies of the same data (wooldridge `wagepan`).
NLSY_GROUPS = {
    "Professional, Technical_and_kindred": (1, "Professional, technical and kindred workers"),
    "Managers, Officials_and_Proprietors": (2, "Managers, officials and proprietors"),
    "Sales_Workers": (3, "Sales workers"),
    "Clerical_and_kindred": (4, "Clerical and kindred workers"),
    "Craftsmen, Foremen_and_kindred": (5, "Craftsmen, foremen and kindred workers"),
    "Operatives_and_kindred": (6, "Operatives and kindred workers"),
    "Laborers_and_farmers": (7, "Laborers and farmers"),
    "Farm_Laborers_and_Foreman": (8, "Farm laborers and foremen"),
    "Service_Workers": (9, "Service workers"),
}


@dataclasses.dataclass(frozen=True)
class TitleTable:
  """Occupation codes and their titles, in a fixed order (the scorer's candidate order)."""
  codes: tuple[str, ...]
  titles: tuple[str, ...]
  source: str = ""

  def __post_init__(self):
    if len(set(self.titles)) != len(self.titles):
      dup = pd.Series(self.titles)[pd.Series(self.titles).duplicated()].iloc[0]
      raise PanelError(self.source or "titles", f"title {dup!r} appears for two codes; titles must be unique")

  def __len__(self):
    return len(self.codes)

  def title(self, code: str) -> str:
    return self.titles[self.index[code]]

  @property
  def index(self) -> dict[str, int]:
    return {c: i for i, c in enumerate(self.codes)}

  def to_csv(self, path: str | Path):
    pd.DataFrame({"code": self.codes, "title": self.titles}).to_csv(path, index=False)


def nlsy_groups() -> TitleTable:
  items = sorted(NLSY_GROUPS.values())
  return TitleTable(tuple(str(c) for c, _ in items), tuple(t for _, t in items),
                    source="NLSY occupation groups (Vella & Verbeek 1998)")


def load_titles(path: str | Path) -> TitleTable:
  """Reads a ``code,title`` CSV. Codes are kept as strings (leading zeros matter)."""
  path = Path(path)
  try:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
  except (OSError, pd.errors.EmptyDataError) as e:
    raise PanelError(path, f"cannot read titles table ({e.__class__.__name__}: {e})") from None
  for col in ("code", "title"):
    if col not in df.columns:
      raise PanelError(path, f"missing required column '{col}' (found: {list(df.columns)})")
  if df.empty:
    raise PanelError(path, "titles table has no rows")
  for i, (code, title) in enumerate(zip(df["code"], df["title"]), start=1):
    if not code.strip():
      raise PanelError(path, "empty code", row=i, column="code", value=code, has_value=True)
    if not title.strip():
      raise PanelError(path, "empty title", row=i, column="title", value=title, has_value=True)
  dup = df["code"].duplicated()
  if dup.any():
    i = int(dup.to_numpy().nonzero()[0][0]) + 1
    raise PanelError(path, "duplicate code", row=i, column="code", value=df["code"].iloc[i - 1], has_value=True)
  return TitleTable(tuple(df["code"].str.strip()), tuple(df["title"].str.strip()), source=str(path))


_ROLES = ("Assistant", "Senior", "Junior", "Chief", "Apprentice", "Lead", "Trainee", "Head", "Deputy",
          "Associate", "Principal")
_WORK = ("machine operators", "clerks", "technicians", "inspectors", "mechanics", "supervisors",
         "assemblers", "analysts", "installers", "engineers", "sales workers", "designers", "drivers",
         "handlers", "planners", "repairers", "teachers", "cooks", "attendants", "buyers")
_FIELD = ("textiles", "metal products", "food processing", "retail trade", "public administration",
          "health services", "construction", "transportation", "printing", "finance", "agriculture",
          "electronics", "education", "chemicals", "wood products", "utilities", "mining", "insurance")


def synthetic_titles(n: int, seed: int = 0) -> TitleTable:
  """``n`` made-up occupation titles ("Senior clerks, textiles"), for the simulator only."""
  rng = np.random.default_rng(seed)
  combos = [(r, w, f) for r in _ROLES for w in _WORK for f in _FIELD]
  if n > len(combos):
    raise ValueError(f"at most {len(combos)} synthetic titles")
  pick = rng.choice(len(combos), size=n, replace=False)
  titles = tuple(f"{combos[i][0]} {combos[i][1]}, {combos[i][2]}" for i in pick)
  return TitleTable(tuple(f"{i + 1:03d}" for i in range(n)), titles, source=f"synthetic (seed {seed})")
