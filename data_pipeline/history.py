"""One worker's history file, the input of prediction and forecasts: JSON, or a CSV in the panel
format (one row per year, for one person)::

  {"dataset": "NLSY79", "sex": "male", "race": "black", "region": "the south", "birth_year": 1960,
   "history": [{"year": 1980, "education": "high school diploma", "occupation": "Service workers"},
               {"year": 1981, "education": "high school diploma", "occupation": "6"}],
   "next_year": 1982, "next_education": "some college"}

``occupation`` is a code or a title of the run's titles table. Everything but ``history``
is optional; the next entry defaults to the year after the last one, with the last
education. Problems stop with one line naming file, row, column and value (:class:`PanelError`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data_pipeline.errors import PanelError
from data_pipeline.panel import YEAR_RANGE, read_table, validate
from data_pipeline.titles import TitleTable


def load_history(path: str | Path, titles: TitleTable, dataset: str) -> tuple[pd.DataFrame, int, str | None]:
  """(panel rows, next year, next education) from a JSON or CSV history file; ``dataset`` names
  the survey when the file does not."""
  path = Path(path)
  by_title = dict(zip(titles.titles, titles.codes))
  if path.suffix.lower() == ".json" or _looks_like_json(path):
    try:
      doc = json.loads(path.read_text(encoding="utf-8-sig"))  # with or without a BOM (Windows editors write one)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise PanelError(path, f"cannot read JSON ({e})") from None
    if not isinstance(doc, dict) or not doc.get("history"):
      raise PanelError(path, "expected an object with a non-empty 'history' list")
    rows = []
    for i, h in enumerate(doc["history"], start=1):
      if not isinstance(h, dict):
        raise PanelError(path, "each history entry must be an object", row=i)
      row = {k: doc.get(k) for k in ("dataset", "sex", "race", "ethnicity", "region", "birth_year")}
      row["person_id"] = doc.get("person_id", "worker")
      row.update(h)  # an entry's own person_id wins; a second worker is refused below
      rows.append(row)
    raw = pd.DataFrame(rows).astype(object)
    raw = raw.where(raw.notna(), None).map(lambda v: None if v is None else str(v))
    next_year, next_edu = doc.get("next_year"), doc.get("next_education")
  else:
    raw, next_year, next_edu = read_table(path), None, None
  if "occupation" in raw.columns:
    raw["occupation"] = raw["occupation"].map(lambda v: by_title.get(v.strip(), v) if isinstance(v, str) else v)
  panel, _ = validate(raw, path, titles, dataset=dataset)
  if panel[["dataset", "person_id"]].drop_duplicates().shape[0] != 1:
    raise PanelError(path, "the history must describe exactly one worker")
  last = panel.iloc[-1]
  if next_year is None:
    next_year = int(last["year"]) + 1
  else:
    if isinstance(next_year, float) and next_year.is_integer():
      next_year = int(next_year)
    if isinstance(next_year, bool) or not isinstance(next_year, (int, str)) or not str(next_year).strip().isdigit():
      raise PanelError(path, "next_year must be a year (an integer)", column="next_year", value=next_year,
                       has_value=True)
    next_year = int(next_year)
    if not YEAR_RANGE[0] <= next_year <= YEAR_RANGE[1]:
      raise PanelError(path, f"next_year must be a year in [{YEAR_RANGE[0]}, {YEAR_RANGE[1]}], as the history's are",
                       column="next_year", value=next_year, has_value=True)
    if next_year <= int(last["year"]):
      raise PanelError(path, f"next_year must come after the history's last year ({int(last['year'])})",
                       column="next_year", value=next_year, has_value=True)
  if next_edu is None and "education" in panel.columns:
    next_edu = last["education"]
  return panel, next_year, next_edu


def _looks_like_json(path: Path) -> bool:
  """Whether a file not named ``.json`` holds JSON all the same (its first character, after a BOM and blanks, opens
  an object or a list), so that it is read as the JSON it is rather than as a CSV of odd fields."""
  try:
    with open(path, "rb") as f:
      head = f.read(4096)
  except OSError:
    return False
  return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"[")
