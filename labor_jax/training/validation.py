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

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline import loader, resume
from data_pipeline.dataset_dir import TITLES, DatasetDir
from labor_jax import losses, scorer, sharding
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


@functools.lru_cache(maxsize=4)
def _step(config: LlamaConfig, candidates: tuple[tuple[int, ...], ...], mesh: jax.sharding.Mesh, chunk: int,
          with_loss: bool):
  """The jitted ``(params, batch) -> sums``, one per model, titles, mesh and chunk in a process:
  runs of the same shapes (the main job's seeds) reuse its compiled code."""
  tree = scorer.CandidateTree.build(candidates)
  replicated = NamedSharding(mesh, PartitionSpec())

  def sums(params, tokens_BN, mask_BN, ends_BT, target_BT, valid_BT, weight_BN):
    b, n = tokens_BN.shape
    x_BND, kv = scorer.encode(config, params, tokens_BN, mask_BN, mesh=mesh)
    last_BT = jnp.clip(ends_BT - 1, 0, n - 1)
    logp_BTJ = scorer.score_from_cache(config, params, tree, kv, x_BND[jnp.arange(b)[:, None], last_BT], ends_BT,
                                       normalize=True, chunk=chunk, mesh=mesh)
    true_BT = jnp.take_along_axis(logp_BTJ, target_BT[..., None], axis=-1)[..., 0]
    out = {"logp": jnp.sum(jnp.where(valid_BT, true_BT, 0.0)), "transitions": jnp.sum(valid_BT)}
    if with_loss:
      next_BN = jnp.concatenate([tokens_BN[:, 1:], jnp.zeros_like(tokens_BN[:, :1])], axis=1)
      out["xent"] = losses.linear_cross_entropy(x_BND, scorer.head_weight(config, params), next_BN, weight_BN,
                                                config.loss_chunk, dtype=config.jnp_dtype)
      out["tokens"] = jnp.sum(weight_BN)
    return out
  # params and batches arrive placed (the train state's shardings, the workers' sharding): jit keeps them.
  return jax.jit(sums, out_shardings=replicated)


def occupation_metrics(config: LlamaConfig, data: DatasetDir, tokenizer, mesh: jax.sharding.Mesh, *,
                       batch_workers: int, max_workers: int | None = None, chunk: int | None = None,
                       token_loss: tuple[int, str] | None = None,
                       log=print) -> Callable[[Any], dict[str, float]] | None:
  """``params -> {"val_occupation_ppl": ..., "val_loss": ...}`` over ``data``'s validation split, or
  None (after one ``log`` line) when the dataset cannot give a perplexity (:func:`unavailable`).

  ``batch_workers`` workers go through the scorer per call (a multiple of the mesh's data x fsdp;
  the trainer's batch size); ``max_workers`` keeps the split's first workers only (None: all);
  ``chunk``: workers per tree pass (:func:`labor_jax.scorer.score`), by default one per device of
  the batch axes (the least memory). ``token_loss=(seq_len, loss_on)`` adds ``val_loss`` as the
  trainer's unpacked validation rows of that length and mask give it. ``params`` live on ``mesh``.
  """
  src = data.source("validation")
  examples = [src[i] for i in range(len(src))][:max_workers]
  why = unavailable(data, examples)
  if why is not None:
    log(f"eval_metric: no occupation perplexity ({why}); the best checkpoint is chosen by validation loss")
    return None
  candidates = tokenizer.candidate_tokens(resume.candidate_texts(data.titles(), data.variant))
  step = _step(config, tuple(map(tuple, candidates)), mesh, chunk or mesh.shape["data"] * mesh.shape["fsdp"],
               token_loss is not None)
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

  batch_sh = NamedSharding(mesh, sharding.logical_to_mesh(("batch", "length"), what="validation workers"))

  def put(x):  # every process holds every row on the host and supplies its devices' rows
    return jax.make_array_from_callback(x.shape, batch_sh, lambda idx: x[idx])
  batches = [tuple(put(x[s:s + b]) for x in (tokens_WN, mask_WN, ends_WT, target_WT, valid_WT, weight_WN))
             for s in range(0, w, b)]

  def metrics(params) -> dict[str, float]:
    out = [step(params, *batch) for batch in batches]  # all dispatched before any is read
    total = {k: sum(float(sharding.to_host(o[k])) for o in out) for k in out[0]}
    result = {"val_occupation_ppl": math.exp(-total["logp"] / total["transitions"])}
    if token_loss is not None:
      result["val_loss"] = total["xent"] / max(total["tokens"], 1.0)
    return result
  return metrics
