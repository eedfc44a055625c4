"""Bad checkpoints stop with one line naming the tensor; nothing is filled in."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from labor_jax.interop import hf
from labor_jax.config import ConfigError, llama_tiny
from labor_jax.model import init_params


@pytest.fixture()
def ckpt(tmp_path):
  import jax
  config = llama_tiny()
  return hf.save(config, init_params(config, jax.random.key(0)), tmp_path / "ckpt")


def _edit_tensors(d, fn):
  f = d / hf.SAFETENSORS_SINGLE
  tensors = load_file(str(f))
  fn(tensors)
  save_file(tensors, str(f))


def _edit_config(d, **changes):
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(changes)
  (d / "config.json").write_text(json.dumps(cfg))


def _one_line(exc):
  msg = str(exc.value)
  assert "\n" not in msg
  return msg


def test_missing_tensor(ckpt):
  _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointError) as e:
    hf.load(ckpt)
  assert "missing tensor model.layers.1.mlp.up_proj.weight" in _one_line(e)
  assert "(128, 64)" in _one_line(e)


def test_unexpected_tensor(ckpt):
  _edit_tensors(ckpt, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}))
  with pytest.raises(hf.CheckpointError) as e:
    hf.load(ckpt)
  assert "unexpected tensor model.layers.7.mlp.up_proj.weight" in _one_line(e)


def test_shape_mismatch_names_expected_and_found(ckpt):
  _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
  with pytest.raises(hf.CheckpointError) as e:
    hf.load(ckpt)
  msg = _one_line(e)
  assert "model.layers.0.self_attn.k_proj.weight" in msg and "(64, 64)" in msg and "expected (32, 64)" in msg


def test_legacy_rotary_buffers_are_ignored(ckpt):
  _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
  hf.load(ckpt)


@pytest.mark.parametrize("changes, needle", [
    (dict(model_type="gpt2"), "model_type='gpt2' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope type 'yarn'"),
    (dict(model_type="mistral", sliding_window=64), "sliding_window=64"),
])
def test_unsupported_config(ckpt, changes, needle):
  _edit_config(ckpt, **changes)
  with pytest.raises(ConfigError) as e:
    hf.load(ckpt)
  assert needle in _one_line(e) and "config.json" in _one_line(e)


def test_no_weights_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(llama_tiny().to_hf_dict()))
  with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
    hf.load(tmp_path)


def test_failed_export_leaves_nothing(tmp_path):
  import jax
  config = llama_tiny()
  params = init_params(config, jax.random.key(0))
  del params["norm"]
  with pytest.raises(hf.CheckpointError, match="norm/weight"):
    hf.save(config, params, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []


def test_config_round_trips_through_hf_json(tmp_path):
  import jax
  for config in (llama_tiny(), llama_tiny(rope_type="llama3", rope_factor=8.0, rope_original_max_position=64),
                 llama_tiny(model_type="mistral", tie_word_embeddings=True, pad_token_id=0)):
    d = hf.save(config, init_params(config, jax.random.key(0)), tmp_path / config.model_type / config.rope_type)
    assert hf.load(d)[0] == config
