"""LoRA adapters in PEFT's format: ``load_adapter(path, config, params, mesh)`` and
``save_adapter(config, params, path)``.

adapter_config.json + adapter_model.safetensors, the layout that ``peft.PeftModel.from_pretrained``
reads for LlamaForCausalLM. An adapter's tensor names extend the Hugging Face key map of
:mod:`labor_jax.interop.hf`: the adapted Linear's HF module name, prefixed by PEFT's wrapper and
suffixed per leaf; both leaves are stored transposed like every HF linear weight. labor_jax never
imports ``peft``; the tests use it as the reference.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from labor_jax import labels, model
from labor_jax import sharding as shard_lib
from labor_jax.config import ConfigError, LlamaConfig
from labor_jax.fileio import atomic_dir, check_replaceable
from labor_jax.interop.hf import CheckpointError, check_names, expected_tensors, hf_name

ADAPTER_CONFIG = "adapter_config.json"
OUTPUT_NAME = "PEFT adapter"  # in errors about an output directory that holds no ADAPTER_CONFIG
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


def save_adapter(config: LlamaConfig, params: Any, path: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None) -> Path:
  """Writes the LoRA adapters of ``params`` (selected by the label tree) as a PEFT adapter directory:
  ``adapter_config.json`` and ``adapter_model.safetensors``, in ``config.param_dtype``.

  ``target_modules`` lists the projection names (``["down_proj", "q_proj", "v_proj"]``) when every
  layer carries the same adapters, else a regex that PEFT full-matches against module names. The
  directory appears atomically; every process of a multi-process run must call this, process 0 writes.
  """
  path = Path(path)
  # every process: none waits in a gather alone; process 0, the writer, also tries the file system
  check_replaceable(path, ADAPTER_CONFIG, OUTPUT_NAME, writer=jax.process_index() == 0)
  if not config.lora_rank:
    raise CheckpointError("the model has no LoRA adapters (lora_rank=0): nothing to export")
  adapters = labels.split(params, labels.label_tree(params, labels.ADAPTERS))[0]
  flat = traverse_util.flatten_dict(model.unstack_layers(jax.tree.map(shard_lib.to_host, adapters)), sep="/")
  want = {ours: (name, shape) for name, (ours, shape) in expected_adapters(config).items()}
  check_names(flat, set(want), "adapters")
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
  with atomic_dir(path, jax.process_index() == 0, marker=ADAPTER_CONFIG, what=OUTPUT_NAME) as tmp:
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
