"""LoRA adapters in PEFT's format: exported from a run, loaded by peft.PeftModel, read back by labor_jax."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from labor_jax import labels, lora, model, sharding
from labor_jax.cli import export
from labor_jax.interop import hf
from labor_jax.interop import peft as peft_io
from labor_jax.training import config as train_config
from labor_jax.training import loop as trainer
from labor_jax.config import ConfigError, llama_tiny
from labor_jax.rundir import RunDir
from tests import numerics
from tests.runs import longest_resume, run_train
from tests.compiled import forward
from tests.hf_fixtures import edit_json, edit_safetensors

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.targets=(self_attn/(q|v)_proj|mlp/down_proj)"]
TOKENS = np.arange(1, 21, dtype=np.int64)[None]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, nlsy_dataset):
  """A 3-step LoRA run from scratch, exported as --base-only and --adapter-only."""
  root = tmp_path_factory.mktemp("peft")
  run_dir = root / "run"
  code, _, err = run_train(run_dir, nlsy_dataset, "steps=3", "ckpt_every=3", "eval_every=3", *LORA)
  assert code == 0, err
  assert export.main(["--run", str(run_dir), "--out", str(root / "base"), "--base-only"]) == 0
  assert export.main(["--run", str(run_dir), "--out", str(root / "adapter"), "--adapter-only",
                      "--base-model", str(root / "base")]) == 0
  return run_dir, root / "base", root / "adapter"


def _adapters(params):
  return labels.split(params, labels.label_tree(params, labels.ADAPTERS))[0]


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def _peft_logits(torch, base_dir, adapter_dir):
  import peft
  import transformers
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    plain = base(torch.tensor(TOKENS)).logits.numpy()
  m = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  with torch.no_grad():
    return m(torch.tensor(TOKENS)).logits.numpy(), plain


def test_peft_loads_the_exported_adapters_on_the_base_export(exported, torch, capsys):
  run_dir, base_dir, adapter_dir = exported
  config, params, _ = RunDir(run_dir).load_model()
  meta = json.loads((adapter_dir / peft_io.ADAPTER_CONFIG).read_text())
  assert (meta["r"], meta["lora_alpha"], meta["peft_type"]) == (4, 8, "LORA")
  assert meta["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert meta["base_model_name_or_path"] == str(base_dir)
  names = load_file(str(adapter_dir / peft_io.ADAPTER_WEIGHTS))
  assert names["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 64)
  assert names["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
  assert len(names) == 2 * 3 * 2
  ours = np.asarray(forward(config, params, TOKENS))
  theirs, plain = _peft_logits(torch, base_dir, adapter_dir)
  # peft adds the adapter branch in PyTorch's order: the float32 bound of one forward pass.
  numerics.assert_close(ours, theirs, **numerics.forward_terms(config, tokens=TOKENS.shape[1]), what="peft logits")
  with pytest.raises(AssertionError, match="bound"):  # the base without its adapters fails the same bound
    numerics.assert_close(plain, theirs, **numerics.forward_terms(config, tokens=TOKENS.shape[1]), what="no adapters")


def test_load_adapter_reads_the_export_back_bitwise(exported):
  run_dir, base_dir, adapter_dir = exported
  config, params, _ = RunDir(run_dir).load_model()
  mesh = sharding.make_mesh(fsdp=8)
  base_cfg, base = hf.load(base_dir, mesh)
  cfg, loaded = peft_io.load_adapter(adapter_dir, base_cfg, base, mesh)
  assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (config.lora_rank, config.lora_alpha, config.lora_dropout)
  assert peft_io.adapter_modules(cfg) == peft_io.adapter_modules(config)
  _assert_bitwise(_adapters(loaded), _adapters(params))
  _assert_bitwise(labels.split(loaded, labels.run_labels(loaded, True))[1],
                  labels.split(params, labels.run_labels(params, True))[1])
  assert loaded["layers_0"]["self_attn"]["q_proj"]["lora_a"].sharding.spec[0] == "fsdp"


def _initial_params(base_dir, adapter_dir, *changes):
  cfg = train_config.load(None, [*LORA, f"model.hf_path={base_dir}", f"model.adapter_path={adapter_dir}", *changes])
  config = train_config.model_config(cfg, hf.load(base_dir)[0])
  return config, trainer.initial_params(cfg, config, sharding.make_mesh(devices=jax.devices()[:1]), jax.random.key(0))


def test_adapter_path_starts_training_from_the_exported_adapters(exported, capsys):
  """A fresh run on the base export with model.adapter_path starts from the run's weights: the exported
  adapters (not fresh ones) on the exported base, bit for bit; the same with scanned layers."""
  run_dir, base_dir, adapter_dir = exported
  _, params, _ = RunDir(run_dir).load_model()
  config, init = _initial_params(base_dir, adapter_dir)
  out = capsys.readouterr().out
  assert f"LoRA adapters from {adapter_dir}: r=4, alpha=8, down_proj, q_proj, v_proj (6 modules)" in out
  _assert_bitwise(init, params)
  config, init = _initial_params(base_dir, adapter_dir, "model.scan_layers=true")
  _assert_bitwise(init, model.stack_layers(params, config.num_hidden_layers))


@pytest.mark.parametrize("change, message", [
    ({"lora.rank": 8}, "has rank 4, the run's lora.rank gives 8"),
    ({"lora.alpha": 16}, "has alpha 8.0, the run's lora.alpha gives 16.0"),
    ({"lora.targets": "self_attn/(q|v)_proj"},
     "has targets down_proj, q_proj, v_proj (6 modules), the run's lora.targets gives q_proj, v_proj (4 modules); "
     "lora.targets='(mlp/down_proj|self_attn/q_proj|self_attn/v_proj)$' selects its modules"),
])
def test_adapter_path_must_match_the_lora_config(exported, change, message):
  _, base_dir, adapter_dir = exported
  with pytest.raises(ConfigError) as e:
    _initial_params(base_dir, adapter_dir, *(f"{k}={v}" for k, v in change.items()))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_adapter_path_needs_lora_and_a_base():
  with pytest.raises(ConfigError, match="set lora.enabled=true"):
    train_config.load(None, ["model.adapter_path=x", "model.hf_path=y"])
  with pytest.raises(ConfigError, match="model.hf_path or model.init_from"):
    train_config.load(None, ["model.adapter_path=x", "lora.enabled=true"])


def test_scanned_layers_and_lm_head_round_trip_through_peft(torch, tmp_path):
  """A scan_layers model with adapters on lm_head too: exported adapters load in peft with equal logits and
  read back bitwise; an adapter saved by peft itself (with its copy of lm_head's base weight) reads in."""
  import peft
  import transformers
  config = llama_tiny(vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                      num_key_value_heads=1, scan_layers=True)
  base = model.init_params(config, jax.random.key(0))  # stacked: layers/... with a leading layer axis
  cfg, params = lora.add_adapters(config, base, jax.random.key(1), rank=2, alpha=5.0,
                                  targets=r"(self_attn/k_proj|mlp/(gate|up)_proj|lm_head)")
  params = jax.tree_util.tree_map_with_path(  # trained-looking adapters: lora_b away from zero
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(labels.path_str(p))), x.shape)
      if labels.path_str(p).endswith("lora_b") else x, params)
  hf.save(config, base, tmp_path / "base")
  peft_io.save_adapter(cfg, params, tmp_path / "adapter")
  assert json.loads((tmp_path / "adapter" / peft_io.ADAPTER_CONFIG).read_text())["target_modules"] == [
      "gate_proj", "k_proj", "lm_head", "up_proj"]
  ours = np.asarray(forward(cfg, params, TOKENS))
  theirs, _ = _peft_logits(torch, tmp_path / "base", tmp_path / "adapter")
  # peft adds the adapter branch in PyTorch's order: the float32 bound of one forward pass.
  numerics.assert_close(ours, theirs, **numerics.forward_terms(config, tokens=TOKENS.shape[1]), what="peft logits")
  cfg2, loaded = peft_io.load_adapter(tmp_path / "adapter", config, base)
  assert cfg2.replace(lora_targets=cfg.lora_targets) == cfg
  _assert_bitwise(loaded, params)

  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
  pm = peft.get_peft_model(ref, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["o_proj", "lm_head"],
                                                 init_lora_weights="gaussian")).eval()
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.05)
    theirs = pm(torch.tensor(TOKENS)).logits.numpy()
  pm.save_pretrained(tmp_path / "from_peft")
  assert "base_model.model.lm_head.base_layer.weight" in load_file(str(tmp_path / "from_peft" / peft_io.ADAPTER_WEIGHTS))
  cfg3, loaded = peft_io.load_adapter(tmp_path / "from_peft", config, base)
  assert (cfg3.lora_rank, cfg3.lora_alpha) == (3, 6.0)
  numerics.assert_close(forward(cfg3, loaded, TOKENS), theirs, **numerics.forward_terms(config, tokens=TOKENS.shape[1]),
                        what="logits of peft's own adapter")


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory):
  config = llama_tiny(vocab_size=64)
  base = model.init_params(config, jax.random.key(0))
  cfg, params = lora.add_adapters(config, base, jax.random.key(1), rank=4, targets=r"self_attn/(q|v)_proj")
  return config, base, peft_io.save_adapter(cfg, params, tmp_path_factory.mktemp("small") / "adapter")


