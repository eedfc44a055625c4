"""The trainer end to end: config errors, resume after SIGKILL, SIGTERM, bad checkpoints, NaN guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from labor_jax import train

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.num_key_value_heads=1", "data.seq_len=64", "batch_size=4",
        "optim.lr=0.003", "optim.warmup_steps=2", "log_every=1", "eval_batches=2", "progress=false"]


def _args(run_dir, data_dir, *extra):
  out = ["--config", "configs/demo.yaml"]
  for s in TINY + [f"run_dir={run_dir}", f"data.dataset_dir={data_dir}", *extra]:
    out += ["--set", s]
  return out


ROOT = Path(__file__).resolve().parent.parent


def _spawn(run_dir, data_dir, *extra, devices=1, sleep=0.0):
  """``python -m labor_jax.train`` in a subprocess; ``sleep`` > 0 paces every step (tests.paced_train)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  cmd = ["-m", "labor_jax.train"] if not sleep else ["-m", "tests.paced_train", str(sleep)]
  return subprocess.Popen([sys.executable, *cmd, *_args(run_dir, data_dir, *extra)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(run_dir, data_dir, *extra, **kw):
  p = _spawn(run_dir, data_dir, *extra, **kw)
  out, err = p.communicate(timeout=300)
  return p.returncode, out, err


def _metrics(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_params(run_dir):
  from labor_jax.checkpoint import restore_params
  return restore_params(run_dir / "checkpoints")


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("steps=many", "steps: expected int"),
    ("mesh.data=3", "mesh: data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are present"),
    ("mesh.data=8", "batch_size: 4 does not divide into mesh data x fsdp = 8"),
    ("data.loss_on=tokens", "data.loss_on: must be one of"),
])
def test_config_errors_fail_before_compiling(tmp_path, nlsy_dataset, capsys, override, needle):
  assert train.main(_args(tmp_path / "run", nlsy_dataset, override)) == train.EXIT_CONFIG
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and needle in err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_hugging_face_config_is_a_config_error(tmp_path, nlsy_dataset, capsys):
  """A config.json labor_jax cannot represent stops the trainer like any config error: one line, exit 2."""
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 100}')
  args = _args(tmp_path / "run", nlsy_dataset, "batch_size=8", "mesh.data=8", f"model.hf_path={tmp_path / 'hf'}")
  assert train.main(args) == train.EXIT_CONFIG
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "model_type='gpt2' is not supported" in err and "config.json" in err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, nlsy_dataset):
  run_dir = tmp_path_factory.mktemp("full") / "run"
  code, out, err = _run(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4")
  assert code == 0, err
  return run_dir


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, nlsy_dataset, uninterrupted):
  run_dir = tmp_path / "run"
  p = _spawn(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4", sleep=1.0)
  deadline = time.time() + 240
  while not (run_dir / "checkpoints" / "4" / "_CHECKPOINT_METADATA").exists():
    assert time.time() < deadline and p.poll() is None, p.communicate()[1][-2000:]
    time.sleep(0.1)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = _metrics(run_dir)[-1]["step"]
  assert killed_at < 8
  code, out, err = _run(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4")
  assert code == 0, err
  assert "resumed from step 4" in out
  step_a, want = _final_params(uninterrupted)
  step_b, got = _final_params(run_dir)
  assert step_a == step_b == 8
  import jax
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0), want, got)
  order_a = {r["step"]: r["batch_crc"] for r in _metrics(uninterrupted)}
  order_b = {r["step"]: r["batch_crc"] for r in _metrics(run_dir)}  # steps 5.. logged twice: same batches
  assert order_a == order_b


def test_sigterm_saves_and_exits_zero(tmp_path, nlsy_dataset):
  run_dir = tmp_path / "run"
  p = _spawn(run_dir, nlsy_dataset, "steps=50", "ckpt_every=100", "eval_every=100", sleep=0.5)
  deadline = time.time() + 240
  while not (run_dir / "metrics.jsonl").exists() or len(_metrics(run_dir)) < 2:
    assert time.time() < deadline and p.poll() is None, p.communicate()[1][-2000:]
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err
  step, _ = _final_params(run_dir)
  assert 2 <= step < 50 and f"saved checkpoint at step {step}" in out


