"""Files from strangers and runs that share a directory (#21 items 1-2): each probe is refused in one line
naming the file and the field, exit 2, nothing written; nothing is unpickled; one writer per run directory;
concurrent evaluations never leave a mix. The probes are listed in docs/probes.md."""

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from tests.hf_fixtures import edit_json, edit_safetensors
from tests.runs import ROOT, cpu_env, read_metrics, run_train, spawn_train


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, nlsy_dataset):
  """A random tiny Llama saved as a Hugging Face directory with the dataset's tokenizer, a LoRA adapter of it
  in PEFT's format, and a second model of another seed."""
  from data_pipeline.dataset_dir import DatasetDir
  from labor_jax import lora, model
  from labor_jax.config import llama_tiny
  from labor_jax.interop import hf, peft
  data = DatasetDir(nlsy_dataset)
  config = llama_tiny(vocab_size=data.tokenizer().vocab_size)
  root = tmp_path_factory.mktemp("untrusted")
  params = model.init_params(config, jax.random.key(0))
  hf.save(config, params, root / "hf", tokenizer_dir=data.tokenizer_dir)
  hf.save(config, model.init_params(config, jax.random.key(1)), root / "hf_other", tokenizer_dir=data.tokenizer_dir)
  lcfg, lparams = lora.add_adapters(config, params, jax.random.key(2), rank=4, alpha=8.0)
  peft.save_adapter(lcfg, lparams, root / "adapter")
  return root


def _evaluate(capsys, model_dir, data, out, *extra):
  """(exit code, stderr) of ``labor_jax.evaluate --hf`` in this process."""
  from labor_jax.cli import evaluate
  capsys.readouterr()
  code = evaluate.main(["--hf", str(model_dir), "--data", str(data), "--out", str(out), "--no-career",
                        "--bootstrap", "0", "--no-progress", "--mesh", "data=8", *extra])
  return code, capsys.readouterr().err


def _assert_refused(capsys, tmp_path, needles, model_dir, data, *extra):
  """``evaluate --hf model_dir`` exits 2 with one stderr line holding every needle; writes and unpickles nothing."""
  out = tmp_path / "out"
  code, err = _evaluate(capsys, model_dir, data, out, *extra)
  err = err.strip()
  assert code == 2 and err.count("\n") == 0, err[-3000:]
  assert all(n in err for n in needles), err
  assert not out.exists() and not (tmp_path / "UNPICKLED").exists()


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def _copy_editing_json(src: Path, dst: Path, name: str, **changes) -> Path:
  """A copy of the directory ``src`` at ``dst`` whose JSON file ``name`` has ``changes`` set."""
  d = _copy(src, dst)
  edit_json(d / name, **changes)
  return d


