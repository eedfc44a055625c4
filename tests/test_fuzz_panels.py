"""Fuzzed panels (issue #21 item 4): random panel files thrown at ``data_pipeline.build``.

Each panel either builds a dataset whose resumes round-trip (the text re-parsed gives the
input's records, re-rendering the saved panel gives the same text and tokens, the tokens decode
back to the text, title spans and prefixes keep the tokenizer's promises) or stops with exactly
one ``error:`` line (exit 2) naming the file, and the row and column of the defect; the output
directory is then untouched and no temporary sibling is left. The tokenizer promises are also
checked on random titles for a SentencePiece and a byte-level BPE tokenizer trained here.
docs/probes.md lists every probe; the last test keeps that table true.
"""

import contextlib
import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from data_pipeline import build, resume, splits
from data_pipeline.dataset_dir import DatasetDir
from data_pipeline.resume import END_OF_DATA
from data_pipeline.tokenizer import ResumeTokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
# pandas reads these as missing values: not drawn as valid text.
NA_WORDS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
            "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
# Any printable character: letters of every script, marks, symbols, spaces (no control, line or surrogate).
CHARS = st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp", "Co", "Cn"), exclude_characters="\u2581\x85")


def _text(max_size=12):
  return st.text(CHARS, min_size=1, max_size=max_size).filter(lambda s: s.strip() and s.strip() not in NA_WORDS)


DEFECTS = ("missing_column", "bad_year", "huge_year", "negative_year", "nan_year", "empty_occupation",
           "duplicate", "latin1", "line_break", "space_mark")


@st.composite
def panels(draw, defect=None):
  """(rows, columns, file format, ``defect`` (None: a valid panel), the row (from 1) it is on, its column)."""
  n_people = draw(st.integers(1, 5))
  pids = draw(st.lists(_text(6), min_size=n_people, max_size=n_people, unique_by=str.strip))
  titles = draw(st.lists(_text(), min_size=1, max_size=5))
  with_dataset, with_education = draw(st.booleans()), draw(st.booleans())
  rows = []
  for pid in pids:
    if draw(st.integers(0, 9)) == 0:  # a very long history: every allowed year
      years = list(range(1900, 2101))
    else:
      years = draw(st.lists(st.integers(1900, 2100), min_size=1, max_size=6, unique=True))
    dataset = draw(st.sampled_from(["NLSY79", "a/b", "PSID", "Ünïcode 調査"]))
    for y in years:
      row = {"person_id": pid, "year": str(y), "occupation": draw(st.sampled_from(titles))}
      if with_dataset:
        row["dataset"] = dataset
      if with_education:
        row["education"] = draw(st.one_of(st.none(), _text()))
      rows.append(row)
  rows = draw(st.permutations(rows))  # unsorted, as files often are
  rows = [dict(r) for r in rows]
  fmt = draw(st.sampled_from(["utf-8", "utf-8-sig", "parquet"]))
  at, column = None, None
  if defect is not None:
    i = draw(st.integers(0, len(rows) - 1))
    at = i + 1
    r = rows[i]
    if defect == "missing_column":
      column = draw(st.sampled_from(["person_id", "year", "occupation"]))
      for row in rows:
        del row[column]
      at = None
    elif defect in ("bad_year", "huge_year", "negative_year", "nan_year"):
      column = "year"
      r["year"] = {"bad_year": draw(st.sampled_from(["198x", "1980.5", "inf", "nineteen"])),
                   "huge_year": draw(st.sampled_from(["99999999999999999999999", "2101", "1e308"])),
                   "negative_year": str(-draw(st.integers(0, 10 ** 12))), "nan_year": None}[defect]
    elif defect == "empty_occupation":
      column, r["occupation"] = "occupation", draw(st.sampled_from([None, "", "   "]))
    elif defect == "duplicate":
      column = "year"
      rows.insert(draw(st.integers(i + 1, len(rows))), dict(r))
      at = None  # the later copy: found below
    elif defect == "latin1":
      column, fmt = None, "latin-1"
      r["occupation"] = "Café"
    elif defect in ("line_break", "space_mark"):
      column = draw(st.sampled_from(["occupation", "person_id"] + (["education"] if with_education else [])))
      mark = draw(st.sampled_from(["\n", "\r", "\u2028", "\x0b"])) if defect == "line_break" else "\u2581"
      r[column] = (r.get(column) or "x") + mark + "y"
    if defect == "duplicate":
      key = lambda row: (row["person_id"].strip(), row["year"], row.get("dataset"))  # noqa: E731
      seen = set()
      for j, row in enumerate(rows):
        if key(row) in seen:
          at = j + 1
          break
        seen.add(key(row))
  columns = [c for c in ("person_id", "year", "occupation", "dataset", "education") if c in rows[0]]
  return rows, columns, fmt, defect, at, column


