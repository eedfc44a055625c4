"""Every validation error names the file, the row and the field, in one line."""

import re

import pandas as pd
import pytest

from data_pipeline import build
from data_pipeline import panel as panel_lib
from data_pipeline.errors import PanelError
from data_pipeline.panel import read_panel, summary, transitions
from data_pipeline.titles import load_titles, nlsy_groups

GOOD = """person_id,year,occupation,education,sex,birth_year
7,1980,3,high school diploma,female,1962
7,1981,3,high school diploma,female,1962
7,1983,5,some college,female,1962
9,1980,1,bachelor's degree,male,
"""


def _write(tmp_path, text, name="panel.csv"):
  p = tmp_path / name
  p.write_text(text)
  return p


def _error(tmp_path, text, titles=None):
  with pytest.raises(PanelError) as e:
    read_panel(_write(tmp_path, text), titles)
  msg = str(e.value)
  assert "\n" not in msg and "panel.csv" in msg
  return msg


def test_good_panel_with_gap(tmp_path):
  panel, titles = read_panel(_write(tmp_path, GOOD), nlsy_groups(), dataset="NLSY97")
  assert list(panel["year"]) == [1980, 1981, 1983, 1980]
  tr = transitions(panel)
  assert list(tr["gap"]) == [0, 1]  # 1981 -> 1983 skips one year; person 9 has no transition
  s = summary(panel)
  assert s["workers"] == 2 and s["transitions"] == 2 and s["stay_rate"] == 0.5 and s["gaps"] == 1
  assert panel["birth_year"].isna().sum() == 1 and panel["dataset"].unique().tolist() == ["NLSY97"]


def test_parquet_reads_like_csv(tmp_path):
  csv_panel, _ = read_panel(_write(tmp_path, GOOD), nlsy_groups())
  pq = tmp_path / "panel.parquet"
  pd.read_csv(tmp_path / "panel.csv").to_parquet(pq)
  pq_panel, _ = read_panel(pq, nlsy_groups(), dataset="panel")
  pd.testing.assert_frame_equal(csv_panel, pq_panel)


def test_parquet_whole_number_floats_read_as_integers(tmp_path):
  """Integer columns that a Parquet export wrote as doubles (person ids, years) read as their CSV export does ("7",
  not "7.0"): a worker whose early rounds are a CSV file and late ones a Parquet file stays one worker."""
  csv_panel, _ = read_panel(_write(tmp_path, GOOD), nlsy_groups())
  pq = tmp_path / "floats.parquet"
  pd.read_csv(tmp_path / "panel.csv").astype({"person_id": float, "year": float}).to_parquet(pq)
  pq_panel, _ = read_panel(pq, nlsy_groups(), dataset="panel")
  pd.testing.assert_frame_equal(csv_panel, pq_panel)
  assert list(pq_panel["person_id"]) == ["7", "7", "7", "9"]


def test_missing_required_column(tmp_path):
  msg = _error(tmp_path, "person_id,occupation\n1,2\n")
  assert "missing required column 'year'" in msg


def test_non_integer_year(tmp_path):
  msg = _error(tmp_path, GOOD.replace("7,1981", "7,198x"))
  assert "row 2" in msg and "column 'year'" in msg and "not an integer" in msg and "'198x'" in msg


def test_fractional_year(tmp_path):
  msg = _error(tmp_path, GOOD.replace("7,1981", "7,1981.5"))
  assert "row 2" in msg and "column 'year'" in msg


def test_year_out_of_range(tmp_path):
  msg = _error(tmp_path, GOOD.replace("9,1980", "9,3010"))
  assert "row 4" in msg and "column 'year'" in msg and "out of range" in msg and "'3010'" in msg


def test_duplicate_person_year(tmp_path):
  msg = _error(tmp_path, GOOD + "7,1981,4,,,\n")
  assert "row 5" in msg and "duplicate person-year" in msg and "person '7'" in msg and "1981" in msg


def test_unknown_occupation_code(tmp_path):
  msg = _error(tmp_path, GOOD.replace("7,1983,5", "7,1983,55"), nlsy_groups())
  assert "row 3" in msg and "column 'occupation'" in msg and "'55'" in msg and "titles table" in msg


