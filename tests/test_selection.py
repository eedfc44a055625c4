"""Which checkpoint is reported: the validation occupation perplexity logged at every evaluation
(equal to evaluation's), BestN and "best" by the run's eval_metric, token loss as before."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from labor_jax import checkpoint, evaluation, inference, selection
from labor_jax.training import validation
from labor_jax.rundir import RunDir
from tests import numerics
from tests.runs import longest_resume, read_metrics, run_train

# LoRA on scanned layers, a (data=2, fsdp=2) mesh of 4 devices, validation loss on the work histories.
RUN = ["steps=6", "eval_every=2", "ckpt_every=2", "keep=1", "eval_batches=0", "data.loss_on=history", "lora.enabled=true",
       "lora.rank=4", "model.scan_layers=true", "mesh.data=2", "mesh.fsdp=2"]


@pytest.fixture(scope="module")
def occupation_run(tmp_path_factory, nlsy_dataset):
  run_dir = tmp_path_factory.mktemp("occupation") / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, *RUN, devices=4)
  assert code == 0, err
  return run_dir, out

def _tb_scalars(events_dir) -> dict:
  """{tag: {step: value}} from tensorboardX event files (TFRecord framing of Event protos)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for f in events_dir.iterdir():
    buf, i = f.read_bytes(), 0
    while i < len(buf):
      n = struct.unpack("<Q", buf[i:i + 8])[0]
      event = event_pb2.Event.FromString(buf[i + 12:i + 12 + n])
      i += 16 + n
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def _kept(run_dir):
  return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _reference_perplexity(run_dir, step) -> tuple[float, float]:
  """exp(-mean log P) of the true titles of the validation transitions (t >= 1), from evaluation.llm_scores,
  and the largest |log P| of all candidates (the magnitude its float32 error scales with)."""
  loaded = inference.open_model(run_dir, step=step)
  data = loaded.dataset()
  scores = evaluation.llm_scores(loaded, data.titles(), data.variant, data, "validation")
  src = data.source("validation")
  occ = {(e["dataset"].decode(), e["person_id"].decode()): e["occupations"] for e in (src[i] for i in range(len(src)))}
  logp = [r.llm_norm[occ[(r.dataset, r.person_id)][r.t]] for r in scores.itertuples() if r.t >= 1]
  return float(np.exp(-np.mean(logp))), float(np.abs(np.stack(scores["llm_norm"].to_numpy())).max())


def test_validation_perplexity_is_logged_equals_evaluation_and_picks_best(occupation_run):
  """The perplexity logged at each evaluation is evaluation's on the validation split, and the
  kept / "best" step is the lowest one."""
  run_dir, out = occupation_run
  rows = read_metrics(run_dir)
  evals = {r["step"]: r["val_occupation_ppl"] for r in rows if "val_occupation_ppl" in r}
  assert sorted(evals) == [r["step"] for r in rows if "val_loss" in r] == [2, 4, 6]
  assert out.count("validation occupation perplexity") == 3
  tb = _tb_scalars(run_dir / "tb")
  assert set(tb["eval/occupation_perplexity"]) == set(tb["eval/loss"]) == {2, 4, 6}
  np.testing.assert_allclose(tb["eval/occupation_perplexity"][6], evals[6], rtol=1e-6)  # TensorBoard keeps float32
  assert json.loads((run_dir / "summary.json").read_text())["best_by"] == "val_occupation_ppl"

  best = min(evals, key=evals.get)
  assert _kept(run_dir) == sorted({best, 6})  # keep=1: the latest and the best by perplexity
  assert RunDir(run_dir).load_model(step="best")[2] == best
  # Training's pass on 4 devices versus evaluation's on one: a log-perplexity is a mean of log-probs of one
  # forward pass, within its float32 bound at the log-probs' magnitude.
  depth = numerics.forward_terms(RunDir(run_dir).model_config(), tokens=longest_resume(RunDir(run_dir).dataset().path,
                                                                                      "validation"))
  for step in sorted({best, 6}):
    want, scale = _reference_perplexity(run_dir, step)
    numerics.assert_close(np.log(evals[step]), np.log(want), **depth, scale=scale, what=f"step {step}")


