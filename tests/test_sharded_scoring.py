"""Scoring, evaluation and prediction on device meshes and across processes (8 fake CPU devices)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from labor_jax import evaluation, inference, sharding
from labor_jax.rundir import RunDir
from tests import numerics
from tests.runs import ROOT, cpu_env, free_port, longest_resume, run_train

# (mesh, workers per tree pass): each takes the model's sums in another order (sharded contractions, gathered
# and reduced over other devices, other batch tilings); None is one device, the whole batch of 16 at once.
MESHES = [(None, None), (None, 4), ("data=8", 8), ("fsdp=4,tensor=2", None), ("data=2,fsdp=2,tensor=2", 4)]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, nlsy_dataset):
  """A tiny run trained on an (fsdp=8) mesh of 8 devices, with 2 key/value heads so tensor=2 divides them."""
  run_dir = tmp_path_factory.mktemp("fsdp") / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, "steps=6", "ckpt_every=6", "eval_every=6", "batch_size=8",
                             "mesh.fsdp=8", "model.num_key_value_heads=2", "data.loss_on=history", devices=8)
  assert code == 0, err
  return run_dir


def _open(run_dir, mesh_spec):
  return inference.open_model(run_dir, mesh=None if mesh_spec is None else
                              sharding.make_mesh(**sharding.parse_mesh(mesh_spec)))


def _scores(loaded, chunk=None):
  data = loaded.dataset()
  df = evaluation.llm_scores(loaded, data.titles(), data.variant, data, "test", batch_workers=16, chunk=chunk)
  return np.stack(df["llm_norm"].to_numpy()), np.stack(df["llm_raw"].to_numpy())


def _depth(loaded):
  """One forward pass of the test split: sums over hidden/intermediate size and the longest resume, through
  every layer (:func:`tests.numerics.forward_terms`)."""
  return numerics.forward_terms(loaded.config, tokens=longest_resume(loaded.dataset().path))


def _swap_tensor_shards(x):
  """``x`` with its two shards along the tensor=2 axis swapped, in the same sharding: what a shard put on
  the wrong devices computes."""
  axis = list(x.sharding.spec).index("tensor")
  return jax.device_put(np.concatenate(np.split(np.asarray(x), 2, axis=axis)[::-1], axis=axis), x.sharding)


def test_scores_on_every_mesh_equal_one_device(fsdp_run):
  """Trained on (fsdp=8), restored and scored on one device and on four meshes and batch tilings: the log-probs
  agree to the float32 bound of sums taken in another order, with the same top 5 (up to near ties); one
  layer's MLP with a shard of its up projection on the wrong devices (paired with the other half of the
  gate) fails the same bound."""
  loaded = [(spec, _open(fsdp_run, spec), chunk) for spec, chunk in MESHES]
  (_, one, _), *others = loaded
  norm0, raw0 = _scores(one)
  top0 = np.argsort(-norm0, axis=1)[:, :5]
  depth = _depth(one)
  for spec, m, chunk in others:
    norm, raw = _scores(m, chunk)
    numerics.assert_close(norm, norm0, **depth, what=f"{spec} chunk={chunk} normalised")
    numerics.assert_close(raw, raw0, **depth, what=f"{spec} chunk={chunk} raw")
    # The same top 5, up to swaps of two candidates whose log-probs are within twice the bound (each moved
    # by at most the bound).
    gap = np.take_along_axis(norm0, top0, 1) - np.take_along_axis(norm0, np.argsort(-norm, axis=1)[:, :5], 1)
    assert np.abs(gap).max() <= 2 * numerics.tolerance(norm0, **depth), spec
  spec, m, _ = next(x for x in loaded if x[0] == "fsdp=4,tensor=2")
  mlp = m.params["layers_0"]["mlp"]
  broken = dataclasses.replace(m, params={**m.params, "layers_0": {**m.params["layers_0"], "mlp": {
      **mlp, "up_proj": {**mlp["up_proj"], "kernel": _swap_tensor_shards(mlp["up_proj"]["kernel"])}}}})
  with pytest.raises(AssertionError, match="bound"):
    numerics.assert_close(_scores(broken)[0], norm0, **depth, what=f"{spec}, layer 0's up projection shards swapped")


@pytest.mark.parametrize("most, multiple, want", [(16, 1, 15), (16, 8, 16), (64, 1, 57), (200, 1, 113),
                                                   (8, 2, 8)])
def test_even_batches_take_the_fewest_calls_with_the_least_padding(most, multiple, want):
  """113 workers (the NLSY test split) in calls of at most ``most`` rows, a multiple of ``multiple``."""
  got = inference.even_batches(113, most, multiple)
  assert got == want
  calls = -(-113 // got)
  assert calls == -(-113 // most) and got % multiple == 0 and got <= most
  assert inference.even_batches(1, 16, 4) == 4 and inference.even_batches(0, 16) == 16


def test_a_chunk_that_does_not_divide_the_batch_is_refused_whatever_the_rows(fsdp_run):
  """--chunk 6 with --batch-workers 16 stops with one line, for 13 workers (a batch of 16) as for 10 (12)."""
  from labor_jax.config import ConfigError
  one = _open(fsdp_run, None)
  data = one.dataset()
  src = data.source("test")
  for n in (10, 13):
    rows = [(src[i]["tokens"], src[i]["title_spans"][:, 0]) for i in range(n)]
    with pytest.raises(ConfigError, match="--chunk 6 does not divide --batch-workers 16"):
      inference.score_examples(one, data.titles(), data.variant, rows, batch_workers=16, chunk=6)


@pytest.mark.devices(4)
def test_rows_are_split_evenly_over_calls_and_score_as_in_one_call(fsdp_run, monkeypatch):
  """11 workers with at most 8 a call: two calls of 6 (not 8 and 3 padded to 8; on data=4, calls of 8: 6 rounded up to 4s);
  with at most 16, one call of 11. Each worker's log-probs the same in both, to the float32 bound of one forward pass."""
  one = _open(fsdp_run, None)
  data = one.dataset()
  src = data.source("test")
  rows = [(src[i]["tokens"], src[i]["title_spans"][:, 0]) for i in range(11)]
  packed, pack = [], inference.pack
  monkeypatch.setattr(inference, "pack", lambda part, batch, n, t: packed.append((len(part), batch)) or
                      pack(part, batch, n, t))
  alone = inference.score_examples(one, data.titles(), data.variant, rows, batch_workers=16)
  assert packed == [(11, 11)]  # fewer rows than a batch: one call of just those rows
  packed.clear()
  got = inference.score_examples(one, data.titles(), data.variant, rows, batch_workers=8)
  assert packed == [(6, 6), (5, 6)]
  packed.clear()
  four = inference.open_model(fsdp_run, mesh=sharding.make_mesh(data=4, devices=jax.devices()[:4]))
  inference.score_examples(four, data.titles(), data.variant, rows, batch_workers=8)
  assert packed == [(8, 8), (3, 8)]  # 6 rounded up to a multiple of 4
  depth = numerics.forward_terms(one.config, tokens=max(len(r[0]) for r in rows))
  for i, ((norm, raw), (norm1, raw1)) in enumerate(zip(got, alone)):
    assert norm.shape == norm1.shape == (len(rows[i][1]), len(one.candidates(data.titles(), data.variant)))
    numerics.assert_close(norm, norm1, **depth, what=f"worker {i} normalised")
    numerics.assert_close(raw, raw1, **depth, what=f"worker {i} raw")


