"""Runs by epochs: ``epochs`` (and ``eval_every_epochs``, ``ckpt_every_epochs``) resolve to steps from the
training split's rows, exclusive with their counts in steps; ``model.dtype: auto`` follows the CPU's flags."""

import json

import numpy as np
import pytest
import yaml

from data_pipeline import loader
from data_pipeline.dataset_dir import DatasetDir
from labor_jax import runtime
from labor_jax.cli import train
from labor_jax.training import config as train_config
from labor_jax.training import core as train_core
from tests.runs import read_metrics, run_train

TRAIN_ROWS = 375  # training resumes of the embedded NLSY panel (70% of 545 workers), one row each unpacked


def test_epoch_steps_round_up_over_the_endless_stream():
  assert train_config.epoch_steps(3, TRAIN_ROWS, 8) == 141  # 140.625: the last step reads 5 rows of a 4th epoch
  assert train_config.epoch_steps(0.5, TRAIN_ROWS, 8) == 24  # 23.4375
  assert train_config.epoch_steps(2, 400, 8) == 100  # exact: no extra step
  assert train_config.epoch_steps(0.3, 80, 8) == 3  # 0.3 x 80 / 8 is 3 in decimals (in binary 3.0000000000000004)
  assert train_config.epoch_steps(0.001, 10, 8) == 1  # never zero


def test_resolve_epochs_fills_only_what_was_given_in_epochs():
  cfg = train_config.load("configs/demo.yaml", ["epochs=3", "eval_every_epochs=0.5"])
  assert (cfg.steps, cfg.eval_every, cfg.ckpt_every) == (None, None, 100)  # the file's ckpt_every stays
  r = train_config.resolve_epochs(cfg, TRAIN_ROWS)
  assert (r.steps, r.eval_every, r.ckpt_every, r.epochs) == (141, 24, 100, 3.0)
  assert train_config.resolve_epochs(r, 10) == r  # a resolved config (a run's config.yaml) keeps its steps
  assert not train_config.needs_rows(r) and train_config.needs_rows(cfg)


def test_an_override_replaces_the_other_member_of_a_pair():
  cfg = train_config.load("configs/demo.yaml", ["epochs=0.5"])  # the file says steps: 300
  assert (cfg.steps, cfg.epochs) == (None, 0.5)
  back = train_config.updated(cfg, {"steps": 7})
  assert (back.steps, back.epochs) == (7, None)
  assert train_config.load("configs/demo.yaml").steps == 300  # neither in epochs: as before
  assert train_config.load(None).steps == 100 and train_config.load(None).eval_every == 50  # the defaults


@pytest.mark.parametrize("text, sets, where, fields", [
    ("steps: 10\nepochs: 1\n", [], "FILE", "steps and epochs"),
    ("eval_every: 10\neval_every_epochs: 0.5\n", [], "FILE", "eval_every and eval_every_epochs"),
    ("batch_size: 4\n", ["steps=10", "epochs=1"], "--set", "steps and epochs"),
    ("batch_size: 4\n", ["ckpt_every=10", "ckpt_every_epochs=1"], "--set", "ckpt_every and ckpt_every_epochs"),
])
def test_steps_and_epochs_together_is_a_one_line_error(tmp_path, capsys, text, sets, where, fields):
  path = tmp_path / "both.yaml"
  path.write_text(text)
  args = ["--config", str(path), "--set", f"run_dir={tmp_path / 'run'}"] + [a for s in sets for a in ("--set", s)]
  assert train.main(args) == train.EXIT_CONFIG
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and f"{str(path) if where == 'FILE' else where}: {fields} are exclusive" in err
  with pytest.raises(train_config.ConfigError, match="exclusive"):
    train_config.updated(train_config.load(None), {"steps": 3, "epochs": 1.0})
  with pytest.raises(train_config.ConfigError, match="epochs: must be a finite positive number"):
    train_config.load(None, ["epochs=0"])


