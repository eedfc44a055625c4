"""Typed run configuration: YAML file + dotted ``--set`` overrides, checked before anything compiles.

Every field has one comment saying what it does and its unit. Unknown keys, wrong
types, a mesh that does not match the devices, or a batch the mesh cannot split fail
with one line naming the key (:class:`labor_jax.config.ConfigError`, the package's one
configuration error).

:func:`model_config` is the one translation from a run config to the
:class:`~labor_jax.config.LlamaConfig` it trains; the trainer, the memory planner and the
benchmarks all call it.

A run's length and cadences are given in optimizer steps (``steps``, ``eval_every``,
``ckpt_every``) or in passes over the training split (``epochs``, ``eval_every_epochs``,
``ckpt_every_epochs``), one of each pair. :func:`resolve_epochs` turns the second kind into steps
once the training split's rows are known (the trainer does it at start-up and records the result in
the run's ``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from labor_jax import runtime, selection
from labor_jax.config import ATTENTION_IMPLS, ConfigError, LlamaConfig

__all__ = ["ConfigError", "TrainConfig", "load", "model_config", "updated", "check_devices", "to_dict",
           "resolve_epochs", "epoch_steps", "needs_rows", "compute_dtype"]


@dataclasses.dataclass
class ModelConfig:
  hf_path: str | None = None  # local HF checkpoint directory (or .gguf file) to fine-tune; None trains from scratch
  init_from: str | None = None  # a labor_jax.train run directory whose best checkpoint initialises the weights
  adapter_path: str | None = None  # PEFT adapter directory to start LoRA from (its r, alpha, modules must equal lora.*)
  hidden_size: int = 64  # from scratch: residual width
  intermediate_size: int = 128  # from scratch: SwiGLU width
  num_hidden_layers: int = 2  # from scratch: decoder blocks
  num_attention_heads: int = 4  # from scratch: query heads
  num_key_value_heads: int = 2  # from scratch: key/value heads
  max_position_embeddings: int = 1024  # from scratch: longest sequence (tokens)
  rope_theta: float = 10000.0  # from scratch: RoPE base
  param_dtype: str = "float32"  # parameter storage dtype: float32 or bfloat16
  dtype: str = "float32"  # matmul compute dtype: float32, bfloat16, or auto (bfloat16 on GPU/TPU and on CPUs with avx512_bf16 or amx_bf16, else float32)
  remat: bool = False  # rematerialise decoder blocks in the backward pass (saves activation memory)
  scan_layers: bool = False  # one scanned block over stacked weights (faster compiles, one layer's weights live)
  attention_query_block: int = 64  # causal attention skips masked key blocks, query blocks >= this long (0: off)
  attention_impl: str = "auto"  # attention kernel: auto (cuDNN on NVIDIA GPUs, splash on TPUs, else blocked), xla, cudnn, splash, blocked
  loss_chunk: int | None = None  # positions per chunk of the fused head + loss; None: ~2^25 logits per chunk


# ModelConfig fields that describe the architecture of a model trained from scratch; the rest
# is numeric policy, applied to every model (from scratch, model.hf_path or model.init_from).
_ARCHITECTURE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rope_theta")
_POLICY = ("param_dtype", "dtype", "remat", "scan_layers", "attention_query_block", "attention_impl", "loss_chunk")


@dataclasses.dataclass
class LoraConfig:
  enabled: bool = False  # train LoRA adapters instead of all weights
  rank: int = 8  # adapter rank r
  alpha: float = 16.0  # adapter scale numerator (branch scaled by alpha / rank)
  dropout: float = 0.0  # dropout on the adapter input, training only
  targets: str = r"self_attn/(q|k|v|o)_proj"  # regex over module paths that get adapters
  top_layers: int | None = None  # adapters only in the last N blocks (all, if fewer): no backward pass below them
  cache_frozen: bool = False  # with top_layers: the frozen blocks below run once over the training split, not each step
  cache_dir: str | None = None  # with cache_frozen: keep that output here for later runs of the same base and data


@dataclasses.dataclass
class DataConfig:
  dataset_dir: str | None = None  # a data_pipeline.build output; None builds the embedded NLSY data
  seq_len: int = 256  # tokens per training row
  pack: bool = False  # pack several resumes per row (segment-masked attention)
  loss_on: str = "all"  # "all" tokens or only the work "history" entries
  truncate: str = "warn"  # resumes longer than seq_len are cut: "warn" (counted at start) or "error" (exit 2)
  vocab_size: int = 1024  # SentencePiece vocabulary when the dataset is built here


@dataclasses.dataclass
class OptimConfig:
  lr: float = 1e-3  # peak learning rate
  warmup_steps: int = 10  # linear warmup steps
  decay: str = "cosine"  # "cosine", "linear" or "constant" after warmup
  min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
  weight_decay: float = 0.0  # AdamW decoupled weight decay
  b1: float = 0.9  # AdamW beta1
  b2: float = 0.95  # AdamW beta2
  clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
  grad_accum: int = 1  # micro-batches per optimizer step (the batch is split this many ways)


@dataclasses.dataclass
class MeshConfig:
  data: int = 1  # data-parallel replicas
  fsdp: int = 1  # fully-sharded data parallel (parameters split along "embed")
  tensor: int = 1  # tensor parallel (heads / mlp / vocab split)


@dataclasses.dataclass
class DistributedConfig:
  initialize: bool | str = "auto"  # true, false, or "auto" (on a TPU pod, under SLURM, or with a coordinator)
  coordinator_address: str | None = None  # host:port of process 0 (multi-host CPU/GPU without SLURM)
  num_processes: int | None = None  # total processes (with coordinator_address)
  process_id: int | None = None  # this process (with coordinator_address)


@dataclasses.dataclass
class TrainConfig:
  run_dir: str = "runs/demo"  # where config, tokenizer, checkpoints, metrics and events go
  steps: int | None = None  # optimizer steps; null: from epochs, or 100 when epochs is null too (exclusive with epochs)
  epochs: float | None = None  # passes over the training split (fractions allowed); steps = ceil(epochs x rows / batch_size)
  batch_size: int = 8  # global batch (rows of seq_len tokens), all processes together
  seed: int = 0  # parameter init, data order, dropout
  log_every: int = 10  # steps between metric lines
  eval_every: int | None = None  # steps between validation evaluations (and at the end); null: from eval_every_epochs, or 50
  eval_every_epochs: float | None = None  # epochs between validation evaluations, rounded up to whole steps (exclusive with eval_every)
  eval_batches: int = 8  # validation batches per evaluation (batch_size rows; perplexity: batch_size workers); 0 = all
  eval_metric: str = selection.DEFAULT  # what picks the best checkpoint: occupation_perplexity (computed at each eval) or token_loss
  ckpt_every: int | None = None  # steps between checkpoints (and at the end); null: from ckpt_every_epochs, or 50
  ckpt_every_epochs: float | None = None  # epochs between checkpoints, rounded up to whole steps (exclusive with ckpt_every)
  ckpt_every_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last save (0: off)
  keep: int = 3  # most recent checkpoints kept (the best by eval_metric is kept too)
  async_checkpointing: bool = True  # write checkpoints in the background
  progress: bool = True  # show a progress bar
  peak_flops_per_chip: float | None = None  # peak bf16 FLOP/s of one chip for MFU; None: labor_jax.flops' table by device kind (none on the CPU)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


_CHOICES = {"data.loss_on": ("all", "history"), "data.truncate": ("warn", "error"), "optim.decay": ("cosine", "linear", "constant"),
            "model.param_dtype": ("float32", "bfloat16"), "model.dtype": ("float32", "bfloat16", "auto"),
            "distributed.initialize": ("auto", True, False), "model.attention_impl": ATTENTION_IMPLS,
            "eval_metric": tuple(selection.EVAL_METRICS)}


def _check(value: Any, typ: Any, key: str) -> Any:
  origin = typing.get_origin(typ)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(typ)
    if value is None and type(None) in args:
      return None
    members = [a for a in args if a is not type(None)]
    for a in members[:-1]:
      try:
        return _check(value, a, key)
      except ConfigError:
        pass
    return _check(value, members[-1], key)
  if typ is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if typ is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
    try:
      value = float(value)
    except ValueError:
      pass
  if typ in (int, float, str, bool) and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
    raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
  if key in _CHOICES and value not in _CHOICES[key]:
    raise ConfigError(f"{key}: must be one of {_CHOICES[key]}, got {value!r}")
  return value


def _build(cls, data: dict, prefix: str = ""):
  if not isinstance(data, dict):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in data.items():
    if key not in fields:
      raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(fields)})")
    typ = hints[key]
    if dataclasses.is_dataclass(typ):
      kwargs[key] = _build(typ, value or {}, f"{prefix}{key}.")
    else:
      kwargs[key] = _check(value, typ, f"{prefix}{key}")
  return cls(**kwargs)


def _field_type(dotted: str) -> Any:
  """The declared type of the config field ``dotted`` (``model.hidden_size``), or None if there is no such field
  (:func:`_build` then names the unknown key)."""
  typ = TrainConfig
  for part in dotted.split("."):
    if not dataclasses.is_dataclass(typ):
      return None
    typ = typing.get_type_hints(typ).get(part)
  return typ


def _set(tree: dict, dotted: str, value: Any):
  *parents, last = dotted.split(".")
  node = tree
  for p in parents:
    node = node.setdefault(p, {})
    if not isinstance(node, dict):
      raise ConfigError(f"--set {dotted}: {p} is not a section")
  node[last] = value


# Each pair gives one quantity in steps or in epochs: one layer (a file, the --set list, the changes
# of updated()) may give only one of them; a later layer's member replaces an earlier layer's other.
EXCLUSIVE = (("steps", "epochs"), ("eval_every", "eval_every_epochs"), ("ckpt_every", "ckpt_every_epochs"))
DEFAULT_STEPS = {"steps": 100, "eval_every": 50, "ckpt_every": 50}  # when neither member of a pair is given


def _layer(raw: dict, given: dict[str, Any], where: str) -> None:
  """Checks that the top-level keys ``given`` by one layer hold at most one member of each
  :data:`EXCLUSIVE` pair, and clears from ``raw`` (the layers below) the other member of a pair
  ``given`` sets."""
  for a, b in EXCLUSIVE:
    if given.get(a) is not None and given.get(b) is not None:
      raise ConfigError(f"{where}: {a} and {b} are exclusive, give one ({a} counts optimizer steps, "
                        f"{b} passes over the training split)")
    for mine, other in ((a, b), (b, a)):
      if given.get(mine) is not None and other not in given:
        raw[other] = None


def load(path: str | Path | None, overrides: list[str] = (), *, resolved: bool = False) -> TrainConfig:
  """Reads a YAML run config and applies ``key.sub=value`` overrides (values parsed as YAML).

  ``steps`` given in one place and ``epochs`` in another: the override wins (``--set epochs=3`` on a
  file with ``steps: 300`` trains by epochs). ``resolved``: ``path`` is a run's ``config.yaml``, where
  the trainer recorded the steps it resolved next to the epochs they came from."""
  raw: dict = {}
  if path is not None:
    try:
      raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
      raise ConfigError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
      raise ConfigError(f"{path}: a run config is a mapping of keys to values, not a {type(raw).__name__}")
    if not resolved:
      _layer({}, raw, str(path))
  given: dict[str, Any] = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set {item!r}: expected key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if dataclasses.is_dataclass(_field_type(key)):
      raise ConfigError(f"--set {item!r}: {key} is a section; set its keys ({key}.KEY=VALUE)")
    if not value.strip():  # an empty shell variable, most likely: never the default in silence
      raise ConfigError(f"--set {item!r}: no value (write {key}=null for null)")
    given[key] = yaml.safe_load(value)
  if isinstance(raw, dict):
    _layer(raw, given, "--set")
  for key, value in given.items():
    _set(raw, key, value)
  try:
    return _validated(_build(TrainConfig, raw))
  except ConfigError as e:  # name the file the value came from (or --set)
    if path is None or str(e).startswith(str(path)):
      raise
    raise ConfigError(f"{path}{' with --set' if overrides else ''}: {e}") from None


def updated(cfg: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
  """A copy of ``cfg`` with dotted-key changes (``{"model.init_from": path, "seed": 1}``), checked
  like a YAML file's values (a change of ``steps`` replaces ``cfg``'s ``epochs``, and so on)."""
  raw = to_dict(cfg)
  _layer(raw, changes, "changes")
  for key, value in changes.items():
    _set(raw, key, value)
  return _validated(_build(TrainConfig, raw))


def _exact(x: float) -> fractions.Fraction:
  """``x`` as the decimal it was written as (0.1 is 1/10, not the nearest binary fraction), so that
  ceilings of products are not one off."""
  return fractions.Fraction(repr(float(x)))


def epoch_steps(epochs: float, rows: int, batch_size: int) -> int:
  """Optimizer steps that take ``epochs`` passes over ``rows`` rows at ``batch_size`` rows per step:
  ceil(epochs x rows / batch_size), at least 1. The training stream is endless (the loader repeats
  the split and batches across the epoch boundary, so drop_remainder never drops a row), so after
  ``k`` steps the run has read ``k x batch_size`` rows; rounding up makes it read all of them."""
  return max(1, math.ceil(_exact(epochs) * rows / batch_size))


def resolve_epochs(cfg: TrainConfig, rows: int) -> TrainConfig:
  """``cfg`` with ``steps``, ``eval_every`` and ``ckpt_every`` that are null (given in epochs)
  computed from ``rows`` (rows the training loader yields per epoch, all processes together) by
  :func:`epoch_steps`. Fields already set (given in steps, or recorded by an earlier start of the
  run) stay."""
  changes = {}
  for steps_key, epochs_key in EXCLUSIVE:
    epochs = getattr(cfg, epochs_key)
    if getattr(cfg, steps_key) is None:
      changes[steps_key] = DEFAULT_STEPS[steps_key] if epochs is None else epoch_steps(epochs, rows, cfg.batch_size)
  return dataclasses.replace(cfg, **changes)


def needs_rows(cfg: TrainConfig) -> bool:
  """Whether ``cfg`` has a length or cadence still to be resolved from the training split's rows."""
  return any(getattr(cfg, steps_key) is None for steps_key, _ in EXCLUSIVE)


