"""``python -m labor_jax.plan --config CONFIG --devices N --chip h100``: will this run fit, without the hardware?

Builds the real train step of a run config (and the real scoring step of ``labor_jax.evaluate``)
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
import dataclasses
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline.titles import load_titles
from labor_jax import config as config_lib
from labor_jax import evaluation, labels, model, scorer, sharding
from labor_jax.training import config as train_config
from labor_jax.training import core as train_core
from labor_jax.config import ConfigError, LlamaConfig

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  device_kind: str  # as jax.devices()[0].device_kind names it (for the peak FLOP/s table in labor_jax.flops)
  hbm_bytes: int  # memory of one device


CHIPS = {  # memory per device as the runtime reports it (vendor data sheets)
    "h100": Chip("NVIDIA H100 80GB HBM3", 81_559 * 2 ** 20),
    "h200": Chip("NVIDIA H200", 143_771 * 2 ** 20),
    "a100": Chip("NVIDIA A100-SXM4-80GB", 81_920 * 2 ** 20),
    "v4": Chip("TPU v4", 32 * GIB),
    "v5e": Chip("TPU v5 lite", 16 * GIB),
    "v5p": Chip("TPU v5p", 95 * GIB),
    "v6e": Chip("TPU v6 lite", 32 * GIB),
}


@dataclasses.dataclass
class Plan:
  """One compiled step's per-device memory (bytes) and FLOPs."""
  what: str
  arguments: int
  temporaries: int
  outputs: int
  aliased: int
  flops: float
  biggest: list[tuple[str, int]]  # (HLO shape, bytes) of the largest values the program produces
  compile_seconds: float

  @property
  def peak(self) -> int:
    return self.arguments + self.temporaries + self.outputs - self.aliased


def _plan(what: str, jitted, *args) -> Plan:
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  secs = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Plan(what, mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes,
              mem.alias_size_in_bytes, float((cost or {}).get("flops", float("nan"))),
              biggest_buffers(compiled.as_text()), secs)


_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_SHAPE = re.compile(r"=\s*(f64|s64|u64|f32|s32|u32|bf16|f16|s16|u16|s8|u8|pred)\[([\d,]*)\]")


def biggest_buffers(hlo_text: str, n: int = 5) -> list[tuple[str, int]]:
  """The ``n`` largest array values an optimised HLO module defines (per device under SPMD)."""
  sizes = {}
  for dtype, dims in _SHAPE.findall(hlo_text):
    shape = f"{dtype}[{dims}]"
    sizes[shape] = _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return sorted(sizes.items(), key=lambda kv: -kv[1])[:n]


def train_plan(cfg: train_config.TrainConfig, config: LlamaConfig, mesh) -> Plan:
  """The run's real train step (optimizer, label tree, gradient accumulation) compiled for ``mesh``."""
  shapes = model.param_shapes(config)
  label_tree = labels.run_labels(shapes, cfg.lora.enabled)
  optimizer = train_core.make_optimizer(label_tree, lr=1e-4, clip_norm=cfg.optim.clip_norm or None)
  shardings = train_core.state_shardings(config, optimizer, mesh)
  state = train_core.abstract_state(config, optimizer, shardings)
  batch_sh = train_core.batch_sharding(mesh)
  b, t = cfg.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch_sh)
           for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  step = train_core.make_train_step(config, optimizer, shardings, batch_sh, labels=label_tree,
                                    grad_accum=cfg.optim.grad_accum)
  return _plan(f"train step, batch {b} x {t}", step, state, batch)


def title_tree(n_titles: int, vocab_size: int) -> scorer.CandidateTree:
  """A candidate tree of ``n_titles`` occupation titles (occ1990dd, repeated with a suffix past 330),
  each word split into pieces of about four characters, words mapped to stable token ids."""
  titles = list(load_titles("occ1990dd").titles)
  names = [titles[i % len(titles)] + ("" if i < len(titles) else f" ({i // len(titles)})") for i in range(n_titles)]
  ids: dict[str, int] = {}

  def tokens(text):
    out = []
    for word in (" " + text).split(" ")[1:]:
      for k in range(0, max(len(word), 1), 4):
        out.append(ids.setdefault(word[k:k + 4] + ("_" if k else " "), 10 + len(ids) % (vocab_size - 10)))
    return out + [2]  # the entry terminator
  return scorer.CandidateTree.build([tokens(t) for t in names])


def score_plan(config: LlamaConfig, mesh, *, batch_workers: int, chunk: int | None, titles: int,
               resume_tokens: int, entries: int) -> Plan:
  """The scoring step of labor_jax.evaluate (``scorer.score`` on ``mesh``) for one batch."""
  tree = title_tree(titles, config.vocab_size)
  param_sh = model.param_shardings(config, mesh)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model.param_shapes(config), param_sh)
  batch_sh = NamedSharding(mesh, sharding.logical_to_mesh(("batch", "length"), what="workers"))
  tokens = jax.ShapeDtypeStruct((batch_workers, resume_tokens), jnp.int32, sharding=batch_sh)
  ends = jax.ShapeDtypeStruct((batch_workers, entries), jnp.int32, sharding=batch_sh)

  def step(params, tokens_BN, mask_BN, ends_BT):
    return scorer.score(config, params, tree, tokens_BN, mask_BN, ends_BT, normalize=True, chunk=chunk, mesh=mesh)
  jitted = jax.jit(step, in_shardings=(param_sh, batch_sh, batch_sh, batch_sh),
                   out_shardings=NamedSharding(mesh, PartitionSpec(*batch_sh.spec, None)))
  return _plan(f"scoring, {batch_workers} workers x {entries} entries x {tree.num_candidates} titles "
               f"({len(tree.nodes_L)} tree nodes), chunk {chunk or batch_workers}, {resume_tokens} tokens per resume",
               jitted, params, tokens, tokens, ends)


