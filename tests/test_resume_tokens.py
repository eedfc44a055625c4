"""Resume text, the prefix property of resume tokens, splits, simulator."""

import json

import pandas as pd
import pytest

from data_pipeline import resume, simulator, splits
from data_pipeline.errors import PanelError
from data_pipeline.resume import END_OF_DATA
from data_pipeline.titles import synthetic_titles
from data_pipeline.tokenizer import ResumeTokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def sim():
  titles = synthetic_titles(40, seed=1)
  panel = simulator.simulate(60, 6, titles, seed=3)
  return panel, titles, resume.render_panel(panel, titles)


@pytest.fixture(scope="module")
def sp_tokenizer(sim, tmp_path_factory):
  _, _, resumes = sim
  model = train_sentencepiece([r.text for r in resumes], tmp_path_factory.mktemp("sp") / "tok", vocab_size=400)
  return ResumeTokenizer.from_sentencepiece(model)


def test_too_small_sentencepiece_vocabulary_is_one_line_naming_the_flag(sim, tmp_path):
  _, _, resumes = sim
  with pytest.raises(PanelError, match=r"^--vocab-size: 20 is smaller than the \d+ characters .* use at least \d+$"):
    train_sentencepiece([r.text for r in resumes], tmp_path / "tok", vocab_size=20)