def _validated(cfg: TrainConfig) -> TrainConfig:
  for steps_key, epochs_key in EXCLUSIVE:
    if getattr(cfg, steps_key) is None and getattr(cfg, epochs_key) is None:
      cfg = dataclasses.replace(cfg, **{steps_key: DEFAULT_STEPS[steps_key]})
  positive = {"steps": cfg.steps, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "data.seq_len": cfg.data.seq_len,
              "optim.grad_accum": cfg.optim.grad_accum, "mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp,
              "mesh.tensor": cfg.mesh.tensor, "log_every": cfg.log_every, "eval_every": cfg.eval_every,
              "eval_every_epochs": cfg.eval_every_epochs, "ckpt_every": cfg.ckpt_every,
              "ckpt_every_epochs": cfg.ckpt_every_epochs, "keep": cfg.keep}
  positive.update({f"model.{k}": getattr(cfg.model, k) for k in _ARCHITECTURE})
  positive["data.vocab_size"] = cfg.data.vocab_size
  for key, v in positive.items():
    if v is not None and not (math.isfinite(v) and v > 0):  # NaN and inf too (epochs: .nan, .inf)
      raise ConfigError(f"{key}: must be a finite positive number, got {v}")
  o = cfg.optim
  non_negative = {"eval_batches": cfg.eval_batches, "ckpt_every_minutes": cfg.ckpt_every_minutes,
                  "optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
                  "optim.clip_norm": o.clip_norm, "optim.min_lr_ratio": o.min_lr_ratio}
  for key, v in non_negative.items():
    if not (math.isfinite(v) and v >= 0):
      raise ConfigError(f"{key}: must be a finite number >= 0, got {v}")
  if not math.isfinite(cfg.lora.alpha) or cfg.lora.alpha <= 0:
    raise ConfigError(f"lora.alpha: must be a positive number (the branch is scaled by alpha / rank), "
                      f"got {cfg.lora.alpha}")
  if not 0 <= cfg.lora.dropout < 1:
    raise ConfigError(f"lora.dropout: a probability in [0, 1), got {cfg.lora.dropout}")
  if not (math.isfinite(o.lr) and o.lr > 0):
    raise ConfigError(f"optim.lr: must be a positive number, got {o.lr}")
  for key, v in (("optim.b1", o.b1), ("optim.b2", o.b2)):
    if not 0 <= v < 1:
      raise ConfigError(f"{key}: must be in [0, 1), got {v}")
  if cfg.model.attention_query_block < 0:
    raise ConfigError(f"model.attention_query_block: must be >= 0, got {cfg.model.attention_query_block}")
  if cfg.model.loss_chunk is not None and cfg.model.loss_chunk <= 0:
    raise ConfigError(f"model.loss_chunk: must be positive or null, got {cfg.model.loss_chunk}")
  if cfg.model.hf_path and cfg.model.init_from:
    raise ConfigError("model.hf_path and model.init_from are exclusive")
  if cfg.lora.enabled and cfg.lora.rank <= 0:
    raise ConfigError(f"lora.rank: must be positive, got {cfg.lora.rank}")
  if cfg.model.adapter_path and not cfg.lora.enabled:
    raise ConfigError("model.adapter_path: continues LoRA adapters, set lora.enabled=true")
  if cfg.model.adapter_path and not (cfg.model.hf_path or cfg.model.init_from):
    raise ConfigError("model.adapter_path: name the base the adapter was trained on (model.hf_path or model.init_from)")
  if cfg.lora.cache_frozen:
    if not cfg.lora.enabled or cfg.lora.top_layers is None:
      raise ConfigError("lora.cache_frozen: caches the frozen blocks below LoRA adapters in the top blocks; "
                        "set lora.enabled: true and lora.top_layers")
    if cfg.data.pack:
      raise ConfigError("lora.cache_frozen: packed rows (data.pack: true) change every epoch; set data.pack: false")
    if cfg.distributed.num_processes not in (None, 1):
      raise ConfigError("lora.cache_frozen: one process only (each process would need every row of the split)")
  if cfg.lora.cache_dir and not cfg.lora.cache_frozen:
    raise ConfigError("lora.cache_dir: keeps the output of lora.cache_frozen; set lora.cache_frozen: true")
  return cfg


