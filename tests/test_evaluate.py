"""Evaluation and prediction on a tiny trained model."""

import json

import numpy as np
import pandas as pd
import pytest

from tests.runs import run_train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, nlsy_dataset):
  run_dir = tmp_path_factory.mktemp("eval") / "run"
  code, out, err = run_train(run_dir, nlsy_dataset, "steps=40", "ckpt_every=20", "eval_every=20", "data.loss_on=history")
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
    if name != "LABOR-LLM (this run)":  # trained baselines: staying is easier to predict than moving
      assert m["perplexity_stays"] < m["perplexity_moves"]
  llm = models["LABOR-LLM (this run)"]
  assert llm["perplexity_raw"] >= llm["perplexity"]  # raw keeps mass on non-title continuations
  pred = pd.read_csv(out / "predictions.csv")
  assert len(pred) == on_disk["transitions"]
  np.testing.assert_allclose(np.exp(-pred["logprob"].mean()), llm["perplexity"], rtol=1e-4)
  assert pred["top5"].str.count(";").eq(4).all()
  report = (out / "report.md").read_text()
  assert "| multinomial logit |" in report and "calibration_subgroup.png" in report
  for png in ("calibration_occupation.png", "calibration_subgroup.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_predict_cli(trained_run, tmp_path, capsys):
  from labor_jax import predict
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
