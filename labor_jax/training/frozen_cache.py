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

With ``lora.cache_dir`` the frozen blocks' output (for the training rows here, for the validation batches in
:mod:`labor_jax.training.validation`) is also kept on disk (:class:`Store`), under a hash of the frozen
weights, the compute dtype, the rows and the batch layout: a later run of the same base on the same data
(the main job's other seeds) reads it instead of running those blocks again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from data_pipeline import loader
from data_pipeline.dataset_dir import DatasetDir
from labor_jax import inference, model
from labor_jax.config import ConfigError, LlamaConfig
from labor_jax.fileio import OutputExists, atomic_dir, remove_stale

_KEY_FIELDS = ("inputs", "positions", "segment_ids")


def first_trained_layer(num_layers: int, top_layers: int | None) -> int:
  """The blocks below the adapters (``num_layers - top_layers``): the cache's depth; 0 when the adapters are in
  every block of a model of ``num_layers`` (nothing to cache: a recipe for a deeper model, run on a tiny one)."""
  if top_layers is None:
    raise ConfigError("lora.cache_frozen: needs lora.top_layers (the frozen blocks below the adapters are what it caches)")
  return max(num_layers - top_layers, 0)


def _key(row: dict[str, np.ndarray], i: int | None = None) -> bytes:
  return b"".join(np.ascontiguousarray(row[k] if i is None else row[k][i]).tobytes() for k in _KEY_FIELDS)


class Store:
  """``lora.cache_dir``: arrays computed by the frozen blocks, on disk, each set in a directory named by a hash
  of the frozen weights (:func:`labor_jax.inference.lower_fingerprint`), the model's configuration (all but the
  adapters' and the backward pass's settings), the JAX backend, and what the set was computed from."""

  def __init__(self, directory: str | Path, fingerprint: str, log=print):
    self.directory = Path(directory)
    self.fingerprint = fingerprint
    self.log = log

  @classmethod
  def open(cls, directory: str | Path | None, config: LlamaConfig, params: Any, n_layers: int,
           log=print) -> "Store | None":
    """The store for the first ``n_layers`` blocks of ``params`` (None without a directory, or when those
    blocks cannot be fingerprinted: then every run computes them)."""
    if directory is None or not n_layers:
      return None
    for stale in remove_stale(directory):  # what a run killed while writing left
      log(f"lora.cache_dir: removed {stale.name}, left by a run that was stopped while writing it")
    found = inference.lower_fingerprint(config, params, n_layers)
    if found is None:
      log(f"lora.cache_dir: the first {n_layers} blocks are not held one by one without adapters "
          "(scanned layers?); their output is computed, not stored")
      return None
    numerics = {k: v for k, v in dataclasses.asdict(config).items()
                if not k.startswith("lora_") and k not in ("remat", "loss_chunk")}
    return cls(directory, hashlib.blake2b(repr((found, sorted(numerics.items()), jax.default_backend())).encode(),
                                          digest_size=16).hexdigest(), log)

  def path(self, kind: str, *parts) -> Path:
    """The directory of one set: ``kind`` and a hash of the weights and ``parts`` (arrays, bytes or reprs)."""
    digest = hashlib.blake2b(self.fingerprint.encode(), digest_size=16)
    for part in parts:
      if isinstance(part, np.ndarray):
        part = repr((part.dtype.str, part.shape)).encode() + np.ascontiguousarray(part).tobytes()
      digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return self.directory / f"{kind}-{digest.hexdigest()}"

  def load(self, path: Path, expected: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, np.ndarray] | None:
    """The arrays saved at ``path`` (None when there are none), which must be ``expected``'s names, shapes and
    dtypes; anything else stops with one line naming ``path``."""
    meta_file = path / "arrays.json"
    if not meta_file.exists():
      return None
    try:
      meta = json.loads(meta_file.read_text())
      if not isinstance(meta, dict) or set(meta) != set(expected):
        raise ValueError(f"holds {sorted(meta) if isinstance(meta, dict) else meta!r}, not {sorted(expected)}")
      out = {k: np.load(path / f"{k}.npy").view(np.dtype(dtype)).reshape(shape) for k, (dtype, shape) in meta.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
      raise ConfigError(f"{path}: a lora.cache_dir entry that cannot be read ({e}); delete it") from e
    for k, (shape, dtype) in expected.items():
      if out[k].shape != tuple(shape) or out[k].dtype != np.dtype(dtype):
        raise ConfigError(f"{path}: {k} is {out[k].dtype}{list(out[k].shape)}, this run computes "
                          f"{np.dtype(dtype)}{list(shape)}; delete it")
    return out

  def save(self, path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """``arrays`` at ``path``, whole or not at all (any dtype: kept as raw bytes with its name). A write the
    file system refuses (full, read-only) is said in one line and not kept: the store only saves time."""
    try:
      with atomic_dir(path) as tmp:
        for k, a in arrays.items():
          np.save(tmp / f"{k}.npy", np.ascontiguousarray(a).view(np.uint8).reshape(-1))
        (tmp / "arrays.json").write_text(json.dumps({k: [a.dtype.name, list(a.shape)] for k, a in arrays.items()}))
    except (OSError, OutputExists) as e:  # OutputExists: nothing can be written there (labor_jax.fileio)
      self.log(f"lora.cache_dir: could not keep {path} ({e}); later runs compute it again")
      return False
    return True


class FrozenCache:
  """The output of the first ``n_layers`` blocks for every training row, on the host."""

  def __init__(self, n_layers: int, hidden_NTD: np.ndarray, index: dict[bytes, int]):
    self.n_layers = n_layers
    self.hidden_NTD = hidden_NTD
    self.index = index

  @classmethod
  def build(cls, config: LlamaConfig, params: Any, data: DatasetDir, data_kw: dict, n_layers: int,
            batch_sh: NamedSharding, batch_size: int, log=print, store: Store | None = None) -> "FrozenCache":
    """One forward pass of the first ``n_layers`` blocks over every row of the training split (in order,
    ``batch_size`` rows at a time, laid out as ``batch_sh``), with the loader's own row format; with a
    ``store``, read from it when a run of the same weights, rows and layout computed it, else kept there."""
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
    index = {}
    for i in range(n):
      index.setdefault(_key(fields, i), i)
    path = None if store is None else store.path(  # the store's key holds the weights, their depth and dtype
        "train", batch_size, dict(batch_sh.mesh.shape), str(batch_sh.spec), *(fields[k] for k in _KEY_FIELDS))
    saved = None if path is None else store.load(
        path, {"hidden": ((*fields["inputs"].shape, config.hidden_size), config.jnp_dtype)})
    if saved is not None:
      hidden = saved["hidden"]
      log(f"lora.cache_frozen: the {n_layers} frozen blocks' output for {n:,} training rows read from {path} "
          f"in {time.perf_counter() - t0:.1f} s; each step runs the top {config.num_hidden_layers - n_layers} "
          "blocks only")
      return cls(n_layers, hidden, index)
    lower = jax.jit(lambda p, b: model.lower_hidden(config, p, b["inputs"], n_layers, positions_BT=b["positions"],
                                                    segment_ids_BT=b["segment_ids"], mesh=batch_sh.mesh))
    out = []
    for start in range(0, n, batch_size):
      take = np.arange(start, start + batch_size) % n  # the last batch is topped up with the first rows
      batch = jax.device_put({k: v[take] for k, v in fields.items()}, batch_sh)
      out.append(np.asarray(jax.device_get(lower(params, batch)))[:min(batch_size, n - start)])
    hidden = np.concatenate(out)
    kept = path is not None and store.save(path, {"hidden": hidden})
    log(f"lora.cache_frozen: the {n_layers} frozen blocks' output for {n:,} training rows "
        f"({hidden.nbytes / 2 ** 20:,.0f} MiB, {hidden.dtype}) in {time.perf_counter() - t0:.1f} s; "
        f"each step runs the top {config.num_hidden_layers - n_layers} blocks only"
        + (f"; kept in {path} for runs of the same base and data" if kept else ""))
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
