"""``python -m labor_jax.export --run RUN --out DIR``: a trained run -> Hugging Face checkpoint.

Restores the best (or ``--step``) checkpoint's parameters and writes one of:

* (default) the model with LoRA adapters folded into the base weights: config.json,
  generation_config.json, safetensors and the run's tokenizer, loadable by
  ``transformers.AutoModelForCausalLM.from_pretrained``;
* ``--adapter-only``: the LoRA adapters alone in PEFT's format (adapter_config.json,
  adapter_model.safetensors), loadable by ``peft.PeftModel.from_pretrained`` on the base;
* ``--base-only``: that base (the run's frozen weights, no adapters) as a Hugging Face
  checkpoint with the tokenizer, for runs whose base is not already one (from scratch,
  ``model.init_from``).

Exit codes: 0 written; 2 a bad run, step or option (one line); 3 the output could not be written, the
disk being full or a file size limit hit (one line naming the file; nothing is left at ``--out``, an
earlier export there is kept).
"""

from __future__ import annotations

import argparse
import re
import sys

import jax

from data_pipeline.errors import WriteError, disk_full
from labor_jax import labels, lora
from labor_jax.cli import common as cli
from labor_jax.fileio import check_replaceable
from labor_jax.interop import hf, peft
from labor_jax.config import ConfigError
from labor_jax.rundir import RunDir

EXIT_INPUT, EXIT_WRITE = 2, 3


def _shard_size(text: str) -> int | str:
  """``--max-shard-size``: bytes, or a number with one of the units safetensors' splitter reads."""
  if text.strip().isdigit() and int(text) > 0:
    return int(text)
  size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*[KMGT]B", text.strip().upper())
  if size and float(size[1]) > 0:
    return size[0]
  raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or a number of bytes, got {text!r}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="run directory of labor_jax.train")
  ap.add_argument("--out", required=True, help="output directory (created atomically)")
  cli.add_step_flag(ap)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="tensor dtype (default: the run's)")
  ap.add_argument("--max-shard-size", default="5GB", type=_shard_size,
                  help="largest safetensors file, in bytes or with a unit (KB, MB, GB, TB; default 5GB)")
  what = ap.add_mutually_exclusive_group()
  what.add_argument("--adapter-only", action="store_true", help="write the LoRA adapters alone, in PEFT's format")
  what.add_argument("--base-only", action="store_true", help="write the base model without its LoRA adapters")
  ap.add_argument("--base-model", help="adapter_config.json's base_model_name_or_path (default: the run's "
                                       "model.hf_path; give the --base-only export's path or a hub name otherwise)")
  args = ap.parse_args(argv)

  run = RunDir(args.run)
  try:  # the output checked before loading (the writers check it again)
    check_replaceable(args.out, *((peft.ADAPTER_CONFIG, peft.OUTPUT_NAME) if args.adapter_only else
                                  (hf.CONFIG_FILE, hf.OUTPUT_NAME)))
    if args.base_model and not args.adapter_only:
      raise ConfigError("--base-model names the base in adapter_config.json: it goes with --adapter-only")
    step = cli.step(args)
    config, params, step = run.load_model(None if step in ("last", "latest") else step)
    if (args.adapter_only or args.base_only) and not config.lora_rank:
      raise ConfigError(f"{args.run} trained without LoRA adapters: --{'adapter' if args.adapter_only else 'base'}"
                        "-only needs a lora.enabled run")
    if args.dtype:
      config = config.replace(param_dtype=args.dtype)
      params = jax.tree.map(lambda x: x.astype(config.jnp_param_dtype), params)
    tok = run.tokenizer_dir if run.tokenizer_dir.exists() else None
    if args.adapter_only:
      base_name = args.base_model or run.train_config().model.hf_path
      out = peft.save_adapter(config, params, args.out, base_model_name_or_path=base_name)
      print(f"exported the LoRA adapters of step {step} of {args.run} (r={config.lora_rank}, "
            f"alpha={config.lora_alpha:g}) in PEFT format to {out}; base_model_name_or_path: "
            + (base_name or "unset (give --base-model, e.g. a --base-only export)"))
      return 0
    if args.base_only:
      base = labels.split(params, labels.run_labels(params, lora=True))[1]
      out = hf.save(lora.merged_config(config), base, args.out, tokenizer_dir=tok, max_shard_size=args.max_shard_size)
      print(f"exported the base model of {args.run} (frozen weights, no adapters) to {out}")
      return 0
    merged_cfg, merged = lora.merge(config, params)
    out = hf.save(merged_cfg, merged, args.out, tokenizer_dir=tok, max_shard_size=args.max_shard_size)
  except (FileNotFoundError, ConfigError, hf.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_INPUT
  except WriteError as e:  # an --out where no file can be made, found before any work: the line says it all
    print(f"error: {e}; nothing was written", file=sys.stderr)
    return EXIT_WRITE
  except Exception as e:  # noqa: BLE001 - a full disk or an unwritable --out in one line; anything else propagates
    full = disk_full(e)
    if full is None and isinstance(e, OSError):
      full = (e.strerror or str(e), e.filename)
    if full is None:
      raise
    why, file = full
    print(f"error: cannot write the export {args.out}{f' ({file})' if file else ''}: {why}; nothing was written",
          file=sys.stderr)
    return EXIT_WRITE
  print(f"exported step {step} of {args.run}{' (LoRA merged)' if config.lora_rank else ''} to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
