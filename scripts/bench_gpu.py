"""Accelerator benchmark: one markdown table naming the device, the jax version and the date.

(a) train step of a ~1B-parameter Llama (16 layers, d=2048, 16 heads, F=5632, V=32,000; 1.2B
    parameters), bf16, 2,048 tokens per row, for each attention implementation this backend can
    run (model.attention_impl): tokens/s and MFU;
(b) a Llama-2-7B-shaped LoRA step (rank 16 on attention and MLP, as configs/llama2_7b_lora.yaml)
    with random bf16 weights on one device, scanned and rematerialised blocks, 2,048 tokens per row:
    whether it fits (the largest batch of --lora-batches that does), tokens/s and MFU;
(c) the fused scorer (labor_jax.scorer.score) on a 7B-shaped model with 335 synthetic titles, in
    workers/s, against cached-prefix scoring in PyTorch transformers: each resume's keys/values
    computed once, then for every step all titles run against that cache, cropped to the step's
    history and repeated over a batch of titles (--torch-title-batch at a time).

MFU = tokens/s x labor_jax.flops.train_flops_per_token / peak bf16 FLOP/s of the chip
(labor_jax.flops.PEAK_BF16_FLOPS, or --peak-flops); LoRA counts 4 FLOPs per frozen weight.
A row that runs out of memory says so and the next row runs.

  python scripts/bench_gpu.py --size full     # one H100 / H200 (or one TPU chip)
  python scripts/bench_gpu.py --size tiny     # tiny shapes, on the CPU in seconds (tests/test_bench_gpu.py)

At --size full the PyTorch model and the JAX model have independent random weights (timing
only); at --size tiny they share weights and the table reports the largest log-prob difference.
"""

import argparse
import datetime
import gc
import inspect
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU in part (c)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _reference import random_llama_pair, time_best  # noqa: E402

TITLES = 335
COLUMNS = ("part", "model", "attention", "batch x seq", "fits", "tokens/s", "workers/s", "MFU", "notes")

SIZES = {
    # dense: (layers, hidden, intermediate, heads, kv_heads, vocab); seq: tokens per row
    # float32 at tiny size: XLA:CPU compiles and runs bfloat16 steps several times slower
    "tiny": dict(dense=(2, 64, 172, 4, 4, 256), dense_batch=2, seq=128, lora=(2, 64, 172, 4, 4, 256),
                 lora_batches=(2, 1), workers=4, steps=3, chunk=2, corpus=300, timed=2, dtype="float32"),
    "full": dict(dense=(16, 2048, 5632, 16, 16, 32000), dense_batch=4, seq=2048, lora="llama2_7b",
                 lora_batches=(4, 2, 1), workers=16, steps=8, chunk=4, corpus=2000, timed=5, dtype="bfloat16"),
}
LORA = dict(lora_rank=16, lora_alpha=32.0, lora_targets=r"(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)")


ROWS: list[dict] = []  # every row so far, in order
JSON_PATH: str | None = None  # --json: rewritten after every row, so a part cut off by a time limit keeps its rows


def record(row: dict) -> dict:
  """Keeps ``row``, rewrites --json and prints the row at once (a time limit then loses only the row running)."""
  import json
  ROWS.append(row)
  if JSON_PATH:
    with open(JSON_PATH, "w") as f:
      json.dump(ROWS, f, indent=1, default=str)
  print(f"row: {row['part']} | {row['model']} | {row['shape']} | {row.get('fits', '-')} | {row.get('notes', '')}",
        file=sys.stderr, flush=True)
  return row


def is_oom(err: BaseException) -> bool:
  text = f"{type(err).__name__} {err}".lower()
  return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemoryerror"))


def failed(err: BaseException) -> dict:
  """The cells of a row whose run raised: OOM, or the error's first line (the other rows still run)."""
  first = (str(err).strip().splitlines() or [""])[0][:100]
  return dict(fits="no (OOM)" if is_oom(err) else "error", notes=f"{type(err).__name__}: {first}")


