"""``python -m labor_jax.main``: the end-to-end job on the embedded NLSY panel.

Stages available today: build the resume dataset (data_pipeline), build a tiny Llama
sized to its tokenizer, export it as a Hugging Face checkpoint with the tokenizer and
import it back (checked bit for bit), then score every occupation title as the next
entry of one test worker's resume, using the model's cached-prefix forward pass.
Training and evaluation against the econometric baselines are not built yet: the
model is untrained, so its probabilities carry no information about careers (they
mostly reflect how many tokens each title has).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def next_occupation_logprobs(config, params, prompt_ids, candidates) -> np.ndarray:
  """log P(candidate j | prompt) for each candidate token list (prompt encoded once, cached)."""
  from labor_jax import model
  prompt = jnp.asarray(prompt_ids, jnp.int32)[None]
  logits, kv = model.forward(config, params, prompt, return_kv=True)
  last = jax.nn.log_softmax(logits[0, -1])
  width = max(len(c) for c in candidates)
  toks = np.zeros((len(candidates), width), np.int32)
  mask = np.zeros_like(toks)
  for j, c in enumerate(candidates):
    toks[j, :len(c)], mask[j, :len(c)] = c, 1
  kv_j = [model.KV(jnp.repeat(k, len(candidates), 0), jnp.repeat(v, len(candidates), 0)) for k, v in kv]
  out = jax.nn.log_softmax(model.forward(config, params, toks, mask_BT=mask, prefix=kv_j), axis=-1)
  first = last[toks[:, 0]]
  rest = jnp.take_along_axis(out[:, :-1], toks[:, 1:, None], axis=-1)[..., 0] * mask[:, 1:]
  return np.asarray(first + rest.sum(1))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/main", help="run directory")
  args = ap.parse_args(argv)

  from data_pipeline import build, resume, tfds_builder
  from data_pipeline.titles import load_titles
  from data_pipeline.tokenizer import ResumeTokenizer
  from labor_jax import hf, model
  from labor_jax.config import llama_tiny

  out = Path(args.out)
  print("== 1/4 data: embedded NLSY panel -> resumes -> tokens")
  data_dir = out / "data"
  build.main(["--out", str(data_dir)])
  tok = ResumeTokenizer.from_dir(data_dir / "tokenizer")
  titles = load_titles(data_dir / "titles.csv")

  print("\n== 2/4 model: tiny Llama sized to the tokenizer")
  config = llama_tiny(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id)
  params = model.init_params(config, jax.random.key(0))
  print(f"{config.num_params() / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, d={config.hidden_size}")

  print("\n== 3/4 Hugging Face export -> import round trip")
  ck = hf.save(config, params, out / "hf_checkpoint", tokenizer_dir=data_dir / "tokenizer")
  config2, params2 = hf.load(ck)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
  print(f"wrote {ck}; reloaded bitwise-equal: {same}")
  if not same or config2 != config:
    print("error: round trip changed the parameters", file=sys.stderr)
    return 1

  print("\n== 4/4 next-occupation distribution for one test worker (untrained model)")
  ex = tfds_builder.data_source(data_dir / "labor_resumes" / "1.0.0", "test")[0]
  t = len(ex["years"]) - 1
  prompt = ex["tokens"][: ex["title_spans"][t][0]]
  cands = tok.candidate_tokens(resume.candidate_texts(titles))
  logp = next_occupation_logprobs(config2, params2, prompt, cands)
  p = np.exp(logp - np.logaddexp.reduce(logp))
  print(tok.decode(prompt[1:])[-200:].split("\n", 1)[-1])
  print(f"true next occupation: {titles.titles[ex['occupations'][t]]}")
  for j in np.argsort(-p):
    print(f"  {p[j]:.3f}  {titles.titles[j]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