def test_empty_file(tmp_path):
  assert "empty file" in _error(tmp_path, "")
  assert "empty file" in _error(tmp_path, "person_id,year,occupation\n")


def test_wrong_type_birth_year(tmp_path):
  msg = _error(tmp_path, GOOD.replace("female,1962\n7,1983", "female,nineteen\n7,1983"))
  assert "row 2" in msg and "column 'birth_year'" in msg and "'nineteen'" in msg


def test_missing_person_id(tmp_path):
  msg = _error(tmp_path, GOOD.replace("9,1980", ",1980"))
  assert "row 4" in msg and "column 'person_id'" in msg


def test_titles_table_errors(tmp_path):
  with pytest.raises(PanelError, match=r"titles.csv, row 2, column 'code': duplicate code"):
    load_titles(_write(tmp_path, "code,title\n1,A\n1,B\n", "titles.csv"))
  with pytest.raises(PanelError, match=r"titles.csv, row 2, column 'code': duplicate code"):
    load_titles(_write(tmp_path, "code,title\n1,A\n 1 ,B\n", "titles.csv"))  # the same code once stripped
  with pytest.raises(PanelError, match="missing required column 'title'"):
    load_titles(_write(tmp_path, "code,name\n1,A\n", "titles.csv"))


def test_occupations_as_titles_without_table(tmp_path):
  panel, titles = read_panel(_write(tmp_path, "person_id,year,occupation\n1,2000,Cashiers\n1,2001,Nurses\n"))
  assert titles.titles == ("Cashiers", "Nurses") and list(panel["occupation"]) == ["1", "2"]