def _write(path_stem: Path, rows, columns, fmt) -> Path:
  if fmt == "parquet":
    path = path_stem.with_suffix(".parquet")
    df = pd.DataFrame(rows, columns=columns)
    if "year" in df:  # a typed column, as survey exports have: integers, or floats with NaN
      year = pd.to_numeric(df["year"], errors="coerce")
      if year.notna().all() and (year % 1 == 0).all() and year.abs().max() < 2 ** 62:
        df["year"] = year.astype(np.int64)
      elif df["year"].isna().any() and (year.notna() == df["year"].notna()).all():
        df["year"] = year
    df.to_parquet(path, index=False)
    return path
  path = path_stem.with_suffix(".csv")
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(columns)
  for r in rows:
    w.writerow(["" if r.get(c) is None else r[c] for c in columns])
  if fmt == "latin-1":
    data = buf.getvalue().encode("utf-8").replace("Café".encode("utf-8"), "Café".encode("latin-1"))
  else:
    data = buf.getvalue().encode(fmt)  # utf-8-sig: with a byte order mark
  path.write_bytes(data)
  return path


def _build(argv) -> tuple[int, str]:
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = build.main(argv)
  return code, err.getvalue()


def _entry_line(year, education, title) -> str:
  education = None if education is None or not str(education).strip() else str(education).strip()
  return f"{year} ({education}): {title}" if education else f"{year}: {title}"


def check_round_trip(out: Path, rows, stem: str):
  """The dataset holds exactly the input's people and records, and every resume round-trips."""
  expect: dict[tuple, dict[int, str]] = {}
  for r in rows:
    key = ((r.get("dataset") or stem).strip(), r["person_id"].strip())
    expect.setdefault(key, {})[int(r["year"])] = _entry_line(r["year"], r.get("education"), r["occupation"].strip())
  data = DatasetDir(out).check()
  tok, titles = data.tokenizer(), data.titles()
  rendered = {(x.dataset, x.person_id): x for x in resume.render_panel(data.panel(), titles)}
  # the split a worker's rows carry in panel.parquet (what the baselines and forecasts read)
  saved_split = {(d, p): s for d, p, s in data.panel()[["dataset", "person_id", "split"]].drop_duplicates()
                 .itertuples(index=False)}
  assert len(saved_split) == len(rendered)  # one split a worker
  seen = set()
  for split in ("train", "validation", "test"):
    if not data.summary["split_workers"][split]:
      continue
    src = data.source(split)
    for i in range(len(src)):
      ex = src[i]
      key = (ex["dataset"].decode(), ex["person_id"].decode())
      text, ids = ex["text"].decode(), [int(t) for t in ex["tokens"]]
      assert key not in seen and saved_split[key] == split, (key, split)  # the TFDS split is panel.parquet's
      seen.add(key)
      # Re-parsed: header, one line per record in year order, the end marker.
      lines = text.split("\n")
      start = next(j for j, line in enumerate(lines) if line.startswith("The worker has the following records")) + 1
      assert lines[0] == f"<{key[0]} resume>" and lines[-1] == END_OF_DATA
      assert lines[start:-1] == [expect[key][y] for y in sorted(expect[key])]
      assert list(ex["years"]) == sorted(expect[key])
      assert [titles.titles[o] for o in ex["occupations"]] == [lines[start + j].split(": ", 1)[1]
                                                               for j in range(len(ex["years"]))]
      # Re-rendered from the saved panel: the same text and the same tokens.
      again = rendered[key]
      assert again.text == text and list(tok.encode_resume(again).ids) == ids
      # The tokens decode back to the text; title spans and prefixes keep their promises.
      assert tok.decode(ids[1:-1]) == text
      check_promises(tok, again, ids)
  assert seen == set(expect)


def check_promises(tok: ResumeTokenizer, r: resume.Resume, ids=None):
  """At every entry boundary the prefix's tokens are a prefix of the whole; each title span is the title
  encoded alone."""
  tr = tok.encode_resume(r)
  full = list(tr.ids) if ids is None else ids
  assert list(tr.ids) == full
  for t, e in enumerate(r.entries):
    s, f = (int(v) for v in tr.title_spans[t])
    assert full[s:f] == tok.encode_piece(e.title)
    prompt = list(tok.encode_resume(r.history(t).prompt(e.year, None)).ids)
    if e.prefix == resume.entry_prefix(e.year):
      assert prompt == full[:s]
    assert list(tok.encode_resume(r.history(t + 1)).ids)[:s] == full[:s]


_FUZZ = dict(deadline=None, derandomize=True, database=None,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # big panels by design


def _run(tmp_path_factory, case):
  rows, columns, fmt, defect, *_ = case
  tmp = tmp_path_factory.mktemp("fuzz")
  path = _write(tmp / "panel", rows, columns, fmt)
  out = tmp / "out"
  if defect is not None:  # an older dataset is there: a failed build must leave it as it was
    out.mkdir()
    (out / "summary.json").write_text("{}")
  code, err = _build(["--panel", str(path), "--out", str(out), "--vocab-size", "1000"])
  leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".out.")]
  assert not leftovers, leftovers
  return path, out, code, err


@settings(max_examples=25, **_FUZZ)
@given(panels())
@example(([{"person_id": "1", "year": "1980", "occupation": "Cook"}], ["person_id", "year", "occupation"],
          "utf-8", None, None, None))  # one person-year: crashed entry_table