def compute_dtype(cfg: TrainConfig, platform: str | None = None) -> str:
  """``model.dtype``, with ``auto`` resolved by :func:`labor_jax.runtime.auto_dtype` for ``platform``
  (None: this process's JAX backend and CPU)."""
  return runtime.auto_dtype(platform)[0] if cfg.model.dtype == "auto" else cfg.model.dtype


def model_config(cfg: TrainConfig, base: LlamaConfig | None = None, *, vocab_size: int | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 platform: str | None = None) -> LlamaConfig:
  """The :class:`LlamaConfig` a run trains.

  Architecture: ``base`` (a Hugging Face ``config.json``, an earlier run's model, a preset),
  or from scratch the ``model.*`` sizes with ``vocab_size`` (default ``data.vocab_size``) and
  the tokenizer's special ids. Numeric policy (dtypes, remat, scanned layers, attention block,
  loss chunk): always ``model.*``, ``model.dtype: auto`` resolved for ``platform``
  (:func:`compute_dtype`). Adapters: ``lora.*`` when enabled (a base's own adapters are replaced;
  merge them first).
  """
  m = cfg.model
  policy = {k: getattr(m, k) for k in _POLICY} | {"dtype": compute_dtype(cfg, platform)}
  if base is None:
    config = LlamaConfig(vocab_size=vocab_size or cfg.data.vocab_size, bos_token_id=bos_id, eos_token_id=eos_id,
                         pad_token_id=pad_id, **{k: getattr(m, k) for k in _ARCHITECTURE}, **policy)
  else:
    config = base.replace(**policy)
  if cfg.lora.enabled:
    config = config.replace(lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                            lora_targets=lora_targets(cfg.lora, config))
  return config


