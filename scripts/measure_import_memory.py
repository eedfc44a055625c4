"""Peak host memory of labor_jax.interop.hf.load on a randomly initialised ~1 GB checkpoint.

Method: a child process writes a random float32 Llama checkpoint of about --gb GB
(labor_jax.interop.hf.save). A second, fresh child imports jax and labor_jax, records its
resident set size (RSS), calls hf.load, blocks until every array is ready, and reads
its peak RSS (getrusage ru_maxrss: the high-water mark of the whole process, every
transient copy included). We report peak RSS minus the pre-load RSS, divided by
the size of the safetensors files on disk.

  python scripts/measure_import_memory.py --gb 1.0
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

WRITE = r"""
import sys, jax
from labor_jax import model
from labor_jax.interop import hf
from labor_jax.config import LlamaConfig
layers = int(sys.argv[2])
cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=16)
hf.save(cfg, model.init_params(cfg, jax.random.key(0)), sys.argv[1], max_shard_size="400MB")
print(cfg.num_params())
"""

READ = r"""
import json, resource, sys, psutil, jax
from labor_jax.interop import hf
rss0 = psutil.Process().memory_info().rss
cfg, params = hf.load(sys.argv[1])
jax.block_until_ready(params)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_before": rss0, "peak": peak, "rss_after": psutil.Process().memory_info().rss}))
"""


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gb", type=float, default=1.0, help="approximate checkpoint size in GB (float32)")
  args = ap.parse_args()
  # 1024-wide layers hold 4*1024^2 + 3*1024*2816 params; embeddings 2*32000*1024.
  per_layer = 4 * 1024 ** 2 + 3 * 1024 * 2816
  layers = max(1, round((args.gb * 1e9 / 4 - 2 * 32000 * 1024) / per_layer))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with tempfile.TemporaryDirectory() as d:
    ck = os.path.join(d, "ckpt")
    n = subprocess.run([sys.executable, "-c", WRITE, ck, str(layers)], env=env, check=True,
                       capture_output=True, text=True).stdout.split()[-1]
    size = sum(os.path.getsize(os.path.join(ck, f)) for f in os.listdir(ck) if f.endswith(".safetensors"))
    out = subprocess.run([sys.executable, "-c", READ, ck], env=env, check=True, capture_output=True, text=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
  inc = m["peak"] - m["rss_before"]
  print(f"checkpoint: {int(n) / 1e6:.0f}M params, {size / 1e9:.3f} GB float32 safetensors ({layers} layers)")
  print(f"RSS before load: {m['rss_before'] / 1e9:.3f} GB; peak during load: {m['peak'] / 1e9:.3f} GB; "
        f"after: {m['rss_after'] / 1e9:.3f} GB")
  print(f"peak increase / checkpoint size = {inc / size:.3f}  (goal < 1.5)")


if __name__ == "__main__":
  main()
