"""Pooled panels (one dataset, one tokenizer, per-dataset splits) and the wide layout of extract tools."""

import json

import numpy as np
import pandas as pd
import pytest

from data_pipeline import build
from data_pipeline.dataset_dir import DatasetDir
from data_pipeline.errors import PanelError
from data_pipeline.inputs import PanelInput, read_inputs
from data_pipeline.simulator import simulate
from data_pipeline.titles import occ1990dd

PERSON = ["person_id", "dataset", "sex", "race", "region", "birth_year"]


def _long(seed, dataset, workers=40):
  """A small occ1990dd panel with gaps (every 6th person-year missing) and yearly education."""
  p = simulate(workers, 5, occ1990dd(), seed=seed, start_year=1990 + seed, gap_rate=0.15, dataset=dataset)
  return p.assign(person_id=p["person_id"].str.slice(1))  # ids "0", "1"...: shared by both surveys


def _wide(long):
  """The extract tools' layout of ``long``: a row per person, occupation_<year> and education_<year>."""
  person = long.groupby("person_id", sort=False)[PERSON[1:]].first()
  yearly = long.pivot(index="person_id", columns="year", values=["occupation", "education"])
  yearly.columns = [f"{field}_{year}" for field, year in yearly.columns]
  return person.join(yearly).reset_index()


def _write(tmp_path, df, name):
  p = tmp_path / name
  df.to_csv(p, index=False)
  return str(p)


def _examples(out, dataset=None):
  """(dataset, person) -> split, text, tokens, title spans, years, occupations of every example."""
  d, rows = DatasetDir(out), {}
  for split, n in d.summary["split_workers"].items():
    src = d.source(split) if n else []
    for i in range(len(src)):
      ex = src[i]
      key = (ex["dataset"].decode(), ex["person_id"].decode())
      if dataset in (None, key[0]):
        rows[key] = (split, ex["text"].decode(), ex["tokens"].tolist(), ex["title_spans"].tolist(),
                     ex["years"].tolist(), ex["occupations"].tolist())
  return rows


def _build(*args):
  assert build.main([*map(str, args), "--titles", "occ1990dd", "--vocab-size", "400"]) == 0


def test_wide_file_equals_its_long_twin(tmp_path):
  long = _long(0, "NLSY97")
  wide = _wide(long)
  assert len(wide) == 40 and wide["occupation_1991"].isna().any()  # gaps are empty cells
  lp, wp = _write(tmp_path, long, "long.csv"), _write(tmp_path, wide, "wide.csv")
  want, _, [rep] = read_inputs([PanelInput(lp)], occ1990dd())
  assert rep["layout"] == "long"
  for layout in ("auto", "wide"):
    got, _, [rep] = read_inputs([PanelInput(wp)], occ1990dd(), layout=layout)
    assert rep["layout"] == "wide"
    pd.testing.assert_frame_equal(got, want)
  # The same dataset: build the long twin, then the wide file with the long build's tokenizer.
  _build("--panel", lp, "--out", tmp_path / "long")
  _build("--panel", wp, "--layout", "wide", "--out", tmp_path / "wide", "--tokenizer-dir", tmp_path / "long/tokenizer")
  pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "wide/panel.parquet"),
                                pd.read_parquet(tmp_path / "long/panel.parquet"))
  assert _examples(tmp_path / "wide") == _examples(tmp_path / "long")


def test_wide_errors_name_the_row_and_yearly_column(tmp_path):
  wide = _wide(_long(0, "NLSY97"))
  wide.loc[3, "occupation_1992"] = "9999"
  with pytest.raises(PanelError, match=r"wide.csv, row 4, column 'occupation_1992': occupation code not in the "
                     r"titles table .* \(value '9999'\)"):
    read_inputs([PanelInput(_write(tmp_path, wide, "wide.csv"))], occ1990dd())
  occ2010 = "person_id,sex,occupation_2012,occupation_2013,education_2013\n1,male,0010,,college\n2,female,10,7,\n"
  (tmp_path / "occ2010.csv").write_text(occ2010)
  with pytest.raises(PanelError, match=r"row 2, column 'occupation_2013': occ2010 code has no occ1990dd mapping"):
    read_inputs([PanelInput(str(tmp_path / "occ2010.csv"), "PSID", "occ2010")], occ1990dd())
  wide = _wide(_long(0, "NLSY97"))
  wide = wide.astype({"birth_year": object})
  wide.loc[5, "birth_year"] = "soon"
  with pytest.raises(PanelError, match=r"row 6, column 'birth_year': not an integer"):
    read_inputs([PanelInput(_write(tmp_path, wide, "wide.csv"))], occ1990dd())
  wide = pd.concat([wide, wide.iloc[[2]]], ignore_index=True)
  with pytest.raises(PanelError, match=r"row 41, column 'person_id': duplicate person \(also in row 3\)"):
    read_inputs([PanelInput(_write(tmp_path, wide, "wide.csv"))], occ1990dd())
  with pytest.raises(PanelError, match="wide layout needs yearly occupation columns"):
    read_inputs([PanelInput(_write(tmp_path, _long(0, "X"), "long.csv"))], occ1990dd(), layout="wide")


