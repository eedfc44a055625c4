"""Census occupation codes of one vintage -> occ1990dd (Autor & Dorn 2013 crosswalks, package data).

A raw code is read as an integer: ``"0010"``, ``"10"`` and ``"10.0"`` (a float written by
a CSV export) are the same code. 2000 and 2005 codes have three digits (001-992), and are also
written in a four-digit form (code x 10: ``0430`` for 043). A file of those vintages is read in
the form under which more of its person-years have a crosswalk row (:func:`code_scale`); where
both read alike (every code a multiple of ten that has a row either way), a code written
zero-padded to four digits (``0430``) marks the four-digit form, and otherwise the three digits
of the Census's own lists are taken.

A person-year cannot be mapped when its code has no row in the crosswalk, is negative (the
surveys' missing-value codes: refused, don't know, skip...), maps to a non-occupation (905
military, 991 no occupation, 999 unclassified) or to a code absent from the titles table.
By default that stops the build with one line naming the file, row, column and code; with
``unmapped="drop"`` such person-years are dropped and counted by reason.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
import pandas as pd

from data_pipeline.errors import PanelError
from data_pipeline.titles import TitleTable, resource

VINTAGES = ("occ1980", "occ1990", "occ2000", "occ2005", "occ2010")
THREE_DIGIT_X10 = ("occ2000", "occ2005")  # vintages also written as four-digit codes (x 10)
NON_OCCUPATION = {"905": "military", "991": "no occupation", "999": "unclassified"}
UNMAPPED = ("error", "drop")
_INTEGER = re.compile(r"[+]?0*(\d+)(?:\.0*)?")
_NEGATIVE = re.compile(r"-\d+(?:\.0*)?")


@dataclasses.dataclass(frozen=True)
class Crosswalk:
  """``mapping``: source code (integer as text, no leading zeros) -> occ1990dd code."""
  name: str
  mapping: dict[str, str]

  def __len__(self):
    return len(self.mapping)


@functools.cache
def load(vintage: str) -> Crosswalk:
  """The packaged crosswalk ``occ1980`` ... ``occ2010`` -> occ1990dd."""
  if vintage not in VINTAGES:
    raise ValueError(f"unknown crosswalk {vintage!r}; one of {', '.join(VINTAGES)}")
  with resource("occ1990dd", "crosswalks", f"{vintage}_occ1990dd.csv").open("r", encoding="utf-8") as f:
    df = pd.read_csv(f, dtype=str)
  return Crosswalk(vintage, dict(zip(df["source_code"].map(normalize), df["occ1990dd"].str.strip())))


def normalize(code) -> str:
  """``" 0010 "`` -> ``"10"``, ``"313.0"`` -> ``"313"``; anything not an integer comes back stripped."""
  s = str(code).strip()
  m = _INTEGER.fullmatch(s)
  return str(int(m[1])) if m else s


def code_scale(occupation: pd.Series, crosswalk: Crosswalk | None) -> int:
  """10 when a 2000/2005 file holds the four-digit form (code x 10), else 1: the reading under which more of its
  person-years have a crosswalk row (a stray missing-value code such as 9999 counts for neither); on a tie, 10 if
  a code is written zero-padded to four digits (``0430``), else 1 (the Census's three digits)."""
  if crosswalk is None or crosswalk.name not in THREE_DIGIT_X10:
    return 1
  raw = occupation[occupation.notna()].astype(str).str.strip()
  keys = raw.map(normalize)
  codes = keys[keys.str.fullmatch(r"\d+")].astype(int)
  as_three = int(codes.map(lambda c: str(c) in crosswalk.mapping).sum())
  as_four = int(codes.map(lambda c: c % 10 == 0 and str(c // 10) in crosswalk.mapping).sum())
  if as_three != as_four:
    return 10 if as_four > as_three else 1
  return 10 if raw.str.fullmatch(r"[+]?0\d{3}(?:\.0*)?").any() else 1


def map_codes(occupation: pd.Series, crosswalk: Crosswalk | None, titles: TitleTable,
              unmapped: str = "error", where=None, file="panel", scale: int = 1) -> tuple[pd.Series, pd.Series]:
  """Maps raw codes to codes of ``titles``; returns (mapped codes, drop reason or None per row).

  Missing values pass through (validation reports them). Without a crosswalk, codes are
  only checked against the table; with one, integer codes are divided by ``scale`` first
  (:func:`code_scale`). ``where(i, "occupation") -> (row, column)`` gives the file position
  of row ``i`` for errors (default: row ``i + 1``, column ``occupation``).
  """
  if unmapped not in UNMAPPED:
    raise ValueError(f"unmapped must be one of {UNMAPPED}, got {unmapped!r}")
  raw = occupation.to_numpy(dtype=object)
  present = pd.notna(occupation).to_numpy() & (occupation.astype(str).str.strip() != "").to_numpy()
  codes = occupation.astype(str).str.strip().to_numpy(dtype=object)
  known = set(titles.codes)
  table = {c: _map_one(c, crosswalk, known, titles.source, scale) for c in pd.unique(codes[present])}
  mapped, reason = raw.copy(), np.full(len(raw), None, dtype=object)
  for i in np.flatnonzero(present):
    mapped[i], reason[i], _ = table[codes[i]]
  bad = np.flatnonzero(pd.notna(reason))
  if len(bad) and unmapped == "error":
    i = int(bad[0])
    row, column = where(i, "occupation") if where else (i + 1, "occupation")
    raise PanelError(file, f"{table[codes[i]][2]}; --unmapped drop drops such person-years", row=row,
                     column=column, value=raw[i], has_value=True)
  return (pd.Series(mapped, index=occupation.index, name=occupation.name),
          pd.Series(reason, index=occupation.index, name="reason"))


def _map_one(code: str, crosswalk: Crosswalk | None, known: set, source: str, scale: int = 1):
  """(target, drop reason, error text) for one raw code; reason and text are None when it maps."""
  if crosswalk is None:
    if code in known:
      return code, None, None
    return None, "not in titles", f"occupation code not in the titles table {source}"
  name = crosswalk.name
  if _NEGATIVE.fullmatch(code):
    return None, "missing-value code", f"negative {name} code (a survey missing-value code) has no occ1990dd title"
  key = normalize(code)
  if scale > 1 and key.isdigit():  # the four-digit form: code x 10 (4725 is no code of it)
    key = str(int(key) // scale) if int(key) % scale == 0 else None
  target = crosswalk.mapping.get(key)
  if target is None:
    form = f" in the four-digit form (code x {scale}) this file is read in" if scale > 1 else ""
    return None, "no mapping", f"{name} code has no occ1990dd mapping{form}"
  if target in NON_OCCUPATION:
    what = f"{NON_OCCUPATION[target]} ({target})"
    return None, what, f"{name} code maps to {target} ({NON_OCCUPATION[target]}), not an occupation"
  if target not in known:
    return None, "not in titles", f"{name} code maps to {target}, which is not in the titles table {source}"
  return target, None, None