@pytest.fixture()
def adapter_dir(small_adapter, tmp_path):
  """A fresh copy of a small adapter directory, to edit."""
  config, base, d = small_adapter
  return config, base, Path(shutil.copytree(d, tmp_path / "adapter"))


def _edit_config(d, **changes):
  edit_json(d / peft_io.ADAPTER_CONFIG, **changes)


def _edit_tensors(d, fn):
  edit_safetensors(d / peft_io.ADAPTER_WEIGHTS, fn)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"use_rslora": True}, "use_rslora=True is not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern={'q_proj': 8} is not supported"),
    ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] is not supported"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target module 'embed_tokens' is not supported"),
    ({"target_modules": ["q_proj", "dense"]}, "target module 'dense' is not supported"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base weights"),
    ({"peft_type": "IA3"}, "peft_type='IA3' is not supported"),
])
def test_unsupported_adapter_configs_stop_in_one_line(adapter_dir, change, message):
  config, base, d = adapter_dir
  _edit_config(d, **change)
  with pytest.raises(ConfigError) as e:
    peft_io.load_adapter(d, config, base)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_misshapen_or_unexpected_tensors_stop_in_one_line(adapter_dir, tmp_path):
  config, base, d = adapter_dir
  name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
  cases = [(lambda t: t.pop(name), f"missing tensor {name} (expected shape (32, 4))"),
           (lambda t: t.update({name: np.zeros((4, 32), np.float32)}),
            f"tensor {name} has shape (4, 32), expected (32, 4)"),
           (lambda t: t.update({name.replace("v_proj", "k_proj"): t[name]}), "unexpected tensor"),
           (lambda t: t.update({"base_model.model.lm_head.base_layer.weight": np.zeros((64, 64), np.float32)}),
            "differs from the base model's lm_head.weight")]
  for i, (edit, message) in enumerate(cases):
    copy = shutil.copytree(d, tmp_path / f"case{i}")
    _edit_tensors(copy, edit)
    with pytest.raises(hf.CheckpointError) as e:
      peft_io.load_adapter(copy, config, base)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_adapter_export_needs_adapters(adapter_dir, tmp_path):
  config, base, _ = adapter_dir
  with pytest.raises(hf.CheckpointError, match="no LoRA adapters"):
    peft_io.save_adapter(config, base, tmp_path / "none")
  assert not (tmp_path / "none").exists()
  assert export.main(["--run", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "x"), "--adapter-only"]) == 2


