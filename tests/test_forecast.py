"""Career forecasts: the sampler against the scorer, against exact enumeration and the model's own
one-step matrix on a simulated first-order Markov panel, cache appends against re-encoding, seeds, the CLI."""

import json

import jax
import numpy as np
import pandas as pd
import pytest

from data_pipeline import simulator
from data_pipeline.dataset_dir import DatasetDir, build_dataset
from data_pipeline.panel import validate
from data_pipeline.resume import render_person
from data_pipeline.titles import TitleTable
from labor_jax import model, scorer, sharding
from labor_jax import forecasting, sampler
from labor_jax.cli import forecast
from labor_jax.rundir import RunDir
from tests import numerics
from tests.runs import run_train

TITLES = TitleTable(("1", "2", "3", "4", "5"), ("Clerks", "Truck drivers", "Cooks", "Nurses", "Farm workers"),
                    source="test titles")
J = len(TITLES)


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
  """A tiny model trained on a simulated first-order Markov panel (5 titles, stay 0.8):
  (run dir, config, params, tokenizer, candidate tree)."""
  root = tmp_path_factory.mktemp("forecast")
  panel = simulator.simulate(800, 6, TITLES, seed=0, stay=0.8, neighbours=3, gap_rate=0.0)
  panel, _ = validate(panel, "simulated", TITLES)
  build_dataset(panel, TITLES, root / "data", vocab_size=800, source="simulated first-order Markov panel")
  code, _, err = run_train(root / "run", root / "data", "steps=300", "ckpt_every=300", "eval_every=300", "batch_size=16",
                        "optim.lr=0.01", "optim.warmup_steps=10", "data.seq_len=160", "data.loss_on=history",
                        optimize=True)  # 300 steps: optimised code pays for its compilation
  assert code == 0, err
  run = RunDir(root / "run")
  config, params, _ = run.load_model()
  tok = run.tokenizer()
  return run.path, config, params, tok, scorer.CandidateTree.for_titles(tok, TITLES)


def _depth(config):
  """One forward pass of a prompt no longer than the model's positions (tests.numerics.forward_terms)."""
  return numerics.forward_terms(config, tokens=config.max_position_embeddings)


def _worker(occupations, education="high school diploma", start=1990):
  rows = pd.DataFrame({"dataset": "SIMULATED", "person_id": "w", "year": start + np.arange(len(occupations)),
                       "occupation": [TITLES.codes[o] for o in occupations], "education": education, "sex": "female",
                       "race": "white", "region": "the south", "birth_year": 1965})
  return forecasting.panel_workers(rows, TITLES, "titles")[0]


_JITTED = {}


def _jitted(name, f):
  return _JITTED.setdefault(name, jax.jit(f))


def _next_probs(config, params, tree, tokens_BN, mask_BN):
  """The scorer's normalised next-title distribution after each (right-padded) prompt: [B, J]."""
  score = _jitted("score", lambda p, t, m: scorer.score(config, p, tree, t, m, m.sum(1)[:, None], normalize=True))
  return np.exp(np.asarray(score(params, tokens_BN, mask_BN)))[:, 0]


def _worker_probs(config, params, tree, tok, workers):
  inp = forecasting.encode_workers(tok, workers, 1)
  return _next_probs(config, params, tree, inp["tokens_BN"], inp["mask_BN"])


def _sample(config, params, tree, tok, workers, years, samples, seed):
  inp = forecasting.encode_workers(tok, workers, years)
  sample = _jitted(f"sample {samples}", lambda p, key, **kw: sampler.sample_paths(config, p, tree, samples=samples,
                                                                                    rng=key, **kw))
  out = sample(params, jax.random.key(seed), **inp)
  return np.asarray(out.titles_BSY), np.asarray(out.probs_BSYJ)


