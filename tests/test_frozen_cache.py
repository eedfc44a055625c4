"""lora.cache_frozen: the frozen lower blocks' output, computed once, gives the full pass's loss, gradients
and training run; a wrong cache (one block short, rows swapped) does not."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labor_jax import labels, lora, model
from labor_jax.config import ConfigError, llama_tiny
from labor_jax.training import config as train_config
from labor_jax.training import core as train_core
from tests import numerics
from tests.runs import TINY

TARGETS = r"(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def _batch(rng, b=3, t=16, vocab=128):
  lengths = np.array([t, t - 5, 7])[:b]
  inputs = rng.integers(3, vocab, (b, t)).astype(np.int32)
  seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  inputs = inputs * seg
  return {"inputs": inputs, "targets": np.roll(inputs, -1, 1) * seg, "loss_mask": seg, "segment_ids": seg,
          "positions": (np.arange(t)[None] * seg).astype(np.int32)}


def test_cached_lower_blocks_give_the_full_passs_loss_and_gradients():
  config = llama_tiny(vocab_size=128, num_hidden_layers=4)
  rx = train_config.lora_targets(train_config.LoraConfig(enabled=True, targets=TARGETS, top_layers=2), config)
  cfg, params = lora.add_adapters(config, model.init_params(config, jax.random.key(0)), jax.random.key(1), rank=4,
                                  targets=rx)
  # lora_b starts at zero; give it values so that every adapter's gradient is non-trivial
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if labels.path_str(p).endswith("lora_b") else x, params)
  tree = labels.label_tree(params, labels.ADAPTERS)
  train, frozen = labels.split(params, tree)
  batch = _batch(np.random.default_rng(0))

  def loss_and_grads(b, first_layer):
    f = lambda t: train_core.loss_sums(cfg, labels.merge(t, frozen), b, first_layer=first_layer)  # noqa: E731
    (total, tokens), g = jax.value_and_grad(f, has_aux=True)(train)
    return float(total / tokens), g

  want_loss, want_g = loss_and_grads(batch, 0)
  hidden = lambda n: np.asarray(model.lower_hidden(  # noqa: E731
      cfg, params, batch["inputs"], n, positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"]))
  got_loss, got_g = loss_and_grads(dict(batch, hidden=hidden(2)), 2)
  # The same products on the same inputs, in one program or two: a forward pass's float32 bound (its loss is a
  # log-sum-exp over the vocabulary), and the backward pass through the same blocks for the gradients.
  terms = numerics.forward_terms(cfg, tokens=16)
  numerics.assert_close(got_loss, want_loss, **terms, what="loss")
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
    numerics.assert_close(g, w, **terms, what=labels.path_str(path))
  assert len(jax.tree.leaves(got_g)) == 2 * 7 * 2  # lora_a and lora_b of 7 projections in each of the top 2 blocks

  # Broken caches fail the same bound: one block short, and the rows of another batch order.
  short_loss, _ = loss_and_grads(dict(batch, hidden=hidden(1)), 2)
  swapped_loss, _ = loss_and_grads(dict(batch, hidden=hidden(2)[[1, 0, 2]]), 2)
  for bad, what in ((short_loss, "a block short"), (swapped_loss, "rows swapped")):
    with pytest.raises(AssertionError):
      numerics.assert_close(bad, want_loss, **terms, what=what)


def _run(tmp_path, nlsy_dataset, name, *extra):
  from labor_jax.training import loop
  cfg = train_config.load("configs/demo.yaml", TINY + [
      f"run_dir={tmp_path / name}", f"data.dataset_dir={nlsy_dataset}", "model.num_hidden_layers=3",
      "mesh.data=8", "batch_size=8", "steps=3", "eval_metric=occupation_perplexity", "lora.enabled=true", "lora.rank=4",
      "lora.top_layers=1", f"lora.targets={TARGETS}", *extra])
  trainer = loop.setup(cfg)
  loop.train(trainer, [])
  return trainer


def test_a_run_with_cache_frozen_trains_and_validates_like_one_without(tmp_path, nlsy_dataset, capsys):
  """Three steps on an 8-device mesh with and without the cache: the same adapters (the grain stream gives both
  the same batches) and the same validation figures. The cache holds every training row once, and refuses a row
  it never saw."""
  plain = _run(tmp_path, nlsy_dataset, "plain")
  cached = _run(tmp_path, nlsy_dataset, "cached", "lora.cache_frozen=true")
  assert "lora.cache_frozen: the 2 frozen blocks' output for" in capsys.readouterr().out
  assert plain.frozen_cache is None and cached.frozen_cache.n_layers == 2
  n_train = len(cached.data.source("train"))
  assert cached.frozen_cache.hidden_NTD.shape[0] == n_train
  terms = numerics.forward_terms(cached.config, tokens=cached.cfg.data.seq_len)
  # Three optimizer steps of AdamW on the same gradients: each step's update is lr-sized whatever the gradient's
  # rounding, so the bound is a forward pass's, times the steps the roundings can compound through.
  tree = cached.label_tree
  got = labels.split(cached.state.params, tree)[0]
  want = labels.split(plain.state.params, tree)[0]
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    numerics.assert_close(g, w, terms=terms["terms"], layers=terms["layers"] * 3, what=labels.path_str(path))
  # lora_b starts at zero: the steps moved it (so the comparison above is of trained adapters)
  assert max(float(jnp.abs(x).max()) for p, x in jax.tree_util.tree_leaves_with_path(got)
             if labels.path_str(p).endswith("lora_b")) > 0
  # Validation from the frozen blocks' output (computed at the first call, kept for the next) gives the
  # whole pass's figures for the same weights.
  want = plain.occupation(cached.state.params)
  for _ in range(2):
    got = cached.occupation(cached.state.params)
    for key in ("val_occupation_ppl", "val_loss"):
      numerics.assert_close(got[key], want[key], **terms, what=key)
  local = next(iter(cached.data_iter))
  bad = dict(local, inputs=local["inputs"] + 1)
  with pytest.raises(RuntimeError, match="not in the cache"):
    cached.frozen_cache.lookup(bad)


@pytest.mark.parametrize("extra, match", [
    (["lora.enabled=true"], "lora.top_layers"),
    (["lora.enabled=true", "lora.top_layers=1", "data.pack=true"], "data.pack"),
    ([], "lora.enabled"),
])
def test_cache_frozen_needs_top_layers_unpacked_rows_and_lora(extra, match):
  with pytest.raises(ConfigError, match=match):
    train_config.load("configs/demo.yaml", ["lora.cache_frozen=true", *extra])
  from labor_jax.training import frozen_cache
  assert frozen_cache.first_trained_layer(30, 15) == 15 and frozen_cache.first_trained_layer(2, 15) == 0


def test_scoring_shares_the_first_blocks_between_models_that_have_them(nlsy_dataset):
  """inference.SharedLower: a fine-tune that changed only the top blocks is scored from the first model's lower
  blocks' output and gets its own whole-pass scores; a model whose lower blocks differ is scored whole (its
  fingerprint differs), and would get other scores from the shared states."""
  from data_pipeline.dataset_dir import DatasetDir
  from labor_jax import inference
  data = DatasetDir(nlsy_dataset)
  tok = data.tokenizer()
  config = llama_tiny(vocab_size=tok.vocab_size, num_hidden_layers=4)
  base = model.init_params(config, jax.random.key(0))

  def nudged(params, block):
    return {**params, block: jax.tree.map(lambda x: x * 1.5, params[block])}
  src = data.source("test")
  rows = [(src[i]["tokens"], src[i]["title_spans"][:, 0]) for i in range(6)]
  titles = data.titles()

  def scores(params, shared=None):
    loaded = inference.Loaded(config, params, tok, "test", inference.HF, "test")
    out = inference.score_examples(loaded, titles, data.variant, rows, batch_workers=4, shared=shared)
    return np.concatenate([norm for norm, _ in out])

  shared = inference.SharedLower(2)
  terms = numerics.forward_terms(config, tokens=256)
  numerics.assert_close(scores(base, shared), scores(base), **terms, what="the first model")
  assert shared.last_used and len(shared.lowers) == 2  # two batches of 4 workers
  tuned = nudged(base, "layers_3")
  numerics.assert_close(scores(tuned, shared), scores(tuned), **terms, what="top block changed")
  assert shared.last_used and len(shared.lowers) == 2
  other = nudged(base, "layers_0")
  whole = scores(other)
  numerics.assert_close(scores(other, shared), whole, **terms, what="lower block changed")
  assert not shared.last_used
  shared.usable = lambda loaded: True  # a broken fingerprint: the base's lower states for another lower half
  with pytest.raises(AssertionError, match="bound"):
    numerics.assert_close(scores(other, shared), whole, **terms, what="another model's lower states")


def test_a_later_seed_reads_the_frozen_blocks_output_the_first_kept(tmp_path, nlsy_dataset, tiny_hf, capsys):
  """lora.cache_dir: seed 1 of a Hugging Face base on the same data reads the training rows' and the validation
  batches' frozen-block output that seed 0 kept: the same bytes as computing them (so the same training), and
  seed 1's validation from the read output gives what seed 0's computed output gives for seed 1's weights."""
  store = tmp_path / "frozen"
  base = [f"model.hf_path={tiny_hf}", "lora.cache_frozen=true"]  # 2 blocks: the adapters in the top one
  first = _run(tmp_path, nlsy_dataset, "seed0", *base, f"lora.cache_dir={store}")
  first.occupation(first.state.params)  # the validation batches' output is kept at the first call
  out = capsys.readouterr().out
  assert out.count("kept in") == 2 and "read from" not in out
  assert sorted(p.name.split("-")[0] for p in store.iterdir()) == ["train", "validation"]
  second = _run(tmp_path, nlsy_dataset, "seed1", *base, f"lora.cache_dir={store}", "seed=1")
  got = second.occupation(second.state.params)
  out = capsys.readouterr().out
  assert out.count("read from") == 2 and "kept in" not in out, out
  np.testing.assert_array_equal(second.frozen_cache.hidden_NTD, first.frozen_cache.hidden_NTD)
  tree = first.label_tree
  assert not all(np.array_equal(g, w) for g, w in zip(jax.tree.leaves(labels.split(second.state.params, tree)[0]),
                                                      jax.tree.leaves(labels.split(first.state.params, tree)[0])))
  want = first.occupation(second.state.params)  # seed 0's own lower-block output, seed 1's weights
  terms = numerics.forward_terms(first.config, tokens=first.cfg.data.seq_len)
  for key in ("val_occupation_ppl", "val_loss"):
    numerics.assert_close(got[key], want[key], **terms, what=key)