def test_pooled_build_equals_each_alone(tmp_path, capsys):
  a = _write(tmp_path, _long(1, "NLSY79").drop(columns="dataset"), "nlsy79.csv")
  b = _write(tmp_path, _wide(_long(2, "PSID")).drop(columns="dataset"), "psid_wide.csv")  # pooled as it comes
  pooled = tmp_path / "pooled"
  _build("--panel", f"{a}:NLSY79", "--panel", f"{b}:PSID", "--out", pooled)
  info = json.loads((pooled / "summary.json").read_text())
  assert info["datasets"] == ["NLSY79", "PSID"] and info["workers"] == 80  # ids "0".."39" in both: 80 people
  assert [r["layout"] for r in info["inputs"]] == ["long", "wide"]
  assert set(info["split_workers_by_dataset"]) == {"NLSY79", "PSID"}
  assert "PSID:" in capsys.readouterr().out
  together = _examples(pooled)
  assert len(together) == 80
  tok = pooled / "tokenizer"
  for spec, name in ((f"{a}:NLSY79", "NLSY79"), (f"{b}:PSID", "PSID")):
    alone = tmp_path / name
    _build("--panel", spec, "--out", alone, "--tokenizer-dir", tok)
    assert _examples(alone) == _examples(pooled, name)  # splits, texts, tokens, spans
    assert (json.loads((alone / "summary.json").read_text())["split_workers"]
            == info["split_workers_by_dataset"][name])
    split = pd.read_parquet(pooled / "panel.parquet").query("dataset == @name").reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_parquet(alone / "panel.parquet"), split)
  first_lines = {text.split("\n")[0] for _, text, *_ in together.values()}
  assert first_lines == {"<NLSY79 resume>", "<PSID resume>"}
  assert np.unique([s for s, *_ in together.values()]).tolist() == ["test", "train", "validation"]


def test_pooling_checks(tmp_path):
  a = _write(tmp_path, _long(1, "NLSY79"), "a.csv")
  b = _write(tmp_path, _long(2, "NLSY79"), "b.csv")  # years 1992-1996 overlap a's 1991-1995
  with pytest.raises(PanelError, match=r"b.csv, row (\d+), column 'year': person-year \(dataset 'NLSY79', "
                     r"person '(\d+)', year (\d+)\) is also in .*a.csv \(value '\3'\)") as e:
    read_inputs([PanelInput.parse(a), PanelInput.parse(b)], occ1990dd())
  row, pid, year = e.value.row, *str(e.value).split("person '")[1].split("', year ")
  assert pd.read_csv(b, dtype=str).iloc[row - 1][["person_id", "year"]].tolist() == [pid, year.split(")")[0]]
  with pytest.raises(PanelError, match=r"b.csv, row 1, column 'dataset': dataset differs from the one --panel "
                     r"names \('PSID'\) \(value 'NLSY79'\)"):
    read_inputs([PanelInput.parse(a), PanelInput.parse(f"{b}:PSID")], occ1990dd())
  assert PanelInput.parse(f"{a}:PSID") == PanelInput(a, "PSID") and PanelInput.parse(a) == PanelInput(a)
  # One survey's rounds in two code vintages: two files, one dataset, a crosswalk each.
  early = _write(tmp_path, pd.DataFrame({"person_id": [5, 5], "year": [1990, 1991], "occupation": [4, 313]}), "e.csv")
  late = _write(tmp_path, pd.DataFrame({"person_id": [5, 6], "year": [2002, 2002], "occupation": ["0010", 5700]}),
                "l.csv")
  panel, _, _ = read_inputs([PanelInput(early, "NLSY79", "occ1980"), PanelInput(late, "NLSY79", "occ2000")],
                            occ1990dd())
  assert panel[["person_id", "year", "occupation"]].values.tolist() == [
      ["5", 1990, "4"], ["5", 1991, "313"], ["5", 2002, "4"], ["6", 2002, "313"]]
  # Occupation values as titles: one table over every file.
  t1 = _write(tmp_path, pd.DataFrame({"person_id": [1, 1], "year": [2000, 2001], "occupation": ["Nurses", "Cooks"]}),
              "t1.csv")
  t2 = _write(tmp_path, pd.DataFrame({"person_id": [1], "year": [2000], "occupation": ["Bakers"]}), "t2.csv")
  panel, titles, _ = read_inputs([PanelInput.parse(f"{t1}:A"), PanelInput.parse(f"{t2}:B")], None)
  assert titles.titles == ("Bakers", "Cooks", "Nurses")
  assert [titles.title(c) for c in panel["occupation"]] == ["Nurses", "Cooks", "Bakers"]
