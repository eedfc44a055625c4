"""Training never throws progress away: strict restore, adapter-only checkpoints, no silent truncation."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipeline.dataset_dir import DatasetDir
from labor_jax import checkpoint, labels
from labor_jax.cli import train
from labor_jax.training import config as train_config
from labor_jax.training import loop as trainer
from labor_jax.rundir import RunDir
from tests import numerics
from tests.runs import final_params, run_train, train_args
from tests.compiled import forward

LORA = ["lora.enabled=true", "lora.rank=4", "steps=4", "ckpt_every=2", "eval_every=2"]
IN_PROCESS = ["mesh.data=8", "batch_size=8"]  # the test process has 8 fake CPU devices


def _step_dirs(run_dir):
  return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, nlsy_dataset):
  run_dir = tmp_path_factory.mktemp("lora") / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, *LORA)
  assert code == 0, err
  assert "frozen weights" in out and "once" in out
  return run_dir


@pytest.mark.parametrize("run, override, leaf", [
    ("full", "model.hidden_size=64", "params/embed_tokens/embedding is float32[600, 32] there and float32[600, 64] here"),
    ("full", "model.param_dtype=bfloat16", "params/embed_tokens/embedding is float32[600, 32] there and bfloat16[600, 32]"),
    ("lora", "lora.rank=8", "params/layers_0/self_attn/k_proj/lora_a is float32[32, 4] there and float32[32, 8] here"),
])
def test_a_changed_model_stops_and_keeps_every_checkpoint(tmp_path, nlsy_dataset, uninterrupted, lora_run, capsys,
                                                          run, override, leaf):
  src = uninterrupted if run == "full" else lora_run
  run_dir = tmp_path / "run"
  shutil.copytree(src, run_dir)
  before = _step_dirs(run_dir)
  configs = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "model_config.json")}
  extra = ["steps=8", "ckpt_every=4", "eval_every=4"] if run == "full" else LORA
  assert train.main(train_args(run_dir, nlsy_dataset, *extra, *IN_PROCESS, override)) == train.EXIT_CONFIG
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("config error: checkpoint step") and leaf in err and "--set run_dir=" in err
  assert _step_dirs(run_dir) == before and not any(p.endswith(".unreadable") for p in before)
  # the refused config was not recorded: the run's config still describes its checkpoints (export reads it)
  assert {name: (run_dir / name).read_bytes() for name in configs} == configs


def test_an_io_error_fails_the_run_and_moves_nothing(tmp_path, nlsy_dataset, uninterrupted, monkeypatch):
  run_dir = tmp_path / "run"
  shutil.copytree(uninterrupted, run_dir)
  before = _step_dirs(run_dir)

  def unreadable(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(run_dir / "checkpoints" / "8" / "state"))
  monkeypatch.setattr(ocp.CheckpointManager, "restore", unreadable)
  with pytest.raises(PermissionError):
    train.main(train_args(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4", *IN_PROCESS))
  assert _step_dirs(run_dir) == before == ["4", "8"]


def test_lora_checkpoints_hold_no_frozen_leaf_and_resume_exactly(tmp_path, nlsy_dataset, lora_run, capsys):
  for step in (2, 4):
    saved = checkpoint.saved_params(lora_run / "checkpoints", step)
    paths = [labels.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved)]
    assert paths and all(labels.is_adapter(p) for p in paths)
  assert (lora_run / "frozen").is_dir()
  # The same run stopped after step 2 and resumed: frozen weights from frozen/, adapters from the step.
  run_dir = tmp_path / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, *LORA[:-3], "steps=2", "ckpt_every=2", "eval_every=2")
  assert code == 0, err
  code, out, err = run_train(run_dir, nlsy_dataset, *LORA)
  assert code == 0, err
  assert "resumed from step 2" in out
  # Deterministic: the same compiled step on the same bytes in the same order on one machine, so equal on any CPU;
  # 1e-6 (8 ulps at 1.0) is slack, where a wrongly restored adapter or moment moves the weights by lr ~ 1e-3.
  for a, b in [(final_params(lora_run), final_params(run_dir))]:
    assert a[0] == b[0] == 4
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0), a[1], b[1])
  # Rebuilt from base + adapters, the model equals the resumed one (the same merge on equal inputs: the same slack),
  # and its export equals both.
  (_, want, _), (cfg_b, got, _) = RunDir(lora_run).load_model(step=4), RunDir(run_dir).load_model(step=4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0), want, got)
  from labor_jax.cli import export
  from labor_jax.interop import hf
  # --step as predict and forecast take it; a step that is not a checkpoint, or no step at all, is one line and exit 2
  for bad, said in (("99", "no checkpoint of step 99 (saved steps: 2, 4)"), ("newest", "--step 'newest'")):
    assert export.main(["--run", str(run_dir), "--out", str(tmp_path / "bad"), "--step", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and err.count("\n") == 1, err
  assert not (tmp_path / "bad").exists()
  assert export.main(["--run", str(run_dir), "--out", str(tmp_path / "hf"), "--step", "last"]) == 0
  tokens = np.arange(1, 30, dtype=np.int32)[None]
  exported = forward(*hf.load(tmp_path / "hf"), tokens)
  # The export merges the adapters into the weights (rounded once): one forward pass's float32 bound.
  numerics.assert_close(exported, forward(cfg_b, got, tokens), **numerics.forward_terms(cfg_b, tokens=tokens.shape[1]),
                        what="exported logits")


def _truncation_counts(dataset, seq_len):
  src = DatasetDir(dataset).source("train")
  rows = [src[i] for i in range(len(src))]
  return (sum(len(r["tokens"]) > seq_len + 1 for r in rows), len(rows),
          sum(int((r["entry_starts"][1:] > seq_len + 1).sum()) for r in rows), sum(len(r["years"]) for r in rows))


def test_truncation_is_counted_and_can_be_fatal(tmp_path, nlsy_dataset, capsys):
  seq_len = 190  # between the median (about 187) and the longest (208) resume
  cut, total, cut_entries, entries = _truncation_counts(nlsy_dataset, seq_len)
  assert 0 < cut < total and 0 < cut_entries < cut * 8
  cfg = train_config.load("configs/demo.yaml", [f"data.seq_len={seq_len}", f"data.dataset_dir={nlsy_dataset}"])
  assert trainer.check_truncation(cfg, DatasetDir(nlsy_dataset)) == {
      "resumes": total, "cut_resumes": cut, "entries": entries, "cut_entries": cut_entries}
  err = capsys.readouterr().err
  assert f"{cut} of {total} training resumes are longer than data.seq_len={seq_len}" in err
  assert f"{cut_entries} of {entries} entries are cut" in err
  code = train.main(train_args(tmp_path / "run", nlsy_dataset, *IN_PROCESS, f"data.seq_len={seq_len}",
                               "data.truncate=error"))
  assert code == train.EXIT_CONFIG
  last = capsys.readouterr().err.strip().splitlines()
  assert len(last) == 1 and f"{cut} of {total} training resumes" in last[0]
  summary = DatasetDir(nlsy_dataset).summary["tokens_per_resume"]
  assert summary["p50"] <= summary["p95"] <= summary["max"] == 208


def test_storage_urls_are_not_made_local():
  assert str(checkpoint.as_path("gs://bucket/runs/x")) == "gs://bucket/runs/x"
  assert str(RunDir("gs://bucket/runs/x").checkpoints) == "gs://bucket/runs/x/checkpoints"
  assert str(checkpoint.as_path("relative/dir")).startswith("/")