def test_the_store_is_keyed_by_the_frozen_weights_and_refuses_what_it_cannot_read(tmp_path):
  """A base whose lower blocks, numerics (dtype, RoPE) differ gets another entry (its output is never read for
  another model's); a change in the trained top blocks or the adapters' settings does not; an entry that cannot be
  read, or holds other shapes, stops with one line naming it; a write that fails leaves nothing, and one the file
  system refuses is said and skipped."""
  from labor_jax.training import frozen_cache
  config = llama_tiny(vocab_size=128, num_hidden_layers=4)
  base = model.init_params(config, jax.random.key(0))
  scaled = lambda block: {**base, block: jax.tree.map(lambda x: x * 1.5, base[block])}  # noqa: E731
  said = []

  def store(params=base, cfg=config):
    return frozen_cache.Store.open(tmp_path / "s", cfg, params, 2, log=said.append)
  path = lambda *a, **k: store(*a, **k).path("train", np.arange(3))  # noqa: E731
  assert path() == path(scaled("layers_3")) == path(cfg=config.replace(lora_rank=4, remat=True))
  for other in (path(scaled("layers_1")), path(scaled("embed_tokens")), path(cfg=config.replace(rope_theta=500.0)),
                path(cfg=config.replace(dtype="bfloat16")), store().path("train", np.arange(4))):
    assert other != path()
  assert frozen_cache.Store.open(tmp_path, config, base, 0) is None
  assert frozen_cache.Store.open(None, config, base, 2) is None
  hidden = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, 8)), jnp.bfloat16)
  s, where = store(), path()
  want = {"hidden": (hidden.shape, hidden.dtype)}
  assert s.save(where, {"hidden": hidden})
  got = s.load(where, want)["hidden"]
  assert got.dtype == hidden.dtype and np.array_equal(got, hidden)
  assert s.load(tmp_path / "nothing", want) is None
  with pytest.raises(ConfigError, match=r"hidden is bfloat16\[3, 5, 8\], this run computes float32\[3, 5, 8\]"):
    s.load(where, {"hidden": (hidden.shape, np.float32)})
  with pytest.raises(ConfigError, match="a lora.cache_dir entry that cannot be read"):
    s.load(where, {"other": (hidden.shape, hidden.dtype)})
  (where / "hidden.npy").write_bytes(b"not an array")
  with pytest.raises(ConfigError, match=f"{where}: a lora.cache_dir entry that cannot be read"):
    s.load(where, want)
  with pytest.raises(TypeError):
    s.save(tmp_path / "s" / "half", {"ok": hidden, "bad": object()})
  assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [where.name]
  (tmp_path / "a_file").write_text("")  # a store under a file: the file system refuses it (whoever runs the test)
  assert not s.save(tmp_path / "a_file" / "refused", {"hidden": hidden})
  assert said[-1].startswith(f"lora.cache_dir: could not keep {tmp_path / 'a_file' / 'refused'}")


