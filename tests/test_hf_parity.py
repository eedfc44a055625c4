"""labor_jax's Llama port against PyTorch transformers on random tiny checkpoints."""

import json

import jax
import numpy as np
import pytest

from labor_jax import model
from labor_jax.interop import hf
from tests import numerics
from tests.hf_fixtures import VARIANTS, hf_logits, make_hf_model, padded_batch


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, torch, tmp_path_factory):
  m = make_hf_model(torch, request.param)
  d = tmp_path_factory.mktemp(request.param)
  m.save_pretrained(d)
  return request.param, m, d


def test_logits_match_hf_on_padded_batch(checkpoint, torch):
  _, m, d = checkpoint
  config, params = hf.load(d)
  tokens, mask, positions = padded_batch(config.vocab_size)
  ref = hf_logits(torch, m, tokens, mask, positions)
  ours = np.asarray(model.forward(config, params, tokens, mask_BT=mask))  # default positions
  real = mask.astype(bool)
  # PyTorch and XLA take the same float32 sums in their own orders: the bound of one forward pass.
  numerics.assert_close(ours[real], ref[real], **numerics.forward_terms(config, tokens=tokens.shape[1]),
                        what="logits against transformers")
  assert np.isfinite(ours).all()  # padding rows stay finite


def test_export_reload_in_pytorch_gives_identical_logits(checkpoint, torch, tmp_path):
  import transformers
  _, m, d = checkpoint
  config, params = hf.load(d)
  out = hf.save(config, params, tmp_path / "export")
  m2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens, mask, positions = padded_batch(config.vocab_size, seed=1)
  np.testing.assert_array_equal(hf_logits(torch, m2, tokens, mask, positions),
                                hf_logits(torch, m, tokens, mask, positions))


def test_import_export_import_is_bitwise(checkpoint, tmp_path):
  _, _, d = checkpoint
  config, params = hf.load(d)
  hf.save(config, params, tmp_path / "a", max_shard_size="40KB")
  assert (tmp_path / "a" / hf.SAFETENSORS_INDEX).exists()  # sharded above the limit
  config2, params2 = hf.load(tmp_path / "a")
  assert config2 == config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_export_copies_tokenizer_and_writes_generation_config(tmp_path):
  from labor_jax.config import llama_tiny
  config = llama_tiny()
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text("{}")
  out = hf.save(config, model.init_params(config, jax.random.key(0)), tmp_path / "m", tokenizer_dir=tok)
  assert (out / "tokenizer.json").read_text() == "{}"
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen["eos_token_id"] == config.eos_token_id
