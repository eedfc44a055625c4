"""Per-device memory plan of a training run, by ahead-of-time compilation (no weights needed).

Fakes ``--devices`` CPU devices, builds the train state of ``--preset`` (or the config's
model.hf_path config.json) as shapes only, lowers and compiles the real train step with
the run's mesh, batch and LoRA settings, and prints XLA's memory analysis per device.

  python scripts/memory_plan.py --config configs/llama2_7b_lora.yaml --preset llama2_7b --devices 8

CPU compilation stands in for the accelerator's: buffer sizes (parameters, optimizer
state, batch) are exact; temporaries depend on the backend's fusion choices.
"""

import argparse
import os
import sys
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True)
  ap.add_argument("--preset", help="architecture preset (llama2_7b, llama2_13b, llama3_8b); default: hf_path")
  ap.add_argument("--devices", type=int, required=True, help="devices of the target slice / cluster")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--layers", type=int, help="override the number of decoder blocks (quick what-ifs)")
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"

  import jax
  import jax.numpy as jnp

  from labor_jax import config as config_lib, labels, sharding, train_config, train_core

  cfg = train_config.load(args.config, args.set)
  train_config.check_devices(cfg, jax.device_count(), 1)
  if args.preset:
    base = config_lib.preset(args.preset)
  elif cfg.model.hf_path:
    base = config_lib.LlamaConfig.from_hf_file(os.path.join(cfg.model.hf_path, "config.json"))
  else:  # from scratch: the config's sizes, the dataset's vocabulary size
    base = None
  config = train_config.model_config(cfg, base)
  if args.layers:
    config = config.replace(num_hidden_layers=args.layers)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  shapes = train_core.model.param_shapes(config)
  label_tree = labels.run_labels(shapes, cfg.lora.enabled)
  optimizer = train_core.make_optimizer(label_tree, lr=1e-4, clip_norm=cfg.optim.clip_norm or None)
  sh = train_core.state_shardings(config, optimizer, mesh)
  abstract_state = jax.eval_shape(lambda: train_core.TrainState(
      step=jnp.zeros((), jnp.int32), params=shapes, opt_state=optimizer.init(shapes),
      rng=jax.random.key_data(jax.random.key(0))))
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, sh)
  batch_sh = train_core.batch_sharding(mesh)
  b, t = cfg.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch_sh)
           for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  step = train_core.make_train_step(config, optimizer, sh, batch_sh, labels=label_tree, grad_accum=cfg.optim.grad_accum)
  t0 = time.perf_counter()
  compiled = step.lower(abstract_state, batch).compile()
  secs = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  gib = 2 ** 30
  n = config.num_params()
  print(f"{args.config}: {args.preset or cfg.model.hf_path or 'from scratch'} ({n / 1e6:,.1f}M params, {config.param_dtype}), "
        f"{'LoRA r=%d' % cfg.lora.rank if cfg.lora.enabled else 'full'}, mesh {dict(mesh.shape)}, "
        f"batch {b} x {t}, remat={config.remat}; compiled in {secs:.0f}s on {args.devices} fake CPU devices")
  print(f"per device: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, outputs {mem.output_size_in_bytes / gib:.2f} GiB "
        f"(aliased {mem.alias_size_in_bytes / gib:.2f} GiB), temporaries {mem.temp_size_in_bytes / gib:.2f} GiB, "
        f"code {mem.generated_code_size_in_bytes / 2 ** 20:.1f} MiB")
  print(f"peak estimate per device (arguments + temporaries + unaliased outputs): "
        f"{(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / gib:.2f} GiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