def test_one_year_forecast_is_the_scorers_distribution(markov):
  """Shares of S = 2000 one-year paths match scorer.score(normalize=True) within 4 standard errors."""
  _, config, params, tok, tree = markov
  workers = [_worker([0, 0, 4]), _worker([1, 3, 3, 3, 3]), _worker([2], education="some college")]
  want_BJ = _worker_probs(config, params, tree, tok, workers)
  s = 2000
  titles_BSY, probs_BSYJ = _sample(config, params, tree, tok, workers, 1, s, seed=0)
  assert titles_BSY.shape == (3, s, 1)
  # The sampler's cached pass and the scorer's whole one sum in other orders: log-probs within one forward
  # pass's float32 bound.
  numerics.assert_close(np.log(probs_BSYJ[:, :, 0]), np.log(np.broadcast_to(want_BJ[:, None], (3, s, J))),
                        **_depth(config), what="first-year distribution")
  shares_BJ = np.stack([np.bincount(t[:, 0], minlength=J) / s for t in titles_BSY])
  se_BJ = np.sqrt((want_BJ * (1 - want_BJ) + 1 / s) / s)
  assert (np.abs(shares_BJ - want_BJ) <= 4 * se_BJ).all(), (shares_BJ, want_BJ)


def test_three_year_forecast_matches_the_models_own_matrix_power(markov):
  """Y = 3 from a worker who has been in occupation o for three years, for every o.

  P[i] = the model's next-title distribution after three years in i (its one-step matrix). The model is
  not exactly first-order, so its exact 3-year distribution (enumerating the 25 two-year paths with the
  scorer) differs from e_o P^3. The hybrid argument bounds that difference: total variation
  <= delta_o = sum over years t = 2, 3 of E[TV(model's year-t distribution given the path, P[path's last])],
  the expectation under the model's own path distribution (year 1 is P[o] itself). Measured at 0.015-0.043
  for this model. The sampled shares must lie within 4 standard errors of the exact distribution, and
  within 4 standard errors + delta_o of e_o P^3; delta_o < 0.1 checks that the model learnt a nearly
  first-order chain (so the second comparison is tight)."""
  _, config, params, tok, tree = markov
  histories = ([[i] * 3 for i in range(J)] + [[o] * 3 + [a] for o in range(J) for a in range(J)]
               + [[o] * 3 + [a, b] for o in range(J) for a in range(J) for b in range(J)])
  q = _worker_probs(config, params, tree, tok, [_worker(h) for h in histories])
  p_IJ = q[:J]
  q2_OAJ = q[J:J + J * J].reshape(J, J, J)
  q3_OABJ = q[J + J * J:].reshape(J, J, J, J)
  exact_OJ = np.einsum("oa,oab,oabj->oj", p_IJ, q2_OAJ, q3_OABJ)
  tv2_OA = 0.5 * np.abs(q2_OAJ - p_IJ[None]).sum(-1)
  tv3_OAB = 0.5 * np.abs(q3_OABJ - p_IJ[None, None]).sum(-1)
  delta_O = np.einsum("oa,oa->o", p_IJ, tv2_OA) + np.einsum("oa,oab,oab->o", p_IJ, q2_OAJ, tv3_OAB)
  markov_OJ = np.linalg.matrix_power(p_IJ, 3)
  assert np.abs(exact_OJ - markov_OJ).sum(-1).max() / 2 <= delta_O.max() + 1e-6  # the bound holds
  assert delta_O.max() < 0.1, delta_O
  assert np.diag(p_IJ).min() > 0.5  # it learnt the persistence

  s = 2000
  titles_BSY, probs_BSYJ = _sample(config, params, tree, tok, [_worker([o] * 3) for o in range(J)], 3, s, seed=1)
  shares_OJ = np.stack([np.bincount(t[:, -1], minlength=J) / s for t in titles_BSY])
  se = lambda p: np.sqrt((p * (1 - p) + 1 / s) / s)  # noqa: E731
  assert (np.abs(shares_OJ - exact_OJ) <= 4 * se(exact_OJ)).all(), (shares_OJ, exact_OJ)
  assert (np.abs(shares_OJ - markov_OJ) <= 4 * se(markov_OJ) + delta_O[:, None]).all(), (shares_OJ, markov_OJ)
  # The mean of the per-path distributions estimates the same thing with less noise.
  mean_OJ = probs_BSYJ[:, :, -1].mean(1)
  assert (np.abs(mean_OJ - exact_OJ) <= 4 * probs_BSYJ[:, :, -1].std(1) / np.sqrt(s) + 1e-5).all()
  numerics.assert_close(np.log(probs_BSYJ[:, :, 0]), np.log(np.broadcast_to(p_IJ[:, None], (J, s, J))),
                        **_depth(config), what="first-year distribution")  # as in the one-year test