def params_str(config) -> str:
  n = config.num_params()
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def effective(config, seq: int) -> str:
  """The attention implementation a config runs at ``seq`` on this device: ``auto (cudnn)``."""
  import jax

  from labor_jax import attention
  impl, _ = attention.resolve(config.attention_impl, backend=jax.default_backend(),
                              device_kind=jax.devices()[0].device_kind, dtype=config.dtype, head_dim=config.head_dim,
                              q_len=seq, kv_len=seq, causal=True, kv_heads=config.num_key_value_heads)
  return impl if impl == config.attention_impl else f"{config.attention_impl} ({impl})"


def fmt(x, spec=",.0f"):
  return "n/a" if x is None else format(x, spec)


# ------------------------------------------------------------------ (a), (b): train steps
def device_peak_bytes() -> int | None:
  """The most memory the first device has held in this process (None where the backend keeps no count)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def time_train_step(config, batch: int, seq: int, timed: int, trainable=None) -> dict:
  """labor_jax.training.core's step on one device, compiled ahead of time: tokens/s (median of ``timed``
  steps), the last loss, seconds per step, the compile seconds, this backend's compiled plan (bytes:
  arguments + temporaries + outputs not aliased) and the device's peak memory in this process after it ran."""
  import jax
  import numpy as np

  from labor_jax import labels, model, planning, sharding
  from labor_jax.training import core as train_core

  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  label_tree = labels.label_tree(model.param_shapes(config), trainable)
  opt = train_core.make_optimizer(label_tree, lr=1e-4)
  sh = train_core.state_shardings(config, opt, mesh)
  batch_sh = train_core.batch_sharding(mesh)
  state = train_core.create_state(config, opt, sh, jax.random.key(0))
  step = train_core.make_train_step(config, opt, sh, batch_sh, labels=label_tree)
  tok = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
  rows = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((batch, seq), np.int32),
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}
  rows = jax.device_put(rows, batch_sh)
  try:
    t0 = time.perf_counter()
    compiled = step.lower(state, rows).compile()
    compile_s = time.perf_counter() - t0
    plan = None if compiled.memory_analysis() is None else planning.compiled_plan("step", compiled).peak
    state, m = compiled(state, rows)  # warm up
    loss = float(m["loss"])
    times = []
    for _ in range(timed):
      t0 = time.perf_counter()
      state, m = compiled(state, rows)
      loss = float(m["loss"])
      times.append(time.perf_counter() - t0)
  finally:
    del state
    gc.collect()
  sec = statistics.median(times)
  return dict(tps=batch * seq / sec, loss=loss, sec=sec, compile_s=compile_s, plan=plan, peak=device_peak_bytes())


def gib(x) -> str:
  from labor_jax import planning
  return "n/a" if x is None else planning.gib(x)


def memory_note(r: dict) -> str:
  return f"plan {gib(r['plan'])}, device peak {gib(r['peak'])}"


