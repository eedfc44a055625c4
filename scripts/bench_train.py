"""Training throughput: labor_jax versus PyTorch LlamaForCausalLM + torch.optim.AdamW, same CPU.

Both train the same architecture from the same initial weights (PyTorch's random init,
loaded into labor_jax through the HF importer) on the same token batches, fp32, with
AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.01) and global-norm clipping at 1.0.
Reports tokens/s (best of --steps timed steps after warm-up) and the ratio, the loss
of both after the same steps, and for the 20M config the optimizer-state bytes of
full fine-tuning versus LoRA (rank 8 on attention projections).

  python scripts/bench_train.py --size demo
  python scripts/bench_train.py --size 20m
  python scripts/bench_train.py --size demo --max-isa avx2   # as an AVX2-only CPU would run it
"""

import argparse
import os
import time

from _reference import add_isa_flag, add_malloc_flag, apply_isa_flag, apply_malloc_flag, cpu_line, random_llama_pair

SIZES = {
    # name: (layers, hidden, intermediate, heads, kv_heads, vocab, batch, seq)
    "demo": (2, 128, 344, 4, 2, 1024, 8, 224),
    "20m": (4, 256, 688, 4, 4, 32000, 8, 256),
}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=sorted(SIZES), default="demo")
  ap.add_argument("--steps", type=int, default=6, help="timed steps per framework")
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  add_malloc_flag(ap)
  add_isa_flag(ap)
  args = ap.parse_args()
  apply_isa_flag(args)
  tuned = apply_malloc_flag(args)  # before JAX and PyTorch start their thread pools

  import jax
  import numpy as np
  import torch

  from labor_jax import labels, lora, sharding
  from labor_jax.training import core as train_core

  torch.set_num_threads(args.threads)
  layers, d, f, h, k, v, b, t = SIZES[args.size]
  ref, config, params = random_llama_pair(layers, d, f, h, k, v, t)
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(args.steps + 1):
    tok = rng.randint(0, v, size=(b, t + 1)).astype(np.int32)
    batches.append({"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((b, t), np.int32),
                    "segment_ids": np.ones((b, t), np.int32),
                    "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))})

  # labor_jax
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  label_tree = labels.label_tree(params, None)
  opt = train_core.make_optimizer(label_tree, lr=1e-3, weight_decay=0.01, clip_norm=1.0)
  sh = train_core.state_shardings(config, opt, mesh)
  state = train_core.create_state(config, opt, sh, jax.random.key(0), params=params)
  step = train_core.make_train_step(config, opt, sh, train_core.batch_sharding(mesh), labels=label_tree)
  state, m = step(state, batches[0])
  m["loss"].block_until_ready()
  jax_times, jax_losses = [], []
  for bt in batches[1:]:
    t0 = time.perf_counter()
    state, m = step(state, bt)
    jax_losses.append(float(m["loss"]))
    jax_times.append(time.perf_counter() - t0)

  # PyTorch
  model = ref.train()
  topt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)

  def torch_step(bt):
    topt.zero_grad(set_to_none=True)
    logits = model(input_ids=torch.from_numpy(bt["inputs"]).long()).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, v), torch.from_numpy(bt["targets"]).long().reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    topt.step()
    return float(loss)
  torch_step(batches[0])
  torch_times, torch_losses = [], []
  for bt in batches[1:]:
    t0 = time.perf_counter()
    torch_losses.append(torch_step(bt))
    torch_times.append(time.perf_counter() - t0)

  n = b * t
  tj, tt = min(jax_times), min(torch_times)
  print(f"size={args.size} params={config.num_params() / 1e6:.1f}M batch={b} seq={t} fp32 AdamW "
        f"threads={args.threads} jax={jax.__version__} torch={torch.__version__} "
        f"malloc_tuning={'on' if tuned else 'off'} max_isa={args.max_isa} torch_isa="
        f"{torch.backends.cpu.get_cpu_capability()}")
  print(f"cpu: {cpu_line()}")
  print(f"loss after {args.steps + 1} steps: labor_jax {jax_losses[-1]:.4f}, PyTorch {torch_losses[-1]:.4f}")
  print(f"labor_jax   {n / tj:10.0f} tokens/s ({tj * 1e3:.0f} ms/step, best of {args.steps})")
  print(f"PyTorch     {n / tt:10.0f} tokens/s ({tt * 1e3:.0f} ms/step, best of {args.steps})")
  print(f"ratio labor_jax / PyTorch = {tt / tj:.2f}x")
  full_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  lcfg, lparams = lora.add_adapters(config, jax.tree.map(np.asarray, state.params), jax.random.key(1), rank=8)
  llabels = labels.label_tree(lparams, labels.ADAPTERS)
  lopt = train_core.make_optimizer(llabels, lr=1e-3)
  lora_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(lopt.init, lparams)))
  print(f"optimizer state: full fine-tuning {full_bytes / 2 ** 20:.1f} MiB, LoRA r=8 on attention "
        f"{lora_bytes / 2 ** 20:.2f} MiB ({full_bytes / lora_bytes:.0f}x less; trainable "
        f"{100 * labels.trainable_fraction(lparams, llabels):.2f}%)")


if __name__ == "__main__":
  main()