def test_cache_append_equals_re_encoding(markov):
  """Appending sampled titles and the next entry prefixes to the cache gives the tokens, keys/values,
  hidden state and next-title distribution of the re-rendered, re-tokenised history."""
  _, config, params, tok, tree = markov
  workers = [_worker([0, 0, 4]), _worker([3, 3, 3, 1, 1, 1], education=None)]
  years = 3
  inp = forecasting.encode_workers(tok, workers, years)
  n = inp["tokens_BN"].shape[1]
  w = tree.tokens_JC.shape[1] + inp["next_prefix_BYP"].shape[2]
  cache = sampler.init_cache(config, params, inp["tokens_BN"], inp["mask_BN"], n + (years - 1) * w)
  append = _jitted("append", lambda p, c, t, k: sampler.append(config, p, c, t, k))
  next_logprobs = _jitted("next", lambda p, c: sampler.next_logprobs(config, p, tree, c))
  forward = _jitted("forward", lambda p, t, m: model.forward(config, p, t, mask_BT=m, return_kv=True,
                                                             return_hidden=True))
  picks = [(4, 2), (1, 3)]  # titles sampled in the first two future years, per worker
  for k in range(years - 1):
    j_B = np.asarray([p[k] for p in picks])
    tokens_BW, count_B = sampler.continuation(tree, j_B, inp["next_prefix_BYP"][:, k], inp["next_prefix_len_BY"][:, k])
    cache = append(params, cache, tokens_BW, count_B)
    texts = []
    for b, wk in enumerate(workers):  # the sampled history, rendered and tokenised as in training
      entries = wk.resume.entries
      rows = pd.DataFrame({"dataset": "SIMULATED", "person_id": "w", "year": [e.year for e in entries] +
                           [entries[-1].year + 1 + i for i in range(k + 1)],
                           "occupation": [e.code for e in entries] + [TITLES.codes[p] for p in picks[b][:k + 1]],
                           "education": wk.education, "sex": "female", "race": "white", "region": "the south",
                           "birth_year": 1965})
      texts.append(render_person(rows, TITLES).prompt(entries[-1].year + k + 2, wk.education))
    ids = [tok.encode_resume(t).ids for t in texts]
    lengths = np.asarray([len(x) for x in ids])
    np.testing.assert_array_equal(cache.length_R, lengths)
    tokens_BN = np.zeros((2, cache.kv[0].k.shape[1]), np.int32)  # one width for both years: one compile
    mask_BN = np.zeros_like(tokens_BN)
    for b, x in enumerate(ids):
      tokens_BN[b, :len(x)], mask_BN[b, :len(x)] = x, 1
      if k == 0:  # the appended tokens are the text's
        assert list(tokens_BW[b, :count_B[b]]) == list(x[inp["mask_BN"][b].sum():])
    x_BND, kv = forward(params, tokens_BN, mask_BN)
    # Appended in pieces versus encoded whole: sums in other orders, within one forward pass's float32 bound.
    depth = _depth(config)
    for b, length in enumerate(lengths):
      for got, want in zip(cache.kv, kv):
        numerics.assert_close(got.k[b, :length], want.k[b, :length], **depth, what="keys")
        numerics.assert_close(got.v[b, :length], want.v[b, :length], **depth, what="values")
      numerics.assert_close(cache.hidden_RD[b], x_BND[b, length - 1], **depth, what="hidden state")
    numerics.assert_close(next_logprobs(params, cache), np.log(_next_probs(config, params, tree, tokens_BN, mask_BN)),
                          **depth, what="next-title log-probs")
  assert texts[1].text.endswith("1996: Truck drivers\n1997: Nurses\n1998:")  # the second worker has no education


