"""The training loop: a typed run config in, a run directory out.

:func:`setup` prepares a :class:`Trainer`: the data (building the embedded NLSY dataset when
the config names none), the model (from scratch, from Hugging Face weights or from an earlier
run; LoRA adapters on top), the sharded train state and the jitted steps
(:mod:`labor_jax.training.core`), restored from the newest readable checkpoint. :func:`train` is
the loop: the pure train step, then the hooks of :mod:`labor_jax.training.hooks` (progress,
metrics, TensorBoard, validation with the next-occupation perplexity that picks the best
checkpoint, preemption, orbax checkpoints, MFU), each at its own cadence. :func:`run` is both.
The command line around it is ``python -m labor_jax.train``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from data_pipeline import loader
from data_pipeline.dataset_dir import DatasetDir, build_default
from data_pipeline.tokenizer import ResumeTokenizer
from labor_jax import checkpoint as ckpt_lib
from labor_jax import inference, labels, lora, model, runtime, selection, sharding
from labor_jax.interop import hf, peft
from labor_jax.training import core as train_core
from labor_jax.training import frozen_cache
from labor_jax.training import hooks as hooks_lib
from labor_jax.training import validation
from labor_jax.config import ConfigError, LlamaConfig
from labor_jax.rundir import CONFIG, RunDir, dataset_of
from labor_jax.training import config as train_config
from labor_jax.training.config import TrainConfig, check_devices, model_config
from labor_jax.training.trainer import Trainer, split_state


def _warn(*args):
  print(*args, file=sys.stderr, flush=True)


def _say(*args):
  print(*args, flush=True)


def prepare_data(cfg: TrainConfig, run: RunDir, is_main: bool) -> DatasetDir:
  """The run's dataset; the embedded NLSY data is built into ``RUN/data`` on first use."""
  data = dataset_of(cfg, run.path)
  if cfg.data.dataset_dir is not None:
    try:
      return data.check()
    except FileNotFoundError as e:
      raise ConfigError(f"data.dataset_dir: {e}") from None
  if is_main and not (data.path / "summary.json").exists():
    print("building the embedded NLSY dataset ...", flush=True)
    build_default(data.path, vocab_size=cfg.data.vocab_size)
  multihost_utils.sync_global_devices("labor_jax: dataset ready")
  return data


def check_truncation(cfg: TrainConfig, data: DatasetDir) -> dict:
  """Counts the training resumes (and entries) that rows of ``data.seq_len`` tokens cut; says so at
  start, and stops (ConfigError) when ``data.truncate`` is "error"."""
  t = loader.truncation(data, "train", cfg.data.seq_len)
  if t["cut_resumes"]:
    msg = (f"{t['cut_resumes']} of {t['resumes']} training resumes are longer than data.seq_len={cfg.data.seq_len} "
           f"(+1) tokens: {t['cut_entries']} of {t['entries']} entries are cut from training")
    if cfg.data.truncate == "error":
      raise ConfigError(f"data.seq_len: {msg}; raise data.seq_len or set data.truncate=warn")
    if jax.process_index() == 0:
      _warn(f"warning: {msg} (data.truncate=error makes this fatal)")
  return t


def resolve_length(cfg: TrainConfig, run: RunDir, data: DatasetDir, is_main: bool) -> TrainConfig:
  """``cfg`` with the length and cadences it gives in epochs turned into steps
  (:func:`~labor_jax.training.config.resolve_epochs` over the rows the training loader yields per
  epoch), said in one line. Where ``RUN/config.yaml`` recorded them for the same epochs and batch (an
  earlier start of this run) the recorded steps are kept, so a resumed run ends and schedules where it
  would have; process 0 decides for every process."""
  if not train_config.needs_rows(cfg):
    return cfg
  n = jax.process_count()
  rows = loader.rows_per_epoch(data, "train", seq_len=cfg.data.seq_len, batch_size=cfg.batch_size // n,
                               seed=cfg.seed, pack=cfg.data.pack, process_count=n)
  resolved = train_config.resolve_epochs(cfg, rows)
  open_pairs = [(s, e) for s, e in train_config.EXCLUSIVE if getattr(cfg, s) is None]
  recorded = None
  if is_main and (run.path / CONFIG).exists():
    try:
      recorded = run.train_config()
    except ConfigError:  # a config of another version: this start's resolution stands
      recorded = None
  kept = {}
  if recorded is not None and recorded.batch_size == cfg.batch_size:
    kept = {s: getattr(recorded, s) for s, e in open_pairs
            if getattr(recorded, e) == getattr(cfg, e) and getattr(recorded, s) is not None}
    changed = {s: (v, getattr(resolved, s)) for s, v in kept.items() if v != getattr(resolved, s)}
    if changed:
      _warn(f"warning: {run.path / CONFIG} recorded " + ", ".join(f"{s}={a}" for s, (a, _) in changed.items())
            + " for this run; the training split now gives " + ", ".join(f"{s}={b}" for s, (_, b) in changed.items())
            + "; keeping the recorded (a new run_dir recomputes)")
    resolved = dataclasses.replace(resolved, **kept)
  if n > 1:  # every process trains for process 0's steps
    mine = np.asarray([getattr(resolved, s) for s, _ in open_pairs], np.int32)
    agreed = multihost_utils.broadcast_one_to_all(mine)
    resolved = dataclasses.replace(resolved, **{s: int(v) for (s, _), v in zip(open_pairs, agreed)})
  if is_main:
    print(f"{rows:,} training rows an epoch at batch_size {cfg.batch_size} ({rows / cfg.batch_size:,.2f} steps an "
          "epoch): " + ", ".join(f"{s}={getattr(resolved, s):,} ({e}={getattr(cfg, e):g})" for s, e in open_pairs)
          + (f" as recorded in {CONFIG}" if kept else ""), flush=True)
  return resolved


