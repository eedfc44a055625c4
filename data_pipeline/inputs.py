"""Panel files -> one validated panel: long or wide layout, crosswalks, and pooling several surveys.

Each file is read on its own (errors name its own rows), turned long, tagged with its
dataset, mapped to the titles' codes through a crosswalk when one is given, and
validated. A person is ``(dataset, person_id)``, so the same id in two surveys stays two
people, and the splits (by ``sha256(seed:dataset:person_id)``) are per dataset by
construction. Files may share a dataset (one survey's rounds in two code vintages, each
file with its crosswalk) but not a person-year.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import numpy as np
import pandas as pd

from data_pipeline import crosswalk as crosswalk_lib, wide
from data_pipeline.errors import PanelError
from data_pipeline.panel import FileRows, read_table, validate
from data_pipeline.titles import TitleTable


@dataclasses.dataclass(frozen=True)
class PanelInput:
  """One ``--panel FILE[:DATASET]``, with the crosswalk (vintage name) its codes need, if any."""
  path: str
  dataset: str | None = None  # every row's dataset (rows without one take it; others must agree)
  crosswalk: str | None = None  # occ1980 ... occ2010, or None for codes of the titles table

  @classmethod
  def parse(cls, spec: str, crosswalk: str | None = None) -> "PanelInput":
    """``"a.csv"`` or ``"a.csv:NLSY79"``; a path that exists is never split at a colon."""
    path, sep, dataset = spec.rpartition(":")
    if sep and path and not dataset.strip() and not os.path.exists(spec) and os.path.exists(path):
      raise PanelError(spec, "no dataset name after ':' (FILE:DATASET names the rows' dataset; without one, "
                             "leave out the colon)")
    if os.path.exists(spec) or not sep or not path or not dataset or "/" in dataset or "\\" in dataset:
      return cls(spec, None, crosswalk)
    return cls(path, dataset.strip(), crosswalk)


def read_inputs(inputs: list[PanelInput], titles: TitleTable | None, *, dataset: str | None = None,
                layout: str = "auto", unmapped: str = "error") -> tuple[pd.DataFrame, TitleTable, list[dict]]:
  """Reads every file and pools them into one panel (sorted by dataset, person, year).

  Returns (panel, titles, one report per file: file, layout, datasets, person-years, crosswalk
  and, with ``unmapped="drop"``, the person-years dropped by reason and the codes dropped most).
  """
  loaded = [_read_one(inp, titles, dataset, layout, unmapped) for inp in inputs]
  if len(loaded) == 1:
    panel, table, report, _ = loaded[0]
    return panel, table, [report]
  panels = [p for p, *_ in loaded]
  if titles is None:
    panels, titles = _merge_value_titles(panels, [t for _, t, *_ in loaded], inputs)
  panel = pd.concat(panels, ignore_index=True)
  _check_no_overlap(panel, [len(p) for p in panels], inputs, [locate for *_, locate in loaded])
  for col in panel.columns:
    if panel[col].dtype == object:
      panel[col] = panel[col].where(panel[col].notna(), None)
  panel = panel.sort_values(["dataset", "person_id", "year"], kind="stable").reset_index(drop=True)
  return panel, titles, [r for _, _, r, _ in loaded]


def _read_one(inp: PanelInput, titles: TitleTable | None, dataset: str | None, layout: str, unmapped: str):
  """(panel, titles, report, locate) of one file; ``locate(dataset, person_id, year)`` -> (row, column)."""
  path = inp.path
  df = read_table(path)
  kind = wide.layout_of(df, layout)
  if kind == "wide":
    df, where = wide.to_long(df, path)
  else:
    where = FileRows.long(len(df))
  if inp.dataset:
    df = _tag(df, inp.dataset, path, where)
  cw = crosswalk_lib.load(inp.crosswalk) if inp.crosswalk else None
  dropped, dropped_codes, scale = Counter(), Counter(), 1
  if cw is not None or unmapped == "drop":
    if titles is None:
      raise ValueError("mapping codes needs a titles table")
    if "occupation" not in df.columns:
      raise PanelError(path, f"missing required column 'occupation' (found: {list(df.columns)})")
    scale = crosswalk_lib.code_scale(df["occupation"], cw)
    occ, reason = crosswalk_lib.map_codes(df["occupation"], cw, titles, unmapped, where=where, file=path,
                                          scale=scale)
    keep = reason.isna().to_numpy()
    dropped.update(reason[~keep].tolist())
    dropped_codes = Counter(df["occupation"][~keep].astype(str).str.strip().map(crosswalk_lib.normalize))
    df = df.assign(occupation=occ)[keep].reset_index(drop=True)
    where = where.take(keep)
    if df.empty:
      raise PanelError(path, f"no person-years left after dropping {sum(dropped.values())} unmapped ones")
  panel, titles = validate(df, path, titles, inp.dataset or dataset, where=where)
  report = {"file": path, "layout": kind, "datasets": sorted(panel["dataset"].unique().tolist()),
            "person_years": int(len(panel)), "crosswalk": inp.crosswalk}
  if scale != 1:
    report["codes_divided_by"] = scale  # four-digit 2000/2005 codes
  if unmapped == "drop":
    report["dropped"] = dict(sorted(dropped.items()))
    report["dropped_codes"] = dict(dropped_codes.most_common(20))  # the most frequent raw codes dropped
  return panel, titles, report, _locator(df, where, inp.dataset or dataset)


def _check_no_overlap(panel: pd.DataFrame, lengths, inputs, locates):
  """Files may share a dataset (a survey's rounds in two code vintages), not a person-year."""
  dup = panel.duplicated(["dataset", "person_id", "year"], keep="first").to_numpy()
  if not dup.any():
    return
  i = int(np.flatnonzero(dup)[0])
  ends = np.cumsum(lengths)
  f = int(np.searchsorted(ends, i, side="right"))
  d, pid, year = panel["dataset"].iloc[i], panel["person_id"].iloc[i], int(panel["year"].iloc[i])
  key = (panel["dataset"] == d) & (panel["person_id"] == pid) & (panel["year"] == year)
  g = int(np.searchsorted(ends, int(np.flatnonzero(key.to_numpy())[0]), side="right"))
  row, column = locates[f](d, pid, year)
  raise PanelError(inputs[f].path, f"person-year (dataset {d!r}, person {pid!r}, year {year}) is also in "
                   f"{inputs[g].path}", row=row, column=column, value=str(year), has_value=True)


def _locator(df: pd.DataFrame, where: FileRows, default_dataset):
  """``locate(dataset, person_id, year) -> (row, column)`` of a validated person-year in its file."""
  def locate(dataset, person_id, year):
    hit = (df["person_id"].astype(str).str.strip() == person_id) & (pd.to_numeric(df["year"], errors="coerce") == year)
    if "dataset" in df.columns:
      ds = df["dataset"].where(df["dataset"].notna(), "").astype(str).str.strip()
      hit &= (ds == dataset) | ((ds == "") & (default_dataset == dataset))
    return where(int(np.flatnonzero(hit.to_numpy())[0]), "year")
  return locate


def _tag(df: pd.DataFrame, name: str, path, where: FileRows) -> pd.DataFrame:
  """Every row's dataset is ``name``: empty ones take it, a different one is an error."""
  if "dataset" not in df.columns:
    return df.assign(dataset=name)
  ds = df["dataset"].where(df["dataset"].notna(), "").astype(str).str.strip()
  bad = ((ds != "") & (ds != name)).to_numpy()
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    row, column = where(i, "dataset")
    raise PanelError(path, f"dataset differs from the one --panel names ({name!r})", row=row, column=column,
                     value=df["dataset"].iloc[i], has_value=True)
  return df.assign(dataset=name)


def _merge_value_titles(panels, tables, inputs):
  """Panels whose occupation values were their titles: one table over all of them (sorted titles)."""
  merged = TitleTable.numbered((t for table in tables for t in table.titles),
                              source="occupation values of " + ", ".join(str(inp.path) for inp in inputs))
  code = dict(zip(merged.titles, merged.codes))
  out = []
  for p, table in zip(panels, tables):
    recode = {c: code[t] for c, t in zip(table.codes, table.titles)}
    out.append(p.assign(occupation=p["occupation"].map(recode)))
  return out, merged