def test_cache_dir_needs_cache_frozen():
  with pytest.raises(ConfigError, match="lora.cache_dir: keeps the output of lora.cache_frozen"):
    train_config.load("configs/demo.yaml", ["lora.cache_dir=somewhere"])


WRITER = r"""
import sys, time
from labor_jax.fileio import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
  (tmp / "part.npy").write_bytes(b"half written")
  print(tmp, flush=True)
  time.sleep(600)
"""


def test_what_a_killed_writer_left_is_removed_by_the_next_run(tmp_path):
  """A process killed outright (SIGKILL) while it writes a store entry cannot remove its temporary directory;
  the next run's Store.open removes it and says so. The directories of running writers (another process, this
  one) are left: their lock is held. A copy set aside while an entry was replaced is removed when the entry is
  there, and put back when a writer died between its two renames; names that are not atomic_dir's are left."""
  import signal
  import subprocess
  import sys

  from labor_jax import fileio
  from labor_jax.training import frozen_cache
  from tests.runs import ROOT
  store = tmp_path / "store"

  def writer(name):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store / name)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    return proc, Path(proc.stdout.readline().strip())
  killed_proc, killed = writer("train-abc")
  killed_proc.send_signal(signal.SIGKILL)
  killed_proc.wait()
  live_proc, live = writer("train-xyz")  # another entry: its writer removes only its own entry's leftovers
  try:
    assert killed.parent == store and (killed / "part.npy").exists() and killed != live
    assert (store / (killed.name + fileio.LOCK)).exists()
    (store / "validation-abc").mkdir()
    replaced = store / f".validation-abc.old.{'0' * 32}"  # its entry is there: a leftover
    died_between = store / f".train-def.old.{'1' * 32}"  # its entry is not: the writer died between renames
    unrelated = store / ".train-abc.tmp-mine"
    for d in (replaced, died_between, unrelated):
      d.mkdir()
    (died_between / "hidden.npy").write_bytes(b"whole")
    said = []
    with fileio.atomic_dir(store / "validation-def") as running:
      config = llama_tiny(vocab_size=128, num_hidden_layers=4)
      assert frozen_cache.Store.open(store, config, model.init_params(config, jax.random.key(0)), 2,
                                     log=said.append)
      left = sorted(p.name for p in store.iterdir())
      assert left == sorted([live.name, live.name + fileio.LOCK, running.name, running.name + fileio.LOCK,
                             unrelated.name, "validation-abc", "train-def"]), left
    assert (store / "train-def" / "hidden.npy").read_bytes() == b"whole"
    assert sorted(said) == sorted(f"lora.cache_dir: removed {p.name}, left by a run that was stopped while writing "
                                  "it" for p in (killed, replaced))
  finally:
    live_proc.kill()
    live_proc.wait()
  assert fileio.remove_stale(store) == [live]  # its writer is gone now
  assert sorted(p.name for p in store.iterdir()) == sorted([unrelated.name, "validation-abc", "validation-def",
                                                            "train-def"])


def test_a_writer_whose_directory_vanished_stops_and_keeps_the_entry(tmp_path):
  """If a writer's temporary directory is removed under it (by hand, by a wrong clean-up), the replace stops
  with the error and the entry it would have replaced is there as it was (before, it looped for ever, having
  deleted the entry)."""
  import shutil

  from labor_jax import fileio
  entry = tmp_path / "entry"
  entry.mkdir()
  (entry / "a").write_text("kept")
  with pytest.raises(FileNotFoundError):
    with fileio.atomic_dir(entry) as tmp:
      shutil.rmtree(tmp)
  assert (entry / "a").read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