def test_restoring_for_scoring_places_parameters_only_in_their_shardings(fsdp_run):
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  alive = jax.live_arrays()  # held, so no array freed here can lend its id to a new one
  before = {id(x) for x in alive}
  config, params, step = RunDir(fsdp_run).load_model(mesh=mesh)
  created = [x for x in jax.live_arrays() if id(x) not in before]
  leaves = jax.tree.leaves(params)
  assert {id(x) for x in created} == {id(x) for x in leaves}  # no optimizer moment, no staging copy
  assert all(x.sharding.mesh == mesh for x in leaves)
  assert sharding.unsharded_params(params, min_size=2 ** 10) == []
  assert not any(len(x.sharding.device_set) == 1 and x.size >= 2 ** 10 for x in leaves)


def _evaluate(run_dir, out, devices, *extra, processes=1):
  env = cpu_env(devices)
  cmd = [sys.executable, "-m", "labor_jax.evaluate", "--run", str(run_dir), "--out", str(out), "--no-career",
         "--no-progress", *extra]
  if processes == 1:
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  else:
    port = free_port()
    procs = [subprocess.Popen(cmd + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                                     "--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (o, e) in zip(procs, results):
    assert p.returncode == 0, e[-3000:]
  return [o for o, _ in results]


def test_two_processes_evaluate_like_one(tmp_path, fsdp_run):
  """2 processes x 2 CPU devices (gloo) give the files of 1 process x 4 devices, written once."""
  _evaluate(fsdp_run, tmp_path / "one", 4, "--mesh", "data=2,fsdp=2")
  outs = _evaluate(fsdp_run, tmp_path / "two", 2, "--mesh", "data=2,fsdp=2", processes=2)
  assert "full report" in outs[0] and "full report" not in outs[1] and "perplexity" not in outs[1]
  assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
  a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
  pa, pb = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("one", "two"))
  # Gloo's reductions and one process's sum in other orders: the float32 bound of one forward pass; a
  # log-perplexity is a mean of those log-probs, held to the same bound at their magnitude.
  depth = _depth(inference.open_model(fsdp_run))
  numerics.assert_close(pb["logprob"], pa["logprob"], **depth, what="predictions.csv logprob")
  for name in a["models"]:
    numerics.assert_close(np.log(b["models"][name]["perplexity"]), np.log(a["models"][name]["perplexity"]),
                          **depth, scale=np.abs(pa["logprob"]).max(), what=f"{name} log-perplexity")
  assert (pa["top5"].str.replace(r" \(\d\.\d+\)", "", regex=True) ==
          pb["top5"].str.replace(r" \(\d\.\d+\)", "", regex=True)).all()


@pytest.fixture(scope="module")
def odd_vocab_hf(tmp_path_factory, nlsy_dataset):
  """A random tiny Llama with an odd vocabulary (the dataset tokenizer's size, made odd) and 2 KV heads,
  saved as a Hugging Face directory with the dataset's tokenizer."""
  from data_pipeline.dataset_dir import DatasetDir
  from labor_jax import model
  from labor_jax.config import llama_tiny
  from labor_jax.interop import hf
  data = DatasetDir(nlsy_dataset)
  v = data.tokenizer().vocab_size
  config = llama_tiny(vocab_size=v + (v + 1) % 2, num_attention_heads=4, num_key_value_heads=2)
  assert config.vocab_size % 2 == 1
  out = tmp_path_factory.mktemp("odd") / "hf"
  hf.save(config, model.init_params(config, jax.random.key(3)), out, tokenizer_dir=data.tokenizer_dir)
  return out


def test_a_vocabulary_the_tensor_axis_does_not_divide_is_padded_and_scores_like_one_device(odd_vocab_hf, nlsy_dataset):
  """open_model pads the vocabulary to the tensor axis (never refuses it); the padded rows get -inf logits, so
  the log-probs equal one device's; through the command line, --mesh fsdp=4,tensor=2 gives --mesh data=8's
  perplexities (before, it stopped: "dimension ... is not divisible by mesh axes 'tensor' of size 2")."""
  from data_pipeline.dataset_dir import DatasetDir
  from labor_jax import model
  from labor_jax.cli import evaluate
  data = DatasetDir(nlsy_dataset)
  one = inference.open_model(odd_vocab_hf)
  mesh = sharding.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
  padded = inference.open_model(odd_vocab_hf, mesh=mesh)
  v = one.config.vocab_size
  assert one.config.padded_vocab_size is None and padded.config.padded_vocab_size == v + 1
  embed = padded.params["embed_tokens"]["embedding"]
  assert embed.shape[0] == v + 1 and embed.sharding.spec[0] == "tensor"
  assert f"vocabulary padded {v} -> {v + 1}" in padded.description
  src = data.source("validation")
  rows = [(src[i]["tokens"], src[i]["title_spans"][:, 0]) for i in range(8)]
  a = inference.score_examples(one, data.titles(), data.variant, rows, batch_workers=4)
  b = inference.score_examples(padded, data.titles(), data.variant, rows, batch_workers=4)
  # Sharded over fsdp=2,tensor=2 versus one device: the float32 bound of one forward pass over these rows.
  depth = numerics.forward_terms(one.config, tokens=max(len(r[0]) for r in rows))
  for (na, ra), (nb, rb) in zip(a, b):
    numerics.assert_close(nb, na, **depth, what="normalised")
    numerics.assert_close(rb, ra, **depth, what="raw")
  # The validation token loss of the same pass (training's) leaves the padded rows out of the softmax too.
  n, t = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
  tokens_BN, mask_BN, ends_BT = inference.pack(rows, len(rows), n, t)
  cands = one.candidates(data.titles(), data.variant)
  xent = [float(inference.scoring_step(m.config, cands, m.mesh, inference.default_chunk(m.config, m.mesh, 8),
                                       token_loss=True)(
      m.params, *(inference.place_batch(x, m.mesh) for x in (tokens_BN, mask_BN, ends_BT, mask_BN)))["xent"])
      for m in (one, padded)]
  numerics.assert_close(xent[1], xent[0], **depth, what="validation token loss")  # a mean of log-probs
  tokens = np.asarray(rows[0][0])[None]
  logits = model.forward(padded.config, padded.params, tokens, mask_BT=np.ones_like(tokens))
  assert np.all(np.asarray(logits)[..., v:] == -np.inf) and np.isfinite(np.asarray(logits)[..., :v]).all()

  common = ["--hf", str(odd_vocab_hf), "--data", str(nlsy_dataset), "--no-career", "--bootstrap", "0", "--no-progress"]
  tmp = odd_vocab_hf.parent
  assert evaluate.main(common + ["--out", str(tmp / "data8"), "--mesh", "data=8"]) == 0
  assert evaluate.main(common + ["--out", str(tmp / "tensor2"), "--mesh", "fsdp=4,tensor=2"]) == 0
  x, y = (json.loads((tmp / d / "metrics.json").read_text())["models"][evaluation.MAIN_LLM] for d in ("data8", "tensor2"))
  # Log-perplexities: means of log-probs of one forward pass on two meshes (scale: the log-probs' magnitude).
  scale = max(np.abs(np.concatenate([*na, *ra])).max() for na, ra in a)
  for key in ("perplexity", "perplexity_raw"):
    numerics.assert_close(np.log(y[key]), np.log(x[key]), **depth, scale=scale, what=key)
