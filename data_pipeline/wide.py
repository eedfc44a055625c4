"""The wide layout of survey extract tools: one row per person, one column per field and year.

::

  person_id,dataset,sex,birth_year,occupation_1980,occupation_1981,occupation_1982,education_1980
  7,NLSY79,female,1962,313,313,,high school diploma

Yearly columns are ``<field>_<year>`` (four digits) for the panel fields other than
``person_id``, ``year`` and ``dataset``; the other columns are person-level, as in the long
layout. Each non-missing ``occupation_<year>`` is one person-year; a missing one is a gap
(person 7 above has no 1982 entry). Yearly values of years without an occupation column
are ignored. :func:`to_long` gives the long rows and, for errors, each one's wide row and
yearly column.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from data_pipeline.errors import PanelError
from data_pipeline.panel import OPTIONAL, REQUIRED, FileRows

# The panel columns that can vary by year: every column but the worker's key and survey.
FIELDS = tuple(c for c in REQUIRED + OPTIONAL if c not in ("person_id", "year", "dataset"))
LAYOUTS = ("auto", "long", "wide")
_YEARLY = re.compile(r"(.+)_(\d{4})")
# a field's name, "_", then something with a digit: meant as a year (race_ethnicity, industry_code are not)
_YEAR_LIKE = re.compile(r"(?:" + "|".join(FIELDS) + r")_(?=.*\d).+")


def yearly_columns(columns) -> dict[str, dict[int, str]]:
  """field -> {year: column} for the columns named ``<field>_<year>``."""
  out: dict[str, dict[int, str]] = {}
  for c in columns:
    m = _YEARLY.fullmatch(str(c))
    if m and m[1] in FIELDS:
      out.setdefault(m[1], {})[int(m[2])] = c
  return out


def is_wide(df: pd.DataFrame) -> bool:
  """Yearly occupation columns and no ``occupation`` or ``year`` column."""
  return ("occupation" in yearly_columns(df.columns) and "occupation" not in df.columns
          and "year" not in df.columns)


def layout_of(df: pd.DataFrame, layout: str = "auto") -> str:
  """``long`` or ``wide``: the given one, or the detected one for ``auto``."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "auto":
    return "wide" if is_wide(df) else "long"
  return layout


def to_long(df: pd.DataFrame, path) -> tuple[pd.DataFrame, FileRows]:
  """One row per person and observed year (ordered by wide row, then year), and where each came from."""
  yearly = yearly_columns(df.columns)
  if "occupation" not in yearly:
    raise PanelError(path, "wide layout needs yearly occupation columns (occupation_1980, occupation_1981, ...)")
  for col in ("occupation", "year"):
    if col in df.columns:
      raise PanelError(path, f"column '{col}' next to yearly occupation columns; a file is long or wide")
  for field in yearly:
    if field in df.columns:
      raise PanelError(path, f"column '{field}' and yearly columns '{field}_<year>' both given", column=field)
  if "person_id" not in df.columns:
    raise PanelError(path, f"missing required column 'person_id' (found: {list(df.columns)})")
  for c in map(str, df.columns):  # occupation_198x, education_80: a year that would be read as a person-level field
    if _YEAR_LIKE.fullmatch(c) and not _YEARLY.fullmatch(c):
      raise PanelError(path, "a yearly column's year must be four digits (<field>_<year>, e.g. occupation_1980)",
                       column=c)
  _check_unique_people(df, path)
  wide_cols = {c for cols in yearly.values() for c in cols.values()}
  person = [c for c in df.columns if c not in wide_cols]
  rows = np.arange(1, len(df) + 1)
  parts, part_rows, part_years = [], [], []
  for year in sorted(yearly["occupation"]):
    occ = df[yearly["occupation"][year]]
    has = (occ.notna() & (occ.astype(str).str.strip() != "")).to_numpy()
    part = df.loc[has, person].copy()
    part["year"] = str(year)
    for field, cols in yearly.items():
      part[field] = df.loc[has, cols[year]] if year in cols else None
    parts.append(part)
    part_rows.append(rows[has])
    part_years.append(np.full(int(has.sum()), year))
  long = pd.concat(parts, ignore_index=True)
  src_rows, src_years = np.concatenate(part_rows), np.concatenate(part_years)
  if long.empty:
    raise PanelError(path, "no occupation in any yearly column")
  order = np.lexsort((src_years, src_rows))
  long = long.iloc[order].reset_index(drop=True)
  return long, FileRows(src_rows[order], src_years[order], frozenset(yearly))


def _check_unique_people(df: pd.DataFrame, path):
  pid = df["person_id"].astype(str).str.strip()
  key = pid if "dataset" not in df.columns else df["dataset"].fillna("").astype(str).str.strip() + "\x00" + pid
  present = df["person_id"].notna() & (pid != "")
  dup = key.duplicated() & present
  if dup.any():
    i = int(np.flatnonzero(dup.to_numpy())[0])
    first = int(np.flatnonzero((key == key.iloc[i]).to_numpy())[0])
    raise PanelError(path, f"duplicate person (also in row {first + 1}); the wide layout has one row per person",
                     row=i + 1, column="person_id", value=df["person_id"].iloc[i], has_value=True)
