"""Person-year panels: the generic format, reading CSV/Parquet, and validation.

A panel has one row per person and year:

=============  ========  =====================================================
column         required  meaning
=============  ========  =====================================================
person_id      yes       worker identifier (any string; unique within dataset)
year           yes       calendar year, integer in [1900, 2100]
occupation     yes       a code of the titles table (when one is given) or a title
dataset        no        survey name (NLSY79, NLSY97, PSID...); else ``--dataset``
education      no        education level as text ("high school diploma")
sex            no        e.g. "male", "female"
race           no        e.g. "black"
ethnicity      no        e.g. "hispanic"
region         no        e.g. "south"
birth_year     no        integer year of birth
industry       no        industry as text
=============  ========  =====================================================

Row numbers in errors count data rows from 1 (in a CSV, row N is on line N + 1). The wide
layout of survey extract tools (a row per person) is read in :mod:`data_pipeline.wide`;
:mod:`data_pipeline.inputs` reads files of either layout, crosswalks and pools them.
Gaps are allowed: a person observed in 1980 and 1983 has no entries for 1981-82;
the resume simply lists the observed years, and transitions are between
consecutive observed entries (``gap`` = years skipped, 0 for adjacent years).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.errors import PanelError
from data_pipeline.titles import TitleTable, text_problem

REQUIRED = ("person_id", "year", "occupation")
OPTIONAL = ("dataset", "education", "sex", "race", "ethnicity", "region", "birth_year", "industry")
YEAR_RANGE = (1900, 2100)


def read_table(path: str | Path) -> pd.DataFrame:
  """Reads CSV or Parquet into string columns (missing values stay missing). A Parquet column of floats that are all
  whole numbers (a Stata or pandas export of integer codes with missing values) reads as integers: ``5``, as its CSV
  export reads, not ``5.0``, so one worker's rows in a CSV file and a Parquet file stay one worker."""
  path = Path(path)
  if not path.exists():
    raise PanelError(path, "file does not exist")
  other = _OTHER_FORMATS.get(path.suffix.lower())
  if other:  # read as CSV, it said something about a header it does not have
    raise PanelError(path, f"a {other} file: tables are read from CSV (.csv, also compressed) or Parquet (.parquet); "
                           "save it as one of those")
  try:
    if path.suffix.lower() in (".parquet", ".pq"):
      df = pd.read_parquet(path)
      for c in df.columns:
        if pd.api.types.is_float_dtype(df[c]):
          v = df[c].dropna().to_numpy()
          if len(v) and (np.abs(v) < 2 ** 53).all() and (v == np.round(v)).all():
            df[c] = df[c].astype("Int64")
      df = df.astype(object).where(df.notna(), None)
      df = df.apply(lambda c: c.map(lambda v: None if v is None else str(v)))
    else:
      df = pd.read_csv(path, dtype=str, keep_default_na=True, skipinitialspace=True)
      if path.suffix.lower() not in _COMPRESSED:  # pandas opens those itself; its own reading is all there is
        _check_csv_shape(path)
  except PanelError:
    raise
  except pd.errors.EmptyDataError:
    raise PanelError(path, "empty file") from None
  except UnicodeDecodeError:
    raise _not_utf8(path) from None
  except Exception as e:  # pyarrow / parser errors: report them in one line
    raise PanelError(path, f"cannot read ({e.__class__.__name__}: {e})") from None
  if df.empty:
    raise PanelError(path, "empty file (a header but no rows)")
  df.columns = [str(c).strip() for c in df.columns]
  return df


_COMPRESSED = (".gz", ".bz2", ".zip", ".xz", ".zst", ".tar")
_OTHER_FORMATS = {".json": "JSON", ".jsonl": "JSON lines", ".xlsx": "Excel", ".xls": "Excel", ".dta": "Stata",
                  ".sav": "SPSS", ".sas7bdat": "SAS", ".xpt": "SAS transport", ".feather": "Feather",
                  ".arrow": "Arrow", ".pkl": "pickle", ".pickle": "pickle", ".rds": "R", ".rdata": "R"}


