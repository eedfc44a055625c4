"""``lora.cache_frozen``: the frozen lower blocks run once over the training split, not once a step.

With adapters in the top blocks only (``lora.top_layers``), the embedding and every block below the
first adapted one are frozen, so their output for a training row is the same at every step and in
every epoch. :class:`FrozenCache` computes it once, before the first step, for every row of the
training split (one forward pass of the lower blocks, :func:`labor_jax.model.lower_hidden`), keeps it
on the host in the compute dtype, and hands each batch its rows' hidden states; the train step then
runs only the top blocks and the head (``first_layer`` in :func:`labor_jax.training.core.loss_sums`).
The loss and the gradients are those of the full forward pass: the same products on the same inputs.

A row is found by its tokens, positions and segment ids, so the cache serves any order the loader
shuffles the split into. It needs unpacked rows (packing combines resumes differently each epoch) and
one process (each process would need every row the shuffled stream can give it).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from data_pipeline import loader
from data_pipeline.dataset_dir import DatasetDir
from labor_jax import model
from labor_jax.config import ConfigError, LlamaConfig

_KEY_FIELDS = ("inputs", "positions", "segment_ids")


def first_trained_layer(num_layers: int, top_layers: int | None) -> int:
  """The blocks below the adapters (``num_layers - top_layers``): the cache's depth; 0 when the adapters are in
  every block of a model of ``num_layers`` (nothing to cache: a recipe for a deeper model, run on a tiny one)."""
  if top_layers is None:
    raise ConfigError("lora.cache_frozen: needs lora.top_layers (the frozen blocks below the adapters are what it caches)")
  return max(num_layers - top_layers, 0)


def _key(row: dict[str, np.ndarray], i: int | None = None) -> bytes:
  return b"".join(np.ascontiguousarray(row[k] if i is None else row[k][i]).tobytes() for k in _KEY_FIELDS)


class FrozenCache:
  """The output of the first ``n_layers`` blocks for every training row, on the host."""

  def __init__(self, n_layers: int, hidden_NTD: np.ndarray, index: dict[bytes, int]):
    self.n_layers = n_layers
    self.hidden_NTD = hidden_NTD
    self.index = index

  @classmethod
  def build(cls, config: LlamaConfig, params: Any, data: DatasetDir, data_kw: dict, n_layers: int,
            batch_sh: NamedSharding, batch_size: int, log=print) -> "FrozenCache":
    """One forward pass of the first ``n_layers`` blocks over every row of the training split (in order,
    ``batch_size`` rows at a time, laid out as ``batch_sh``), with the loader's own row format."""
    if data_kw.get("pack"):
      raise ConfigError("lora.cache_frozen: packed rows (data.pack: true) change every epoch; set data.pack: false")
    if jax.process_count() > 1:
      raise ConfigError("lora.cache_frozen: one process only (each process would need every row of the split)")
    t0 = time.perf_counter()
    kw = {k: v for k, v in data_kw.items() if k in ("seq_len", "loss_on", "pad_id")}
    rows = list(loader.make_dataset(data, "train", batch_size=1, shuffle=False, num_epochs=1, **kw))
    if not rows:
      raise ConfigError(f"lora.cache_frozen: {data.path} has no training rows")
    fields = {k: np.concatenate([r[k] for r in rows]) for k in _KEY_FIELDS}
    n = len(rows)
    lower = jax.jit(lambda p, b: model.lower_hidden(config, p, b["inputs"], n_layers, positions_BT=b["positions"],
                                                    segment_ids_BT=b["segment_ids"], mesh=batch_sh.mesh))
    out = []
    for start in range(0, n, batch_size):
      take = np.arange(start, start + batch_size) % n  # the last batch is topped up with the first rows
      batch = jax.device_put({k: v[take] for k, v in fields.items()}, batch_sh)
      out.append(np.asarray(jax.device_get(lower(params, batch)))[:min(batch_size, n - start)])
    hidden = np.concatenate(out)
    index = {}
    for i in range(n):
      index.setdefault(_key(fields, i), i)
    log(f"lora.cache_frozen: the {n_layers} frozen blocks' output for {n:,} training rows "
        f"({hidden.nbytes / 2 ** 20:,.0f} MiB, {hidden.dtype}) in {time.perf_counter() - t0:.1f} s; "
        f"each step runs the top {config.num_hidden_layers - n_layers} blocks only")
    return cls(n_layers, hidden, index)

  def lookup(self, local: dict[str, np.ndarray]) -> np.ndarray:
    """The cached hidden states [B, T, D] of a host batch's rows."""
    idx = []
    for i in range(local["inputs"].shape[0]):
      j = self.index.get(_key(local, i))
      if j is None:
        raise RuntimeError("lora.cache_frozen: a training row is not in the cache built from the training split "
                           "(was the dataset changed during the run?)")
      idx.append(j)
    return self.hidden_NTD[np.asarray(idx)]