def dense_rows(size, peak, device_kind):
  import jax

  from labor_jax import attention, flops
  from labor_jax.config import LlamaConfig

  s = SIZES[size]
  layers, d, f, h, k, v = s["dense"]
  seq, batch = s["seq"], s["dense_batch"]
  config = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                       num_attention_heads=h, num_key_value_heads=k, max_position_embeddings=seq,
                       param_dtype=s["dtype"], dtype=s["dtype"], scan_layers=True)
  # Scanned layers: XLA:GPU compiled the 16 unrolled blocks' step for over 170 s on an H200 (2026-12-04).
  name = f"Llama {params_str(config)} ({layers}x{d}), {s['dtype']}, scanned layers"
  impls = {"gpu": ("cudnn", "xla", "blocked"), "tpu": ("splash", "xla", "blocked")}.get(jax.default_backend(),
                                                                                        ("xla", "blocked"))
  fpt = flops.train_flops_per_token(config, seq)
  out = []
  for impl in impls:
    runs, why = attention.resolve(impl, backend=jax.default_backend(), device_kind=device_kind, dtype=s["dtype"],
                                  head_dim=config.head_dim, q_len=seq, kv_len=seq, causal=True, kv_heads=k)
    row = dict(part="(a) train step", model=name, attention=impl, shape=f"{batch} x {seq}")
    if runs != impl:
      out.append(record({**row, "fits": "-", "notes": f"not run: {why}"}))
      continue
    try:
      r = time_train_step(config.replace(attention_impl=impl), batch, seq, s["timed"])
    except Exception as e:  # noqa: BLE001 - a row reports its own failure
      out.append(record({**row, **failed(e)}))
      continue
    out.append(record({**row, "fits": "yes", "tokens": r["tps"], "mfu": flops.mfu(r["tps"], fpt, peak),
                "notes": f"{r['tps'] * fpt / 1e12:.3g} model TFLOP/s; loss {r['loss']:.3f}; compile {r['compile_s']:.0f} s"}))
  return out


def lora_rows(size, peak):
  from labor_jax import flops, labels
  from labor_jax.config import LlamaConfig, preset

  s = SIZES[size]
  seq = s["seq"]
  policy = dict(param_dtype=s["dtype"], dtype=s["dtype"], remat=True, scan_layers=True, max_position_embeddings=seq,
                **LORA)
  if isinstance(s["lora"], str):
    config = preset(s["lora"], **policy)
  else:
    layers, d, f, h, k, v = s["lora"]
    config = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                         num_attention_heads=h, num_key_value_heads=k, **policy)
  name = f"Llama-2-7B-shaped ({config.num_hidden_layers}x{config.hidden_size}), LoRA r={config.lora_rank}"
  if size == "tiny":
    name = f"7B-shaped stand-in ({config.num_hidden_layers}x{config.hidden_size}), LoRA r={config.lora_rank}"
  fpt = flops.train_flops_per_token(config, seq, frozen_base=True)
  ooms = []
  row = dict(part="(b) LoRA step", model=name, attention=effective(config, seq))
  for batch in s["lora_batches"]:
    try:
      r = time_train_step(config, batch, seq, s["timed"], trainable=labels.ADAPTERS)
    except Exception as e:  # noqa: BLE001
      if not is_oom(e):
        return [record({**row, "shape": f"{batch} x {seq}", **failed(e)})]
      ooms.append(batch)
      continue
    note = f"{s['dtype']} weights, scan + remat; loss {r['loss']:.3f}; {memory_note(r)}"
    if ooms:
      note += f"; OOM at batch {', '.join(map(str, ooms))}"
    recipe = planner_recipe("configs/llama2_7b_lora.yaml", config, s["lora"] if isinstance(s["lora"], str) else None,
                            batch, seq)
    return [record({**row, "shape": f"{batch} x {seq}", "fits": "yes", "tokens": r["tps"],
             "mfu": flops.mfu(r["tps"], fpt, peak), "notes": note, "plan": r["plan"], "peak": r["peak"],
             "recipe": recipe})]
  return [record({**row, "shape": f"{s['lora_batches'][-1]} x {seq}", "fits": "no (OOM)",
           "notes": f"OOM at batch {', '.join(map(str, ooms))}"})]