@pytest.fixture(scope="module")
def bpe_tokenizer(sim, tmp_path_factory):
  """A Llama-3-style byte-level BPE tokenizer.json, trained here."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  _, _, resumes = sim
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([r.text for r in resumes], trainers.BpeTrainer(
      vocab_size=600, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  d = tmp_path_factory.mktemp("bpe")
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                       "eos_token": "<|end_of_text|>"}))
  return ResumeTokenizer.from_dir(d)


@pytest.fixture(scope="module")
def llama3_tokenizer(sim, tmp_path_factory):
  """A byte-level BPE with Llama-3's pre-tokenizer (digits in groups of 3, punctuation glued to the
  newlines after it) that learned "\\n\\n", so a newline sentinel would merge with a newline segment."""
  import tokenizers
  from data_pipeline.gguf_tokenizer import _LLAMA3_SPLIT
  from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
  _, _, resumes = sim
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  texts = [r.text for r in resumes] + [r.text.replace("\n", "\n\n") for r in resumes]
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=700, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  d = tmp_path_factory.mktemp("llama3")
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                       "eos_token": "<|end_of_text|>"}))
  return ResumeTokenizer.from_dir(d)


def test_sentinel_is_a_newline_unless_the_tokenizer_merges_newlines(sp_tokenizer, bpe_tokenizer, llama3_tokenizer):
  assert sp_tokenizer.sentinel == "\n" and bpe_tokenizer.sentinel == "\n"
  assert len(llama3_tokenizer._raw("\n\n")) == 1  # "\n\n" is one token: "\n" cannot be the sentinel
  assert llama3_tokenizer.sentinel == "a"
  assert llama3_tokenizer.encode_piece("\n") == llama3_tokenizer._raw("\n")


def test_a_normalizing_tokenizer_is_refused_in_one_line(sim, tmp_path):
  import tokenizers
  from tokenizers import models, normalizers, pre_tokenizers
  from data_pipeline.tokenizer import TokenizerError
  tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(TokenizerError, match=r"tokenizer.json: no sentinel .* so resume entries would have no token "
                                           r"boundary$"):
    ResumeTokenizer.from_dir(tmp_path)


def test_build_check_refuses_a_tokenizer_that_changes_resume_text(sim, bpe_tokenizer, tmp_path):
  import tokenizers
  from tokenizers import normalizers
  from data_pipeline.tokenizer import TokenizerError
  _, _, resumes = sim
  tok = tokenizers.Tokenizer.from_str(bpe_tokenizer.backend.to_str())
  tok.normalizer = normalizers.Replace("history", "story")  # not in the sentinel probes' text: passes them
  tok.save(str(tmp_path / "tokenizer.json"))
  rt = ResumeTokenizer.from_dir(tmp_path)
  r = resumes[0]
  with pytest.raises(TokenizerError, match=rf"resume {r.person_id} does not decode back to its text \(first "
                                           r"difference at character \d+: 'history.*' came back as 'story.*'\); "
                                           r"this tokenizer cannot give resume entry boundaries$"):
    rt.verify(r, rt.encode_resume(r))


def test_template_example(sim):
  _, titles, resumes = sim
  text = resumes[0].text
  lines = text.split("\n")
  assert lines[0] == "<SIMULATED resume>"
  assert lines[1].startswith("The following information is available about the work history of a")
  assert lines[2].startswith("The worker was born in ")
  assert lines[-1] == END_OF_DATA
  first = resumes[0].entries[0]
  assert f"\n{first.prefix}{first.title}\n" in text and first.title[1:] in titles.titles


def test_missing_fields_are_left_out():
  head = resume.header("PSID", sex=None, race=None, region=None, birth_year=None)
  assert "born" not in head and "residing" not in head and "None" not in head and "nan" not in head
  assert "history of a worker." in head


def test_codes_variant(sim):
  panel, titles, _ = sim
  coded = resume.render_panel(panel, titles, "codes")
  assert coded[0].entries[0].title == " " + coded[0].entries[0].code
  assert not any(t in coded[0].text for t in titles.titles)


@pytest.mark.parametrize("which", ["sp_tokenizer", "bpe_tokenizer", "llama3_tokenizer"])
def test_prefix_property_and_title_spans(which, request, sim):
  tok = request.getfixturevalue(which)
  _, titles, resumes = sim
  cands = tok.candidate_tokens(resume.candidate_texts(titles))
  index = titles.index
  nl = tok.encode_piece("\n")
  for r in resumes[:20]:
    tr = tok.encode_resume(r)
    full = list(tr.ids)
    start = 0 if tok.bos_id is None else 1
    assert tok.decode(full[start:len(full) - (tok.eos_id is not None)]) == r.text
    for t, e in enumerate(r.entries):
      # Tokens of the text up to entry t's prefix are a prefix of the whole resume's tokens.
      partial = resume.Resume(r.dataset, r.person_id, r.header, r.entries[:t + 1])
      prefix_ids = list(tok.encode_resume(partial).ids)[:tr.title_spans[t][0]]
      assert prefix_ids == full[:tr.title_spans[t][0]]
      assert tok.decode(prefix_ids[start:]) == r.text[:r.text.index(e.prefix + e.title) + len(e.prefix)]
      # The title span is exactly the candidate's tokens, followed by the terminator.
      s, f = tr.title_spans[t]
      cand = cands[index[e.code]]
      assert full[s:f] + nl == cand == full[s:f + len(nl)]
      # entry t starts at its leading newline: the newline and the entry's prefix lie between it and the title
      assert full[tr.entry_starts[t]:s] == nl + tok.encode_piece(e.prefix)
    # the last start is the end marker's newline, right after the last title
    assert tr.entry_starts[-1] == tr.title_spans[-1][1] and full[tr.entry_starts[-1]:][:len(nl)] == nl


def test_bytelevel_segments_equal_whole_text_tokens(bpe_tokenizer, sim):
  _, _, resumes = sim
  tr = bpe_tokenizer.encode_resume(resumes[0])
  assert list(tr.ids[1:-1]) == bpe_tokenizer._raw(resumes[0].text)


def test_splits_deterministic_and_order_free(sim):
  panel, _, _ = sim
  a = splits.assign(panel, seed=5)
  shuffled = panel.sample(frac=1.0, random_state=0)
  b = splits.assign(shuffled, seed=5).reindex(panel.index)
  pd.testing.assert_series_equal(a, b)
  assert (a.groupby([panel["dataset"], panel["person_id"]]).nunique() == 1).all()
  assert not a.equals(splits.assign(panel, seed=6))
  big = simulator.simulate(3000, 1, synthetic_titles(10), seed=0)
  frac = splits.assign(big, seed=0).value_counts(normalize=True)
  assert abs(frac["train"] - 0.7) < 0.03 and abs(frac["test"] - 0.2) < 0.03


def test_simulator_is_seeded_and_sticky():
  titles = synthetic_titles(30)
  a = simulator.simulate(200, 10, titles, seed=1, stay=0.8)
  b = simulator.simulate(200, 10, titles, seed=1, stay=0.8)
  pd.testing.assert_frame_equal(a, b)
  from data_pipeline.panel import summary, validate
  s = summary(validate(a, "sim", titles)[0])
  assert 0.75 < s["stay_rate"] < 0.87 and s["gaps"] > 0