def test_token_loss_keeps_the_old_behaviour(tmp_path, nlsy_dataset, occupation_run):
  """The same run under eval_metric=token_loss: no perplexity, the best step by the loader's validation
  loss, which equals the one the perplexity's pass computed alongside."""
  run_dir = tmp_path / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, *RUN, "eval_metric=token_loss", devices=4)
  assert code == 0, err
  rows = read_metrics(run_dir)
  assert not any("val_occupation_ppl" in r for r in rows) and "occupation perplexity" not in out
  losses = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
  best = min(losses, key=losses.get)
  assert _kept(run_dir) == sorted({best, 6})
  assert RunDir(run_dir).load_model(step="best")[2] == best
  assert checkpoint._reader(run_dir / "checkpoints").metrics(6) == {"val_loss": pytest.approx(losses[6])}
  fused = read_metrics(occupation_run[0])
  np.testing.assert_array_equal([r["loss"] for r in rows], [r["loss"] for r in fused])  # the same training
  # The loader's validation loss versus the one the scoring pass computed alongside: other batches and orders
  # of one forward pass over training rows (data.seq_len tokens).
  numerics.assert_close(list(losses.values()), [r["val_loss"] for r in fused if "val_loss" in r],
                        **numerics.forward_terms(RunDir(run_dir).model_config(),
                                                 tokens=RunDir(run_dir).train_config().data.seq_len), what="val_loss")


def _save_steps(directory, metric, records):
  mgr = checkpoint.manager(directory, keep=1, async_save=False, metric=metric)
  for step, metrics in records:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": {"w": jnp.full(2, step, jnp.float32)}})),
             metrics=metrics)
  mgr.wait_until_finished()
  return mgr


def test_best_is_the_lowest_of_the_run_metric_and_old_runs_keep_val_loss(tmp_path):
  """Perplexity and loss disagree: BestN keeps, and "best" reads, the lowest perplexity; a run with
  val_loss only (from before eval_metric) still resolves "best" by it."""
  ppl = "val_occupation_ppl"
  records = [(1, {"val_loss": 0.5, ppl: 5.0}), (2, {"val_loss": 0.3, ppl: 6.0}), (3, {"val_loss": 0.4, ppl: 4.5}),
             (4, {"val_loss": 0.35, ppl: 4.8}), (5, None)]
  mgr = _save_steps(tmp_path / "new", ppl, records)
  assert mgr.all_steps() == [3, 5]  # the latest, and the lowest perplexity (not the lowest loss, step 2)
  assert checkpoint.resolve_step(tmp_path / "new", "best") == 3
  assert checkpoint.restore_params(tmp_path / "new", "best", metric=ppl)[0] == 3

  old = [(s, m and {"val_loss": m["val_loss"]}) for s, m in records]
  assert _save_steps(tmp_path / "old", "val_loss", old).all_steps() == [2, 5]
  assert checkpoint.resolve_step(tmp_path / "old", "best") == 2  # default metric absent: judged by val_loss
  assert selection.best_step({1: None, 2: {}}) is None


def test_a_dataset_without_transitions_falls_back_to_token_loss(nlsy_dataset):
  from data_pipeline.dataset_dir import DatasetDir
  data = DatasetDir(nlsy_dataset)
  lines = []
  one_entry = [{"tokens": np.arange(5), "title_spans": np.zeros((1, 2), np.int32), "occupations": np.zeros(1, np.int32)}]
  assert validation.unavailable(data, one_entry) == "the validation split has no transitions"
  assert validation.unavailable(data, [{"tokens": np.arange(5)}]) == "its resumes have no title spans"
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  assert validation.occupation_metrics(None, data, None, mesh, batch_workers=1, max_workers=0,
                                          log=lines.append) is None
  assert lines == [("eval_metric: no occupation perplexity (the validation split has no transitions); "
                    "the best checkpoint is chosen by validation loss")]
