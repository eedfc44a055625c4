"""Hugging Face checkpoints in and out: ``load(path, mesh)`` and ``save(config, params, path)``
(LoRA adapters in PEFT's format are :mod:`labor_jax.interop.peft`).

The key map is data: one list of (HF name, labor_jax path) patterns serves both
directions, and the only tensor transform is the transpose of linear weights (HF
stores ``[out, in]``, Flax ``[in, out]``), applied after the expected HF shape is
checked. Import streams one tensor at a time from (sharded) safetensors files
and places it straight into its target sharding, so host memory never holds two
copies of the model. Nothing is ever initialised to fill a gap.

Library roles: ``safetensors`` reads and writes tensors, ``huggingface_hub`` plans the
shards of a large export, ``transformers`` writes ``config.json`` and
``generation_config.json`` in the format its loaders expect (no PyTorch needed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.numpy import save_file

from data_pipeline.tokenizer import TOKENIZER_FILES
from labor_jax import model
from labor_jax.fileio import atomic_dir, check_replaceable
from labor_jax import sharding as shard_lib
from labor_jax.config import LlamaConfig

SAFETENSORS_SINGLE = "model.safetensors"
# what every Hugging Face checkpoint written here holds, and its name in errors: an output directory holding it may
# be replaced by a new one (labor_jax.fileio.check_replaceable)
CONFIG_FILE, OUTPUT_NAME = "config.json", "Hugging Face checkpoint"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# (HF name, labor_jax path, transposed). "{i}" is a layer index, "{p}" a projection name.
KEY_MAP = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.layers.{i}.self_attn.{p}.weight", "layers_{i}/self_attn/{p}/kernel", True),
    ("model.layers.{i}.mlp.{p}.weight", "layers_{i}/mlp/{p}/kernel", True),
    ("model.layers.{i}.{p}.weight", "layers_{i}/{p}/weight", False),
    ("model.norm.weight", "norm/weight", False),
    ("lm_head.weight", "lm_head/kernel", True),
)
# Buffers that some older checkpoints store and that carry no learned weights.
IGNORED_HF_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class CheckpointError(ValueError):
  """A checkpoint that does not match its config: missing, unexpected or misshapen tensors."""


def _pattern(template: str) -> re.Pattern:
  rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z_]+)")
  return re.compile(rx + "$")


_TO_HF = [(_pattern(ours), hf, t) for hf, ours, t in KEY_MAP]


def hf_name(path: str) -> tuple[str, bool]:
  """labor_jax parameter path ('layers_0/mlp/up_proj/kernel') -> (HF tensor name, transposed)."""
  for rx, hf, transposed in _TO_HF:
    m = rx.match(path)
    if m:
      return hf.format(**m.groupdict()), transposed
  raise CheckpointError(f"parameter {path} has no Hugging Face name in labor_jax.interop.hf.KEY_MAP")


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
  """HF tensor name -> (labor_jax path, HF shape, transposed) for every parameter of ``config``.

  Paths are per layer (``layers_3/...``) even for ``scan_layers`` configs, whose stacked
  ``layers/...`` leaves are filled slice by slice."""
  out = {}
  for path, sds in traverse_util.flatten_dict(model.param_shapes(config.replace(scan_layers=False)), sep="/").items():
    name, transposed = hf_name(path)
    shape = tuple(sds.shape[::-1]) if transposed else tuple(sds.shape)
    out[name] = (path, shape, transposed)
  return out


def _tensor_files(path: Path) -> list[Path]:
  index = path / SAFETENSORS_INDEX
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    files = [path / f for f in dict.fromkeys(weight_map.values())]
  elif (path / SAFETENSORS_SINGLE).exists():
    files = [path / SAFETENSORS_SINGLE]
  else:
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise CheckpointError(f"{path}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (found: {found}); "
                          "convert PyTorch .bin checkpoints to safetensors first")
  for f in files:
    if not f.exists():
      raise CheckpointError(f"{f}: listed in {SAFETENSORS_INDEX} but missing")
  return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, Any]]:
  """Yields (name, file, reader); the reader maps the file only while one tensor is read.

  safetensors reads through mmap, and mapped pages count as resident memory until
  the file is closed: reopening per tensor keeps at most one tensor's pages mapped
  instead of a whole multi-GB shard.
  """
  for f in files:
    with safe_open(str(f), framework="numpy") as fh:
      names = list(fh.keys())
    for name in names:
      with safe_open(str(f), framework="numpy") as fh:
        yield name, f, fh


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, *,
         rules: shard_lib.Rules = shard_lib.DEFAULT_RULES, **policy) -> tuple[LlamaConfig, Any]:
  """Reads a HF Llama/Mistral checkpoint directory into ``(config, params)``.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or sharded
      ``model-0000x-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
    mesh: when given, every tensor is placed straight into its sharding on this mesh
      (logical names from the model, mapped by ``rules``); otherwise onto the default device.
    **policy: LlamaConfig fields that are not in config.json (``param_dtype``, ``dtype``,
      ``remat``); ``param_dtype`` defaults to float32.
  """
  config = LlamaConfig.from_hf_file(Path(path) / "config.json", **policy)
  return config, load_params(path, config, mesh, rules=rules)


def load_params(path: str | os.PathLike, config: LlamaConfig, mesh: jax.sharding.Mesh | None = None, *,
                rules: shard_lib.Rules = shard_lib.DEFAULT_RULES) -> Any:
  """The tensors of a HF checkpoint directory as the params of ``config`` (its architecture must be
  the checkpoint's; its policy sets dtype and layout), streamed one tensor at a time."""
  path = Path(path)
  if config.lora_rank:
    raise CheckpointError(f"{path}: a Hugging Face checkpoint holds base weights only; load it with lora_rank=0")
  expected = expected_tensors(config)
  shardings = traverse_util.flatten_dict(model.param_shardings(config, mesh, rules), sep="/") if mesh is not None else {}
  stacked = _StackedLoader(config, shardings) if config.scan_layers else None
  target = np.dtype(config.jnp_param_dtype)
  tied_head = "lm_head.weight" if config.tie_word_embeddings else None
  params: dict[str, jax.Array] = {}
  for name, f, fh in _iter_tensors(_tensor_files(path)):
    if IGNORED_HF_KEYS.match(name) or name == tied_head:
      continue
    if name not in expected:
      raise CheckpointError(f"{f.name}: unexpected tensor {name} (not part of a {config.model_type} "
                            f"model with {config.num_hidden_layers} layers)")
    ours, shape, transposed = expected[name]
    if ours in params:
      raise CheckpointError(f"{f.name}: tensor {name} appears twice in the checkpoint")
    found = tuple(fh.get_slice(name).get_shape())
    if found != shape:
      raise CheckpointError(f"{f.name}: tensor {name} has shape {found}, expected {shape}")
    arr = fh.get_tensor(name).astype(target, copy=False)
    if transposed:
      arr = arr.T  # a view: device_put / the callback copy it once into the device buffer
    if stacked is not None and stacked.put(ours, arr):
      params[ours] = None  # recorded; the stacked leaf is assembled on the device
    elif mesh is not None:
      sh = shardings[ours]
      params[ours] = jax.make_array_from_callback(arr.shape, sh, lambda idx, a=arr: a[idx])
    else:
      params[ours] = jax.device_put(arr)
    del arr
  missing = [n for n, (ours, _, _) in expected.items() if ours not in params]
  if missing:
    raise CheckpointError(f"{path}: missing tensor {missing[0]} (expected shape {expected[missing[0]][1]})"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
  if stacked is not None:
    params = {k: v for k, v in params.items() if v is not None}
    params.update(stacked.buffers)
  return traverse_util.unflatten_dict(params, sep="/")


class _StackedLoader:
  """Fills the stacked ``layers/...`` leaves of a scan_layers model one layer slice at a time,
  on the device (a donated in-place update), so host memory holds one tensor at a time."""

  def __init__(self, config: LlamaConfig, shardings: dict):
    self.shapes = traverse_util.flatten_dict(model.param_shapes(config), sep="/")
    self.shardings = shardings
    self.buffers: dict[str, jax.Array] = {}
    self._update = {}

  def put(self, ours: str, arr: np.ndarray) -> bool:
    m = re.match(r"layers_(\d+)/(.*)$", ours)
    if not m:
      return False
    i, key = int(m.group(1)), "layers/" + m.group(2)
    if key not in self.buffers:
      sds = self.shapes[key]
      sh = self.shardings.get(key)
      self.buffers[key] = jax.jit(lambda: jnp.zeros(sds.shape, sds.dtype), out_shardings=sh)()
      self._update[key] = jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0),
                                  donate_argnums=0, out_shardings=sh)
    self.buffers[key] = self._update[key](self.buffers[key], arr, i)
    return True


