"""The trainer end to end: config errors, resume after SIGKILL, SIGTERM, bad checkpoints, NaN guard."""

import shutil
import signal
import time

import numpy as np
import pytest

from labor_jax.cli import train
from labor_jax.rundir import RunDir
from tests import numerics
from tests.runs import final_params, free_port, read_metrics, run_train, spawn_train, train_args


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("steps=many", "steps: expected int"),
    ("mesh.data=3", "mesh: data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are present"),
    ("mesh.data=8", "batch_size: 4 does not divide into mesh data x fsdp = 8"),
    ("data.loss_on=tokens", "data.loss_on: must be one of"),
])
def test_config_errors_fail_before_compiling(tmp_path, nlsy_dataset, capsys, override, needle):
  assert train.main(train_args(tmp_path / "run", nlsy_dataset, override)) == train.EXIT_CONFIG
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and needle in err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_hugging_face_config_is_a_config_error(tmp_path, nlsy_dataset, capsys):
  """A config.json labor_jax cannot represent stops the trainer like any config error: one line, exit 2."""
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 100}')
  args = train_args(tmp_path / "run", nlsy_dataset, "batch_size=8", "mesh.data=8", "data.seq_len=256",
               f"model.hf_path={tmp_path / 'hf'}")
  assert train.main(args) == train.EXIT_CONFIG
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "model_type='gpt2' is not supported" in err and "config.json" in err


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, nlsy_dataset, uninterrupted):
  run_dir = tmp_path / "run"
  p = spawn_train(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4", sleep=1.0)
  deadline = time.time() + 240
  while not (run_dir / "checkpoints" / "4" / "_CHECKPOINT_METADATA").exists():
    assert time.time() < deadline and p.poll() is None, p.communicate()[1][-2000:]
    time.sleep(0.1)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = read_metrics(run_dir)[-1]["step"]
  assert killed_at < 8
  code, out, err = run_train(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4")
  assert code == 0, err
  assert "resumed from step 4" in out
  assert f"process {p.pid}, which is no longer running: taking it over" in err  # its train.lock
  step_a, want = final_params(uninterrupted)
  step_b, got = final_params(run_dir)
  assert step_a == step_b == 8
  import jax
  # Deterministic: the same compiled steps on the same bytes on one machine, so equal on any CPU; 1e-6 (8 ulps at 1.0)
  # is slack, where a step replayed, skipped or resumed from the wrong state moves the weights by lr ~ 1e-3.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0), want, got)
  order_a = {r["step"]: r["batch_crc"] for r in read_metrics(uninterrupted)}
  order_b = {r["step"]: r["batch_crc"] for r in read_metrics(run_dir)}  # steps 5.. logged twice: same batches
  assert order_a == order_b


def test_sigterm_saves_and_exits_zero(tmp_path, nlsy_dataset):
  run_dir = tmp_path / "run"
  p = spawn_train(run_dir, nlsy_dataset, "steps=50", "ckpt_every=100", "eval_every=100", sleep=0.5)
  deadline = time.time() + 240
  while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 2:
    assert time.time() < deadline and p.poll() is None, p.communicate()[1][-2000:]
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err
  step, _ = final_params(run_dir)
  assert 2 <= step < 50 and f"saved checkpoint at step {step}" in out


@pytest.mark.parametrize("damage", ["missing item", "truncated file"])
def test_damaged_latest_checkpoint_is_set_aside(tmp_path, nlsy_dataset, uninterrupted, damage):
  """A partial save (an item directory missing) or a truncated data file: that step is set aside with the bad
  file named, and the previous step is used."""
  run_dir = tmp_path / "run"
  shutil.copytree(uninterrupted, run_dir)
  state_dir = run_dir / "checkpoints" / "8" / "state"
  if damage == "missing item":
    shutil.rmtree(state_dir)
    named = str(state_dir)
  else:
    for victim in state_dir.glob("**/d/*"):  # every data file of the step, cut to 10 bytes
      with victim.open("r+b") as f:
        f.truncate(10)
    named = str(state_dir)
  (run_dir / "metrics.jsonl").unlink()
  code, out, err = run_train(run_dir, nlsy_dataset, "steps=8", "ckpt_every=4", "eval_every=4")
  assert code == 0, err
  assert "checkpoint step 8" in err and "cannot be restored" in err and named in err and "resumed from step 4" in out
  assert (run_dir / "checkpoints" / "8.unreadable").is_dir()
  assert [r["step"] for r in read_metrics(run_dir)] == [5, 6, 7, 8]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nlsy_dataset):
  run_dir = tmp_path / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, "steps=30", "ckpt_every=2", "eval_every=100",
                        "optim.lr=1.0e+30", "optim.warmup_steps=0", "optim.clip_norm=0")
  assert code == train.EXIT_NAN, err
  assert "loss is nan" in err.lower() or "loss is inf" in err.lower()
  good = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  bad_step = int(err.split(" at step ")[1].split(":")[0])
  assert good and max(good) < bad_step