def model_config_of(cfg: TrainConfig, tok: ResumeTokenizer) -> LlamaConfig:
  """The run's LlamaConfig, read from its source without loading any weight."""
  m = cfg.model
  if m.init_from:
    base = lora.merged_config(RunDir(m.init_from).model_config())
    config, source, hint = model_config(cfg, base), "model.init_from", ""
  elif m.hf_path:
    config = model_config(cfg, LlamaConfig.from_hf_file(inference.hf_dir(m.hf_path) / "config.json"))
    source, hint = "model.hf_path", f"; build the dataset with --tokenizer-dir {m.hf_path}"
  else:
    return model_config(cfg, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  if tok.vocab_size > config.vocab_size:
    raise ConfigError(f"{source}: tokenizer has {tok.vocab_size} tokens, the model only {config.vocab_size}{hint}")
  return config


def initial_params(cfg: TrainConfig, config: LlamaConfig, mesh, rng):
  """The weights a fresh run starts from, born in their shardings (None: random, drawn inside the
  state initialiser), with new LoRA adapters when ``config`` has them."""
  m = cfg.model
  base = config.replace(lora_rank=0)
  if m.init_from:
    base_cfg, params, step = RunDir(m.init_from).load_model(mesh=mesh)  # born sharded, parameters only
    params = lora.merge(base_cfg, params)[1]
    print(f"initialised from {m.init_from} (step {step})", flush=True)
  elif m.hf_path:
    params = hf.load_params(inference.hf_dir(m.hf_path), base, mesh=mesh)  # a .gguf file is converted once
  elif config.lora_rank:  # a random base for the adapters, born sharded
    params = jax.jit(lambda r: model.init_params(base, r), out_shardings=model.param_shardings(base, mesh))(
        jax.random.fold_in(rng, 1))
  else:
    return None
  if config.scan_layers and "layers" not in params:
    params = model.stack_layers(params, config.num_hidden_layers)
  elif not config.scan_layers and "layers" in params:
    params = model.unstack_layers(params)
  if config.lora_rank and m.adapter_path:
    params = adapters_from(m.adapter_path, config, params, mesh)  # a published or exported adapter, continued
  elif config.lora_rank:
    params = lora.add_adapters(base, params, rng, rank=config.lora_rank, alpha=config.lora_alpha,
                               dropout=config.lora_dropout, targets=config.lora_targets, mesh=mesh)[1]
  return params


def adapters_from(path: str, config: LlamaConfig, params, mesh):
  """``params`` (the base) with the PEFT adapter at ``path``, which must have ``config``'s rank, alpha and
  adapted modules (ConfigError naming the difference); the run's ``lora.dropout`` applies in training."""
  try:
    found, params = peft.load_adapter(path, config.replace(lora_rank=0), params, mesh)
  except hf.CheckpointError as e:
    raise ConfigError(f"model.adapter_path: {e}") from None
  theirs, ours = peft.adapter_modules(found), peft.adapter_modules(config)
  named = lambda ms: f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in ms}))} ({len(ms)} modules)"  # noqa: E731
  for key, a, b in (("rank", found.lora_rank, config.lora_rank), ("alpha", found.lora_alpha, config.lora_alpha),
                    ("targets", theirs, ours)):
    if a != b:
      hint = f"; lora.targets={found.lora_targets!r} selects its modules" if key == "targets" else ""
      a, b = (named(a), named(b)) if key == "targets" else (a, b)
      raise ConfigError(f"model.adapter_path: {path} has {key} {a}, the run's lora.{key} gives {b}{hint}")
  print(f"LoRA adapters from {path}: r={found.lora_rank}, alpha={found.lora_alpha:g}, {named(ours)}", flush=True)
  return params


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or abstract arrays) of ``tree``."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run(cfg: TrainConfig, hooks: list[hooks_lib.Hook] | None = None) -> dict:
  """Trains (or resumes) the run ``cfg`` describes with ``hooks`` (default: :func:`hooks.default_hooks`);
  returns the last step's metrics record. One process trains a run directory at a time (:meth:`RunDir.lock`).
  A new run directory whose set-up fails (a config the model or the data refuses) is removed: nothing half-made
  is left to be mistaken for a run."""
  # the directory the path names once resolved ("runs/new/../old" is runs/old, which exists)
  real = os.path.realpath(cfg.run_dir) if "://" not in str(cfg.run_dir) else None
  fresh = real is not None and not os.path.lexists(real)
  with RunDir(cfg.run_dir).lock():
    try:
      trainer = setup(cfg)
    except BaseException:
      if fresh and jax.process_index() == 0:  # ours alone: made under the lock just taken
        shutil.rmtree(real, ignore_errors=True)
      raise
    return train(trainer, hooks_lib.default_hooks() if hooks is None else hooks)


