"""occ1990dd built in: the packaged titles and Census crosswalks, and building through a crosswalk."""

import json

import pandas as pd
import pytest

from data_pipeline import build, crosswalk
from data_pipeline.errors import PanelError
from data_pipeline.inputs import PanelInput, read_inputs
from data_pipeline.titles import load_titles, occ1990dd

ROWS = {"occ1980": 504, "occ1990": 502, "occ2000": 471, "occ2005": 471, "occ2010": 489}

# occ2010 codes as a PSID extract writes them: leading zeros, floats from a CSV export, gaps.
P2010 = """person_id,year,occupation,education,sex
1,2012,0010,high school diploma,female
1,2013,10.0,high school diploma,female
1,2015,4700,some college,female
2,2012,2310,,male
2,2013,2310,,male
"""
# Row 2: 9920 maps to 991 (no occupation); row 3: 9999 has no mapping; row 4: NLSY-style missing code.
BAD = """person_id,year,occupation
1,2012,0010
1,2013,9920
1,2014,9999
2,2012,-4
2,2013,0
2,2014,2310
"""


def _write(tmp_path, text, name="panel.csv"):
  p = tmp_path / name
  p.write_text(text)
  return p


def test_titles_load_with_spelling_fixed():
  t = load_titles("occ1990dd")
  assert t is occ1990dd() and len(t) == 330 and t.codes[:3] == ("4", "7", "8") and t.codes[-1] == "889"
  assert t.title("873") == "Production helpers" and t.title("69") == "Physicists and astronomers"
  text = " ".join(t.titles)
  for typo in ("astronomists", "Surveryors", "exluding", "Miscellanious", "equipement", "carpeters", "Furnance",
               "machne", "applicance"):
    assert typo not in text
  assert "Autor & Dorn" in t.source


@pytest.mark.parametrize("vintage", crosswalk.VINTAGES)
def test_each_crosswalk_loads(vintage):
  cw = crosswalk.load(vintage)
  assert len(cw) == ROWS[vintage]
  targets = set(cw.mapping.values())
  codes = set(occ1990dd().codes)
  assert targets <= codes | set(crosswalk.NON_OCCUPATION)  # occ1990's 873 -> 874 swap is fixed
  assert len(targets & codes) >= 325  # each vintage reaches (almost) every occ1990dd code
  assert all(k == crosswalk.normalize(k) for k in cw.mapping)


def test_codes_read_as_integers():
  assert {crosswalk.normalize(c) for c in ("0010", "10", "10.0", " 10 ", "+10")} == {"10"}
  assert crosswalk.normalize("0") == "0" and crosswalk.normalize("10.5") == "10.5"
  cw = crosswalk.load("occ2010")
  assert cw.mapping["10"] == "4" and cw.mapping["9920"] == "991" and crosswalk.load("occ1990").mapping["873"] == "873"


def test_panel_with_occ2010_codes_builds(tmp_path, capsys):
  out = tmp_path / "out"
  assert build.main(["--panel", f"{_write(tmp_path, P2010)}:PSID", "--crosswalk", "occ2010", "--out", str(out),
                     "--vocab-size", "400"]) == 0
  info = json.loads((out / "summary.json").read_text())
  assert info["titles"] == 330 and info["titles_source"].startswith("occ1990dd") and info["datasets"] == ["PSID"]
  assert info["person_years"] == 5 and "dropped" not in info
  assert info["inputs"] == [{"file": str(tmp_path / "panel.csv"), "layout": "long", "datasets": ["PSID"],
                             "person_years": 5, "crosswalk": "occ2010"}]
  panel = pd.read_parquet(out / "panel.parquet")
  assert list(panel["occupation"]) == ["4", "4", "243", "156", "156"]
  assert (out / "titles.csv").read_text().count("\n") == 331