def test_two_processes_match_one_and_stop_together(tmp_path, nlsy_dataset):
  """2 local processes x 2 CPU devices (gloo collectives) fine-tune a HF checkpoint like 1 process x 4 devices
  (hf.load places every tensor into its multi-process sharding). A SIGTERM to one process makes both save the
  same step (JAX's preemption sync point) and exit 0; resumed, the run ends where the uninterrupted one does."""
  import jax

  from labor_jax import model
  from labor_jax.interop import hf
  from labor_jax.config import LlamaConfig
  base = LlamaConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=128)
  hf.save(base, model.init_params(base, jax.random.key(5)), tmp_path / "base")
  common = ["steps=6", "ckpt_every=6", "eval_every=6", "batch_size=8", "mesh.data=2", "mesh.fsdp=2",
            f"model.hf_path={tmp_path / 'base'}"]
  code, out, err = run_train(tmp_path / "single", nlsy_dataset, *common, devices=4)
  assert code == 0, err

  def multi(sleep=0.0):
    port = free_port()
    return [spawn_train(tmp_path / "multi", nlsy_dataset, *common, "distributed.initialize=true",
                        f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                        f"distributed.process_id={i}", devices=2, sleep=sleep) for i in range(2)]
  procs = multi(sleep=1.0)  # the notice sent after step 2 must reach both before step 5 ends: 3 s, on a loaded machine
  deadline = time.time() + 240
  while not (tmp_path / "multi" / "metrics.jsonl").exists() or len(read_metrics(tmp_path / "multi")) < 2:
    assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)  # one process only
  results = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  saved = [int(out.split("saved checkpoint at step ")[1].split(",")[0]) for out, _ in results]
  assert saved[0] == saved[1] < 6 and final_params(tmp_path / "multi")[0] == saved[0]
  assert "2 process(es)" in results[0][0] and "4 cpu devices" in results[0][0]

  procs = multi()
  results = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  assert f"resumed from step {saved[0]}" in results[0][0]
  single, both = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
  assert [r["step"] for r in both] == list(range(1, 7))  # only process 0 writes metrics
  # Two processes (gloo) versus one, 6 steps: each step's pass over 4 x 64 tokens sums in other orders and its
  # error passes through the layers again at each later step. The validation perplexity is the exp of a
  # mean log-prob: compared as its log.
  depth = numerics.forward_terms(RunDir(tmp_path / "single").model_config(), tokens=4 * 64)
  steps = dict(terms=depth["terms"], layers=6 * depth["layers"])
  for key in ("loss", "grad_norm"):  # the gradient's norm too: AdamW's steps hardly notice a scaled gradient
    numerics.assert_close([r[key] for r in both], [r[key] for r in single], **steps, what=key)
  numerics.assert_close(both[-1]["val_loss"], single[-1]["val_loss"], **steps, what="val_loss")
  numerics.assert_close(np.log(both[-1]["val_occupation_ppl"]), np.log(single[-1]["val_occupation_ppl"]), **steps,
                        what="log val_occupation_ppl")
  (_, want), (step, got) = final_params(tmp_path / "single"), final_params(tmp_path / "multi")
  assert step == 6
  # Adam moves a weight by about lr = 0.003 a step whatever the gradient's size, so a gradient's relative error
  # moves it by lr times that: far inside the bound at the weights' scale (at least 1: the norms' weights).
  jax.tree.map(lambda a, b: numerics.assert_close(b, a, **steps, what="final weights"), want, got)


def test_lora_scanned_run_exports_merged_checkpoint_that_pytorch_loads(tmp_path, nlsy_dataset, torch):
  import transformers

  from labor_jax import lora, model
  from labor_jax.cli import export
  from labor_jax.rundir import RunDir
  run_dir = tmp_path / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, "steps=3", "ckpt_every=3", "eval_every=3", "lora.enabled=true",
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
  # The merged export in PyTorch versus adapters unmerged here: one forward pass's float32 bound.
  numerics.assert_close(ours, theirs, **numerics.forward_terms(config, tokens=tokens.shape[1]), what="PyTorch logits")
  assert (tmp_path / "hf" / "tokenizer.model").exists()


def test_keeps_latest_and_best_checkpoints(tmp_path):
  import jax.numpy as jnp

  from labor_jax import checkpoint
  mgr = checkpoint.manager(tmp_path / "ck", keep=2, async_save=False, metric="val_loss")
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


def test_mfu_is_logged_against_the_given_peak(uninterrupted):
  """Every logged step records MFU = positions/s x model FLOPs per position / peak; rows of TINY are all real
  tokens (resumes are cut at 64), so positions/s equals the logged tokens/s."""
  from labor_jax import flops
  from labor_jax.training import config as train_config
  from labor_jax.rundir import RunDir
  run = RunDir(uninterrupted)
  cfg = run.train_config()
  fpt = flops.train_flops_per_token(run.model_config(), cfg.data.seq_len)
  assert cfg.peak_flops_per_chip == 1e12 and isinstance(cfg, train_config.TrainConfig)
  rows = read_metrics(uninterrupted)
  assert all("mfu" in r for r in rows)  # log_every=1
  for r in rows:
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12, rel=1e-6) and 0 < r["mfu"] < 1
