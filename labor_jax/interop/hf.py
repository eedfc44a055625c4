"""Hugging Face checkpoints in and out: ``load(path, mesh)`` and ``save(config, params, path)``; LoRA
adapters in PEFT's format: ``load_adapter(path, config, params, mesh)`` and ``save_adapter(config, params, path)``.

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

import contextlib
import json
import os
import re
import shutil
import tempfile
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
from labor_jax import labels, model
from labor_jax import sharding as shard_lib
from labor_jax.config import ConfigError, LlamaConfig

SAFETENSORS_SINGLE = "model.safetensors"
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
  if config.lora_rank:
    raise CheckpointError("params carry LoRA adapters: fold them in first with labor_jax.lora.merge")
  flat = traverse_util.flatten_dict(params, sep="/")
  if config.scan_layers:  # per-layer views of the stacked leaves, sliced when written
    cache: dict = {}
    for key in [k for k in flat if k.startswith("layers/")]:
      leaf = flat.pop(key)
      for i in range(config.num_hidden_layers):
        flat[f"layers_{i}/{key[len('layers/'):]}"] = _LayerSlice(leaf, i, cache)
  _check_names(flat, {ours for ours, _, _ in expected_tensors(config).values()}, "params")
  names = {hf_name(p)[0]: p for p in flat}
  itemsize = np.dtype(config.jnp_param_dtype).itemsize
  split = split_state_dict_into_shards_factory(
      {n: flat[p] for n, p in names.items()},
      get_storage_size=lambda x: int(np.prod(x.shape)) * itemsize,
      filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
  writer = jax.process_index() == 0
  with _atomic_dir(path, writer) as tmp:
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


@contextlib.contextmanager
def _atomic_dir(path: Path, writer: bool = True) -> Iterator[Path | None]:
  """A temporary sibling of ``path`` that replaces ``path`` when the block ends without error
  (and is removed when it raises). Yields None on processes that do not write."""
  if not writer:
    yield None
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    yield tmp
    if path.exists():
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ---------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, the layout that
# peft.PeftModel.from_pretrained reads for LlamaForCausalLM. An adapter's tensor names extend the key
# map above: the adapted Linear's HF module name, prefixed by PEFT's wrapper and suffixed per leaf;
# both leaves are stored transposed like every HF linear weight.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# labor_jax adapter leaf -> PEFT tensor suffix (lora_a [in, r] -> lora_A.weight [r, in], lora_b [r, out] ->
# lora_B.weight [out, r]).
ADAPTER_KEY_MAP = (("lora_a", "lora_A.weight"), ("lora_b", "lora_B.weight"))
# adapter_config.json fields labor_jax reads; any other field set to something other than its
# "off" value (null, false, 0, "none", {}, []) describes an adapter labor_jax cannot represent.
_ADAPTER_FIELDS = {"r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "task_type",
                   "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
                   "init_lora_weights", "megatron_core", "qalora_group_size"}
_PLAIN_INITS = (True, False, "gaussian")  # initialisers that leave the base weights as they are


def _module_name(path: str) -> str:
  """labor_jax module path ('layers_0/self_attn/q_proj') -> HF module name ('model.layers.0.self_attn.q_proj')."""
  name, transposed = hf_name(path + "/kernel")
  if not transposed:
    raise CheckpointError(f"{path}: not a linear layer, cannot carry adapters")
  return name[:-len(".weight")]


def adapter_name(path: str) -> str:
  """labor_jax adapter path ('layers_0/mlp/down_proj/lora_a') -> PEFT tensor name
  ('base_model.model.model.layers.0.mlp.down_proj.lora_A.weight')."""
  module, leaf = path.rsplit("/", 1)
  suffix = dict(ADAPTER_KEY_MAP).get(leaf)
  if suffix is None:
    raise CheckpointError(f"parameter {path} is not a LoRA adapter leaf ({', '.join(dict(ADAPTER_KEY_MAP))})")
  return f"{PEFT_PREFIX}{_module_name(module)}.{suffix}"


def expected_adapters(config: LlamaConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
  """PEFT tensor name -> (labor_jax path, PEFT shape) for every adapter leaf of ``config`` (per layer,
  like :func:`expected_tensors`), as the label tree selects them."""
  shapes = model.param_shapes(config.replace(scan_layers=False))
  adapters = labels.split(shapes, labels.label_tree(shapes, labels.ADAPTERS))[0]
  return {adapter_name(p): (p, tuple(s.shape[::-1])) for p, s in traverse_util.flatten_dict(adapters, sep="/").items()}


def adapter_modules(config: LlamaConfig) -> list[str]:
  """HF names of the modules that carry adapters under ``config`` ('model.layers.0.self_attn.q_proj', 'lm_head')."""
  return sorted({_module_name(p.rsplit("/", 1)[0]) for p, _ in expected_adapters(config).values()})


def _linear_modules(config: LlamaConfig) -> list[str]:
  """HF names of every linear layer of ``config``'s model (the modules an adapter can sit on)."""
  return adapter_modules(config.replace(lora_rank=1, lora_targets=""))  # the empty regex matches every path