def test_each_panel_takes_its_own_crosswalk(tmp_path):
  """A survey's rounds in two vintages, one file each (``--panel early.csv:NLSY79 --crosswalk occ1980 --panel
  late.csv:NLSY79 --crosswalk occ2000``): code 4 is 1980's 004 (occ1990dd 4) in the first file and 2000's 004
  (occ1990dd 13) in the second; given the other way round, the two files' person-years swap titles."""
  early = _write(tmp_path, "person_id,year,occupation\n1,1988,4\n2,1988,5\n", "early.csv")
  late = _write(tmp_path, "person_id,year,occupation\n1,2002,4\n2,2002,6\n", "late.csv")
  def built(first, second, out):
    assert build.main(["--panel", f"{early}:NLSY79", "--crosswalk", first, "--panel", f"{late}:NLSY79",
                       "--crosswalk", second, "--out", str(out), "--vocab-size", "400"]) == 0
    panel = pd.read_parquet(out / "panel.parquet")
    return {(r.person_id, r.year): r.occupation for r in panel.itertuples()}
  assert built("occ1980", "occ2000", tmp_path / "a") == {("1", 1988): "4", ("2", 1988): "22", ("1", 2002): "13",
                                                          ("2", 2002): "13"}
  assert built("occ2000", "occ1980", tmp_path / "b") == {("1", 1988): "13", ("2", 1988): "13", ("1", 2002): "4",
                                                          ("2", 2002): "418"}