@example(([{"person_id": "b/c", "year": "1980", "occupation": "Cook", "dataset": "a"},
           {"person_id": "c", "year": "1980", "occupation": "Cook", "dataset": "a/b"}],
          ["person_id", "year", "occupation", "dataset"], "utf-8", None, None, None))  # one TFDS key for two
def test_fuzzed_panel_builds_and_round_trips(tmp_path_factory, case):
  rows, _, fmt, *_ = case
  event(f"format: {fmt}")
  _, out, code, err = _run(tmp_path_factory, case)
  if "none of the" in err:  # a valid panel whose few workers all landed in validation/test
    event("no training worker")
    people = pd.DataFrame([{"dataset": (r.get("dataset") or "panel").strip(), "person_id": r["person_id"].strip()}
                           for r in rows])
    assert "train" not in set(splits.assign(people, 0)), err
    assert code == build.EXIT_INPUT and err.count("\n") == 1 and "--tokenizer-dir" in err and not out.exists()
    return
  assert code == 0, err
  check_round_trip(out, rows, "panel")


@pytest.mark.parametrize("defect", DEFECTS)
def test_fuzzed_defect_stops_with_one_line_and_writes_nothing(tmp_path_factory, defect):
  @settings(max_examples=4, **_FUZZ)
  @given(panels(defect))
  def probe(case):
    _, _, fmt, _, at, column = case
    event(f"format: {fmt}")
    path, out, code, err = _run(tmp_path_factory, case)
    assert code == build.EXIT_INPUT, f"{defect}: exit {code}, stderr {err!r}"
    assert err.count("\n") == 1 and err.startswith(f"error: {path}"), err
    if at is not None:
      assert f"row {at}" in err, err
    if column is not None:
      assert f"'{column}'" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert (out / "summary.json").read_text() == "{}"
  probe()


def test_command_line_stops_a_latin1_panel_with_one_line(tmp_path):
  """``python -m data_pipeline.build`` itself: exit 2, one stderr line naming file, row and the fix; no output."""
  path = tmp_path / "panel.csv"
  path.write_bytes("person_id,year,occupation\n7,1980,Cook\n7,1981,Caf\xe9 owner\n".encode("latin-1"))
  p = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--panel", str(path), "--out",
                      str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2
  assert p.stderr.splitlines() == [f"error: {path}, row 2: not UTF-8 text (byte 0xe9 on line 3); save the file as UTF-8"]
  assert sorted(x.name for x in tmp_path.iterdir()) == ["panel.csv"]


# ----------------------------------------------------------------- tokenizer promises on random titles
def _resumes(titles: list[str]) -> list[resume.Resume]:
  head = resume.header("FUZZ", sex="female")
  out = []
  for k in range(3):
    entries = tuple(resume.Entry(1980 + j, resume.entry_prefix(1980 + j, "some college" if j % 2 else None),
                                 " " + titles[(j + k) % len(titles)], str(j)) for j in range(4))
    out.append(resume.Resume("FUZZ", str(k), head, entries))
  return out


TRAIN_TEXT = [r.text for r in _resumes(["Service workers", "Sales workers", "Cooks", "Machine operators, textiles"])]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  model = train_sentencepiece(TRAIN_TEXT * 20, tmp_path_factory.mktemp("sp") / "tok", vocab_size=400)
  return ResumeTokenizer.from_sentencepiece(model)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
  """A small byte-level BPE tokenizer.json (ByteLevel pre-tokenizer), trained on text with blank lines so
  that it learns a "\\n\\n" merge."""
  import json

  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([t.replace("\n", "\n\n", 1) for t in TRAIN_TEXT] * 20 + ["a\n\nb\n\n\nc"] * 20,
                          trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  d = tmp_path_factory.mktemp("bpe")
  tok.save(str(d / "tokenizer.json"))
  assert "ĊĊ" in tok.get_vocab()  # the "\n\n" merge
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  return ResumeTokenizer.from_dir(d)


_TOKENIZER_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])  # read-only fixture


@_TOKENIZER_SETTINGS
@given(st.lists(_text(16).map(str.strip), min_size=1, max_size=4))
def test_sentencepiece_promises_hold_on_random_titles(sp_tokenizer, titles):
  for r in _resumes(titles):
    check_promises(sp_tokenizer, r)
    assert sp_tokenizer.decode(list(sp_tokenizer.encode_resume(r).ids)[1:-1]) == r.text


@_TOKENIZER_SETTINGS
@given(st.lists(_text(16).map(str.strip), min_size=1, max_size=4))
def test_bytelevel_bpe_promises_hold_on_random_titles(bpe_tokenizer, titles):
  for r in _resumes(titles):
    check_promises(bpe_tokenizer, r)
    ids = list(bpe_tokenizer.encode_resume(r).ids)
    assert bpe_tokenizer.decode(ids[1:-1]) == r.text
    assert ids[1:-1] == bpe_tokenizer._raw(r.text)  # segments encode as the whole text does
