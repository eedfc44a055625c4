"""Shared set-up of the benchmarks: the allocator and instruction-set flags, the CPU's name
(``cpu_line``, from labor_jax.runtime), and one random Llama in PyTorch transformers and in labor_jax."""

import argparse
import os
import tempfile

from labor_jax.runtime import cpu_description as cpu_line  # noqa: F401  (the benchmarks import it from here)

# What --max-isa avx2 sets, before JAX or PyTorch is imported: XLA's generated code (fusions,
# the attention kernel's loops), PyTorch's own kernels, MKL's GEMMs and oneDNN each stop at AVX2,
# so a machine with AVX-512 runs both frameworks as an AVX2-only CPU of the same kind would.
# jaxlib's precompiled Eigen GEMMs have no runtime dispatch and are unaffected either way.
AVX2_ENV = {
    "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def add_isa_flag(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--max-isa", choices=("native", "avx2"), default="native",
                  help="avx2: cap XLA, PyTorch, MKL and oneDNN at AVX2, to measure on an AVX-512 machine what "
                       "an AVX2-only CPU would run (see AVX2_ENV)")


def apply_isa_flag(args: argparse.Namespace) -> None:
  """Applies ``--max-isa``; call it before JAX or PyTorch is imported."""
  if args.max_isa == "avx2":
    for key, value in AVX2_ENV.items():
      os.environ[key] = f"{os.environ[key]} {value}" if key == "XLA_FLAGS" and os.environ.get(key) else value


def add_malloc_flag(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--malloc-tuning", choices=("on", "off"), default="on",
                  help="labor_jax.runtime.tune_malloc, as the CLIs apply it (process-wide: every framework "
                       "in the benchmark runs under the same allocator settings)")


def apply_malloc_flag(args: argparse.Namespace) -> bool:
  """Applies ``--malloc-tuning``; call it before JAX or PyTorch starts threads. True when in effect."""
  from labor_jax import runtime
  return args.malloc_tuning == "on" and runtime.tune_malloc()


def random_llama_pair(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                      max_positions: int, seed: int = 0):
  """(transformers LlamaForCausalLM, labor_jax config, labor_jax params) with the same random weights.

  The PyTorch model is saved and reloaded, and labor_jax imports the same files
  (labor_jax.interop.hf.load), so both sides start from identical tensors."""
  import torch
  import transformers

  from labor_jax.interop import hf

  cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                 max_position_embeddings=max_positions)
  torch.manual_seed(seed)
  with tempfile.TemporaryDirectory() as ck:
    transformers.LlamaForCausalLM(cfg).save_pretrained(ck)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ck)
    config, params = hf.load(ck)
  return ref, config, params


def time_best(fn, repeats: int = 3):
  """(result, seconds of the first call (compiles), best seconds of ``repeats`` more calls) of ``fn()``."""
  import time
  t0 = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, first, min(times)
