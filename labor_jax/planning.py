"""Will a run fit, without the hardware? Its real train and scoring steps compiled ahead of time.

:func:`train_plan` builds the real train step of a run config and :func:`score_plan` the inference
layer's scoring step (:func:`labor_jax.inference.scoring_step`), both with abstract parameters
(shapes only: no weight is read or allocated), and compiles them ahead of time for a mesh of fake
CPU devices; a :class:`Plan` holds per device the arguments, temporaries, outputs, the peak
(arguments + temporaries + outputs not aliased to a donated argument), the biggest buffers and
XLA's FLOPs per step; :func:`report` says it in words against a chip's memory (:data:`CHIPS`).
The command is ``python -m labor_jax.plan`` (:mod:`labor_jax.cli.plan`).

The figures come from XLA's CPU backend standing in for the accelerator's: buffer sizes
(parameters, optimizer state, batch, caches) are exact; temporaries depend on the backend's
fusion and scheduling, so leave headroom. Scoring is planned for resumes of a given length and
entries and a number of occupation titles (the occ1990dd titles, split into tokens of about four
characters, a stand-in for the model's tokenizer).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from data_pipeline.titles import load_titles
from labor_jax import config as config_lib
from labor_jax import inference, labels, model, scorer
from labor_jax.training import config as train_config
from labor_jax.training import core as train_core
from labor_jax.config import LlamaConfig

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
  return compiled_plan(what, compiled, time.perf_counter() - t0)


def compiled_plan(what: str, compiled, compile_seconds: float = float("nan")) -> Plan:
  """The :class:`Plan` of a program already compiled (for any backend: the accelerator's own compiler too)."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Plan(what, mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes,
              mem.alias_size_in_bytes, float((cost or {}).get("flops", float("nan"))),
              biggest_buffers(compiled.as_text()), compile_seconds)


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


def title_candidates(n_titles: int, vocab_size: int) -> tuple[tuple[int, ...], ...]:
  """The candidate tokens of ``n_titles`` occupation titles (occ1990dd, repeated with a suffix past 330),
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
  return tuple(tuple(tokens(t)) for t in names)


def score_plan(config: LlamaConfig, mesh, *, batch_workers: int, chunk: int | None, titles: int,
               resume_tokens: int, entries: int) -> Plan:
  """The inference layer's scoring step (:func:`labor_jax.inference.scoring_step`, as labor_jax.evaluate
  runs it on ``mesh``, the vocabulary padded when the mesh needs it) for one batch."""
  config = inference.padded_config(config, mesh)
  candidates = title_candidates(titles, config.vocab_size)
  tree = scorer.CandidateTree.build(candidates)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model.param_shapes(config), model.param_shardings(config, mesh))
  batch_sh = inference.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((batch_workers, resume_tokens), jnp.int32, sharding=batch_sh)
  ends = jax.ShapeDtypeStruct((batch_workers, entries), jnp.int32, sharding=batch_sh)
  jitted = inference.scoring_step(config, candidates, mesh, chunk)
  return _plan(f"scoring, {batch_workers} workers x {entries} entries x {tree.num_candidates} titles "
               f"({len(tree.nodes_L)} tree nodes), chunk {chunk or batch_workers}, {resume_tokens} tokens per resume",
               jitted, params, tokens, tokens, ends)


def base_config(cfg: train_config.TrainConfig, preset: str | None) -> LlamaConfig | None:
  if preset:
    return config_lib.preset(preset)
  if cfg.model.hf_path:
    return LlamaConfig.from_hf_file(os.path.join(cfg.model.hf_path, "config.json"))
  return None


def gib(x: float) -> str:
  return f"{x / GIB:.2f} GiB"


def report(plan: Plan, chip: Chip | None) -> list[str]:
  fits = "" if chip is None else ("fits" if plan.peak <= chip.hbm_bytes else "does not fit")
  return [f"{plan.what} (compiled in {plan.compile_seconds:.0f} s)",
          f"  per device: arguments {gib(plan.arguments)}, temporaries {gib(plan.temporaries)}, outputs "
          f"{gib(plan.outputs)} (aliased to donated arguments {gib(plan.aliased)})",
          f"  peak {gib(plan.peak)}" + (f" of {gib(chip.hbm_bytes)}: {fits}" if chip else ""),
          f"  XLA FLOPs per step and device: {plan.flops:.3e}",
          "  biggest values: " + ", ".join(f"{s} {gib(b)}" for s, b in plan.biggest)]
