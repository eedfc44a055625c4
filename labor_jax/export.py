"""``python -m labor_jax.export --run RUN --out DIR``: a trained run -> Hugging Face checkpoint.

Restores the best (or ``--step``) checkpoint's parameters, folds LoRA adapters into the
base weights, and writes config.json, generation_config.json, safetensors and the run's
tokenizer, loadable by ``transformers.AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import sys

import jax

from labor_jax import hf, lora
from labor_jax.rundir import RunDir


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="run directory of labor_jax.train")
  ap.add_argument("--out", required=True, help="output directory (created atomically)")
  ap.add_argument("--step", help="checkpoint step, 'latest', or 'best' (default: lowest of the run's eval_metric)",
                  default="best")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="tensor dtype (default: the run's)")
  ap.add_argument("--max-shard-size", default="5GB")
  args = ap.parse_args(argv)

  run = RunDir(args.run)
  try:
    step_arg = None if args.step == "latest" else args.step if args.step == "best" else int(args.step)
    config, params, step = run.load_model(step_arg)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  had_lora = bool(config.lora_rank)
  config, params = lora.merge(config, params)
  if args.dtype:
    config = config.replace(param_dtype=args.dtype)
    params = jax.tree.map(lambda x: x.astype(config.jnp_param_dtype), params)
  tok = run.tokenizer_dir
  out = hf.save(config, params, args.out, tokenizer_dir=tok if tok.exists() else None,
                max_shard_size=args.max_shard_size)
  print(f"exported step {step} of {args.run}{' (LoRA merged)' if had_lora else ''} to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