def test_seeded_runs_are_reproducible(markov):
  _, config, params, tok, tree = markov
  workers = [_worker([0, 0, 4]), _worker([2, 2])]
  a, _ = _sample(config, params, tree, tok, workers, 3, 64, seed=5)
  b, _ = _sample(config, params, tree, tok, workers, 3, 64, seed=5)
  c, _ = _sample(config, params, tree, tok, workers, 3, 64, seed=6)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_cli_outputs_and_errors(markov, tmp_path, capsys):
  run_dir = markov[0]
  data = DatasetDir(RunDir(run_dir).train_config().data.dataset_dir)
  worker = {"sex": "male", "region": "the west", "birth_year": 1970,
            "history": [{"year": 1994, "education": "some college", "occupation": "Cooks"},
                        {"year": 1995, "education": "some college", "occupation": "4"}],
            "next_education": "bachelor's degree"}
  f = tmp_path / "w.json"
  f.write_text(json.dumps(worker))
  args = ["--run", str(run_dir), "--years", "3", "--samples", "40", "--seed", "3"]
  assert forecast.main(args + ["--history", str(f), "--out", str(tmp_path / "one")]) == 0
  assert capsys.readouterr().out.splitlines()[0].startswith("1996: ")
  doc = json.loads((tmp_path / "one" / "forecast.json").read_text())
  (person,) = doc["workers"]
  assert [y["year"] for y in person["forecast"]] == [1996, 1997, 1998]
  assert all(y["education"] == "bachelor's degree" for y in person["forecast"])
  for y in person["forecast"]:
    assert abs(sum(y["probability"].values()) - 1) < 1e-4 and abs(sum(y["share"].values()) - 1) < 1e-6
  paths = pd.read_csv(tmp_path / "one" / "paths.csv")
  assert len(paths) == 40 * 3 and set(paths["title"]) <= set(TITLES.titles)
  assert len(person["sample_paths"]) == 5 and person["sample_paths"][0] == list(paths["title"][:3])

  # A split, in batches of 8 workers on one device and of 16 on a (data 4, fsdp 2) mesh: the same paths
  # (one key per worker), the same distributions.
  split = ["--split", "validation", "--years", "2", "--samples", "8"]
  assert forecast.main(args[:2] + split + ["--out", str(tmp_path / "a")]) == 0
  forecasting.run_forecast(run_dir, tmp_path / "b", data_dir=data.path, split="validation", years=2, samples=8,
                        batch_workers=16, mesh=sharding.make_mesh(data=4, fsdp=2), progress=False)
  a, b = (pd.read_csv(tmp_path / d / "paths.csv") for d in "ab")
  pd.testing.assert_frame_equal(a, b)
  # One device versus a (data 4, fsdp 2) mesh: means of probabilities whose logs agree to one forward pass's
  # float32 bound (compared as logs; a transition never taken is 0 in both).
  numerics.assert_close(np.log(pd.read_csv(tmp_path / "b" / "transitions.csv")["probability"]),
                        np.log(pd.read_csv(tmp_path / "a" / "transitions.csv")["probability"]),
                        **_depth(RunDir(run_dir).model_config()), what="transition probabilities")
  workers = (data.panel()["split"] == "validation").groupby(data.panel()["person_id"]).any().sum()
  assert len(a) == workers * 8 * 2
  table = pd.read_csv(tmp_path / "a" / "transitions.csv")
  assert {"all", "education", "sex", "race", "region"} <= set(table["group"])
  sums = table.groupby(["group", "value", "origin"])["probability"].sum()
  # each origin's row is a mean of distributions over every title, each normalised in float32 (a few hundred terms:
  # n * eps ~ 4e-5 at worst); a lost or doubled title moves a sum by a whole probability
  np.testing.assert_allclose(sums, 1.0, atol=1e-4)
  overall = table[table["group"] == "all"].drop_duplicates("origin")
  assert overall["workers"].sum() == workers
  for png in ("transitions.png", "transitions_by_subgroup.png"):
    assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"

  worker["history"][1]["occupation"] = "Astronaut"
  f.write_text(json.dumps(worker))
  capsys.readouterr()
  assert forecast.main(args + ["--history", str(f), "--out", str(tmp_path / "bad")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "row 2" in err and "column 'occupation'" in err and "Astronaut" in err
