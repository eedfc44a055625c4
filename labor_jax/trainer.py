"""The training loop: a typed run config in, a run directory out.

:func:`run` prepares the data (building the embedded NLSY dataset when the config names
none), builds the model (from scratch, from Hugging Face weights or from an earlier run;
LoRA adapters on top), the sharded train state and the jitted steps
(:mod:`labor_jax.train_core`), restores the newest readable checkpoint, and trains with
progress output, metrics, TensorBoard events, validation and orbax checkpoints. The
command line around it is ``python -m labor_jax.train``.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm import tqdm

from data_pipeline import loader
from data_pipeline.dataset_dir import DatasetDir, build_default
from data_pipeline.tokenizer import ResumeTokenizer
from labor_jax import checkpoint as ckpt_lib
from labor_jax import hf, labels, lora, model, sharding, train_core
from labor_jax.config import ConfigError, LlamaConfig
from labor_jax.rundir import RunDir, dataset_of
from labor_jax.train_config import TrainConfig, check_devices, model_config


class NonFiniteLoss(RuntimeError):
  """The training loss became NaN or infinite."""


def _warn(*args):
  print(*args, file=sys.stderr, flush=True)


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


def build_model(cfg: TrainConfig, tok: ResumeTokenizer, mesh, rng) -> tuple[LlamaConfig, object]:
  """(LlamaConfig, params or None for a random init) of the run, adapters added for LoRA."""
  m = cfg.model
  if m.init_from:
    base, params, step = RunDir(m.init_from).load_model()
    base, params = lora.merge(base, params)
    config = model_config(cfg, base)
    source, hint = "model.init_from", ""
    print(f"initialised from {m.init_from} (step {step})", flush=True)
  elif m.hf_path:
    config = model_config(cfg, LlamaConfig.from_hf_file(f"{m.hf_path}/config.json"))
    params = hf.load_params(m.hf_path, config.replace(lora_rank=0), mesh=mesh)
    source, hint = "model.hf_path", f"; build the dataset with --tokenizer-dir {m.hf_path}"
  else:
    config = model_config(cfg, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    params = None
  if params is not None and tok.vocab_size > config.vocab_size:
    raise ConfigError(f"{source}: tokenizer has {tok.vocab_size} tokens, the model only {config.vocab_size}{hint}")
  if params is not None and config.scan_layers and "layers" not in params:
    params = model.stack_layers(params, config.num_hidden_layers)
  if cfg.lora.enabled:
    base = config.replace(lora_rank=0)
    if params is None:
      params = model.init_params(base, jax.random.fold_in(rng, 1))
    config, params = lora.add_adapters(base, params, rng, rank=config.lora_rank, alpha=config.lora_alpha,
                                       dropout=config.lora_dropout, targets=config.lora_targets)
  return config, params


def run(cfg: TrainConfig) -> dict:
  """Trains (or resumes) the run ``cfg`` describes; returns the last step's metrics record."""
  check_devices(cfg, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  run_dir = RunDir(cfg.run_dir)
  run_dir.path.mkdir(parents=True, exist_ok=True)
  data = prepare_data(cfg, run_dir, is_main)
  tok = data.tokenizer()
  if is_main:
    run_dir.write_config(cfg)
    run_dir.copy_tokenizer(data)

  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  rng = jax.random.key(cfg.seed)
  config, params = build_model(cfg, tok, mesh, rng)
  if is_main:
    run_dir.write_model_config(config)
  label_tree = labels.run_labels(model.param_shapes(config), cfg.lora.enabled)
  o = cfg.optim
  schedule = train_core.make_schedule(o.lr, cfg.steps, o.warmup_steps, o.decay, o.min_lr_ratio)
  optimizer = train_core.make_optimizer(label_tree, lr=schedule, weight_decay=o.weight_decay,
                                        clip_norm=o.clip_norm or None, b1=o.b1, b2=o.b2)
  shardings = train_core.state_shardings(config, optimizer, mesh)
  state = train_core.create_state(config, optimizer, shardings, rng, params=params)
  del params
  batch_sh = train_core.batch_sharding(mesh)
  train_step = train_core.make_train_step(config, optimizer, shardings, batch_sh, labels=label_tree,
                                          grad_accum=o.grad_accum, schedule=schedule)
  eval_step = train_core.make_eval_step(config, shardings, batch_sh)
  frac = labels.trainable_fraction(state.params, label_tree)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))

  local_batch = cfg.batch_size // jax.process_count()
  data_kw = dict(seq_len=cfg.data.seq_len, batch_size=local_batch, pack=cfg.data.pack, loss_on=cfg.data.loss_on,
                 pad_id=tok.pad_id, process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(loader.make_dataset(data, "train", seed=cfg.seed, **data_kw))

  mgr = ckpt_lib.manager(run_dir.checkpoints, cfg.keep, cfg.async_checkpointing)
  start, restored = ckpt_lib.restore_latest(mgr, ckpt_lib.abstract(state), data_iter,
                                            log=_warn if is_main else (lambda *a: None))
  if restored is not None:
    state = restored
  start = int(start or 0)
  if is_main:
    print(f"model: {n_params / 1e6:.2f}M parameters, trainable {100 * frac:.2f}% "
          f"({'LoRA r=%d' % cfg.lora.rank if cfg.lora.enabled else 'full fine-tuning'}), "
          f"optimizer state {opt_bytes / 2 ** 20:.1f} MiB; mesh {dict(mesh.shape)} on "
          f"{jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} process(es)"
          + (f"; resumed from step {start}" if start else ""), flush=True)

  def global_batch(local):
    return jax.make_array_from_process_local_data(batch_sh, local) if jax.process_count() > 1 else \
        jax.device_put(local, batch_sh)

  def evaluate() -> float:
    it = iter(loader.make_dataset(data, "validation", shuffle=False, num_epochs=1, **data_kw))
    total = tokens = 0.0
    for i, local in enumerate(it):
      if cfg.eval_batches and i >= cfg.eval_batches:
        break
      s, n = eval_step(state.params, global_batch(local))
      total, tokens = total + float(s), tokens + float(n)
    return total / max(tokens, 1.0)

  stop = {"signal": None}

  def on_term(signum, frame):
    stop["signal"] = signum
  old_handler = signal.signal(signal.SIGTERM, on_term)
  tb = None
  if is_main:
    tb = SummaryWriter(str(run_dir.events_dir))
  bar = tqdm(total=cfg.steps, initial=start, disable=not (is_main and cfg.progress), dynamic_ncols=True,
             file=sys.stdout)
  last = {"step": start}
  t_last, tok_last = time.perf_counter(), 0.0
  val_loss = None
  try:
    for step in range(start + 1, cfg.steps + 1):
      local = next(data_iter)
      batch_crc = zlib.crc32(np.ascontiguousarray(local["inputs"]).tobytes())
      state, m = train_step(state, global_batch(local))
      loss = float(m["loss"])
      if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss} at step {step}: stopping; the last good checkpoint "
                            f"(step {mgr.latest_step()}) is kept in {mgr.directory}")
      tok_last += float(m["tokens"])
      rec = {"step": step, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
             "batch_crc": batch_crc}
      bar.update(1)
      if step % cfg.log_every == 0 or step == cfg.steps:
        now = time.perf_counter()
        rec["tokens_per_s"] = tok_last / max(now - t_last, 1e-9)
        t_last, tok_last = now, 0.0
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
      if step % cfg.eval_every == 0 or step == cfg.steps:
        val_loss = rec["val_loss"] = evaluate()
        bar.write(f"step {step}: train loss {loss:.4f}, validation loss {val_loss:.4f}")
      if is_main:
        run_dir.append_metrics(rec)
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
          if k in rec:
            tb.add_scalar(f"train/{k}" if k != "val_loss" else "eval/loss", rec[k], step)
      last = rec
      if stop["signal"] is not None:
        ckpt_lib.save(mgr, step, state, data_iter, wait=True)
        bar.write(f"received signal {stop['signal']}: saved checkpoint at step {step}, exiting")
        return last
      if step % cfg.ckpt_every == 0 or step == cfg.steps:
        ckpt_lib.save(mgr, step, state, data_iter, {"val_loss": val_loss} if "val_loss" in rec else None)
  finally:
    mgr.wait_until_finished()
    bar.close()
    if tb is not None:
      tb.close()
    signal.signal(signal.SIGTERM, old_handler)
  if is_main:
    run_dir.write_summary({"final_step": last["step"], "final_loss": last.get("loss"), "val_loss": val_loss,
                           "params": n_params, "trainable_fraction": frac, "optimizer_state_bytes": opt_bytes})
  return last
