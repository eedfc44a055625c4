"""The validation split's next-occupation perplexity (and token loss), computed by the trainer at every evaluation.

:func:`occupation_metrics` builds, once per run, a function ``params -> metrics``:

* ``val_occupation_ppl``: the fused scorer (:func:`labor_jax.scorer.score`, normalised over the
  titles) on every validation worker's entries after the first (the transitions evaluation
  reports), exp(-mean log P(true title | history));
* ``val_loss`` (with ``token_loss=(seq_len, loss_on)``): the validation token loss of the trainer's
  unpacked validation rows, from the same encoding of the resumes. Causal attention makes a
  row cut to ``seq_len`` tokens see what the whole resume's first ``seq_len`` tokens see, so
  the loss is the loader's (same rows, masks and batches, the remainder dropped; tested equal
  to the separate pass) at the cost of the head alone.

The workers are padded to batches of one fixed shape that are placed on the mesh once, so the
jitted step compiles once and every evaluation only runs it (runs of the same shapes in one
process, as the main job's seeds, share the compiled step). Every process takes part in every
call (each supplies its devices' rows) and gets the same values.
Shape suffixes: W workers, B workers per call, N tokens, T transitions (entries after the first), J titles.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from data_pipeline import loader, resume
from data_pipeline.dataset_dir import TITLES, DatasetDir
from labor_jax import inference, scorer, sharding
from labor_jax.config import LlamaConfig


def unavailable(data: DatasetDir, examples: list[dict]) -> str | None:
  """Why ``examples`` of ``data`` cannot give an occupation perplexity (None when they can)."""
  if not (data.path / TITLES).exists():
    return f"{data.path} has no {TITLES}"
  if examples and not {"title_spans", "occupations"} <= set(examples[0]):
    return "its resumes have no title spans"
  if not any(len(e["occupations"]) > 1 for e in examples):
    return "the validation split has no transitions"
  return None


def loss_weights(examples: list[dict], n: int, seq_len: int, loss_on: str, local_batch: int,
                 processes: int) -> np.ndarray:
  """float32 [W, N]: weight of the target token ``i + 1`` at position ``i`` in the trainer's validation
  token loss: each worker's loss mask as the loader makes it, for the workers that the unshuffled
  batches of ``local_batch`` rows of every process (``p::processes``, remainder dropped) hold."""
  out = np.zeros((len(examples), n), np.float32)
  for p in range(processes):
    mine = range(p, len(examples), processes)
    for i in mine[:len(mine) // local_batch * local_batch]:
      m = loader.example(examples[i], seq_len, loss_on)["loss_mask"]
      out[i, :len(m)] = m
  return out


def occupation_metrics(config: LlamaConfig, data: DatasetDir, tokenizer, mesh: jax.sharding.Mesh, *,
                       batch_workers: int, max_workers: int | None = None, chunk: int | None = None,
                       token_loss: tuple[int, str] | None = None, frozen_layers: int = 0,
                       open_store: Callable[[Any], Any] | None = None, log=print) -> Callable[[Any], dict[str, float]] | None:
  """``params -> {"val_occupation_ppl": ..., "val_loss": ...}`` over ``data``'s validation split, or
  None (after one ``log`` line) when the dataset cannot give a perplexity (:func:`unavailable`).

  ``batch_workers`` workers go through the scorer per call (a multiple of the mesh's data x fsdp;
  the trainer's batch size); ``max_workers`` keeps the split's first workers only (None: all);
  ``chunk``: workers per tree pass (:func:`labor_jax.scorer.score`), by default one per device of
  the batch axes (the least memory). ``token_loss=(seq_len, loss_on)`` adds ``val_loss`` as the
  trainer's unpacked validation rows of that length and mask give it. ``params`` live on ``mesh``.
  ``frozen_layers``: the first blocks (and the embedding) never change between calls (``lora.cache_frozen``):
  their output for every batch is computed at the first call and kept, and each call runs the blocks above;
  ``open_store`` (``params -> Store | None``: the :class:`labor_jax.training.frozen_cache.Store` of those blocks,
  ``lora.cache_dir``): that output is read from the store when a run of the same weights and validation batches
  put it there, else put there.
  """
  src = data.source("validation")
  examples = [src[i] for i in range(len(src))][:max_workers]
  why = unavailable(data, examples)
  if why is not None:
    log(f"eval_metric: no occupation perplexity ({why}); the best checkpoint is chosen by validation loss")
    return None
  candidates = tokenizer.candidate_tokens(resume.candidate_texts(data.titles(), data.variant))
  cands, chunk = tuple(map(tuple, candidates)), chunk or inference.batch_size(mesh)
  step = inference.scoring_step(config, cands, mesh, chunk, token_loss is not None, frozen_layers)
  lower_step = inference.lower_step(config, cands, frozen_layers, mesh, chunk) if frozen_layers else None
  lowers = []  # the frozen blocks' output per batch, from the first call on
  b = batch_workers
  w = -(-len(examples) // b) * b
  n = max(len(e["tokens"]) for e in examples)
  t = max(len(e["occupations"]) for e in examples) - 1
  tokens_WN = np.zeros((w, n), np.int32)
  mask_WN = np.zeros_like(tokens_WN)
  ends_WT = np.ones((w, t), np.int32)  # unused steps: any prefix length in [1, N], ignored
  target_WT = np.zeros((w, t), np.int32)
  valid_WT = np.zeros((w, t), bool)
  weight_WN = np.zeros((w, n), np.float32)
  for i, e in enumerate(examples):
    k, m = len(e["tokens"]), len(e["occupations"]) - 1
    tokens_WN[i, :k], mask_WN[i, :k] = e["tokens"], 1
    ends_WT[i, :m], target_WT[i, :m], valid_WT[i, :m] = e["title_spans"][1:, 0], e["occupations"][1:], True
  if token_loss is not None:
    processes = jax.process_count()
    weight_WN[:len(examples)] = loss_weights(examples, n, *token_loss, b // processes, processes)

  inputs = (tokens_WN, mask_WN, ends_WT) + ((weight_WN,) if token_loss is not None else ())
  batches = [tuple(inference.place_batch(x[s:s + b], mesh) for x in inputs) for s in range(0, w, b)]
  true_logp = []  # the validation transitions' true titles, per batch: (row, step, title) indices
  for s in range(0, w, b):
    rows, steps = np.nonzero(valid_WT[s:s + b])
    true_logp.append((rows, steps, target_WT[s:s + b][rows, steps]))

  def frozen_output(params) -> list:
    store = None if open_store is None else open_store(params)
    path = None if store is None else store.path("validation", cands, chunk, b, dict(mesh.shape), tokens_WN, mask_WN,
                                                 ends_WT)  # the store's key holds the weights, their depth and dtype
    saved = None
    if path is not None:
      shapes = jax.eval_shape(lower_step, params, *batches[0][:3])._asdict()
      saved = store.load(path, {f"{k}{i}": (x.shape, x.dtype) for i in range(len(batches)) for k, x in shapes.items()})
    if saved is None:
      found = [lower_step(params, *batch[:3]) for batch in batches]
      if path is not None and store.save(path, {f"{k}{i}": sharding.to_host(x) for i, lower in enumerate(found)
                                                for k, x in lower._asdict().items()}):
        log(f"lora.cache_frozen: the {frozen_layers} frozen blocks' output for the validation batches kept in {path}")
      return found
    log(f"lora.cache_frozen: the {frozen_layers} frozen blocks' output for the validation batches read from {path}")
    return [scorer.Lower(*(inference.place_batch(saved[f"{k}{i}"], mesh) for k in scorer.Lower._fields))
            for i in range(len(batches))]

  def metrics(params) -> dict[str, float]:
    if lower_step is not None and not lowers:
      lowers.extend(frozen_output(params))
    # all dispatched before any is read
    out = [step(params, *batch, lower=lower) for batch, lower in zip(batches, lowers or [None] * len(batches))]
    logp = sum(float(np.sum(sharding.to_host(o["logp"])[idx], dtype=np.float64)) for o, idx in zip(out, true_logp))
    result = {"val_occupation_ppl": math.exp(-logp / int(valid_WT.sum()))}
    if token_loss is not None:
      xent, tokens = (sum(float(sharding.to_host(o[k])) for o in out) for k in ("xent", "tokens"))
      result["val_loss"] = xent / max(tokens, 1.0)
    return result
  return metrics
