"""``python -m labor_jax.plan --config CONFIG --devices N --chip h100``: will this run fit, without the hardware?

Builds (:mod:`labor_jax.planning`) the real train step of a run config (and the real scoring step of ``labor_jax.evaluate``)
with abstract parameters (shapes only: no weight is read or allocated), compiles both ahead of
time for ``--devices`` fake CPU devices on the run's mesh (or ``--mesh``), and prints per device:
arguments, temporaries, outputs, the peak (arguments + temporaries + outputs not aliased to a
donated argument), the biggest buffers and XLA's FLOPs per step; then the verdict against the
chip's memory: ``fits`` (exit 0) or ``does not fit`` (exit 1).

  python -m labor_jax.plan --config configs/llama2_7b_lora.yaml --preset llama2_7b --devices 8 --chip h100

The figures come from XLA's CPU backend standing in for the accelerator's: buffer sizes
(parameters, optimizer state, batch, caches) are exact; temporaries depend on the backend's
fusion and scheduling, so leave headroom. The architecture comes from ``--preset``, else from
``model.hf_path``'s config.json (the weights are not read), else from the config's
from-scratch sizes. Scoring is planned for ``--batch-workers`` resumes of
``--resume-tokens`` tokens with ``--entries`` entries each and ``--titles`` occupation titles
(the occ1990dd titles, split into tokens of about four characters, a stand-in for the model's
tokenizer).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from labor_jax import config as config_lib
from labor_jax import inference, planning, sharding
from labor_jax.cli.common import positive
from labor_jax.config import ConfigError
from labor_jax.training import config as train_config


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="YAML run config (configs/...)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  ap.add_argument("--devices", type=positive, required=True, help="devices of the target slice or cluster")
  ap.add_argument("--mesh", help="data=N,fsdp=M,tensor=K (default: the config's mesh)")
  ap.add_argument("--chip", choices=sorted(planning.CHIPS), help="the verdict is against this chip's memory")
  ap.add_argument("--preset", help=f"architecture ({', '.join(sorted(config_lib.PRESETS))}); default: "
                                   "model.hf_path's config.json or the config's from-scratch sizes")
  ap.add_argument("--no-score", action="store_true", help="plan the train step only")
  ap.add_argument("--no-train", action="store_true", help="plan the scoring step only")
  ap.add_argument("--score-devices", type=positive, help="devices for the scoring plan (default: --devices)")
  ap.add_argument("--score-mesh", help="mesh of the scoring plan (default: labor_jax.evaluate's for this chip)")
  ap.add_argument("--batch-workers", type=positive, default=16, help="scoring: workers per batch")
  ap.add_argument("--chunk", type=positive, help="scoring: workers per tree pass (default: labor_jax.evaluate's)")
  ap.add_argument("--titles", type=positive, default=335, help="scoring: occupation titles")
  ap.add_argument("--resume-tokens", type=positive, default=512, help="scoring: tokens per resume")
  ap.add_argument("--entries", type=positive, default=20, help="scoring: entries per resume")
  args = ap.parse_args(argv)
  if args.no_train and args.no_score:
    ap.error("--no-train and --no-score leave nothing to plan")
  if args.score_devices and args.score_devices > args.devices:
    ap.error(f"--score-devices {args.score_devices} is more than --devices {args.devices}")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    cfg = train_config.load(args.config, args.set)
    if args.mesh:
      cfg = train_config.updated(cfg, {f"mesh.{k}": v for k, v in sharding.parse_mesh(args.mesh).items()})
    if not args.no_train:
      train_config.check_devices(cfg, jax.device_count(), 1)
    config = train_config.model_config(cfg, planning.base_config(cfg, args.preset), platform=args.chip)  # auto: bf16 on a chip
    chip = planning.CHIPS.get(args.chip)
    if not args.no_score:  # the scoring mesh and batch checked before the train step's compile (minutes on 7B)
      n = args.score_devices or args.devices  # labor_jax.evaluate's default mesh for this model on this chip
      score_mesh = sharding.scoring_mesh(args.score_mesh,
                                         config.num_params() * np.dtype(config.jnp_param_dtype).itemsize,
                                         devices=jax.devices()[:n], device_bytes=chip.hbm_bytes if chip else None)
      inference.check_batch(score_mesh, args.batch_workers, args.chunk)  # as labor_jax.evaluate refuses them
  except (ConfigError, sharding.ShardingError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  m = cfg.mesh
  print(f"{args.config}: {args.preset or cfg.model.hf_path or 'from scratch'} ({config.num_params() / 1e6:,.1f}M "
        f"parameters, {config.param_dtype}), {'LoRA r=%d' % cfg.lora.rank if cfg.lora.enabled else 'full'}, "
        f"remat={config.remat}, scan_layers={config.scan_layers}; {args.devices} fake CPU devices"
        + (f"; chip {args.chip} ({planning.gib(chip.hbm_bytes)})" if chip else ""))
  plans = []
  if not args.no_train:
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor)
    plans.append(planning.train_plan(cfg, config, mesh))
    print(f"mesh {dict(mesh.shape)}")
    print("\n".join(planning.report(plans[-1], chip)), flush=True)
  if not args.no_score:
    chunk = args.chunk or inference.default_chunk(config, score_mesh, args.batch_workers)
    plans.append(planning.score_plan(config, score_mesh, batch_workers=args.batch_workers, chunk=chunk,
                            titles=args.titles, resume_tokens=args.resume_tokens, entries=args.entries))
    print(f"mesh {dict(score_mesh.shape)}")
    print("\n".join(planning.report(plans[-1], chip)))
  if chip is None:
    return 0
  ok = all(p.peak <= chip.hbm_bytes for p in plans)
  print(f"verdict on {args.chip}: {'fits' if ok else 'does not fit'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