def _check_csv_shape(path: Path) -> None:
  """What pandas reads without a word and should not: a column name given twice (the second renamed ``year.1``) and
  a line with fewer or more fields than the header (a cut or shifted line, padded with missing values). Lines are
  split as pandas splits them (spaces after a delimiter skipped, blank lines passed over)."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    lines = (r for r in csv.reader(f, skipinitialspace=True) if any(c.strip() for c in r))
    header = [c.strip() for c in next(lines, [])]
    named = [c for c in header if c]  # unnamed columns (a trailing comma) are pandas' "Unnamed: 3"
    repeated = sorted({c for c in named if named.count(c) > 1})
    if repeated:
      raise PanelError(path, f"column {repeated[0]!r} appears {named.count(repeated[0])} times in the header")
    for i, fields in enumerate(lines, start=1):
      if len(fields) != len(header):
        raise PanelError(path, f"{len(fields)} fields where the header has {len(header)} (a cut or shifted line?)",
                         row=i)


def _not_utf8(path: Path) -> PanelError:
  """The error for a CSV that is not UTF-8 (a latin-1 export, say), naming its first bad line."""
  raw = path.read_bytes()
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    bad = raw[e.start:e.start + 1]
    where = {"row": line - 1} if line > 1 else {}
    return PanelError(path, f"not UTF-8 text (byte 0x{bad.hex()} on line {line}); save the file as UTF-8",
                      **where)
  return PanelError(path, "not UTF-8 text; save the file as UTF-8")


@dataclasses.dataclass(frozen=True)
class FileRows:
  """Where each row of a long frame sits in its file, for errors: ``where(i, column) -> (row, column)``.

  ``rows`` are data rows (from 1). For a wide file, ``years[i]`` is the year whose yearly
  columns (``occupation_1983``...) hold row ``i``, for the fields in ``yearly``.
  """
  rows: np.ndarray
  years: np.ndarray | None = None
  yearly: frozenset = frozenset()

  @classmethod
  def long(cls, n: int) -> "FileRows":
    return cls(np.arange(1, n + 1))

  def __call__(self, i: int, column: str) -> tuple[int, str]:
    if self.years is not None and (column in self.yearly or column == "year"):
      return int(self.rows[i]), f"{'occupation' if column == 'year' else column}_{self.years[i]}"
    return int(self.rows[i]), column

  def take(self, keep: np.ndarray) -> "FileRows":
    keep = np.asarray(keep, bool)
    return FileRows(self.rows[keep], None if self.years is None else self.years[keep], self.yearly)


def _first_bad(mask: np.ndarray) -> int:
  return int(np.flatnonzero(mask)[0])


def _at(where, i: int, col: str) -> dict:
  """``row=`` and ``column=`` of a PanelError for row position ``i`` and panel column ``col``."""
  row, column = where(i, col) if where else (i + 1, col)
  return {"row": row, "column": column}


def _integer_column(df: pd.DataFrame, col: str, path, optional: bool, where=None) -> pd.Series:
  raw = df[col]
  present = raw.notna() & (raw.astype(str).str.strip() != "")
  if not optional and not present.all():
    i = _first_bad(~present.to_numpy())
    raise PanelError(path, "missing value", **_at(where, i, col), value=raw.iloc[i], has_value=True)
  num = pd.to_numeric(raw.where(present), errors="coerce")
  bad = present & (num.isna() | (num % 1 != 0))
  if bad.any():
    i = _first_bad(bad.to_numpy())
    raise PanelError(path, "not an integer", **_at(where, i, col), value=raw.iloc[i], has_value=True)
  lo, hi = YEAR_RANGE
  out = present & ((num < lo) | (num > hi))
  if out.any():
    i = _first_bad(out.to_numpy())
    raise PanelError(path, f"out of range [{lo}, {hi}]", **_at(where, i, col), value=raw.iloc[i], has_value=True)
  return num.astype("Int64")


def _check_text(values: pd.Series, path, col: str, where=None) -> None:
  """Every present value of a text column can be resume text (:func:`data_pipeline.titles.text_problem`)."""
  bad = values.map(lambda v: v is not None and not (isinstance(v, float) and np.isnan(v)) and text_problem(v) is not None)
  if bad.any():
    i = _first_bad(bad.to_numpy(dtype=bool))
    raise PanelError(path, text_problem(values.iloc[i]), **_at(where, i, col), value=values.iloc[i], has_value=True)


def validate(df: pd.DataFrame, path: str | Path, titles: TitleTable | None,
             dataset: str | None = None, where=None) -> tuple[pd.DataFrame, TitleTable]:
  """Checks a raw panel and returns (clean panel sorted by dataset/person/year, titles).

  Without a titles table, occupation values are titles and the table is built from
  them (codes "1", "2"... in sorted title order). ``where(i, column) -> (row, column)``
  names the file position of row ``i`` in errors when ``df`` is not the file's own rows
  (a wide file read as long); by default row ``i`` is data row ``i + 1``.
  """
  if df.empty:
    raise PanelError(path, "empty file (a header but no rows)")
  for col in REQUIRED:
    if col not in df.columns:
      raise PanelError(path, f"missing required column '{col}' (found: {list(df.columns)})")
  out = pd.DataFrame(index=df.index)
  pid = df["person_id"].astype(object)
  empty = pid.isna() | (pid.astype(str).str.strip() == "")
  if empty.any():
    i = _first_bad(empty.to_numpy())
    raise PanelError(path, "missing value", **_at(where, i, "person_id"), value=pid.iloc[i], has_value=True)
  out["person_id"] = pid.astype(str).str.strip()
  _check_text(out["person_id"], path, "person_id", where)
  out["year"] = _integer_column(df, "year", path, optional=False, where=where).astype(np.int64)
  if "dataset" in df.columns:
    ds = df["dataset"].where(df["dataset"].notna() & (df["dataset"].astype(str).str.strip() != ""), None)
    if ds.isna().any() and not dataset:
      i = _first_bad(ds.isna().to_numpy())
      raise PanelError(path, "missing value (and no --dataset default)", **_at(where, i, "dataset"),
                       value=df["dataset"].iloc[i], has_value=True)
    out["dataset"] = ds.fillna(dataset).astype(str).str.strip()
    _check_text(out["dataset"], path, "dataset", where)
  else:
    out["dataset"] = dataset or Path(path).stem
  occ = df["occupation"]
  occ_missing = occ.isna() | (occ.astype(str).str.strip() == "")
  if occ_missing.any():
    i = _first_bad(occ_missing.to_numpy())
    raise PanelError(path, "missing value", **_at(where, i, "occupation"), value=occ.iloc[i], has_value=True)
  occ = occ.astype(str).str.strip()
  _check_text(occ, path, "occupation", where)
  if titles is None:
    titles = TitleTable.numbered(occ.unique(), source=f"{path} (titles)")
    out["occupation"] = occ.map(dict(zip(titles.titles, titles.codes)))
  else:
    known = occ.isin(titles.codes)
    if not known.all():
      i = _first_bad(~known.to_numpy())
      raise PanelError(path, f"occupation code not in the titles table {titles.source}",
                       **_at(where, i, "occupation"), value=occ.iloc[i], has_value=True)
    out["occupation"] = occ
  for col in OPTIONAL:
    if col in ("dataset",) or col not in df.columns:
      continue
    if col == "birth_year":
      out[col] = _integer_column(df, col, path, optional=True, where=where)
    else:
      v = df[col].where(df[col].notna(), None)
      out[col] = v.map(lambda s: None if s is None or pd.isna(s) or not str(s).strip() else str(s).strip())
      _check_text(out[col], path, col, where)
  dup = out.duplicated(["dataset", "person_id", "year"], keep="first")
  if dup.any():
    i = _first_bad(dup.to_numpy())
    raise PanelError(path, f"duplicate person-year (person {out['person_id'].iloc[i]!r}, "
                     f"year {out['year'].iloc[i]})", **_at(where, i, "year"), value=df["year"].iloc[i],
                     has_value=True)
  out = out.sort_values(["dataset", "person_id", "year"], kind="stable").reset_index(drop=True)
  return out, titles


def read_panel(path: str | Path, titles: TitleTable | None = None,
               dataset: str | None = None) -> tuple[pd.DataFrame, TitleTable]:
  """Reads and validates a panel file (CSV or Parquet). See the module docstring."""
  return validate(read_table(path), path, titles, dataset)


def entry_table(panel: pd.DataFrame) -> pd.DataFrame:
  """One row per entry (person-year) of a validated panel: the one table every consumer builds on.

  Rows are sorted by dataset, person and year. Columns: the panel's own, plus ``t`` (entries
  of the person before this one), ``prev_occupation`` and ``prev2_occupation`` (the codes of
  the previous two entries; None where there are none) and ``gap`` (years skipped since the
  previous entry; 0 for the first). The dataset summary, the baselines' transition table and
  the CAREER-style model's sequences are all read off this table.
  """
  p = panel.sort_values(["dataset", "person_id", "year"], kind="stable").reset_index(drop=True)
  key = (p["dataset"].astype(str) + "\x00" + p["person_id"].astype(str)).to_numpy()
  t = p.groupby(key, sort=False).cumcount().to_numpy()
  occ = p["occupation"].to_numpy(dtype=object)
  year = p["year"].to_numpy()
  out = p.copy()
  out["t"] = t
  out["prev_occupation"] = np.where(t >= 1, np.r_[[None], occ][:len(p)], None)  # [:len]: a one-row panel
  out["prev2_occupation"] = np.where(t >= 2, np.r_[[None, None], occ][:len(p)], None)
  out["gap"] = np.where(t >= 1, year - np.r_[year[:1], year[:-1]] - 1, 0)
  return out


def transitions(panel: pd.DataFrame) -> pd.DataFrame:
  """The entries that have a previous one (t >= 1): one row per observed transition."""
  e = entry_table(panel)
  return e[e["t"] >= 1].reset_index(drop=True)


def summary(panel: pd.DataFrame) -> dict:
  """Workers, person-years, transitions, stay rate, occupations used, years covered."""
  tr = transitions(panel)
  return {
      "workers": int(panel.groupby(["dataset", "person_id"]).ngroups),
      "person_years": int(len(panel)),
      "years": [int(panel["year"].min()), int(panel["year"].max())],
      "transitions": int(len(tr)),
      "stay_rate": float((tr["prev_occupation"] == tr["occupation"]).mean()) if len(tr) else float("nan"),
      "occupations_used": int(panel["occupation"].nunique()),
      "datasets": sorted(panel["dataset"].unique().tolist()),
      "gaps": int((tr["gap"] > 0).sum()),
  }