class _LayerSlice:
  """Layer i of a stacked leaf. Slices of one save share ``cache``, which holds the host
  copy of one stacked leaf at a time (slices are written grouped by leaf)."""

  def __init__(self, stacked: jax.Array, i: int, cache: dict):
    self.stacked, self.i, self.cache = stacked, i, cache
    self.shape = stacked.shape[1:]

  def host(self) -> np.ndarray:
    key = id(self.stacked)
    if key not in self.cache:
      self.cache.clear()
      self.cache[key] = shard_lib.to_host(self.stacked)
    return self.cache[key][self.i]


def check_names(flat: dict, want: set, what: str) -> None:
  """Raises unless the flattened tree ``flat`` holds exactly the paths ``want``."""
  if set(flat) != want:
    extra, missing = sorted(set(flat) - want), sorted(want - set(flat))
    raise CheckpointError(f"{what} do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")


def save(config: LlamaConfig, params: Any, path: str | os.PathLike,
         tokenizer_dir: str | os.PathLike | None = None, *,
         max_shard_size: int | str = "5GB") -> Path:
  """Writes ``params`` as a HF checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.

  The directory appears atomically (written to a temporary sibling, then renamed).
  Tensors are saved in ``config.param_dtype``; above ``max_shard_size`` they are split
  into ``model-0000x-of-0000N.safetensors`` with ``model.safetensors.index.json``.
  Tokenizer files in ``tokenizer_dir`` are copied. In a multi-process run every process
  must call this (sharded arrays are gathered); only process 0 writes.
  """
  import transformers  # heavy (seconds): only the export needs it

  path = Path(path)
  # every process: none waits in a gather alone; process 0, the writer, also tries the file system
  check_replaceable(path, CONFIG_FILE, OUTPUT_NAME, writer=jax.process_index() == 0)
  if config.lora_rank:
    raise CheckpointError("params carry LoRA adapters: fold them in first with labor_jax.lora.merge")
  flat = traverse_util.flatten_dict(params, sep="/")
  if config.scan_layers:  # per-layer views of the stacked leaves, sliced when written
    cache: dict = {}
    for key in [k for k in flat if k.startswith("layers/")]:
      leaf = flat.pop(key)
      for i in range(config.num_hidden_layers):
        flat[f"layers_{i}/{key[len('layers/'):]}"] = _LayerSlice(leaf, i, cache)
  check_names(flat, {ours for ours, _, _ in expected_tensors(config).values()}, "params")
  names = {hf_name(p)[0]: p for p in flat}
  itemsize = np.dtype(config.jnp_param_dtype).itemsize
  split = split_state_dict_into_shards_factory(
      {n: flat[p] for n, p in names.items()},
      get_storage_size=lambda x: int(np.prod(x.shape)) * itemsize,
      filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
  writer = jax.process_index() == 0
  with atomic_dir(path, writer, marker=CONFIG_FILE, what=OUTPUT_NAME) as tmp:
    for filename, tensor_names in split.filename_to_tensors.items():
      shard = {}
      for n in tensor_names:
        leaf = flat[names[n]]
        arr = leaf.host() if isinstance(leaf, _LayerSlice) else shard_lib.to_host(leaf)
        arr = arr.astype(config.jnp_param_dtype)
        shard[n] = np.ascontiguousarray(arr.T if hf_name(names[n])[1] else arr)
      if writer:
        save_file(shard, str(tmp / filename), metadata={"format": "pt"})
      del shard
    if not writer:
      return path
    if split.is_sharded:
      index = {"metadata": {"total_size": sum(int(np.prod(flat[p].shape)) * itemsize for p in flat)},
               "weight_map": dict(sorted(split.tensor_to_filename.items()))}
      (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    hf = config.to_hf_dict()
    model_type = hf.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **hf)
    hf_config.save_pretrained(tmp)
    transformers.GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                  pad_token_id=config.pad_token_id).save_pretrained(tmp)
    if tokenizer_dir is not None:
      copied = 0
      for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
          shutil.copy2(src, tmp / name)
          copied += 1
      if not copied:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
  return path