def test_corrupt_latest_checkpoint_falls_back(tmp_path, nlsy_dataset, uninterrupted):
  run_dir = tmp_path / "run"
  shutil.copytree(uninterrupted, run_dir)
  shutil.rmtree(run_dir / "checkpoints" / "8" / "state")  # a partial latest checkpoint
  (run_dir / "metrics.jsonl").unlink()
  code, out, err = _run(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4")
  assert code == 0, err
  assert "checkpoint step 8" in err and "cannot be restored" in err and "resumed from step 4" in out
  assert [r["step"] for r in _metrics(run_dir)] == [5, 6, 7, 8]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nlsy_dataset):
  run_dir = tmp_path / "run"
  code, out, err = _run(run_dir, nlsy_dataset, "steps=30", "ckpt_every=2", "eval_every=100",
                        "optim.lr=1.0e+30", "optim.warmup_steps=0", "optim.clip_norm=0")
  assert code == train.EXIT_NAN, err
  assert "loss is nan" in err.lower() or "loss is inf" in err.lower()
  good = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  bad_step = int(err.split(" at step ")[1].split(":")[0])
  assert good and max(good) < bad_step


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, nlsy_dataset):
  """2 local processes x 2 CPU devices (gloo collectives) fine-tune a HF checkpoint like 1 process x 4 devices
  (hf.load places every tensor into its multi-process sharding)."""
  import jax

  from labor_jax import hf, model
  from labor_jax.config import LlamaConfig
  base = LlamaConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=128)
  hf.save(base, model.init_params(base, jax.random.key(5)), tmp_path / "base")
  common = ["steps=3", "ckpt_every=3", "eval_every=3", "batch_size=8", "mesh.data=2", "mesh.fsdp=2",
            f"model.hf_path={tmp_path / 'base'}"]
  code, out, err = _run(tmp_path / "single", nlsy_dataset, *common, devices=4)
  assert code == 0, err
  port = _free_port()
  procs = [_spawn(tmp_path / "multi", nlsy_dataset, *common, "distributed.initialize=true",
                  f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                  f"distributed.process_id={i}", devices=2) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  assert "2 process(es)" in results[0][0] and "4 cpu devices" in results[0][0]
  single, multi = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
  assert len(multi) == 3  # only process 0 writes metrics
  np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=1e-5)
  np.testing.assert_allclose(multi[-1]["val_loss"], single[-1]["val_loss"], rtol=1e-5)
  step, params = _final_params(tmp_path / "multi")
  assert step == 3


def test_lora_scanned_run_exports_merged_checkpoint_that_pytorch_loads(tmp_path, nlsy_dataset, torch):
  import transformers

  from labor_jax import export, lora, model
  from labor_jax.rundir import RunDir
  run_dir = tmp_path / "run"
  code, out, err = _run(run_dir, nlsy_dataset, "steps=3", "ckpt_every=3", "eval_every=3", "lora.enabled=true",
                        "lora.rank=4", "model.scan_layers=true", "model.remat=true")
  assert code == 0, err
  assert "LoRA r=4" in out and "trainable" in out
  assert export.main(["--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
  config, params, _ = RunDir(run_dir).load_model()
  merged_cfg, merged = lora.merge(config, params)
  tokens = np.arange(1, 21, dtype=np.int64)[None]
  ours = np.asarray(model.forward(config, params, tokens))
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    theirs = ref(torch.tensor(tokens)).logits.numpy()
  assert np.abs(ours - theirs).max() < 1e-4
  assert (tmp_path / "hf" / "tokenizer.model").exists()


def test_keeps_latest_and_best_checkpoints(tmp_path):
  import jax.numpy as jnp

  from labor_jax import checkpoint
  mgr = checkpoint.manager(tmp_path / "ck", keep=2, async_save=False)
  import orbax.checkpoint as ocp
  for step, loss in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.6), (5, None)]:
    state = {"params": {"w": jnp.full(2, step, jnp.float32)}}
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
             metrics=None if loss is None else {"val_loss": loss})
  mgr.wait_until_finished()
  assert mgr.all_steps() == [2, 4, 5]  # the last two, and the best by validation loss
  step, params = checkpoint.restore_params(tmp_path / "ck", "best")
  assert step == 2 and float(params["w"][0]) == 2.0
  assert checkpoint.restore_params(tmp_path / "ck")[0] == 5
