"""Occupation code -> title tables.

Built in: the 9 occupation groups of the NLSY young-men panel (Vella & Verbeek 1998),
with readable titles, and the 330 Autor-Dorn occ1990dd titles (package data, see
``resources/occ1990dd/README.md``; ``load_titles("occ1990dd")``). Users bring any other
table as a CSV with columns ``code,title``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from importlib import resources
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


# What resume text cannot hold: a line break (a resume is one entry per line, and a title ends at the
# newline the scorer appends to every candidate) and U+2581, SentencePiece's space mark (decoded as a space).
_BAD_TEXT = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\u2581]")


def text_problem(value) -> str | None:
  """Why ``value`` cannot be resume text (one line), or None when it can."""
  m = _BAD_TEXT.search(str(value))
  if m is None:
    return None
  if m[0] == "\u2581":
    return "holds U+2581 (SentencePiece's space mark, which decodes as a space)"
  return f"holds a line break ({m[0]!r}); resume text is one entry per line"


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

  @classmethod
  def numbered(cls, names, source: str) -> "TitleTable":
    """The table of a panel whose occupation values are its titles: the distinct ``names`` sorted,
    coded "1", "2", ... in that order."""
    names = sorted(set(names))
    return cls(tuple(str(i + 1) for i in range(len(names))), tuple(names), source=source)

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


def resource(*parts: str):
  """A file of the package data under ``data_pipeline/resources`` (an importlib Traversable)."""
  return resources.files("data_pipeline").joinpath("resources", *parts)


@functools.cache
def occ1990dd() -> TitleTable:
  """The 330 occ1990dd titles (Autor & Dorn 2013; titles from Graetz-Michaels, Deming, IPUMS)."""
  with resource("occ1990dd", "titles.csv").open("r", encoding="utf-8") as f:
    return _read_titles(f, "occ1990dd (Autor & Dorn 2013)")


BUILT_IN = {"occ1990dd": occ1990dd}


def load_titles(path: str | Path) -> TitleTable:
  """A built-in table by name (``"occ1990dd"``), else a ``code,title`` CSV file.

  Codes are kept as strings (leading zeros matter). To read a file that has a built-in
  table's name, write it as a path (``./occ1990dd``).
  """
  if isinstance(path, str) and path in BUILT_IN:
    return BUILT_IN[path]()
  path = Path(path)
  try:
    with open(path, encoding="utf-8") as f:
      return _read_titles(f, str(path))
  except OSError as e:
    raise PanelError(path, f"cannot read titles table ({e.__class__.__name__}: {e})") from None


def _read_titles(f, source: str) -> TitleTable:
  try:
    df = pd.read_csv(f, dtype=str, keep_default_na=False)
  except pd.errors.EmptyDataError as e:
    raise PanelError(source, f"cannot read titles table ({e.__class__.__name__}: {e})") from None
  for col in ("code", "title"):
    if col not in df.columns:
      raise PanelError(source, f"missing required column '{col}' (found: {list(df.columns)})")
  if df.empty:
    raise PanelError(source, "titles table has no rows")
  for i, (code, title) in enumerate(zip(df["code"], df["title"]), start=1):
    if not code.strip():
      raise PanelError(source, "empty code", row=i, column="code", value=code, has_value=True)
    if not title.strip():
      raise PanelError(source, "empty title", row=i, column="title", value=title, has_value=True)
    if text_problem(title):
      raise PanelError(source, text_problem(title), row=i, column="title", value=title, has_value=True)
  dup = df["code"].str.strip().duplicated()  # " 1" and "1" are one code
  if dup.any():
    i = int(dup.to_numpy().nonzero()[0][0]) + 1
    raise PanelError(source, "duplicate code", row=i, column="code", value=df["code"].iloc[i - 1], has_value=True)
  return TitleTable(tuple(df["code"].str.strip()), tuple(df["title"].str.strip()), source=source)


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
