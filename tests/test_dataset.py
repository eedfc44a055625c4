"""The embedded NLSY data, the TFDS dataset and the grain loader."""

import json

import numpy as np

from data_pipeline import loader, nlsy
from data_pipeline.dataset_dir import DatasetDir


def test_embedded_panel_is_the_published_one():
  raw = nlsy.load_raw()
  assert len(raw) == 4360 and raw["nr"].nunique() == 545
  assert sorted(raw["year"].unique()) == list(range(1980, 1988))
  assert raw["occupation"].nunique() == 9 and raw["industry"].nunique() == 12


def test_default_build_summary(nlsy_dataset, capsys):
  info = json.loads((nlsy_dataset / "summary.json").read_text())
  assert info["workers"] == 545 and info["person_years"] == 4360 and info["transitions"] == 545 * 7
  assert sum(info["split_workers"].values()) == 545
  assert info["template"] == "labor-llm-v1"
  assert (nlsy_dataset / "tokenizer" / "tokenizer.model").exists()


def test_tfds_examples_carry_tokens_and_spans(nlsy_dataset):
  src = DatasetDir(nlsy_dataset).source("test")
  ex = src[0]
  assert len(ex["years"]) == len(ex["occupations"]) == len(ex["title_spans"]) == 8
  assert ex["title_spans"][0][0] > ex["entry_starts"][0]
  assert ex["text"].decode().endswith("<END OF DATA>")


def _ds(nlsy_dataset, **kw):
  args = dict(seq_len=224, batch_size=4, seed=3)
  args.update(kw)
  return loader.make_dataset(nlsy_dataset, "train", **args)


def test_batches_and_history_loss_mask(nlsy_dataset):
  b = next(iter(_ds(nlsy_dataset, loss_on="history")))
  assert b["inputs"].shape == (4, 224) and b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["inputs"][:, 1:][b["segment_ids"][:, 1:] > 0],
                                b["targets"][:, :-1][b["segment_ids"][:, 1:] > 0])
  full = next(iter(_ds(nlsy_dataset, loss_on="all")))
  assert 0 < b["loss_mask"].sum() < full["loss_mask"].sum() == full["segment_ids"].astype(bool).sum()
  assert b["loss_mask"][:, :40].sum() == 0  # the header carries no loss


def test_history_loss_mask_starts_at_the_first_entrys_newline(nlsy_dataset):
  """loss_on="history": target i (token i + 1) is in the loss exactly from the first entry's leading newline on,
  whole or cut to seq_len; loss_on="all": every target."""
  data = DatasetDir(nlsy_dataset)
  nl = data.tokenizer().encode_piece("\n")
  for rec in (data.source("train")[i] for i in range(3)):
    n, start = len(rec["tokens"]) - 1, int(rec["entry_starts"][0])
    want = (np.arange(n) + 1 >= start).astype(np.int32)
    for seq_len in (n + 10, 120):
      ex = loader.example(rec, seq_len, "history")
      np.testing.assert_array_equal(ex["loss_mask"], want[:seq_len])
      np.testing.assert_array_equal(ex["targets"], rec["tokens"][1:seq_len + 1])
      np.testing.assert_array_equal(loader.example(rec, seq_len, "all")["loss_mask"], np.ones(min(n, seq_len)))
    first = int(np.argmax(want))
    assert list(rec["tokens"][first + 1:first + 1 + len(nl)]) == nl  # the first target in the loss opens entry 0


def test_the_train_splits_workers_are_the_panels_train_workers(nlsy_dataset):
  """Each TFDS split holds exactly the workers that panel.parquet (read by the baselines) puts in that split."""
  data = DatasetDir(nlsy_dataset)
  panel = data.panel().drop_duplicates(["dataset", "person_id"])
  for split in ("train", "validation", "test"):
    src = data.source(split)
    got = sorted((src[i]["dataset"].decode(), src[i]["person_id"].decode()) for i in range(len(src)))
    want = sorted(map(tuple, panel.loc[panel["split"] == split, ["dataset", "person_id"]].to_numpy().tolist()))
    assert got == want, split


def test_shuffle_is_seeded(nlsy_dataset):
  a = next(iter(_ds(nlsy_dataset, seed=1)))["inputs"]
  np.testing.assert_array_equal(a, next(iter(_ds(nlsy_dataset, seed=1)))["inputs"])
  assert not np.array_equal(a, next(iter(_ds(nlsy_dataset, seed=2)))["inputs"])