def test_rows_per_epoch_counts_what_the_loader_yields(nlsy_dataset):
  kw = dict(seq_len=512, batch_size=4, seed=0)
  assert loader.rows_per_epoch(nlsy_dataset, "train", **kw) == TRAIN_ROWS
  assert loader.rows_per_epoch(nlsy_dataset, "train", process_count=2, **kw) == TRAIN_ROWS
  packed = loader.rows_per_epoch(nlsy_dataset, "train", pack=True, **kw)
  tokens = int(np.sum(DatasetDir(nlsy_dataset).lengths("train")[0] - 1))  # inputs: a resume's tokens but one
  assert tokens / 512 <= packed < TRAIN_ROWS  # resumes of ~190 tokens: two or so share a row of 512
  batches = list(loader.make_dataset(nlsy_dataset, "train", pack=True, num_epochs=1, **kw))
  assert len(batches) == packed // 4  # one pass, batched with drop_remainder: the whole batches of the count


def test_auto_dtype_follows_the_cpu_flags(tmp_path, monkeypatch):
  assert runtime.auto_dtype("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}))[0] == "bfloat16"
  assert runtime.auto_dtype("cpu", frozenset({"avx2", "amx_bf16"}))[0] == "bfloat16"
  assert runtime.auto_dtype("cpu", frozenset({"avx2", "avx512f"})) == (
      "float32", "the CPU has neither avx512_bf16 nor amx_bf16")
  assert runtime.auto_dtype("gpu", frozenset())[0] == runtime.auto_dtype("tpu", frozenset())[0] == "bfloat16"
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n")
  assert runtime.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "amx_bf16", "amx_tile"}
  assert runtime.cpu_flags(str(tmp_path / "absent")) == frozenset()

  cfg = train_config.load("configs/demo.yaml", ["model.dtype=auto"])
  for flags, want in ((frozenset({"avx512_bf16"}), "bfloat16"), (frozenset({"avx512f"}), "float32")):
    monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo", flags=flags: flags)
    assert train_config.model_config(cfg, platform="cpu").dtype == want
    assert train_config.model_config(cfg).dtype == want  # the tests' JAX backend is the CPU
    assert train_config.model_config(cfg, platform="h100").dtype == "bfloat16"  # the planner's chip
    explicit = train_config.load("configs/demo.yaml", ["model.dtype=float32"])
    assert train_config.model_config(explicit).dtype == "float32"


def test_a_run_by_epochs_trains_the_resolved_steps_and_keeps_them_on_resume(tmp_path, nlsy_dataset):
  """0.05 epochs of 375 rows at batch 4 are ceil(4.69) = 5 steps; validation and checkpoints every 0.02
  epochs, ceil(1.88) = 2 steps (and at the end). The schedule's warm-up and decay span the 5 steps."""
  run_dir = tmp_path / "run"
  args = ["epochs=0.05", "eval_every_epochs=0.02", "ckpt_every_epochs=0.02", "model.dtype=auto"]
  code, out, err = run_train(run_dir, nlsy_dataset, *args)  # configs/demo.yaml says steps: 300, eval_every: 100
  assert code == 0, err
  assert "375 training rows an epoch at batch_size 4 (93.75 steps an epoch): steps=5 (epochs=0.05), " \
         "eval_every=2 (eval_every_epochs=0.02), ckpt_every=2 (ckpt_every_epochs=0.02)" in out
  dtype, why = runtime.auto_dtype("cpu")
  assert out.count("model.dtype auto:") == 1 and f"model.dtype auto: {dtype} compute ({why})" in out
  assert json.loads((run_dir / "model_config.json").read_text())["dtype"] == dtype
  rows = read_metrics(run_dir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 5]
  assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 5
  saved = yaml.safe_load((run_dir / "config.yaml").read_text())
  assert (saved["steps"], saved["epochs"], saved["eval_every"], saved["ckpt_every"]) == (5, 0.05, 2, 2)
  lr = lambda steps: [float(train_core.make_schedule(0.003, steps, 2, "cosine", 0.1)(i)) for i in range(5)]  # noqa: E731
  np.testing.assert_allclose([r["lr"] for r in rows], lr(5), rtol=1e-6)  # one optax schedule, logged as float32
  assert not np.allclose([r["lr"] for r in rows], lr(300), rtol=1e-3)  # demo.yaml's 300 steps would decay slower

  # As if the split had changed since: the recorded length is kept, and said.
  saved["steps"] = 6
  (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
  code, out, err = run_train(run_dir, nlsy_dataset, *args)
  assert code == 0, err
  assert "recorded steps=6 for this run; the training split now gives steps=5; keeping the recorded" in err
  assert "steps=6 (epochs=0.05)" in out and "as recorded in config.yaml" in out
  assert [r["step"] for r in read_metrics(run_dir)][-1] == 6
