"""Evaluation and prediction on a tiny trained model."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labor_jax import inference
from tests import numerics
from tests.runs import longest_resume, run_train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, nlsy_dataset):
  # 400 steps on whole resumes (seq_len 224: the longest has 208 tokens), at XLA's default code generation (it pays
  # for 400 steps): a model that reads the history, so that a scoring fault shows in its figures (40 steps on
  # 64-token rows gave a perplexity of millions and the same top-5 for every worker).
  run_dir = tmp_path_factory.mktemp("eval") / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, "steps=400", "ckpt_every=200", "eval_every=200", "data.seq_len=224",
                             "data.loss_on=history", optimize=True)
  assert code == 0, err
  return run_dir


def test_evaluate_writes_report_with_every_baseline(trained_run):
  from labor_jax import evaluation
  metrics = evaluation.evaluate(trained_run, "test")
  out = trained_run / "eval_test"
  on_disk = json.loads((out / "metrics.json").read_text())
  assert on_disk["transitions"] == metrics["transitions"] > 0
  models = on_disk["models"]
  assert set(models) == {"LABOR-LLM (this run)", "empirical frequencies", "first-order Markov", "multinomial logit",
                         "CAREER-style transformer"}
  assert models["multinomial logit"]["perplexity"] < models["empirical frequencies"]["perplexity"] < 9.5
  for name, m in models.items():
    assert 1 < m["perplexity"] and 0.0 <= m["move_auc"] <= 1.0
    assert set(m["by_history_years"]) == {str(t) for t in range(1, 8)}
    assert m["perplexity_stays"] < m["perplexity_moves"], name  # staying is easier to predict than moving
  llm = models["LABOR-LLM (this run)"]
  # The tiny LLM reads each worker's history (stays easier than moves, above) and beats the empirical frequencies:
  # scores paired with another worker's transitions would lose both.
  assert llm["perplexity"] < models["empirical frequencies"]["perplexity"]
  assert llm["perplexity_raw"] >= llm["perplexity"]  # raw keeps mass on non-title continuations
  pred = pd.read_csv(out / "predictions.csv")
  assert len(pred) == on_disk["transitions"]
  # The same probabilities: the file's logs and the metric's differ by float32 roundings of values ~ 10 (~1e-6 in the
  # perplexity, relative); 1e-4 is far below what scores of another model or split would move.
  np.testing.assert_allclose(np.exp(-pred["logprob"].mean()), llm["perplexity"], rtol=1e-4)
  assert pred["top5"].str.count(";").eq(4).all()
  report = (out / "report.md").read_text()
  assert "| multinomial logit |" in report and "calibration_subgroup.png" in report
  for png in ("calibration_occupation.png", "calibration_subgroup.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_predict_cli(trained_run, tmp_path, capsys):
  from labor_jax.cli import predict
  worker = {"sex": "male", "region": "the south", "birth_year": 1960,
            "history": [{"year": 1980, "education": "high school diploma", "occupation": "Service workers"},
                        {"year": 1981, "education": "high school diploma", "occupation": "6"}]}
  f = tmp_path / "w.json"
  f.write_text(json.dumps(worker))
  top = predict.predict(trained_run, f, top_k=9)
  assert len(top) == 9 and abs(sum(p for _, p in top) - 1) < 1e-4 and top[0][1] >= top[-1][1]
  assert predict.main(["--run", str(trained_run), "--history", str(f), "--top-k", "3"]) == 0
  assert len(capsys.readouterr().out.strip().splitlines()) == 3
  worker["history"][1]["occupation"] = "Astronaut"
  f.write_text(json.dumps(worker))
  assert predict.main(["--run", str(trained_run), "--history", str(f)]) == 2
  err = capsys.readouterr().err
  assert "row 2" in err and "column 'occupation'" in err and "Astronaut" in err


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_workers():
  from labor_jax.metrics import bootstrap_intervals
  rng = np.random.default_rng(0)

  def data(workers):
    clusters = np.repeat(np.arange(workers), 7)
    skill = np.repeat(rng.normal(0, 0.5, workers), 7)  # a worker's transitions move together
    a = -1.4 + skill + rng.normal(0, 0.3, len(clusters))
    return {"a": a, "b": a - 0.05 + rng.normal(0, 0.05, len(clusters))}, clusters
  widths = []
  for workers in (40, 640):
    logp, clusters = data(workers)
    ci = bootstrap_intervals(logp, clusters, "a", resamples=500, seed=1)
    lo, hi = ci["a"]["perplexity_ci"]
    assert lo < np.exp(-logp["a"].mean()) < hi
    d_lo, d_hi = ci["b"]["log_ppl_diff_ci"]
    assert d_lo < ci["b"]["log_ppl_diff"] < d_hi and "log_ppl_diff" not in ci["a"]
    widths.append(hi - lo)
    assert bootstrap_intervals(logp, clusters, "a", resamples=500, seed=1) == ci  # seeded
  assert widths[1] < widths[0] / 2.5  # sixteen times the workers: about a quarter of the width
  # b is worse than a by 0.05 in log-probability with little noise: the paired interval excludes zero
  assert ci["b"]["excludes_zero"] and ci["b"]["log_ppl_diff"] > 0


def test_ensemble_of_one_run_equals_the_run_and_hf_scoring_equals_the_run(trained_run, tmp_path, nlsy_dataset):
  """The mixture of one model is that model; the same weights exported to a Hugging Face directory and
  scored with --hf on the run's dataset give the run's numbers; a dataset tokenised otherwise is refused."""
  from labor_jax import evaluation
  from labor_jax.cli import evaluate
  from labor_jax.cli import export
  m = evaluation.evaluate(trained_run, "test", tmp_path / "run_eval", career=False, bootstrap=200,
                          ensembles={"ensemble of 1": [trained_run]})
  main, ens = m["models"][evaluation.MAIN_LLM], m["models"]["ensemble of 1"]
  assert ens["perplexity"] == pytest.approx(main["perplexity"], rel=1e-9)
  assert ens["log_ppl_diff"] == pytest.approx(0.0, abs=1e-9) and not ens["excludes_zero"]
  assert main["perplexity_ci"][0] < main["perplexity"] < main["perplexity_ci"][1]
  report = (tmp_path / "run_eval" / "report.md").read_text()
  assert "95% CI" in report and "cannot be told apart" in report

  assert export.main(["--run", str(trained_run), "--out", str(tmp_path / "hf")]) == 0
  assert evaluate.main(["--hf", str(tmp_path / "hf"), "--data", str(nlsy_dataset), "--out", str(tmp_path / "hf_eval"),
                        "--no-career", "--bootstrap", "0", "--mesh", "data=8", "--no-progress"]) == 0
  got = json.loads((tmp_path / "hf_eval" / "metrics.json").read_text())["models"][evaluation.MAIN_LLM]
  # One device versus data=8: log-perplexities are means of log-probs of one forward pass, each within its
  # float32 bound at the log-probs' magnitude.
  depth = numerics.forward_terms(inference.model_config(trained_run), tokens=longest_resume(nlsy_dataset))
  scale = np.abs(pd.read_csv(tmp_path / "run_eval" / "predictions.csv")["logprob"]).max()
  for key in ("perplexity", "perplexity_raw"):
    numerics.assert_close(np.log(got[key]), np.log(main[key]), **depth, scale=scale, what=key)

  # --dtype bfloat16 computes the Hugging Face model in bfloat16 (matrix products of operands rounded to 8-bit
  # significands): every log-probability within a few such roundings per layer of its magnitude, and the figures
  # further from float32's than float32's own bound (the flag took effect); --dtype with --run is refused.
  assert evaluate.main(["--hf", str(tmp_path / "hf"), "--data", str(nlsy_dataset), "--out", str(tmp_path / "bf16"),
                        "--no-career", "--bootstrap", "0", "--no-progress", "--dtype", "bfloat16"]) == 0
  bf16 = json.loads((tmp_path / "bf16" / "metrics.json").read_text())["models"][evaluation.MAIN_LLM]
  rows = [pd.read_csv(tmp_path / d / "predictions.csv") for d in ("run_eval", "bf16")]
  assert rows[0][["person_id", "year"]].equals(rows[1][["person_id", "year"]])
  numerics.assert_close(rows[1]["logprob"], rows[0]["logprob"], terms=1, layers=depth["layers"],
                        eps=numerics.EPS_BF16, what="bfloat16 log-probabilities")
  moved = abs(np.log(bf16["perplexity"]) - np.log(got["perplexity"]))
  assert moved > numerics.tolerance(np.log(main["perplexity"]), **depth, scale=scale), moved
  assert evaluate.main(["--run", str(trained_run), "--dtype", "bfloat16", "--no-career", "--bootstrap", "0"]) == 2

  from data_pipeline.dataset_dir import build_default
  other = tmp_path / "other_tokens"
  build_default(other, vocab_size=500)
  with pytest.raises(evaluation.ConfigError, match="another tokenizer"):
    evaluation.evaluate(tmp_path / "hf", "test", tmp_path / "x", data=other, career=False, bootstrap=0)
  # for a run, the fix it names is a folder data_pipeline.build reads (it named the run, which build refuses)
  with pytest.raises(evaluation.ConfigError, match="another tokenizer") as e:
    evaluation.evaluate(trained_run, "test", tmp_path / "y", data=other, career=False, bootstrap=0)
  named = Path(str(e.value).split("--tokenizer-dir ")[1].split(" ")[0])
  assert named == Path(trained_run) / "tokenizer" and {"tokenizer.model", "tokenizer.json"} & set(os.listdir(named))


def test_every_model_is_checked_before_the_first_is_scored(trained_run, tmp_path, monkeypatch):
  """A missing --compare-hf model or an ensemble member with another tokenizer was found after the main model's
  scoring (minutes on a real model)."""
  from data_pipeline.dataset_dir import build_default
  from labor_jax import evaluation

  def no_scoring(*args, **kwargs):
    raise AssertionError("scored before every model was checked")
  monkeypatch.setattr(evaluation, "score_transitions", no_scoring)
  with pytest.raises(FileNotFoundError, match="nope: neither a labor_jax.train run"):
    evaluation.evaluate(trained_run, "test", tmp_path / "a", extra_llms={"x": tmp_path / "nope"}, career=False)
  other = tmp_path / "other_tokens"
  build_default(other, vocab_size=500)
  (tmp_path / "other_run").mkdir()
  for f in ("model_config.json", "config.yaml"):
    (tmp_path / "other_run" / f).write_bytes((Path(trained_run) / f).read_bytes())
  (tmp_path / "other_run" / "tokenizer").symlink_to(other / "tokenizer")
  with pytest.raises(evaluation.ConfigError, match=r"other_run: its tokenizer is not the one .* \(the main model's\)"):
    evaluation.evaluate(trained_run, "test", tmp_path / "b", ensembles={"e": [trained_run, tmp_path / "other_run"]},
                        career=False)


def test_python_api_scores_a_run_and_its_hf_export_like_evaluate(trained_run, tmp_path, nlsy_dataset, capsys):
  """labor_jax.load(run).score(test panel) gives evaluate's predictions.csv log-probabilities; the run exported
  to a Hugging Face directory gives the same through labor_jax.load(hf, titles=...); next_distribution of a
  history equals score's row for the entry that follows it, and predict's top-k."""
  import labor_jax
  from data_pipeline.dataset_dir import DatasetDir
  from labor_jax import evaluation
  from labor_jax.cli import export, predict
  evaluation.evaluate(trained_run, "test", tmp_path / "eval", career=False, bootstrap=0)
  want = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype={"person_id": str})
  data = DatasetDir(nlsy_dataset)
  panel = data.panel()
  test = panel[panel["split"] == "test"].drop(columns="split")
  m = labor_jax.load(trained_run)
  got = m.score(test, top_k=3)
  assert len(got) == len(want) and set(got.columns) >= {"person_id", "year", "title", "prob", "logprob", "top3"}
  merged = want.merge(got, on=["dataset", "person_id", "year"], validate="one_to_one")
  assert len(merged) == len(want)
  # The API's batches and evaluate's sum in other orders: one forward pass's float32 bound.
  depth = numerics.forward_terms(inference.model_config(trained_run), tokens=longest_resume(nlsy_dataset))
  numerics.assert_close(merged["logprob_y"], merged["logprob_x"], **depth, what="API versus evaluate")
  assert (merged["true_occupation"] == merged["title"]).all()
  assert (merged["top5"].str.split(" \\(").str[0] == merged["top1"]).mean() > 0.99  # ties may reorder

  assert export.main(["--run", str(trained_run), "--out", str(tmp_path / "hf")]) == 0
  hf_model = labor_jax.load(tmp_path / "hf", titles=data.titles())
  numerics.assert_close(hf_model.score(test)["logprob"], got["logprob"], **depth, what="Hugging Face export")

  pid = got["person_id"].iloc[0]
  rows = test[test["person_id"] == pid].reset_index(drop=True)
  history, nxt = rows.iloc[:2], rows.iloc[2]
  dist = m.next_distribution(history, next_year=int(nxt["year"]), next_education=nxt["education"])
  assert dist.shape == (1, len(data.titles())) and dist.index.tolist() == [pid]
  assert dist.sum(axis=1).iloc[0] == pytest.approx(1.0, abs=1e-9)
  row = got[(got["person_id"] == pid) & (got["year"] == nxt["year"])].iloc[0]
  numerics.assert_close(np.log(dist.loc[pid, row["title"]]), np.log(row["prob"]), **depth,
                        scale=np.abs(got["logprob"]).max(), what="next_distribution")  # a shorter prompt's pass
  hist_file = tmp_path / "h.csv"
  history.assign(occupation=history["occupation"]).to_csv(hist_file, index=False)
  top = predict.predict(trained_run, hist_file, top_k=4)
  nxt_default = m.next_distribution(history).iloc[0].sort_values(ascending=False, kind="stable")[:4]
  assert [t for t, _ in top] == list(nxt_default.index)
  # predict calls next_distribution on the same rows: the same program on the same inputs, equal on any CPU (slack)
  np.testing.assert_allclose([p for _, p in top], nxt_default.to_numpy(), rtol=1e-6)
  with pytest.raises(labor_jax.api.PanelError, match="occupation"):
    m.score(test.assign(occupation="not a title"))
  # a history longer than the model's positions is scored, and said to be (it was scored in silence)
  long = pd.concat([history.iloc[:1]] * 80, ignore_index=True).assign(year=range(1901, 1981))
  capsys.readouterr()
  assert np.isfinite(m.next_distribution(long).to_numpy()).all()
  err = capsys.readouterr().err
  assert "beyond the model's 512 positions (its scores are extrapolated)" in err, err


def test_in_context_scores_equal_a_forward_pass_over_context_history_and_title(trained_run, nlsy_dataset):
  """With context tokens before each resume, the raw score of a title at an entry is the sum of the title's
  token log-probabilities after context + the history before the entry, by a plain forward pass; with an
  empty context the scores are the plain ones."""
  import jax

  from data_pipeline.dataset_dir import DatasetDir
  from labor_jax import evaluation, model
  data = DatasetDir(nlsy_dataset)
  loaded = inference.open_model(trained_run)
  titles = data.titles()
  context = np.asarray(data.source("train")[0]["tokens"], np.int32)
  plain = evaluation.llm_scores(loaded, titles, data.variant, data, "test", batch_workers=8)
  empty = evaluation.llm_scores(loaded, titles, data.variant, data, "test", batch_workers=8,
                                context=np.zeros(0, np.int32))
  np.testing.assert_array_equal(np.stack(plain["llm_raw"]), np.stack(empty["llm_raw"]))
  got = evaluation.llm_scores(loaded, titles, data.variant, data, "test", batch_workers=8, context=context)
  e = data.source("test")[0]
  t = 2  # the third entry of the first test worker
  start = int(e["title_spans"][t, 0])
  pick = lambda df: df[(df["person_id"] == e["person_id"].decode()) & (df["t"] == t)]["llm_raw"].iloc[0]  # noqa: E731
  raw = pick(got)
  cands = loaded.candidates(titles, data.variant)
  # every candidate after context + history, right padded into one batch: one jitted plain forward pass
  # (a causal model's logits before the padding do not see it)
  seqs = [np.concatenate([context, np.asarray(e["tokens"][:start], np.int32), np.asarray(c, np.int32)]) for c in cands]
  batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for j, q in enumerate(seqs):
    batch[j, :len(q)] = q
  logits = jax.jit(lambda p, x: model.forward(loaded.config, p, x))(loaded.params, batch)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  want, depth = [], 0
  for j, (cand, seq) in enumerate(zip(cands, seqs)):
    first = len(seq) - len(cand)
    want.append(sum(float(logp[j, first - 1 + k, tok]) for k, tok in enumerate(cand)))
    depth = max(depth, len(cand))
  # the fused scorer and the plain pass sum the same float32 log-probs over other orders: the bound of a
  # forward pass over the sequence, at the scores' magnitude, times the title's tokens
  bound = numerics.forward_terms(loaded.config, tokens=batch.shape[1])
  numerics.assert_close(raw, np.asarray(want), **bound, scale=np.abs(want).max() * depth, what="in-context scores")
  assert np.abs(raw - pick(plain)).max() > 0  # the context changed the scores


def test_transitions_are_scored_without_the_first_entries(trained_run, nlsy_dataset, monkeypatch):
  """score_transitions asks for the entries its table holds (transitions: t >= 1), so no worker's first entry is
  scored; those scores equal the whole pass's, within the float32 bound of one forward pass over the resumes."""
  from data_pipeline.dataset_dir import DatasetDir
  from labor_jax import evaluation
  from tests.runs import longest_resume
  data = DatasetDir(nlsy_dataset)
  loaded = inference.open_model(trained_run)
  every = evaluation.llm_scores(loaded, data.titles(), data.variant, data, "test")
  asked, llm_scores = [], evaluation.llm_scores
  monkeypatch.setattr(evaluation, "llm_scores", lambda *a, **k: asked.append(k["first_entry"]) or llm_scores(*a, **k))
  table = evaluation.transitions_of(data, sorted(set(every["dataset"])))
  norm, raw, _ = evaluation.score_transitions(trained_run, data, table, "test")
  assert asked == [1] and table["t"].min() == 1 and len(norm) == len(table) == (every["t"] >= 1).sum()
  want = table[["dataset", "person_id", "t"]].merge(every, on=["dataset", "person_id", "t"], how="left")
  depth = numerics.forward_terms(loaded.config, tokens=longest_resume(nlsy_dataset))
  numerics.assert_close(norm, np.stack(want["llm_norm"]), **depth, what="normalised")
  numerics.assert_close(raw, np.stack(want["llm_raw"]), **depth, what="raw")


