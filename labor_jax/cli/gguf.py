"""``python -m labor_jax.gguf FILE.gguf --out DIR``: a llama.cpp GGUF model -> Hugging Face directory.

Writes config.json, generation_config.json, model.safetensors (float32, dequantised) and
tokenizer.json + tokenizer_config.json rebuilt from the file's metadata (see
:mod:`labor_jax.interop.gguf`). A bad file is one line on stderr naming it and the field, exit
status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import resource
import sys

from labor_jax.config import ConfigError
from labor_jax.interop import gguf


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("file", help="a .gguf model file (Llama family; F32, F16, BF16, Q4_0 ... Q8_0 and K-quants)")
  ap.add_argument("--out", required=True, help="output directory (created atomically)")
  args = ap.parse_args(argv)
  try:
    info = gguf.convert(args.file, args.out)
  except (gguf.GGUFError, ConfigError, OSError) as e:  # a bad file, an --out that is not ours or not writable
    print(f"error: {e}", file=sys.stderr)
    return 2
  types = ", ".join(f"{k} {v}" for k, v in sorted(info["types"].items()))
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"wrote {info['out']}: {info['tensors']} tensors ({types}), {info['parameters']:,} parameters, "
        f"{info['seconds']:.1f}s, peak RSS {peak_mb:.0f} MB")
  return 0