def planner_recipe(config_path: str, config, preset_name: str | None, batch: int, seq: int) -> dict:
  """The ``python -m labor_jax.plan`` arguments that compile the same step as :func:`time_train_step` (one
  device; LoRA dropout off, as here): scripts/gpu_memory.py sets the CPU plan beside this backend's."""
  sets = [f"batch_size={batch}", f"data.seq_len={seq}", "model.hf_path=null", f"model.param_dtype={config.param_dtype}",
          f"model.dtype={config.dtype}", f"model.remat={str(config.remat).lower()}",
          f"model.scan_layers={str(config.scan_layers).lower()}", f"lora.enabled={str(config.lora_rank > 0).lower()}"]
  if config.lora_rank:
    sets += [f"lora.rank={config.lora_rank}", f"lora.alpha={config.lora_alpha}", "lora.dropout=0.0",
             f"lora.targets={config.lora_targets}"]
  if preset_name is None:
    sets += [f"model.{k}={getattr(config, k)}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads", "rope_theta")]
    sets += [f"model.max_position_embeddings={config.max_position_embeddings}", f"data.vocab_size={config.vocab_size}"]
  return dict(config=config_path, preset=preset_name, sets=sets)


# ------------------------------------------------------------------ (d): the main job's model
# NLSY test split as the main job scores it (issue #28, SmolLM2's byte-level BPE): 113 workers, 791 transitions
# (7 a worker), resumes of at most 233 tokens; the NLSY panel's 9 occupation titles, 2-5 tokens each.
NLSY_TEST = dict(workers=113, steps=7, tokens=256, titles=9, batch_workers=16)
NLSY_TRAIN_STEPS_3_EPOCHS = 141  # 375 training resumes x 3 epochs / batch 8, rounded up