def train(trainer: Trainer, hooks: list[hooks_lib.Hook]) -> dict:
  """The loop: the pure train step, then every hook, until the last step or a hook stops the run."""
  last = {"step": trainer.start}
  for hook in hooks:
    hook.start(trainer)
  try:
    for step in range(trainer.start + 1, trainer.cfg.steps + 1):
      local = next(trainer.data_iter)
      trainer.state, metrics = trainer.train_step(trainer.state, trainer.train_batch(local))
      info = hooks_lib.StepInfo(step, metrics, local, record={"step": step})
      for hook in hooks:
        hook.after_step(trainer, info)
      last = info.record
      if info.stop:
        return last
  finally:
    for hook in reversed(hooks):
      hook.close(trainer)
  for hook in hooks:
    hook.done(trainer, last)
  return last


def setup(cfg: TrainConfig) -> Trainer:
  """Prepares a run: data, model config, mesh, optimizer, the train state (restored from the newest
  readable checkpoint, or fresh from the model's source), the jitted steps and the validation scorer."""
  check_devices(cfg, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  run_dir = RunDir(cfg.run_dir)
  run_dir.path.mkdir(parents=True, exist_ok=True)
  data = prepare_data(cfg, run_dir, is_main)
  tok = data.tokenizer()
  check_truncation(cfg, data)
  cfg = resolve_length(cfg, run_dir, data, is_main)
  config = model_config_of(cfg, tok)
  if is_main and cfg.model.dtype == "auto":
    print(f"model.dtype auto: {config.dtype} compute ({runtime.auto_dtype()[1]}), {config.param_dtype} parameters",
          flush=True)

  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  rng = jax.random.key(cfg.seed)
  label_tree = labels.run_labels(model.param_shapes(config), cfg.lora.enabled)
  o = cfg.optim
  schedule = train_core.make_schedule(o.lr, cfg.steps, o.warmup_steps, o.decay, o.min_lr_ratio)
  optimizer = train_core.make_optimizer(label_tree, lr=schedule, weight_decay=o.weight_decay,
                                        clip_norm=o.clip_norm or None, b1=o.b1, b2=o.b2)
  shardings = train_core.state_shardings(config, optimizer, mesh)
  target = train_core.abstract_state(config, optimizer, shardings)
  saved_target, frozen_target = split_state(target, label_tree)
  step_bytes, frozen_bytes = tree_bytes(saved_target), tree_bytes(frozen_target)  # per step; once

  local_batch = cfg.batch_size // jax.process_count()
  data_kw = dict(seq_len=cfg.data.seq_len, batch_size=local_batch, pack=cfg.data.pack, loss_on=cfg.data.loss_on,
                 pad_id=tok.pad_id, process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(loader.make_dataset(data, "train", seed=cfg.seed, **data_kw))

  # The validation perplexity's scoring step, built once (None: token loss picks the best checkpoint). Unpacked
  # rows get their token loss from the same pass; packed ones from the loader's (hooks.Validation).
  occupation = None
  first_layer = 0  # lora.cache_frozen: the frozen blocks below the adapters run once (training and validation)
  if cfg.lora.cache_frozen:  # with lora.enabled and top_layers (checked when the config loads)
    first_layer = frozen_cache.first_trained_layer(config.num_hidden_layers, cfg.lora.top_layers)
    if not first_layer and is_main:
      print(f"lora.cache_frozen: lora.top_layers={cfg.lora.top_layers} puts adapters in all "
            f"{config.num_hidden_layers} blocks; nothing below them to cache", flush=True)
  store: list[frozen_cache.Store | None] = []  # lora.cache_dir: opened (the frozen weights hashed) once, when first needed

  def open_store(params) -> frozen_cache.Store | None:
    if not store:
      store.append(frozen_cache.Store.open(cfg.lora.cache_dir, config, params, first_layer,
                                           log=_say if is_main else (lambda *a: None)))
    return store[0]

  if cfg.eval_metric == "occupation_perplexity":
    occupation = validation.occupation_metrics(
        config, data, tok, mesh, batch_workers=cfg.batch_size, max_workers=cfg.eval_batches * cfg.batch_size or None,
        token_loss=None if cfg.data.pack else (cfg.data.seq_len, cfg.data.loss_on), frozen_layers=first_layer,
        open_store=open_store if cfg.lora.cache_dir else None, log=print if is_main else (lambda *a: None))
  metric = selection.key(cfg.eval_metric if occupation is not None else "token_loss")

  # A checkpoint that fits the run is restored (the frozen weights from RUN/frozen); only a fresh
  # run reads the model's source (HF weights, an earlier run, a random init).
  mgr = ckpt_lib.manager(run_dir.checkpoints, cfg.keep, cfg.async_checkpointing, metric=metric)
  start, restored = ckpt_lib.restore_latest(mgr, saved_target, data_iter, log=_warn if is_main else (lambda *a: None))
  if restored is not None:
    if frozen_target and not run_dir.frozen_dir.exists():
      raise ConfigError(f"{run_dir.frozen_dir} is missing: the checkpoints of this run hold its trainable weights "
                        "only; restore that directory or start a new run (--set run_dir=...)")
    frozen = ckpt_lib.restore_frozen(run_dir.frozen_dir, frozen_target) if frozen_target else {}
    state = restored.replace(params=labels.merge(restored.params, frozen))
  else:
    state = train_core.create_state(config, optimizer, shardings, rng, params=initial_params(cfg, config, mesh, rng))
    if frozen_target:  # written once, before the first step (replacing any left by a run that never saved)
      if is_main and run_dir.frozen_dir.exists():
        run_dir.frozen_dir.rmtree()
      multihost_utils.sync_global_devices("labor_jax: frozen weights cleared")
      ckpt_lib.save_frozen(run_dir.frozen_dir, split_state(state, label_tree)[1])
  del restored
  start = int(start or 0)
  if is_main:  # written once the checkpoints are known to fit them: a refused resume leaves the run as it was
    run_dir.write_config(cfg)
    run_dir.copy_tokenizer(data)
    run_dir.write_model_config(config)

  batch_sh = train_core.batch_sharding(mesh)
  cache = None
  if first_layer and start < cfg.steps:  # a finished run (reopened to be reused) takes no step
    cache = frozen_cache.FrozenCache.build(config, state.params, data, data_kw, first_layer, batch_sh,
                                           local_batch, log=_say if is_main else (lambda *a: None),
                                           store=open_store(state.params) if cfg.lora.cache_dir else None)
  train_step = train_core.make_train_step(config, optimizer, shardings, batch_sh, labels=label_tree,
                                          grad_accum=o.grad_accum, schedule=schedule, first_layer=first_layer)
  eval_step = train_core.make_eval_step(config, shardings, batch_sh)
  frac = labels.trainable_fraction(state.params, label_tree)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  if is_main:
    print(f"model: {n_params / 1e6:.2f}M parameters, trainable {100 * frac:.2f}% "
          f"({'LoRA r=%d' % cfg.lora.rank if cfg.lora.enabled else 'full fine-tuning'}), "
          f"optimizer state {opt_bytes / 2 ** 20:.1f} MiB; checkpoint {step_bytes / 2 ** 20:.1f} MiB per step"
          + (f" + frozen weights {frozen_bytes / 2 ** 20:.1f} MiB once" if frozen_bytes else "")
          + f"; mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{jax.process_count()} process(es)" + (f"; resumed from step {start}" if start else ""), flush=True)
  sizes = {"params": n_params, "trainable_fraction": frac, "optimizer_state_bytes": opt_bytes,
           "checkpoint_bytes_per_step": step_bytes, "frozen_bytes": frozen_bytes}
  return Trainer(cfg, run_dir, data, config, mesh, state, start, train_step, eval_step, data_iter, data_kw, batch_sh,
                 mgr, label_tree, occupation, metric, sizes, frozen_cache=cache)
