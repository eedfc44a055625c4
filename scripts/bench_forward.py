"""Forward throughput: labor_jax versus PyTorch transformers on the same random checkpoint.

One run builds a random LlamaForCausalLM, saves it, loads the same weights into
labor_jax (hf.load) and into PyTorch (from_pretrained), checks that the logits
agree, then times the forward pass of each on the same token batch (fp32, CPU,
both restricted to the same thread count) and reports tokens/s and the ratio.

  python scripts/bench_forward.py --size tiny
  python scripts/bench_forward.py --size 20m
"""

import argparse
import os
import time

from _reference import add_malloc_flag, apply_malloc_flag, cpu_line, random_llama_pair

SIZES = {
    # name: (layers, hidden, intermediate, heads, kv_heads, vocab, batch, seq)
    "tiny": (2, 64, 128, 4, 2, 256, 8, 128),
    "20m": (4, 256, 688, 4, 4, 32000, 8, 256),
}


def _time(fn, repeats):
  fn()  # warm-up (compile for JAX)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
  ap.add_argument("--repeats", type=int, default=50, help="timed batches per framework (the best one counts)")
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  add_malloc_flag(ap)
  args = ap.parse_args()
  tuned = apply_malloc_flag(args)  # before either framework starts threads
  import jax
  import numpy as np
  import torch

  from labor_jax import model

  torch.set_num_threads(args.threads)
  layers, d, f, h, k, v, b, t = SIZES[args.size]
  ref, config, params = random_llama_pair(layers, d, f, h, k, v, t)
  ref = ref.eval()
  tokens = np.random.RandomState(0).randint(0, v, size=(b, t))

  fwd = jax.jit(lambda p, x: model.forward(config, p, x))
  tok_j = jax.numpy.asarray(tokens, dtype=jax.numpy.int32)
  tok_t = torch.tensor(tokens)

  def run_jax():
    return fwd(params, tok_j).block_until_ready()

  def run_torch():
    with torch.inference_mode():
      return ref(input_ids=tok_t).logits

  diff = float(np.abs(np.asarray(run_jax()) - run_torch().numpy()).max())
  tj = _time(run_jax, args.repeats)
  tt = _time(run_torch, args.repeats)
  n = b * t
  print(f"size={args.size} params={config.num_params() / 1e6:.1f}M batch={b} seq={t} fp32 "
        f"threads={args.threads} jax={jax.__version__} torch={torch.__version__} device={jax.devices()[0].device_kind} "
        f"malloc_tuning={'on' if tuned else 'off'}")
  print(f"cpu: {cpu_line()}")
  print(f"max |logit diff| = {diff:.2e}")
  print(f"labor_jax   {n / tj:12.0f} tokens/s  ({tj * 1e3:.1f} ms/batch, best of {args.repeats})")
  print(f"transformers{n / tt:12.0f} tokens/s  ({tt * 1e3:.1f} ms/batch, best of {args.repeats})")
  print(f"ratio labor_jax / transformers = {tt / tj:.2f}x")


if __name__ == "__main__":
  main()