def test_python_api_takes_a_notebooks_frames_and_refuses_what_it_cannot_answer(trained_run, nlsy_dataset):
  """What a notebook hands the API (probe, 2026-12-05): integer ids (they came back as text, so results did not merge
  back), float codes after a merge, padded or differently cased titles, a categorical column, a worker without a
  transition (a frame without columns) are answered; a negative top_k (it gave k - 1 columns), a next_year before the
  history, an education with a line break (it wrote a fake entry into the resume), a repeated column, chunk=0 are
  refused in one line."""
  import labor_jax
  from data_pipeline.dataset_dir import DatasetDir
  from data_pipeline.errors import PanelError
  from labor_jax.config import ConfigError
  data = DatasetDir(nlsy_dataset)
  panel = data.panel()
  test = panel[panel["split"] == "test"].drop(columns="split")
  workers = test[test["person_id"].isin(test["person_id"].unique()[:3])].reset_index(drop=True)
  m = labor_jax.load(trained_run)
  assert labor_jax.load(trained_run, step=np.int64(m.loaded.step)).loaded.step == m.loaded.step  # a numpy integer
  want = m.score(workers, top_k=2)
  assert [c for c in want.columns if c.startswith("top")] == ["top1", "top1_prob", "top2", "top2_prob"]
  titles = dict(zip(m.titles.codes, m.titles.titles))
  as_int = workers.assign(person_id=pd.factorize(workers["person_id"])[0] + 100,
                          occupation=[float(c) if i % 2 else f"  {titles[c].upper()} " for i, c in
                                      enumerate(workers["occupation"])],
                          education=workers["education"].astype("category"))
  got = m.score(as_int, top_k=2)
  assert got["person_id"].tolist() == (pd.factorize(want["person_id"])[0] + 100).tolist()
  assert got.merge(as_int, on=["person_id", "year"]).shape[0] == len(got)  # the caller's ids merge back
  # the same workers in a call of the same shape: at most one forward pass's float32 bound apart
  depth = numerics.forward_terms(inference.model_config(trained_run), tokens=longest_resume(nlsy_dataset))
  numerics.assert_close(got["logprob"], want["logprob"], **depth, what="a notebook's frame")
  empty = m.score(workers.iloc[:1])
  assert len(empty) == 0 and "logprob" in empty.columns
  history = as_int[as_int["person_id"] == 100]
  dist = m.next_distribution(history, next_education="  high school diploma ")
  assert dist.index.tolist() == [100]
  numerics.assert_close(np.log(dist.to_numpy()), np.log(m.next_distribution(history, next_education="high school "
                        "diploma").to_numpy()), **depth, what="a padded next_education")
  last = int(history["year"].max())
  for call, said in ((lambda: m.score(workers, top_k=-1), "top_k: a count of titles"),
                     (lambda: m.next_distribution(history, next_year=last), "next_year must come after every"),
                     (lambda: m.next_distribution(history, next_year="soon"), "next_year must be a year"),
                     (lambda: m.next_distribution(history, next_education="x\n1999: Sales workers"), "next_education"),
                     (lambda: m.score(pd.concat([workers, workers[["year"]]], axis=1)), "'year' appears more than"),
                     (lambda: labor_jax.load(trained_run, chunk=0), "chunk: a positive integer")):
    with pytest.raises((PanelError, ConfigError), match=said):
      call()


def test_open_model_dtype_applies_to_hugging_face_sources_only(trained_run, tmp_path):
  """A Hugging Face source opens in the compute dtype asked for ("auto": the hardware's choice); a run
  keeps its own and refuses another."""
  import jax

  from labor_jax import runtime
  from labor_jax.config import ConfigError
  from labor_jax.interop import hf
  loaded = inference.open_model(trained_run)
  hf.save(loaded.config, jax.device_get(loaded.params), tmp_path / "hf", tokenizer_dir=trained_run / "tokenizer")
  assert inference.open_model(tmp_path / "hf").config.dtype == "float32"
  got = inference.open_model(tmp_path / "hf", dtype="bfloat16")
  assert got.config.dtype == "bfloat16" and "bfloat16 compute" in got.description
  assert inference.open_model(tmp_path / "hf", dtype="auto").config.dtype == runtime.auto_dtype()[0]
  with pytest.raises(ConfigError, match="its own model.dtype"):
    inference.open_model(trained_run, dtype="bfloat16")