def test_unmapped_code_fails_naming_the_row(tmp_path, capsys):
  out = tmp_path / "out"
  bad = _write(tmp_path, BAD)
  assert build.main(["--panel", str(bad), "--crosswalk", "occ2010", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "panel.csv, row 2, column 'occupation'" in err and "'9920'" in err
  assert "991 (no occupation)" in err and "--unmapped drop" in err and not out.exists()
  with pytest.raises(PanelError, match=r"row 3, column 'occupation': occ2010 code has no occ1990dd mapping"):
    read_inputs([PanelInput(str(_write(tmp_path, BAD.replace("9920", "10"))), crosswalk="occ2010")], occ1990dd())
  with pytest.raises(PanelError, match=r"row 4, column 'occupation': negative occ2010 code"):
    read_inputs([PanelInput(str(_write(tmp_path, BAD.replace("9920", "10").replace("9999", "10"))),
                            crosswalk="occ2010")], occ1990dd())


def test_unmapped_drop_counts(tmp_path, capsys):
  panel, _, reports = read_inputs([PanelInput(str(_write(tmp_path, BAD)), "PSID", "occ2010")], occ1990dd(),
                                  unmapped="drop")
  assert list(panel["year"]) == [2012, 2014] and list(panel["occupation"]) == ["4", "156"]
  assert reports[0]["dropped"] == {"missing-value code": 1, "no mapping": 1, "no occupation (991)": 1,
                                   "unclassified (999)": 1}
  assert reports[0]["dropped_codes"] == {"9920": 1, "9999": 1, "-4": 1, "0": 1}
  # Through the CLI: the counts reach summary.json and the printed summary.
  out = tmp_path / "out"
  assert build.main(["--panel", str(tmp_path / "panel.csv"), "--crosswalk", "occ2010", "--unmapped", "drop",
                     "--out", str(out), "--vocab-size", "400"]) == 0
  info = json.loads((out / "summary.json").read_text())
  assert info["dropped"] == reports[0]["dropped"] and info["person_years"] == 2
  assert "dropped:       4 person-years with no title" in capsys.readouterr().out


def test_flag_errors(tmp_path):
  with pytest.raises(SystemExit):
    build.main(["--crosswalk", "occ2010"])  # needs --panel
  with pytest.raises(SystemExit):
    build.main(["--panel", "a.csv", "--panel", "b.csv", "--crosswalk", "occ2010", "--crosswalk", "occ2000",
                "--crosswalk", "occ1980"])  # once, or once per panel
  with pytest.raises(SystemExit):
    build.main(["--panel", "a.csv", "--unmapped", "drop"])  # nothing to map to


def test_package_data_covers_the_resources():
  """A non-editable install ships every resource file: setup.py's package_data globs match them all."""
  import ast
  from pathlib import Path

  root = Path(__file__).resolve().parents[1]
  setup = ast.parse((root / "setup.py").read_text())
  kw = next(k for n in ast.walk(setup) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "package_data")
  pkg = root / "data_pipeline"
  shipped = {f for pattern in ast.literal_eval(kw.value)["data_pipeline"] for f in pkg.glob(pattern)}
  files = {f for f in (pkg / "resources").rglob("*") if f.is_file()}
  assert len(files) == 7 and files <= shipped


def test_four_digit_2000_codes_are_divided_by_ten(tmp_path):
  four = _write(tmp_path, "person_id,year,occupation\n1,2002,0010\n1,2003,4720\n1,2004,5700\n")
  panel, _, [report] = read_inputs([PanelInput(str(four), "NLSY97", "occ2000")], occ1990dd())
  assert list(panel["occupation"]) == ["4", "276", "313"] and report["codes_divided_by"] == 10
  three = _write(tmp_path, "person_id,year,occupation\n1,2002,001\n1,2003,472\n1,2004,10\n", "three.csv")
  panel, _, [report] = read_inputs([PanelInput(str(three), "PSID", "occ2000")], occ1990dd())
  assert list(panel["occupation"]) == ["4", "276", "22"] and "codes_divided_by" not in report


def _read(tmp_path, occupations, unmapped="error"):
  rows = "".join(f"1,{2000 + i},{c}\n" for i, c in enumerate(occupations))
  f = _write(tmp_path, "person_id,year,occupation\n" + rows, f"p{len(list(tmp_path.iterdir()))}.csv")
  panel, _, [report] = read_inputs([PanelInput(str(f), "NLSY97", "occ2000")], occ1990dd(), unmapped=unmapped)
  return list(panel["occupation"]), report.get("codes_divided_by", 1)


def test_the_four_digit_form_is_the_reading_under_which_more_codes_map(tmp_path):
  """Managers only (every code a multiple of ten below 1000, a row either way): zero-padded to four digits they are
  the four-digit form (0430 is 043, managers n.e.c., not 430); a stray 9999 dropped does not flip the reading; a
  code that is no multiple of ten has no row in the four-digit form; written without padding, three digits."""
  three = ["4", "22", "23", "22"]  # 001, 043, 080, 022 read as three digits
  assert _read(tmp_path, ["001", "043", "080", "022"]) == (three, 1)
  assert _read(tmp_path, ["0010", "0430", "0800", "0220"]) == (three, 10)
  assert _read(tmp_path, ["0010", "0430", "0800", "0220", "9999"], unmapped="drop") == (three, 10)
  assert _read(tmp_path, ["10", "430", "800", "220"]) == (["22", "459", "709", "154"], 1)
  with pytest.raises(PanelError, match=r"row 5, column 'occupation'.*four-digit form.*'4725'"):
    _read(tmp_path, ["0010", "0430", "0800", "4720", "4725"])


def test_crosswalks_of_2000_and_2005_differ_where_the_census_changed_codes(tmp_path):
  """Codes of one vintage only (003, 040 and 151 in 2000; 134 and 650 in 2005) map through their own crosswalk and
  not through the other's: a file read with the other vintage's table would stop."""
  def read(codes, vintage):
    rows = "".join(f"1,{2000 + i},{c}\n" for i, c in enumerate(codes))
    f = _write(tmp_path, "person_id,year,occupation\n" + rows, f"{vintage}.csv")
    return list(read_inputs([PanelInput(str(f), "PSID", vintage)], occ1990dd())[0]["occupation"])
  assert read(["003", "040", "151"], "occ2000") == ["4", "22", "59"]
  assert read(["134", "650"], "occ2005") == ["59", "597"]
  with pytest.raises(PanelError, match="row 1, column 'occupation'.*no occ1990dd mapping"):
    read(["003"], "occ2005")
  with pytest.raises(PanelError, match="row 1, column 'occupation'.*no occ1990dd mapping"):
    read(["134"], "occ2000")