def _per_layer(modules: list[str], n_layers: int) -> list[str] | None:
  """The short names (q_proj, lm_head) when every layer adapts the same projections, else None."""
  by_layer = [sorted(m.split(".")[-1] for m in modules if m.startswith(f"model.layers.{i}.")) for i in range(n_layers)]
  if any(b != by_layer[0] for b in by_layer):
    return None
  return sorted({m.split(".")[-1] for m in modules})


def _check_names(flat: dict, want: set, what: str) -> None:
  """Raises unless the flattened tree ``flat`` holds exactly the paths ``want``."""
  if set(flat) != want:
    extra, missing = sorted(set(flat) - want), sorted(want - set(flat))
    raise CheckpointError(f"{what} do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")


def save_adapter(config: LlamaConfig, params: Any, path: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None) -> Path:
  """Writes the LoRA adapters of ``params`` (selected by the label tree) as a PEFT adapter directory:
  ``adapter_config.json`` and ``adapter_model.safetensors``, in ``config.param_dtype``.

  ``target_modules`` lists the projection names (``["down_proj", "q_proj", "v_proj"]``) when every
  layer carries the same adapters, else a regex that PEFT full-matches against module names. The
  directory appears atomically; every process of a multi-process run must call this, process 0 writes.
  """
  path = Path(path)
  if not config.lora_rank:
    raise CheckpointError("the model has no LoRA adapters (lora_rank=0): nothing to export")
  adapters = labels.split(params, labels.label_tree(params, labels.ADAPTERS))[0]
  flat = traverse_util.flatten_dict(model.unstack_layers(jax.tree.map(shard_lib.to_host, adapters)), sep="/")
  want = {ours: (name, shape) for name, (ours, shape) in expected_adapters(config).items()}
  _check_names(flat, set(want), "adapters")
  tensors = {}
  for ours, arr in flat.items():
    name, shape = want[ours]
    if arr.shape[::-1] != shape:
      raise CheckpointError(f"adapter {ours} has shape {arr.shape}, the config's is {shape[::-1]}")
    tensors[name] = np.ascontiguousarray(arr.astype(config.jnp_param_dtype).T)
  modules = adapter_modules(config)
  names = _per_layer(modules, config.num_hidden_layers)
  alpha = config.lora_alpha
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
      "r": config.lora_rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": config.lora_dropout,
      "target_modules": names if names is not None else "|".join(re.escape(m) for m in modules),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
      "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
      "init_lora_weights": True, "inference_mode": True, "revision": None,
  }
  with _atomic_dir(path, jax.process_index() == 0) as tmp:
    if tmp is not None:
      save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
      (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
  return path


def _off(value) -> bool:
  return value in (None, False, 0, "none", {}, [], "")


def adapter_lora_config(adapter_config: dict, config: LlamaConfig, source: str = ADAPTER_CONFIG) -> LlamaConfig:
  """``config`` with the LoRA fields a PEFT ``adapter_config.json`` describes (rank, alpha, dropout,
  and ``lora_targets`` selecting exactly the modules PEFT would adapt); an adapter labor_jax cannot
  represent exactly raises ConfigError in one line."""
  a = adapter_config
  if a.get("peft_type") != "LORA":
    raise ConfigError(f"{source}: peft_type={a.get('peft_type')!r} is not supported (only LORA)")
  if a.get("task_type") not in (None, "CAUSAL_LM"):
    raise ConfigError(f"{source}: task_type={a['task_type']!r} is not supported (only CAUSAL_LM)")
  if a.get("init_lora_weights", True) not in _PLAIN_INITS:
    raise ConfigError(f"{source}: init_lora_weights={a['init_lora_weights']!r} changes the base weights; "
                      "labor_jax reads adapters over an unchanged base only")
  for key, value in a.items():
    if key not in _ADAPTER_FIELDS and not _off(value):
      raise ConfigError(f"{source}: {key}={value!r} is not supported (labor_jax adapters are plain LoRA: "
                        "W + lora_alpha / r * B A on whole linear layers)")
  r, alpha, dropout = a.get("r"), a.get("lora_alpha"), a.get("lora_dropout") or 0.0
  if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
    raise ConfigError(f"{source}: r={r!r} is not a positive integer")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    raise ConfigError(f"{source}: lora_alpha={alpha!r} is not a number")
  linear = _linear_modules(config)
  targets = a.get("target_modules")
  if isinstance(targets, str) and targets != "all-linear":
    try:
      rx = re.compile(targets)
    except re.error as e:
      raise ConfigError(f"{source}: target_modules {targets!r} is not a regex ({e})") from None
    if rx.fullmatch("model.embed_tokens") or (config.tie_word_embeddings and rx.fullmatch("lm_head")):
      raise ConfigError(f"{source}: target_modules {targets!r} selects the embeddings; labor_jax has no "
                        "embedding adapters (nor lm_head adapters when the head is tied)")
    chosen = [m for m in linear if rx.fullmatch(m)]
  elif isinstance(targets, str) or isinstance(targets, list) and targets:
    names = ([m.split(".")[-1] for m in linear if m != "lm_head"] if targets == "all-linear" else targets)
    for t in names:
      if not isinstance(t, str) or not any(m == t or m.endswith("." + t) for m in linear):
        why = ("labor_jax has no embedding adapters" if t in ("embed_tokens", "model.embed_tokens") else
               "the head is tied to the embeddings" if t == "lm_head" else
               "labor_jax adapts linear layers only: " + ", ".join(dict.fromkeys(m.split(".")[-1] for m in linear)))
        raise ConfigError(f"{source}: target module {t!r} is not supported ({why})")
    chosen = [m for m in linear if any(m == t or m.endswith("." + t) for t in names)]
  else:
    raise ConfigError(f"{source}: target_modules={targets!r}: expected a list of module names or a regex")
  if not chosen:
    raise ConfigError(f"{source}: target_modules {targets!r} selects no linear layer of the model")
  ours = ["lm_head" if m == "lm_head" else m[len("model."):].replace("layers.", "layers_", 1).replace(".", "/")
          for m in chosen]
  short = _per_layer(chosen, config.num_hidden_layers)
  if short is not None:  # the same projections in every layer: one pattern that also fits scan_layers
    regex = "(" + "|".join(sorted({"^lm_head" if p == "lm_head" else p.split("/", 1)[1] for p in ours})) + ")$"
  elif config.scan_layers:
    raise ConfigError(f"{source}: target_modules {targets!r} adapts some layers only; a scan_layers model "
                      "carries the same adapters in every layer (set scan_layers=false)")
  else:
    regex = "^(" + "|".join(ours) + ")$"
  cfg = config.replace(lora_rank=r, lora_alpha=float(alpha), lora_dropout=float(dropout), lora_targets=regex)
  assert adapter_modules(cfg) == sorted(chosen), (regex, chosen)
  return cfg


def load_adapter(path: str | os.PathLike, config: LlamaConfig, params: Any, mesh: jax.sharding.Mesh | None = None,
                 *, rules: shard_lib.Rules = shard_lib.DEFAULT_RULES) -> tuple[LlamaConfig, Any]:
  """Reads a PEFT LoRA adapter directory onto a base model: ``(config with the adapter's lora_*
  fields, params with its adapters)``.

  ``config``/``params``: the base model (no adapters) the adapter was trained on, in either layer
  layout. The adapters are placed in their shardings on ``mesh`` (the default device without one),
  in ``config.param_dtype``. Every adapter tensor the config implies must be present with its
  shape; nothing is initialised. PEFT's copies of base weights (``lm_head.base_layer.weight``,
  saved with lm_head adapters) are accepted only when equal to the base.
  """
  path = Path(path)
  if config.lora_rank:
    raise CheckpointError(f"{path}: the model already has LoRA adapters (lora_rank > 0); pass the base config")
  try:
    adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path / ADAPTER_CONFIG}: not JSON ({e})") from None
  cfg = adapter_lora_config(adapter_config, config, source=str(path / ADAPTER_CONFIG))
  shapes = model.param_shapes(cfg)
  base_shapes = labels.split(shapes, labels.label_tree(shapes, labels.ADAPTERS))[1]
  have = {labels.path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  for p, want in jax.tree_util.tree_leaves_with_path(base_shapes):
    if have.get(labels.path_str(p)) != want.shape:
      raise CheckpointError(f"{path}: base parameter {labels.path_str(p)} has shape {have.get(labels.path_str(p))}, "
                            f"the config's is {want.shape}")
  weights = path / ADAPTER_WEIGHTS
  if not weights.exists():
    raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS} (convert adapter_model.bin to safetensors first)")
  expected = expected_adapters(cfg)
  base_copies = {f"{PEFT_PREFIX}{n[:-len('.weight')]}.base_layer.weight": (ours, shape, t)
                 for n, (ours, shape, t) in expected_tensors(config).items()}
  target = np.dtype(cfg.jnp_param_dtype)
  flat: dict[str, np.ndarray] = {}
  with safe_open(str(weights), framework="numpy") as fh:
    for name in fh.keys():
      found = tuple(fh.get_slice(name).get_shape())
      if name in base_copies:
        ours, shape, transposed = base_copies[name]
        arr = fh.get_tensor(name)
        base = np.asarray(_base_leaf(params, ours), dtype=arr.dtype)
        if found != shape or not np.array_equal(arr, base.T if transposed else base):
          raise CheckpointError(f"{weights.name}: tensor {name} differs from the base model's {hf_name(ours)[0]}; "
                                "labor_jax adapters cannot change base weights")
        continue
      if name not in expected:
        raise CheckpointError(f"{weights.name}: unexpected tensor {name} (not an adapter of a module that "
                              f"target_modules selects)")
      ours, shape = expected[name]
      if found != shape:
        raise CheckpointError(f"{weights.name}: tensor {name} has shape {found}, expected {shape}")
      flat[ours] = fh.get_tensor(name).astype(target).T
  missing = [n for n, (ours, _) in expected.items() if ours not in flat]
  if missing:
    raise CheckpointError(f"{weights.name}: missing tensor {missing[0]} (expected shape {expected[missing[0]][1]})"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
  if cfg.scan_layers:
    for key in sorted({p.split("/", 1)[1] for p in flat if p.startswith("layers_")}):
      flat[f"layers/{key}"] = np.stack([flat.pop(f"layers_{i}/{key}") for i in range(cfg.num_hidden_layers)])
  shardings = traverse_util.flatten_dict(model.param_shardings(cfg, mesh, rules), sep="/") if mesh is not None else {}
  placed = {p: jax.make_array_from_callback(a.shape, shardings[p], lambda idx, a=a: a[idx]) if mesh is not None
            else jax.device_put(a) for p, a in flat.items()}
  return cfg, labels.merge(params, traverse_util.unflatten_dict(placed, sep="/"))


def _base_leaf(params: Any, path: str) -> np.ndarray:
  """The base parameter at a per-layer path, in either layer layout, on the host."""
  m = re.match(r"layers_(\d+)/(.*)$", path)
  node, i = (params["layers"], int(m.group(1))) if m and "layers" in params else (params, None)
  for k in (m.group(2) if i is not None else path).split("/"):
    node = node[k]
  arr = shard_lib.to_host(node)
  return arr[i] if i is not None else arr