def base_config(cfg: train_config.TrainConfig, preset: str | None) -> LlamaConfig | None:
  if preset:
    return config_lib.preset(preset)
  if cfg.model.hf_path:
    return LlamaConfig.from_hf_file(os.path.join(cfg.model.hf_path, "config.json"))
  return None


def _gib(x: float) -> str:
  return f"{x / GIB:.2f} GiB"


def report(plan: Plan, chip: Chip | None) -> list[str]:
  fits = "" if chip is None else ("fits" if plan.peak <= chip.hbm_bytes else "does not fit")
  return [f"{plan.what} (compiled in {plan.compile_seconds:.0f} s)",
          f"  per device: arguments {_gib(plan.arguments)}, temporaries {_gib(plan.temporaries)}, outputs "
          f"{_gib(plan.outputs)} (aliased to donated arguments {_gib(plan.aliased)})",
          f"  peak {_gib(plan.peak)}" + (f" of {_gib(chip.hbm_bytes)}: {fits}" if chip else ""),
          f"  XLA FLOPs per step and device: {plan.flops:.3e}",
          "  biggest values: " + ", ".join(f"{s} {_gib(b)}" for s, b in plan.biggest)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="YAML run config (configs/...)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  ap.add_argument("--devices", type=int, required=True, help="devices of the target slice or cluster")
  ap.add_argument("--mesh", help="data=N,fsdp=M,tensor=K (default: the config's mesh)")
  ap.add_argument("--chip", choices=sorted(CHIPS), help="the verdict is against this chip's memory")
  ap.add_argument("--preset", help=f"architecture ({', '.join(sorted(config_lib.PRESETS))}); default: "
                                   "model.hf_path's config.json or the config's from-scratch sizes")
  ap.add_argument("--no-score", action="store_true", help="plan the train step only")
  ap.add_argument("--no-train", action="store_true", help="plan the scoring step only")
  ap.add_argument("--score-devices", type=int, help="devices for the scoring plan (default: --devices)")
  ap.add_argument("--score-mesh", help="mesh of the scoring plan (default: labor_jax.evaluate's for this chip)")
  ap.add_argument("--batch-workers", type=int, default=16, help="scoring: workers per batch")
  ap.add_argument("--chunk", type=int, help="scoring: workers per tree pass (default: labor_jax.evaluate's)")
  ap.add_argument("--titles", type=int, default=335, help="scoring: occupation titles")
  ap.add_argument("--resume-tokens", type=int, default=512, help="scoring: tokens per resume")
  ap.add_argument("--entries", type=int, default=20, help="scoring: entries per resume")
  args = ap.parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    cfg = train_config.load(args.config, args.set)
    if args.mesh:
      cfg = train_config.updated(cfg, {f"mesh.{k}": v for k, v in sharding.parse_mesh(args.mesh).items()})
    if not args.no_train:
      train_config.check_devices(cfg, jax.device_count(), 1)
    config = train_config.model_config(cfg, base_config(cfg, args.preset))
  except (ConfigError, sharding.ShardingError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  chip = CHIPS.get(args.chip)
  m = cfg.mesh
  print(f"{args.config}: {args.preset or cfg.model.hf_path or 'from scratch'} ({config.num_params() / 1e6:,.1f}M "
        f"parameters, {config.param_dtype}), {'LoRA r=%d' % cfg.lora.rank if cfg.lora.enabled else 'full'}, "
        f"remat={config.remat}, scan_layers={config.scan_layers}; {args.devices} fake CPU devices"
        + (f"; chip {args.chip} ({_gib(chip.hbm_bytes)})" if chip else ""))
  plans = []
  if not args.no_train:
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor)
    plans.append(train_plan(cfg, config, mesh))
    print(f"mesh {dict(mesh.shape)}")
    print("\n".join(report(plans[-1], chip)), flush=True)
  if not args.no_score:
    n = args.score_devices or args.devices  # labor_jax.evaluate's default mesh for this model on this chip
    score_mesh = sharding.scoring_mesh(args.score_mesh, config.num_params() * np.dtype(config.jnp_param_dtype).itemsize,
                                       devices=jax.devices()[:n], device_bytes=chip.hbm_bytes if chip else None)
    chunk = args.chunk or evaluation.default_chunk(config, score_mesh, args.batch_workers)
    plans.append(score_plan(config, score_mesh, batch_workers=args.batch_workers, chunk=chunk,
                            titles=args.titles, resume_tokens=args.resume_tokens, entries=args.entries))
    print(f"mesh {dict(score_mesh.shape)}")
    print("\n".join(report(plans[-1], chip)))
  if chip is None:
    return 0
  ok = all(p.peak <= chip.hbm_bytes for p in plans)
  print(f"verdict on {args.chip}: {'fits' if ok else 'does not fit'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