def test_adapters_on_some_layers_round_trip_as_a_regex(small_adapter, tmp_path):
  config, base, _ = small_adapter
  cfg, params = lora.add_adapters(config, base, jax.random.key(1), rank=2, targets=r"layers_1/self_attn/q_proj")
  d = peft_io.save_adapter(cfg, params, tmp_path / "adapter")
  assert json.loads((d / peft_io.ADAPTER_CONFIG).read_text())["target_modules"] == r"model\.layers\.1\.self_attn\.q_proj"
  cfg2, loaded = peft_io.load_adapter(d, config, base)
  assert peft_io.adapter_modules(cfg2) == ["model.layers.1.self_attn.q_proj"]
  _assert_bitwise(loaded, params)
  with pytest.raises(ConfigError, match="adapts some layers only; a scan_layers model"):
    peft_io.load_adapter(d, config.replace(scan_layers=True), model.stack_layers(base, config.num_hidden_layers))


def test_evaluate_hf_with_an_adapter_equals_the_run(exported, nlsy_dataset, tmp_path):
  """A Hugging Face base plus its PEFT adapter, scored with --hf/--adapter, gives the run's own numbers."""
  from labor_jax import evaluation
  run_dir, base_dir, adapter_dir = exported
  want = evaluation.evaluate(run_dir, "test", tmp_path / "run", career=False, bootstrap=0)
  got = evaluation.evaluate(base_dir, "test", tmp_path / "hf", data=nlsy_dataset, adapter=adapter_dir, career=False,
                            bootstrap=0)
  # The run's adapters unmerged versus peft's layout loaded onto the base: one forward pass's float32 bound on
  # the log-probs; a log-perplexity is their mean, held to it at their magnitude.
  depth = numerics.forward_terms(RunDir(run_dir).model_config(), tokens=longest_resume(nlsy_dataset))
  scale = np.abs(pd.read_csv(tmp_path / "run" / "predictions.csv")["logprob"]).max()
  for key in ("perplexity", "perplexity_raw"):
    numerics.assert_close(np.log(got["models"][evaluation.MAIN_LLM][key]),
                          np.log(want["models"][evaluation.MAIN_LLM][key]), **depth, scale=scale, what=key)