def lora_targets(lora: LoraConfig, config: LlamaConfig) -> str:
  """The adapters' module-path regex: ``lora.targets``, limited to the last ``lora.top_layers`` blocks of
  ``config`` when that is set (``layers_15/...`` to ``layers_29/...`` for 15 of 30; every block of a model
  with fewer)."""
  if lora.top_layers is None:
    return lora.targets
  n = config.num_hidden_layers
  if lora.top_layers < 1:
    raise ConfigError(f"lora.top_layers: must be positive or null, got {lora.top_layers}")
  if config.scan_layers:
    raise ConfigError("lora.top_layers: scanned layers (model.scan_layers) share one set of adapters; "
                      "set model.scan_layers: false")
  blocks = "|".join(str(i) for i in range(max(n - lora.top_layers, 0), n))
  return f"(^|/)layers_({blocks})/.*({lora.targets})"


def check_devices(cfg: TrainConfig, n_devices: int, n_processes: int):
  """Mesh and batch divisibility, against the devices actually present."""
  m = cfg.mesh
  if m.data * m.fsdp * m.tensor != n_devices:
    raise ConfigError(f"mesh: data={m.data} x fsdp={m.fsdp} x tensor={m.tensor} = {m.data * m.fsdp * m.tensor} "
                      f"devices, but {n_devices} are present")
  split = m.data * m.fsdp
  if cfg.batch_size % (split * cfg.optim.grad_accum):
    raise ConfigError(f"batch_size: {cfg.batch_size} does not divide into mesh data x fsdp = {split} shards "
                      f"x optim.grad_accum = {cfg.optim.grad_accum} micro-batches")
  if cfg.batch_size % n_processes:
    raise ConfigError(f"batch_size: {cfg.batch_size} does not divide among {n_processes} processes")


def to_dict(cfg: TrainConfig) -> dict:
  return dataclasses.asdict(cfg)