def smollm2_rows(size, peak):
  """SmolLM2-135M-shaped (random weights): the LoRA and the full fine-tuning step of the main job's recipe
  (batch 8 x 256 tokens; float32 master weights, bf16 compute on an accelerator), then one scoring pass of the
  NLSY test split's shape."""
  import jax
  import numpy as np

  from labor_jax import flops, labels, model, scorer
  from labor_jax.config import LlamaConfig, preset

  s = SIZES[size]
  seq, batch = (256, 8) if size == "full" else (64, 2)
  policy = dict(param_dtype="float32", dtype=s["dtype"], max_position_embeddings=max(seq, 512), scan_layers=True)
  if size == "full":
    base, preset_name, name = preset("smollm2_135m", **policy), "smollm2_135m", "SmolLM2-135M-shaped (30x576)"
  else:
    layers, d, f, h, k, v = s["lora"]
    base = LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                       num_attention_heads=h, num_key_value_heads=k, **policy)
    preset_name, name = None, f"SmolLM2 stand-in ({layers}x{d})"
  out = []
  for kind, config, trainable in (
      ("LoRA r=16", base.replace(lora_rank=16, lora_alpha=32.0, lora_targets=LORA["lora_targets"]), labels.ADAPTERS),
      ("full", base, None)):
    row = dict(part="(d) main job's model", model=f"{name}, {kind}, float32 weights, {s['dtype']} compute",
               attention=effective(config, seq), shape=f"{batch} x {seq}")
    fpt = flops.train_flops_per_token(config, seq, frozen_base=trainable is not None)
    try:
      r = time_train_step(config, batch, seq, s["timed"], trainable=trainable)
    except Exception as e:  # noqa: BLE001
      out.append(record({**row, **failed(e)}))
      continue
    epochs3 = NLSY_TRAIN_STEPS_3_EPOCHS * r["sec"]
    out.append(record({**row, "fits": "yes", "tokens": r["tps"], "mfu": flops.mfu(r["tps"], fpt, peak),
                "notes": f"{r['sec'] * 1e3:.1f} ms/step; 3 NLSY epochs ({NLSY_TRAIN_STEPS_3_EPOCHS} steps) "
                         f"{epochs3:.1f} s + compile {r['compile_s']:.0f} s; {memory_note(r)} (process so far)",
                "plan": r["plan"], "peak": r["peak"],
                "recipe": planner_recipe("configs/foundation/smollm2_lora.yaml", config, preset_name, batch, seq)}))

  # One scoring pass over the NLSY test split's shape, batch_workers resumes per call as labor_jax.evaluate.
  t = NLSY_TEST if size == "full" else dict(workers=5, steps=3, tokens=48, titles=9, batch_workers=4)
  rng = np.random.default_rng(0)
  cands = [tuple(int(x) for x in rng.integers(3, base.vocab_size, rng.integers(2, 6))) for _ in range(t["titles"])]
  tree = scorer.CandidateTree.build(cands)
  bw, n = t["batch_workers"], t["tokens"]
  row = dict(part="(d) main job's model", model=f"{name}, scoring, {s['dtype']} weights",
             attention=effective(base, n), shape=f"{t['workers']} workers x {t['steps']} steps x {t['titles']} titles")
  try:
    config = base.replace(param_dtype=s["dtype"])
    params = jax.jit(lambda: model.init_params(config, jax.random.key(0)))()
    step = jax.jit(lambda p, tok, m, e: scorer.score(config, p, tree, tok, m, e))
    tokens = rng.integers(3, base.vocab_size, (bw, n)).astype(np.int32)
    mask = np.ones_like(tokens)
    ends = np.tile(np.linspace(n // 4, n - 8, t["steps"]).astype(np.int32), (bw, 1))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, tokens, mask, ends))
    compile_s = time.perf_counter() - t0
    calls = -(-t["workers"] // bw)
    t0 = time.perf_counter()
    for _ in range(calls):
      lp = step(params, tokens, mask, ends)
    jax.block_until_ready(lp)
    sec = time.perf_counter() - t0
    out.append(record({**row, "fits": "yes", "wps": t["workers"] / sec,
                "notes": f"whole split {sec:.2f} s ({calls} calls of {bw} workers); compile {compile_s:.1f} s; "
                         f"device peak {gib(device_peak_bytes())} (process)"}))
  except Exception as e:  # noqa: BLE001
    out.append(record({**row, **failed(e)}))
  return out


# ------------------------------------------------------------------ (c): scorer
def scorer_data(size, tmp):
  import numpy as np

  from data_pipeline import resume, simulator
  from data_pipeline.titles import synthetic_titles
  from data_pipeline.tokenizer import ResumeTokenizer, train_sentencepiece

  s = SIZES[size]
  titles = synthetic_titles(TITLES, seed=0)
  corpus = resume.render_panel(simulator.simulate(s["corpus"], s["steps"] + 1, titles, seed=1, gap_rate=0.0), titles)
  work = resume.render_panel(simulator.simulate(s["workers"], s["steps"] + 1, titles, seed=2, gap_rate=0.0), titles)
  tok = ResumeTokenizer.from_sentencepiece(train_sentencepiece([r.text for r in corpus], f"{tmp}/tok", 1024))
  cands = tok.candidate_tokens(resume.candidate_texts(titles))
  enc = [tok.encode_resume(r) for r in work]
  n_max = max(len(e.ids) for e in enc)
  tokens = np.zeros((s["workers"], n_max), np.int32)
  mask = np.zeros_like(tokens)
  ends = np.zeros((s["workers"], s["steps"]), np.int32)
  for i, e in enumerate(enc):
    tokens[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
    ends[i] = e.title_spans[1:s["steps"] + 1, 0]  # predict entries 1..S from their histories
  return tok.vocab_size, cands, tokens, mask, ends


def torch_cached_prefix_score(ref, cands, tokens, mask, ends, title_batch: int):
  """log P(title j | history) [W, S, J] in PyTorch transformers with a cached prefix per resume."""
  import numpy as np
  import torch
  import transformers

  dev = next(ref.parameters()).device
  # transformers >= 5.2x calls the cache `cache`; earlier releases `past_key_values`.
  cache_kw = "cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values"
  width = max(len(c) for c in cands) - 1
  inp = torch.zeros((len(cands), max(width, 1)), dtype=torch.long)
  tmask = torch.zeros_like(inp)
  nxt = torch.zeros_like(inp)
  for j, c in enumerate(cands):
    inp[j, :len(c) - 1] = torch.tensor(c[:-1])
    nxt[j, :len(c) - 1] = torch.tensor(c[1:])
    tmask[j, :len(c) - 1] = 1
  inp, tmask, nxt = inp.to(dev), tmask.to(dev), nxt.to(dev)
  first = torch.tensor([c[0] for c in cands], device=dev)
  out = np.zeros((*ends.shape, len(cands)), np.float64)
  with torch.inference_mode():
    for b in range(tokens.shape[0]):
      n = int(mask[b].sum())
      enc = ref(input_ids=torch.as_tensor(tokens[b:b + 1, :n], device=dev).long(), use_cache=True)
      kv = [(layer.keys, layer.values) for layer in getattr(enc, cache_kw).layers]
      logp_first = torch.log_softmax(enc.logits[0].float(), -1)
      for t in range(ends.shape[1]):
        e = int(ends[b, t])
        total = logp_first[e - 1, first].clone()
        for j0 in range(0, len(cands), title_batch):
          j1 = min(j0 + title_batch, len(cands))
          cache = transformers.DynamicCache(
              [(k[:, :, :e].expand(j1 - j0, -1, -1, -1), v[:, :, :e].expand(j1 - j0, -1, -1, -1)) for k, v in kv])
          am = torch.cat([torch.ones((j1 - j0, e), dtype=torch.long, device=dev), tmask[j0:j1]], 1)
          pos = (e + torch.arange(inp.shape[1], device=dev))[None].expand(j1 - j0, -1)
          logits = ref(input_ids=inp[j0:j1], attention_mask=am, position_ids=pos, **{cache_kw: cache}).logits
          lp = torch.log_softmax(logits.float(), -1).gather(-1, nxt[j0:j1, :, None])[..., 0]
          total[j0:j1] += (lp * tmask[j0:j1]).sum(-1)
        out[b, t] = total.double().cpu().numpy()
  return out


def scorer_rows(size, tmp, args):
  import jax
  import numpy as np
  import torch
  import transformers

  from labor_jax import model, scorer
  from labor_jax.config import preset

  s = SIZES[size]
  vocab, cands, tokens, mask, ends = scorer_data(size, tmp)
  w = s["workers"]
  on_gpu = torch.cuda.is_available()
  dev = "cuda" if on_gpu else "cpu"
  if size == "tiny":  # shared weights, fp32 (the CPU): the two must agree
    layers, d, f, h, k, _ = s["lora"]
    ref, config, params = random_llama_pair(layers, d, f, h, k, vocab, 1024)
    ref = ref.to(dev).eval()
    name = f"7B-shaped stand-in ({layers}x{d}), fp32"
  else:  # independent random weights, bf16 (timing only)
    config = preset("llama2_7b", param_dtype="bfloat16", dtype="bfloat16", scan_layers=True)
    hf_cfg = transformers.LlamaConfig(**{k_: v_ for k_, v_ in config.to_hf_dict().items()
                                         if k_ not in ("architectures", "torch_dtype", "model_type")})
    torch.manual_seed(0)
    with torch.device(dev):  # random float32 init on the device (27 GB at 7B), then bfloat16
      ref = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    params = None
    name = "Llama-2-7B-shaped (32x4096), bf16"
  tree = scorer.CandidateTree.build(cands)
  shape = f"{w} workers x {s['steps']} steps x {TITLES} titles"

  # PyTorch first, then its memory goes back to the driver before JAX allocates.
  torch_lp = None
  try:
    torch_cached_prefix_score(ref, cands, tokens[:1], mask[:1], ends[:1, :1], args.torch_title_batch)  # warm-up
    if on_gpu:
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch_lp = torch_cached_prefix_score(ref, cands, tokens, mask, ends, args.torch_title_batch)
    if on_gpu:
      torch.cuda.synchronize()
    t_torch = time.perf_counter() - t0
    torch_row = dict(fits="yes", wps=w / t_torch, notes=f"{t_torch:.2f} s; {args.torch_title_batch} titles per call")
  except Exception as e:  # noqa: BLE001
    torch_row = failed(e)
  del ref
  gc.collect()
  if on_gpu:
    torch.cuda.empty_cache()

  try:
    if params is None:
      params = jax.jit(lambda: model.init_params(config, jax.random.key(0)))()
    fused_fn = jax.jit(lambda p: scorer.score(config, p, tree, tokens, mask, ends, chunk=s["chunk"]))
    fused, compile_s, t_fused = time_best(lambda: np.asarray(fused_fn(params)))
    note = f"{t_fused:.2f} s (best of 3; first call {compile_s:.1f} s); {len(tree.nodes_L)} tree nodes, chunk {s['chunk']}"
    if size == "tiny" and torch_lp is not None:
      note += (f"; max abs log-prob diff vs PyTorch {np.abs(fused - torch_lp).max():.1e} "
               f"(log-probs to {-np.abs(torch_lp).max():.1f})")
    if torch_row["fits"] == "yes":
      note += f"; {(w / t_fused) / torch_row['wps']:.1f}x PyTorch"
    fused_row = dict(fits="yes", wps=w / t_fused, notes=note)
  except Exception as e:  # noqa: BLE001
    fused_row = failed(e)
  finally:
    params = None
    gc.collect()
  base = dict(part="(c) scorer", shape=shape)
  resume_len = int(mask.sum(1).max())
  return [record({**base, "model": f"labor_jax fused, {name}", "attention": effective(config, resume_len), **fused_row}),
          record({**base, "model": f"PyTorch transformers {transformers.__version__} cached prefix, {name}",
                  "attention": "sdpa", **torch_row})]


# ------------------------------------------------------------------ table
def table(rows) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " if i < 3 or i == 8 else " ---: "
                                                               for i in range(len(COLUMNS))) + "|"]
  for r in rows:
    cells = [r["part"], r["model"], r["attention"], r["shape"], r.get("fits", "-"), fmt(r.get("tokens")),
             fmt(r.get("wps"), ",.2f"), fmt(r.get("mfu"), ".1%"), r.get("notes", "")]
    lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=sorted(SIZES), default="full")
  ap.add_argument("--peak-flops", type=float, default=None,
                  help="peak bf16 FLOP/s of one chip, for MFU (default: labor_jax.flops.PEAK_BF16_FLOPS)")
  ap.add_argument("--torch-title-batch", type=int, default=64, help="titles per PyTorch call in part (c)")
  ap.add_argument("--parts", default="abcd", help="which parts to run (subset of abcd)")
  ap.add_argument("--json", help="also write the rows (with the planner recipes of (b) and (d)) to this JSON file")
  ap.add_argument("--no-header", action="store_true", help="print the table without its title line")
  args = ap.parse_args(argv)

  global JSON_PATH
  JSON_PATH = args.json
  import jax

  from labor_jax import flops

  device_kind = jax.devices()[0].device_kind
  peak = flops.peak_flops(device_kind, args.peak_flops)
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if "c" in args.parts:  # first: PyTorch must release the GPU before JAX fills it
      scored = scorer_rows(args.size, tmp, args)
    if "a" in args.parts:
      rows += dense_rows(args.size, peak, device_kind)
    if "b" in args.parts:
      rows += lora_rows(args.size, peak)
    if "c" in args.parts:
      rows += scored
    if "d" in args.parts:
      rows += smollm2_rows(args.size, peak)
  if args.no_header:
    print(table(rows))
    return
  import importlib.metadata
  torch_version = importlib.metadata.version("torch")  # without importing it (parts a, b, d never do)
  print(f"bench_gpu --size {args.size}: device {device_kind} (backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s), peak bf16 {fmt(peak and peak / 1e12, '.0f')} TFLOP/s per chip), "
        f"jax {jax.__version__}, torch {torch_version}, {date}")
  print()
  print(table(rows))


if __name__ == "__main__":
  main()
