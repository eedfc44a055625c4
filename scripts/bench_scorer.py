"""Fused occupation scorer versus naive scoring, same weights, one run.

Builds simulated careers over ~330 made-up occupation titles (data_pipeline.simulator;
synthetic data, used only for timing), trains a SentencePiece tokenizer on them, and a
randomly initialised tiny Llama (the demo size). Then scores W workers x S time steps x
every title three ways and reports speed ratios, the largest log-prob difference, and the
token-count bound (tokens the naive method runs / tokens the fused pass runs):

* fused: ``labor_jax.scorer.score`` (one cached pass per resume + the title tree);
* naive JAX: every prompt + title run separately through ``labor_jax.model.forward``;
* naive PyTorch: the same through ``transformers`` on the exported weights, one batch of
  all titles per prompt (how lm-eval-harness scores multiple choice).

  python scripts/bench_scorer.py --workers 32 --steps 8 --titles 330

Shape suffix: L tree nodes.
"""

import argparse
import os
import tempfile
import time

from _reference import add_malloc_flag, apply_malloc_flag, cpu_line, time_best


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workers", type=int, default=32)
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--titles", type=int, default=330)
  ap.add_argument("--chunk", type=int, default=4, help="workers per tree pass in the fused scorer")
  ap.add_argument("--fused-only", action="store_true", help="time the fused scorer only (quick A/B runs)")
  add_malloc_flag(ap)
  args = ap.parse_args()
  apply_malloc_flag(args)  # before either framework starts threads
  import jax
  import numpy as np
  import torch
  import transformers

  from data_pipeline import resume, simulator
  from data_pipeline.titles import synthetic_titles
  from data_pipeline.tokenizer import ResumeTokenizer, train_sentencepiece
  from labor_jax import model, scorer
  from labor_jax.interop import hf
  from labor_jax.config import LlamaConfig

  torch.set_num_threads(os.cpu_count())
  titles = synthetic_titles(args.titles, seed=0)
  corpus = resume.render_panel(simulator.simulate(2000, args.steps + 1, titles, seed=1, gap_rate=0.0), titles)
  work = resume.render_panel(simulator.simulate(args.workers, args.steps + 1, titles, seed=2, gap_rate=0.0), titles)
  with tempfile.TemporaryDirectory() as d:
    tok = ResumeTokenizer.from_sentencepiece(train_sentencepiece([r.text for r in corpus], f"{d}/tok", 1024))
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    params = model.init_params(config, jax.random.key(0))
    hf.save(config, params, f"{d}/hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(f"{d}/hf").eval()

  cands = tok.candidate_tokens(resume.candidate_texts(titles))
  tree = scorer.CandidateTree.build(cands)
  enc = [tok.encode_resume(r) for r in work]
  n_max = max(len(e.ids) for e in enc)
  tokens = np.zeros((args.workers, n_max), np.int32)
  mask = np.zeros_like(tokens)
  ends = np.zeros((args.workers, args.steps), np.int32)
  for i, e in enumerate(enc):
    tokens[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
    ends[i] = e.title_spans[1:args.steps + 1, 0]  # predict entries 1..S from their histories
  prompts = [enc[b].ids[:ends[b, t]] for b in range(args.workers) for t in range(args.steps)]

  fused_fn = jax.jit(lambda p: scorer.score(config, p, tree, tokens, mask, ends, chunk=args.chunk))
  fused, compile_s, t_fused = time_best(lambda: np.asarray(fused_fn(params)))
  if args.fused_only:
    print(f"fused scorer {t_fused:.3f} s (best of 3; first call incl. compile {compile_s:.1f} s)")
    return

  width = max(len(p) for p in prompts) + max(len(c) for c in cands)
  scorer.naive_score(config, params, cands, prompts[:1], width=width)  # compile outside the timing
  t0 = time.perf_counter()
  naive = scorer.naive_score(config, params, cands, prompts, width=width).reshape(args.workers, args.steps, -1)
  t_naive = time.perf_counter() - t0

  def torch_logp(prompt):
    ids = torch.zeros((len(cands), width), dtype=torch.long)
    am = torch.zeros_like(ids)
    for j, c in enumerate(cands):
      seq = list(prompt) + list(c)
      ids[j, :len(seq)] = torch.tensor(seq)
      am[j, :len(seq)] = 1
    return torch.log_softmax(ref(input_ids=ids, attention_mask=am).logits.float(), -1)

  with torch.inference_mode():
    torch_logp(prompts[0])  # warm-up
  t0 = time.perf_counter()
  torch_lp = np.zeros_like(naive)
  with torch.inference_mode():
    for i, prompt in enumerate(prompts):
      logp = torch_logp(prompt)
      for j, c in enumerate(cands):
        pos = torch.arange(len(prompt) - 1, len(prompt) + len(c) - 1)
        torch_lp.flat[i * len(cands) + j] = logp[j, pos, torch.tensor(c)].sum().item()
  t_torch = time.perf_counter() - t0

  naive_tokens = sum(len(p) + len(c) for p in prompts for c in cands)
  fused_tokens = int(mask.sum()) + args.workers * args.steps * len(tree.nodes_L)
  bound = naive_tokens / fused_tokens
  print(f"{args.workers} workers x {args.steps} steps x {len(cands)} titles ({len(tree.nodes_L)} tree nodes for "
        f"{sum(len(c) - 1 for c in cands)} title input tokens); model {config.num_params() / 1e6:.2f}M params, fp32, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}, torch {torch.__version__}")
  print(f"cpu: {cpu_line()}")
  print(f"fused scorer       {t_fused:8.2f} s   (first call incl. compile {compile_s:.1f} s)")
  print(f"naive JAX          {t_naive:8.2f} s   -> fused is {t_naive / t_fused:6.1f}x faster")
  print(f"naive PyTorch      {t_torch:8.2f} s   -> fused is {t_torch / t_fused:6.1f}x faster")
  print(f"max |log-prob diff|: fused vs naive JAX {np.abs(fused - naive).max():.2e}, "
        f"fused vs PyTorch {np.abs(fused - torch_lp).max():.2e}")
  print(f"token-count bound: naive runs {naive_tokens:,} tokens, fused {fused_tokens:,} -> {bound:.1f}x; "
        f"fused reaches {100 * (t_naive / t_fused) / bound:.0f}% (vs JAX) and {100 * (t_torch / t_fused) / bound:.0f}% "
        f"(vs PyTorch) of it")


if __name__ == "__main__":
  main()