def test_process_shards_are_disjoint_and_complete(nlsy_dataset):
  from collections import Counter

  def rows(**kw):  # every row of one epoch, as a multiset (a few workers share identical resumes)
    return Counter(tuple(r) for b in _ds(nlsy_dataset, num_epochs=1, batch_size=1, **kw) for r in b["inputs"])
  one = rows()
  p0, p1 = rows(process_index=0, process_count=2), rows(process_index=1, process_count=2)
  assert sum(one.values()) == 375 and sum(p0.values()) == 188 and sum(p1.values()) == 187
  assert p0 + p1 == one


def test_iterator_state_restores_the_data_order(nlsy_dataset):
  for pack in (False, True):
    it = iter(_ds(nlsy_dataset, pack=pack, seq_len=400))
    for _ in range(3):
      next(it)
    state = it.get_state()
    expect = [next(it) for _ in range(2)]
    it2 = iter(_ds(nlsy_dataset, pack=pack, seq_len=400))
    it2.set_state(state)
    for want in expect:
      got = next(it2)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_packing_puts_several_resumes_in_a_row(nlsy_dataset):
  b = next(iter(_ds(nlsy_dataset, pack=True, seq_len=600)))
  assert b["segment_ids"].max() >= 2
  row = b["positions"][0][b["segment_ids"][0] == 2]
  np.testing.assert_array_equal(row, np.arange(len(row)))


def test_packed_rows_hold_every_resume_once(nlsy_dataset):
  """One packed epoch, cut back into its segments, is the unpacked epoch's rows (inputs, targets, loss mask) as a
  multiset: no resume dropped, duplicated or cut, at two row lengths and both loss modes."""
  from collections import Counter

  def segments(**kw):
    out = Counter()
    for b in _ds(nlsy_dataset, num_epochs=1, batch_size=1, **kw):
      for r in range(len(b["inputs"])):
        for s in set(b["segment_ids"][r].tolist()) - {0}:
          at = b["segment_ids"][r] == s
          assert (b["positions"][r][at] == np.arange(at.sum())).all()
          out[tuple(tuple(b[k][r][at].tolist()) for k in ("inputs", "targets", "loss_mask"))] += 1
    return out
  for seq_len, loss_on in ((224, "history"), (600, "all")):
    plain = segments(seq_len=seq_len, loss_on=loss_on)
    assert sum(plain.values()) == 375
    assert segments(seq_len=seq_len, loss_on=loss_on, pack=True) == plain, (seq_len, loss_on)


def test_prediction_prompt_is_the_training_prefix(nlsy_dataset, tmp_path):
  """The tokens predict builds for a worker's history (a JSON file, as a user writes it) equal the
  training tokens up to the title of the entry being predicted, for every entry of every
  validation worker (entry 0, which has no history to give predict, through Resume.prompt)."""
  import pandas as pd

  from data_pipeline import resume
  from data_pipeline.history import load_history
  from labor_jax.api import prompt_tokens
  data = DatasetDir(nlsy_dataset)
  panel, titles, tok = data.panel(), data.titles(), data.tokenizer()
  people = {k: g.reset_index(drop=True) for k, g in panel.groupby(["dataset", "person_id"], sort=False)}
  src = data.source("validation")
  plain = lambda v: None if pd.isna(v) else v.item() if hasattr(v, "item") else v  # noqa: E731
  # The header states each field once: the worker's first recorded value, as training renders it.
  first = lambda col: plain(col.dropna().iloc[0]) if col.notna().any() else None  # noqa: E731
  checked = 0
  for i in range(len(src)):
    ex = src[i]
    rows = people[(ex["dataset"].decode(), ex["person_id"].decode())]
    for t in range(len(ex["years"])):
      want = ex["tokens"][:ex["title_spans"][t][0]]
      year, edu = int(rows["year"][t]), rows["education"][t]
      if t == 0:
        got = tok.encode_resume(resume.render_person(rows, titles, data.variant).history(0).prompt(year, edu)).ids
      else:
        doc = {k: first(rows[k]) for k in ("dataset", "person_id", "sex", "race", "ethnicity", "region", "birth_year")}
        doc.update(next_year=year, next_education=edu,
                   history=[{"year": int(y), "education": e, "occupation": o}
                            for y, e, o in zip(rows["year"][:t], rows["education"][:t], rows["occupation"][:t])])
        f = tmp_path / "worker.json"
        f.write_text(json.dumps(doc))
        history, next_year, next_edu = load_history(f, titles, "unused")
        got = prompt_tokens(history, tok, next_year, next_edu, titles=titles, variant=data.variant)
      np.testing.assert_array_equal(got, want)
      checked += 1
  assert checked == len(src) * 8 > 0
