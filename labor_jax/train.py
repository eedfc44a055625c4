"""``python -m labor_jax.train --config configs/demo.yaml [--set optim.lr=1e-4 ...]``

Fine-tunes (or trains from scratch) a Llama-family model on a resume dataset. The run
directory receives the resolved ``config.yaml``, the tokenizer, orbax ``checkpoints/``,
``metrics.jsonl`` and TensorBoard events (``tb/``). Re-running the same command resumes
from the newest readable checkpoint. SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import yaml

from labor_jax import runtime, train_config
from labor_jax.train_config import ConfigError, TrainConfig

EXIT_CONFIG, EXIT_NAN = 2, 3


class NonFiniteLoss(RuntimeError):
  pass


def maybe_initialize_distributed(cfg: train_config.DistributedConfig) -> None:
  """Calls jax.distributed.initialize when configured, or (auto) on a TPU pod / under SLURM."""
  import jax
  want = cfg.initialize is True or (cfg.initialize == "auto" and (
      cfg.coordinator_address or "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1
      or "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]))
  if not want:
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if cfg.coordinator_address:
    kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
  jax.distributed.initialize(**kwargs)


def _log_line(path: Path, record: dict):
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def _prepare_data(cfg: TrainConfig, run_dir: Path, is_main: bool) -> Path:
  from jax.experimental import multihost_utils
  if cfg.data.dataset_dir is not None:
    data_dir = Path(cfg.data.dataset_dir)
    if not (data_dir / "labor_resumes").exists():
      raise ConfigError(f"data.dataset_dir: {data_dir} is not a data_pipeline.build output (no labor_resumes/)")
    return data_dir
  data_dir = run_dir / "data"
  if is_main and not (data_dir / "summary.json").exists():
    from data_pipeline import build
    print("building the embedded NLSY dataset ...", flush=True)
    if build.main(["--out", str(data_dir), "--vocab-size", str(cfg.data.vocab_size)]) != 0:
      raise RuntimeError("dataset build failed")
  multihost_utils.sync_global_devices("labor_jax: dataset ready")
  return data_dir


def _model(cfg: TrainConfig, tok, mesh, rng):
  """(LlamaConfig, params or None for random init)."""
  import jax

  from labor_jax import export, hf, lora, model
  from labor_jax.config import LlamaConfig
  m = cfg.model
  policy = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers,
                attention_query_block=m.attention_query_block)
  if m.hf_path and m.init_from:
    raise ConfigError("model.hf_path and model.init_from are exclusive")
  if m.init_from:
    config, params, step = export.load_run(m.init_from)
    config = config.replace(**policy)
    if config.lora_rank:
      config, params = lora.merge(config, params)
    source, hint = "model.init_from", ""
    print(f"initialised from {m.init_from} (step {step})", flush=True)
  elif m.hf_path:
    config, params = hf.load(m.hf_path, mesh=mesh, **policy)
    source, hint = "model.hf_path", f"; build the dataset with --tokenizer-dir {m.hf_path}"
  else:
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=m.hidden_size,
                         intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                         num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                         max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **policy)
    params = None
  if params is not None and tok.vocab_size > config.vocab_size:
    raise ConfigError(f"{source}: tokenizer has {tok.vocab_size} tokens, the model only {config.vocab_size}{hint}")
  if params is not None and config.scan_layers and "layers" not in params:
    params = model.stack_layers(params, config.num_hidden_layers)
  if cfg.lora.enabled:
    if params is None:
      params = model.init_params(config, jax.random.fold_in(rng, 1))
    config, params = lora.add_adapters(config, params, rng, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                       dropout=cfg.lora.dropout, targets=cfg.lora.targets)
  return config, params


def run(cfg: TrainConfig) -> dict:
  import jax
  from tqdm import tqdm

  from data_pipeline import loader
  from data_pipeline.tokenizer import ResumeTokenizer
  from labor_jax import checkpoint as ckpt_lib
  from labor_jax import lora, sharding, train_core

  train_config.check_devices(cfg, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  data_dir = _prepare_data(cfg, run_dir, is_main)
  tok = ResumeTokenizer.from_dir(data_dir / "tokenizer")
  if is_main:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(train_config.to_dict(cfg), sort_keys=False))
    shutil.copytree(data_dir / "tokenizer", run_dir / "tokenizer", dirs_exist_ok=True)

  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  rng = jax.random.key(cfg.seed)
  config, params = _model(cfg, tok, mesh, rng)
  if is_main:
    (run_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
  labels = train_core.trainable_labels(jax.eval_shape(lambda: train_core.model.init_params(config, rng)),
                                       lora.LORA_PATTERN if cfg.lora.enabled else None)
  o = cfg.optim
  schedule = train_core.make_schedule(o.lr, cfg.steps, o.warmup_steps, o.decay, o.min_lr_ratio)
  optimizer = train_core.make_optimizer(labels, lr=schedule, weight_decay=o.weight_decay,
                                        clip_norm=o.clip_norm or None, b1=o.b1, b2=o.b2)
  shardings = train_core.state_shardings(config, optimizer, mesh)
  state = train_core.create_state(config, optimizer, shardings, rng, params=params)
  del params
  batch_sh = train_core.batch_sharding(mesh)
  train_step = train_core.make_train_step(config, optimizer, shardings, batch_sh, labels=labels,
                                          grad_accum=o.grad_accum, schedule=schedule, loss_chunk=cfg.model.loss_chunk)
  eval_step = train_core.make_eval_step(config, shardings, batch_sh, loss_chunk=cfg.model.loss_chunk)
  frac = train_core.trainable_fraction(state.params, labels)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))

  local_batch = cfg.batch_size // jax.process_count()
  ds_path = data_dir / "labor_resumes" / "1.0.0"
  data_kw = dict(seq_len=cfg.data.seq_len, batch_size=local_batch, pack=cfg.data.pack, loss_on=cfg.data.loss_on,
                 pad_id=tok.pad_id, process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(loader.make_dataset(ds_path, "train", seed=cfg.seed, **data_kw))

  mgr = ckpt_lib.manager(run_dir / "checkpoints", cfg.keep, cfg.async_checkpointing)
  start, restored = ckpt_lib.restore_latest(mgr, ckpt_lib.abstract(state), data_iter,
                                            log=ckpt_lib.eprint if is_main else (lambda *a: None))
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
    it = iter(loader.make_dataset(ds_path, "validation", shuffle=False, num_epochs=1, **data_kw))
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
  metrics_path, tb = run_dir / "metrics.jsonl", None
  if is_main:
    from tensorboardX import SummaryWriter
    tb = SummaryWriter(str(run_dir / "tb"))
  bar = tqdm(total=cfg.steps, initial=start, disable=not (is_main and cfg.progress), dynamic_ncols=True,
             file=sys.stdout)
  debug_sleep = float(os.environ.get("LABOR_JAX_DEBUG_STEP_SLEEP", "0"))  # tests pace runs to kill them
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
        _log_line(metrics_path, rec)
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
      if debug_sleep:
        time.sleep(debug_sleep)
  finally:
    mgr.wait_until_finished()
    bar.close()
    if tb is not None:
      tb.close()
    signal.signal(signal.SIGTERM, old_handler)
  if is_main:
    summary = {"final_step": last["step"], "final_loss": last.get("loss"), "val_loss": val_loss,
               "params": n_params, "trainable_fraction": frac, "optimizer_state_bytes": opt_bytes}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return last


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="YAML run config (see configs/)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")
  args = ap.parse_args(argv)
  try:
    cfg = train_config.load(args.config, args.set)
    maybe_initialize_distributed(cfg.distributed)
    run(cfg)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NAN
  return 0


if __name__ == "__main__":
  sys.exit(main())
