"""Career forecasts of a model: workers in, sampled paths (:mod:`labor_jax.sampler`) and their summaries out.

:func:`run_forecast` renders the workers of a history file or of a dataset split, opens the model
through the inference layer (:func:`labor_jax.inference.open_model`), batches the workers, runs
the sampler and writes the outputs (:func:`write_outputs`). Its command line is
``python -m labor_jax.forecast`` (:mod:`labor_jax.cli.forecast`)::

  python -m labor_jax.forecast --run RUN --history worker.json --years 5 --samples 200 --seed 0 --out DIR
  python -m labor_jax.forecast --run RUN --split test --years 5 --samples 200 --seed 0 --out DIR  [--data DIR]

``--history`` takes the format of ``labor_jax.predict`` (:mod:`data_pipeline.history`: JSON or a
one-person panel CSV; its ``next_year`` / ``next_education`` open the first future entry). Future year k is the first
future year + k - 1; education is carried forward from the last entry unless ``--education``
(or the JSON's ``next_education``) gives it. ``--data`` defaults to the run's own dataset;
in split mode each worker is forecast from their whole observed history. Outputs in ``--out``:

* ``forecast.json``: per worker and future year, ``probability`` (the mean over the S paths of the
  model's distribution for that year given the path so far: an unbiased estimate of
  P(occupation in year k) with less Monte Carlo noise than the shares) and ``share`` (the
  fraction of paths in each occupation), plus the first ``--show-paths`` sample paths;
* ``paths.csv``: dataset, person_id, sample, year, occupation (code), title;
* for a split: ``transitions.csv``, the Y-year transition matrix (origin: the last observed
  occupation; destination: the occupation Y years later, by ``probability``) overall and
  within each subgroup of the panel's education (last observed), sex, race, ethnicity and
  region (values that not every worker shares), with the number of workers per origin;
  ``transitions.png`` and ``transitions_by_subgroup.png``, heatmaps of the same.

Mesh: ``run_forecast(..., mesh=)`` restores the parameters straight into their shardings, places the
worker batches over the mesh's batch axes ``("data", "fsdp")`` and lets XLA propagate the
sharding through the sampler (rows stay worker-major, so a worker's samples share its shard);
tested for equal results on a small fake-device mesh.
Shape suffixes: W workers, S samples, Y years, J titles.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm import tqdm

from data_pipeline import resume as resume_lib
from data_pipeline.dataset_dir import DatasetDir
from data_pipeline.history import load_history
from data_pipeline.titles import TitleTable
from data_pipeline.tokenizer import ResumeTokenizer
from labor_jax import inference, scorer
from labor_jax.fileio import atomic_dir, check_replaceable
from labor_jax.sampler import sample_paths

FORECAST = "forecast.json"  # every forecast output holds it: an output directory holding it may be replaced
SUBGROUPS = ("education", "sex", "race", "ethnicity", "region")  # panel columns the transition matrix is split by


@dataclasses.dataclass(frozen=True)
class Worker:
  """One worker to forecast: the observed history and how future entries are opened."""
  resume: resume_lib.Resume  # the observed history, rendered as in training
  first_year: int  # the first future year
  education: str | None  # education written in every future entry (None: "1988:" entries)
  last_code: str  # the last observed occupation
  groups: dict  # subgroup column -> value (the last observed one)


def _value(v) -> str | None:
  return None if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)


def panel_workers(panel: pd.DataFrame, titles: TitleTable, variant: str, *, first_year: int | None = None,
                  education: str | None = None) -> list[Worker]:
  """The workers of a validated panel, each forecast from their whole history: future years start
  at ``first_year`` (default: the year after each worker's last entry) and carry ``education``
  (default: each worker's last education)."""
  resumes = resume_lib.render_panel(panel, titles, variant)
  cols = [c for c in SUBGROUPS if c in panel.columns]
  last = panel.groupby(["dataset", "person_id"], sort=False).last()  # last non-missing value per column
  out = []
  for r in resumes:
    row = last.loc[(r.dataset, r.person_id)]
    edu = _value(education if education is not None else row.get("education"))
    groups = {c: _value(row[c]) for c in cols if _value(row[c]) is not None}
    out.append(Worker(r, int(first_year if first_year is not None else r.entries[-1].year + 1), edu,
                      r.entries[-1].code, groups))
  return out


def encode_workers(tokenizer: ResumeTokenizer, workers: list[Worker], years: int) -> dict[str, np.ndarray]:
  """The sampler's per-worker inputs (see :func:`sample_paths`), padded to the longest prompt and prefix."""
  prompts = [tokenizer.encode_resume(w.resume.prompt(w.first_year, w.education)).ids for w in workers]
  prefixes = [[tokenizer.encode_piece(resume_lib.entry_prefix(w.first_year + k, w.education)) for k in range(1, years)]
              for w in workers]
  n = max(len(t) for t in prompts)
  p = max([len(x) for row in prefixes for x in row] or [1])
  out = {"tokens_BN": np.zeros((len(workers), n), np.int32), "mask_BN": np.zeros((len(workers), n), np.int32),
         "next_prefix_BYP": np.zeros((len(workers), years - 1, p), np.int32),
         "next_prefix_len_BY": np.zeros((len(workers), years - 1), np.int32)}
  for i, (t, row) in enumerate(zip(prompts, prefixes)):
    out["tokens_BN"][i, :len(t)], out["mask_BN"][i, :len(t)] = t, 1
    for k, x in enumerate(row):
      out["next_prefix_BYP"][i, k, :len(x)], out["next_prefix_len_BY"][i, k] = x, len(x)
  return out


def run_forecast(run_dir: str | Path, out_dir: str | Path, *, history: str | Path | None = None,
                 data_dir: str | Path | None = None, split: str = "test", years: int = 5, samples: int = 100,
                 seed: int = 0, education: str | None = None, batch_workers: int = 8, show_paths: int = 5,
                 step: int | str | None = "best", mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> dict:
  """Forecasts the worker of ``history`` (or every worker of ``split``), writes the outputs to
  ``out_dir`` (see the module docstring) and returns what ``forecast.json`` holds."""
  if years < 1 or samples < 1 or batch_workers < 1 or show_paths < 0:
    raise ValueError(f"--years ({years}), --samples ({samples}) and --batch-workers ({batch_workers}) must be >= 1, "
                     f"--show-paths ({show_paths}) >= 0")
  check_replaceable(out_dir, FORECAST, "forecast", jax.process_index() == 0)
  inference.check_batch(mesh, batch_workers, None)  # before the weights are read
  loaded = inference.open_model(run_dir, step=step, mesh=mesh)  # with a mesh: restored straight into its shardings
  data = DatasetDir(data_dir).check() if data_dir else loaded.dataset()
  titles = data.titles()
  if history is not None:
    panel, first_year, next_edu = load_history(history, titles, (data.datasets or ["worker"])[0])
    workers = panel_workers(panel, titles, data.variant, first_year=first_year,
                            education=education if education is not None else next_edu)
  else:
    panel = data.panel()
    panel = panel[panel["split"] == split]
    if panel.empty:
      raise ValueError(f"{data.path}: split {split!r} has no workers")
    workers = panel_workers(panel, titles, data.variant, education=education)
  tok, config, params = loaded.tokenizer, loaded.config, loaded.params
  tree = scorer.CandidateTree.for_titles(tok, titles, data.variant)
  inputs = encode_workers(tok, workers, years)
  longest = inputs["tokens_BN"].shape[1] + (years - 1) * (tree.tokens_JC.shape[1] + inputs["next_prefix_BYP"].shape[2])
  if longest > config.max_position_embeddings:
    print(f"warning: forecasts reach {longest} tokens, beyond the model's {config.max_position_embeddings} positions",
          file=sys.stderr)

  sampler = jax.jit(lambda params, tokens_BN, mask_BN, next_prefix_BYP, next_prefix_len_BY, keys_B: sample_paths(
      config, params, tree, tokens_BN, mask_BN, next_prefix_BYP, next_prefix_len_BY, samples, keys_B))
  batch_sharding = None
  if mesh is not None:
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  else:
    batch_workers = min(batch_workers, len(workers))  # a single history is one row block, not padded to 8
  root = jax.random.key(seed)
  titles_WSY, probs_WYJ = [], []
  for start in tqdm(range(0, len(workers), batch_workers), desc="forecast", unit="batch",
                    disable=not progress or len(workers) <= batch_workers, file=sys.stdout):
    idx = np.minimum(np.arange(start, start + batch_workers), len(workers) - 1)  # pad the last batch
    batch = {k: v[idx] for k, v in inputs.items()}
    batch["keys_B"] = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(idx))
    if batch_sharding is not None:
      batch = jax.device_put(batch, batch_sharding)
    f = sampler(params, **batch)
    real = min(batch_workers, len(workers) - start)
    titles_WSY.append(np.asarray(f.titles_BSY)[:real])
    probs_WYJ.append(np.asarray(f.probs_BSYJ).mean(axis=1)[:real])
  doc = {"run": loaded.source, "step": loaded.step, "data": str(data.path),
         "workers_from": str(history) if history is not None else f"split {split}", "seed": seed}
  titles_WSY, probs_WYJ = np.concatenate(titles_WSY), np.concatenate(probs_WYJ)
  doc.update(forecast_doc(workers, titles, titles_WSY, probs_WYJ, show_paths))
  # the directory appears whole (an earlier forecast there is replaced, never mixed with this one)
  with atomic_dir(out_dir, jax.process_index() == 0, marker=FORECAST, what="forecast") as tmp:
    if tmp is not None:
      write_outputs(tmp, workers, titles, titles_WSY, probs_WYJ, split_mode=history is None)
      (tmp / FORECAST).write_text(json.dumps(doc, indent=1) + "\n")
  return doc


def transition_table(workers: list[Worker], titles: TitleTable, dest_WJ: np.ndarray) -> pd.DataFrame:
  """The transition matrix (mean destination distribution per origin) overall and per subgroup value:
  one row per (group, value, origin, destination) with the probability and the origin's worker count."""
  index = titles.index
  origin_W = np.asarray([index[w.last_code] for w in workers])
  sets = [("all", "all", np.ones(len(workers), bool))]
  for col in SUBGROUPS:
    values = [w.groups.get(col) for w in workers]
    for v in sorted({x for x in values if x is not None}, key=str):
      in_group = np.asarray([x == v for x in values])
      if not in_group.all():  # a value every worker shares (sex in an all-male panel) splits nothing
        sets.append((col, v, in_group))
  j = len(titles)
  rows = []
  for group, value, in_group in sets:
    counts = np.bincount(origin_W[in_group], minlength=j)
    sums = np.zeros((j, j))
    np.add.at(sums, origin_W[in_group], dest_WJ[in_group])
    for o in np.flatnonzero(counts):
      for d in range(j):
        rows.append((group, value, titles.codes[o], titles.titles[o], titles.codes[d], titles.titles[d],
                     sums[o, d] / counts[o], int(counts[o])))
  return pd.DataFrame(rows, columns=["group", "value", "origin", "origin_title", "destination", "destination_title",
                                     "probability", "workers"])


def write_outputs(out: Path, workers: list[Worker], titles: TitleTable, titles_WSY: np.ndarray, probs_WYJ: np.ndarray,
                  *, split_mode: bool) -> None:
  """Writes ``paths.csv`` and, for a split, the transition files into ``out``."""
  names = np.asarray(titles.titles, dtype=object)
  w_idx, s_idx, y_idx = np.indices(titles_WSY.shape).reshape(3, -1)
  occ = titles_WSY.reshape(-1)
  pd.DataFrame({"dataset": [workers[i].resume.dataset for i in w_idx],
                "person_id": [workers[i].resume.person_id for i in w_idx], "sample": s_idx,
                "year": np.asarray([w.first_year for w in workers])[w_idx] + y_idx,
                "occupation": np.asarray(titles.codes, dtype=object)[occ], "title": names[occ]}).to_csv(
                    out / "paths.csv", index=False)
  if split_mode:
    table = transition_table(workers, titles, probs_WYJ[:, -1])
    table.to_csv(out / "transitions.csv", index=False)
    plot_transitions(out, table, titles, titles_WSY.shape[2])


def forecast_doc(workers: list[Worker], titles: TitleTable, titles_WSY: np.ndarray, probs_WYJ: np.ndarray,
                  show_paths: int) -> dict:
  """forecast.json's per-worker part: each year's mean probability and share of paths per title."""
  s, y = titles_WSY.shape[1:]
  j = len(titles)
  names = np.asarray(titles.titles, dtype=object)
  doc = {"years": y, "samples": s, "workers": []}
  for w, paths_SY, probs_YJ in zip(workers, titles_WSY, probs_WYJ):
    shares_YJ = np.stack([np.bincount(paths_SY[:, k], minlength=j) / s for k in range(y)])
    per_year = []
    for k in range(y):
      order = np.argsort(-probs_YJ[k], kind="stable")
      per_year.append({"year": w.first_year + k, "education": w.education,
                       "probability": {names[i]: round(float(probs_YJ[k, i]), 6) for i in order},
                       "share": {names[i]: round(float(shares_YJ[k, i]), 6) for i in order if shares_YJ[k, i] > 0}})
    doc["workers"].append({"dataset": w.resume.dataset, "person_id": w.resume.person_id,
                           "last_year": w.resume.entries[-1].year, "last_occupation": titles.title(w.last_code),
                           "forecast": per_year, "sample_paths": [list(names[p]) for p in paths_SY[:show_paths]]})
  return doc


def plot_transitions(out: Path, table: pd.DataFrame, titles: TitleTable, years: int) -> None:
  """``transitions.png`` (overall) and ``transitions_by_subgroup.png`` (one panel per subgroup value)."""
  import matplotlib  # the Agg backend is chosen for this process only when plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  j = len(titles)
  labels = [t if len(t) <= 28 else t[:27] + "…" for t in titles.titles]

  def draw(ax, part, title, ticks):
    m = np.full((j, j), np.nan)
    m[[titles.index[c] for c in part["origin"]], [titles.index[c] for c in part["destination"]]] = part["probability"]
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_title(title, fontsize=8)
    if ticks and j <= 30:
      ax.set_xticks(range(j), labels, rotation=90, fontsize=6)
      ax.set_yticks(range(j), labels, fontsize=6)
    else:
      ax.set_xticks([])
      ax.set_yticks([])
    if j <= 12:
      for o, d in zip(*np.nonzero(np.isfinite(m))):
        ax.text(d, o, f"{m[o, d]:.2f}", ha="center", va="center", fontsize=5,
                color="white" if m[o, d] < 0.5 else "black")
    return im

  overall = table[table["group"] == "all"]
  fig, ax = plt.subplots(figsize=(7, 6.5))
  im = draw(ax, overall, f"{years}-year transition matrix (blank rows: no worker)", True)
  ax.set_xlabel(f"occupation {years} years later")
  ax.set_ylabel("last observed occupation")
  fig.colorbar(im, ax=ax, shrink=0.8)
  fig.tight_layout()
  fig.savefig(out / "transitions.png", dpi=110)
  plt.close(fig)

  groups = table[table["group"] != "all"][["group", "value"]].drop_duplicates()
  n = max(len(groups), 1)
  cols = min(4, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
  for ax, (_, g) in zip(axes.flat, groups.iterrows()):
    part = table[(table["group"] == g["group"]) & (table["value"] == g["value"])]
    draw(ax, part, f"{g['group']} = {g['value']} ({part.drop_duplicates('origin')['workers'].sum()} workers)", False)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  fig.suptitle(f"{years}-year transition matrices by subgroup (rows: last occupation, columns: {years} years later)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(out / "transitions_by_subgroup.png", dpi=110)
  plt.close(fig)