class _Marker:
  """A pickle that, when unpickled, creates a file: proof that something unpickled it."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (str(self.path), "w"))


def _pickle_only(tmp, hf_dir):
  d = _copy(hf_dir, tmp / "bin_only")
  (d / "model.safetensors").unlink()
  (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(tmp / "UNPICKLED")))
  return d, ["pytorch_model.bin", "safetensors"]


def _bad_tokenizer(tmp, hf_dir):
  d = _copy(hf_dir, tmp / "bad_tok")
  (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
  return d, ["tokenizer.json", "not a tokenizers file"]


def _not_llama(tmp, hf_dir):
  d = _copy_editing_json(hf_dir, tmp / "gpt2", "config.json", model_type="gpt2")
  return d, ["config.json", "model_type='gpt2'"]


def _missing_tensor(tmp, hf_dir):
  d = _copy(hf_dir, tmp / "missing")
  edit_safetensors(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  return d, ["missing tensor model.layers.1.mlp.up_proj.weight"]


def _wrong_shape(tmp, hf_dir):
  d = _copy(hf_dir, tmp / "shape")
  edit_safetensors(d / "model.safetensors", lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}))
  return d, ["model.safetensors", "model.norm.weight", "shape (7,)"]


MODEL_PROBES = {"pickle only": _pickle_only, "tokenizer.json does not parse": _bad_tokenizer,
                "not Llama-family": _not_llama, "tensor missing": _missing_tensor, "tensor of wrong shape": _wrong_shape}


@pytest.mark.parametrize("probe", sorted(MODEL_PROBES))
def test_bad_model_files_stop_in_one_line_and_write_nothing(probe, hf_pair, nlsy_dataset, tmp_path, capsys):
  model_dir, needles = MODEL_PROBES[probe](tmp_path, hf_pair / "hf")
  _assert_refused(capsys, tmp_path, needles, model_dir, nlsy_dataset)


def _adapter_rank(tmp, adapter):
  d = _copy_editing_json(adapter, tmp / "rank", "adapter_config.json", r=8)
  return d, ["adapter_model.safetensors", "has shape", ", expected ("]


def _adapter_targets(tmp, adapter):
  d = _copy_editing_json(adapter, tmp / "targets", "adapter_config.json", target_modules=["q_proj", "gate_projection"])
  return d, ["adapter_config.json", "target module 'gate_projection' is not supported"]


def _adapter_type(tmp, adapter):
  d = _copy_editing_json(adapter, tmp / "ia3", "adapter_config.json", peft_type="IA3")
  return d, ["adapter_config.json", "peft_type='IA3' is not supported"]


def _adapter_pickle(tmp, adapter):
  d = _copy(adapter, tmp / "adapter_bin")
  (d / "adapter_model.safetensors").unlink()
  (d / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(tmp / "UNPICKLED")))
  return d, ["adapter_model.safetensors", "convert adapter_model.bin to safetensors"]


ADAPTER_PROBES = {"adapter rank does not fit": _adapter_rank, "adapter targets unknown modules": _adapter_targets,
                  "adapter peft_type unknown": _adapter_type, "adapter pickle only": _adapter_pickle}


@pytest.mark.parametrize("probe", sorted(ADAPTER_PROBES))
def test_bad_adapters_stop_in_one_line_and_write_nothing(probe, hf_pair, nlsy_dataset, tmp_path, capsys):
  adapter, needles = ADAPTER_PROBES[probe](tmp_path, hf_pair / "adapter")
  _assert_refused(capsys, tmp_path, needles, hf_pair / "hf", nlsy_dataset, "--adapter", str(adapter))


def test_no_library_module_unpickles_or_calls_torch():
  """Nothing in labor_jax or data_pipeline imports pickle or torch, or calls torch.load / numpy.load with
  allow_pickle: weights are read through safetensors (and GGUF) only."""
  found = []
  for p in [*(ROOT / "labor_jax").rglob("*.py"), *(ROOT / "data_pipeline").rglob("*.py")]:
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, ast.Import):
        found += [f"{p.name}: import {a.name}" for a in node.names if a.name.split(".")[0] in ("pickle", "torch", "dill")]
      elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "torch", "dill"):
        found.append(f"{p.name}: from {node.module}")
      elif isinstance(node, ast.keyword) and node.arg == "allow_pickle" and getattr(node.value, "value", False):
        found.append(f"{p.name}: allow_pickle=True")
  assert found == []


def test_a_second_train_on_a_live_run_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, nlsy_dataset):
  run_dir = tmp_path / "run"
  first = spawn_train(run_dir, nlsy_dataset, "steps=40", "ckpt_every=40", "eval_every=40", sleep=0.5)
  try:
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists():
      assert time.time() < deadline and first.poll() is None, first.communicate()[1][-2000:]
      time.sleep(0.1)
    code, out, err = run_train(run_dir, nlsy_dataset, "steps=40", "ckpt_every=40", "eval_every=40")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"being trained by process {first.pid}" in err and "train.lock" in err
    assert first.poll() is None  # the refused run touched nothing of the live one
  finally:
    first.kill()
    first.wait()
  assert json.loads((run_dir / "train.lock").read_text())["pid"] == first.pid  # left behind by SIGKILL
  code, out, err = run_train(run_dir, nlsy_dataset, "steps=2", "ckpt_every=2", "eval_every=2")
  assert code == 0, err
  assert f"left by process {first.pid}, which is no longer running: taking it over" in err
  assert not (run_dir / "train.lock").exists() and read_metrics(run_dir)[-1]["step"] == 2


def test_two_evaluations_into_one_directory_leave_one_whole_report(hf_pair, nlsy_dataset, tmp_path):
  """Two models evaluated at the same time into the same --out: the directory ends as one run's files,
  whole (predictions.csv and metrics.json agree), never a mix; no temporary directory is left."""
  out = tmp_path / "shared"
  procs = [subprocess.Popen([sys.executable, "-m", "labor_jax.evaluate", "--hf", str(hf_pair / name), "--data",
                             str(nlsy_dataset), "--out", str(out), "--no-career", "--bootstrap", "0", "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cpu_env(1))
           for name in ("hf", "hf_other")]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  metrics = json.loads((out / "metrics.json").read_text())["models"]["LABOR-LLM (this run)"]
  pred = pd.read_csv(out / "predictions.csv")
  # the same probabilities in both files (float32 roundings ~1e-6 relative; see test_evaluate)
  assert np.exp(-pred["logprob"].mean()) == pytest.approx(metrics["perplexity"], rel=1e-4)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]


def test_every_test_docs_probes_names_exists():
  """docs/probes.md stays true: each test it names is defined in the file it names."""
  import re
  named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", (ROOT / "docs" / "probes.md").read_text())
  assert len(named) >= 12
  for path, name in named:
    assert f"def {name}(" in (ROOT / "tests" / path).read_text(), (path, name)