def test_cli_failure_writes_nothing(tmp_path, capsys):
  bad = _write(tmp_path, GOOD.replace("7,1981", "7,198x"))
  out = tmp_path / "out"
  assert build.main(["--panel", str(bad), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "row 2" in err and "column 'year'" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["panel.csv"]


def test_a_history_entry_may_name_its_worker(tmp_path):
  """A JSON history whose entries carry person_id reads as one worker when they name the document's worker, and
  stops in one line when they name another (it crashed with a TypeError before)."""
  import json

  from data_pipeline.history import load_history
  doc = {"person_id": "w1", "sex": "female", "history": [
      {"person_id": "w1", "year": 1990, "occupation": "1"}, {"year": 1991, "occupation": "3"}]}
  f = tmp_path / "h.json"
  f.write_text(json.dumps(doc))
  panel, next_year, _ = load_history(f, nlsy_groups(), "NLSY79")
  assert list(panel["person_id"]) == ["w1", "w1"] and next_year == 1992
  doc["history"][0]["person_id"] = "w2"
  f.write_text(json.dumps(doc))
  with pytest.raises(PanelError, match="h.json: the history must describe exactly one worker"):
    load_history(f, nlsy_groups(), "NLSY79")


@pytest.mark.parametrize("next_year, said", [("soon", "next_year must be a year"), ([1992], "next_year must be a year"),
                                             (1991, "next_year must come after the history's last year (1991)"),
                                             (1970, "next_year must come after the history's last year (1991)"),
                                             (99999, "next_year must be a year in [1900, 2100], as the history's are")])
def test_a_history_next_year_that_cannot_follow_it_is_refused(tmp_path, next_year, said):
  import json

  from data_pipeline.history import load_history
  f = tmp_path / "h.json"
  f.write_text(json.dumps({"next_year": next_year, "history": [{"year": 1990, "occupation": "1"},
                                                              {"year": 1991, "occupation": "3"}]}))
  with pytest.raises(PanelError, match=r"h.json, column 'next_year': " + re.escape(said)):
    load_history(f, nlsy_groups(), "NLSY79")
  f.write_bytes('{"history": [{"year": 1990, "occupation": "Caf\xe9"}]}'.encode("latin-1"))
  with pytest.raises(PanelError, match="h.json: cannot read JSON"):
    load_history(f, nlsy_groups(), "NLSY79")


def test_a_history_reads_padded_titles_and_json_by_content_and_other_formats_are_named(tmp_path):
  """A padded title was refused as 'not in the titles table', quoting the title; JSON in a file not named .json was
  read as a CSV ('4 fields where the header has 6'); a JSON, Stata or Excel panel was read as CSV ('column ... appears
  47 times in the header'); ``FILE:`` said that ``FILE:`` does not exist."""
  import json

  from data_pipeline.history import load_history
  from data_pipeline.inputs import PanelInput
  groups = nlsy_groups()
  f = tmp_path / "history"  # no suffix
  f.write_text("\ufeff" + json.dumps({"history": [{"year": 1990, "occupation": f"  {groups.titles[0]} "},
                                                   {"year": 1991, "occupation": groups.titles[2]}]}))
  panel, next_year, _ = load_history(f, groups, "NLSY79")
  assert list(panel["occupation"]) == [groups.codes[0], groups.codes[2]] and next_year == 1992
  blank = _write(tmp_path, "person_id,year,occupation\nw,1990,1\nw,1991,\n", "h.csv")  # a missing cell: NaN
  with pytest.raises(PanelError, match="h.csv, row 2, column 'occupation': missing value"):
    load_history(blank, groups, "NLSY79")
  for suffix, kind in ((".json", "JSON"), (".dta", "Stata"), (".xlsx", "Excel")):
    other = _write(tmp_path, GOOD, "panel" + suffix)
    with pytest.raises(PanelError, match=f"panel{re.escape(suffix)}: a {kind} file: tables are read from CSV"):
      panel_lib.read_table(other)
  good = _write(tmp_path, GOOD, "good.csv")
  with pytest.raises(PanelError, match="good.csv:: no dataset name after ':'"):
    PanelInput.parse(f"{good}:")
  assert PanelInput.parse(f"{good}:NLSY79").dataset == "NLSY79"


def test_a_repeated_header_or_a_yearly_column_without_a_year_is_refused(tmp_path):
  """Neither is read with a column quietly lost: pandas would rename a second 'year' to 'year.1', and
  occupation_198x would be a person-level field."""
  from data_pipeline.inputs import PanelInput, read_inputs
  from data_pipeline.titles import occ1990dd
  dup = _write(tmp_path, "person_id,year,occupation,year\n1,1990,4,1991\n", "dup.csv")
  with pytest.raises(PanelError, match=r"dup.csv: column 'year' appears 2 times in the header$"):
    read_inputs([PanelInput(str(dup), "X", None)], occ1990dd())
  fine = _write(tmp_path, "person_id,race_ethnicity,industry_code,occupation_1980\n1,x,y,4\n", "fine.csv")
  assert len(read_inputs([PanelInput(str(fine), "X", None)], occ1990dd())[0]) == 1  # person-level, not yearly
  wide = _write(tmp_path, "person_id,occupation_1980,occupation_198x\n1,4,22\n", "wide.csv")
  with pytest.raises(PanelError, match=r"wide.csv, column 'occupation_198x': a yearly column's year must be four"):
    read_inputs([PanelInput(str(wide), "X", None)], occ1990dd())


def test_a_row_with_fewer_fields_than_the_header_is_refused(tmp_path):
  """A line cut short (a truncated last line, a lost comma) is not read as missing values; what pandas reads as
  written (a blank or white line, a space before a quoted field, unnamed trailing columns, a gzipped file) is
  read as before."""
  import gzip
  msg = _error(tmp_path, GOOD + "4,1990\n")
  assert "row 5" in msg and "2 fields where the header has 6" in msg
  want, _ = read_panel(_write(tmp_path, GOOD), nlsy_groups())
  odd = ("\n"  # a blank line first, a line of spaces, a quoted field after a space, two unnamed trailing columns
         "person_id,year,occupation,education,sex,birth_year,,\n"
         "7,1980,3,high school diploma,female,1962,,\n"
         "7,1981,3,high school diploma,female, \"1962\",,\n"
         "   \n"
         "7,1983,5,some college,female,1962,,\n"
         "9,1980,1,bachelor's degree,male,,,\n")
  got, _ = read_panel(_write(tmp_path, odd, "odd.csv"), nlsy_groups(), dataset="panel")
  pd.testing.assert_frame_equal(got, want)
  packed = tmp_path / "panel.csv.gz"
  packed.write_bytes(gzip.compress(GOOD.encode()))
  pd.testing.assert_frame_equal(read_panel(packed, nlsy_groups(), dataset="panel")[0], want)
