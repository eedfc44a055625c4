"""Career forecasts: S sampled future paths of Y years per worker, continued from a key/value cache.

:func:`sample_paths` is a pure JAX function (jit it with ``config``, ``tree`` and ``samples``
closed over). Per worker it

1. encodes the prompt (the resume with the first future entry opened, as
   :meth:`data_pipeline.resume.Resume.prompt` renders it) once, scores every title from the
   cache (:func:`labor_jax.scorer.score_from_cache`), renormalises over the titles and draws
   year 1 for all S samples; then copies the cache S times (samples are a batch axis:
   row r = b * S + s);
2. per year after the first, per row:
   appends the sampled title's tokens, the entry terminator and the next entry's prefix
   (``"1983 (some college):"``) to the cache with one ``model.forward(prefix=...)`` call,
   written in place into a cache preallocated for all Y years (:func:`append`), then scores
   every title from the cache and draws the year's title; years 2 .. Y run in a ``lax.scan``.

The appended tokens are exactly those of the re-rendered, re-tokenised resume of the sampled
history (tested), so the model sees nothing it would not see in training. Every row's cache is
kept contiguous: row r's first ``length_R[r]`` slots are its tokens in order, and each append
writes at the row's own length, so padding is overwritten by the next append and never attended to.

The command line (:func:`main`, ``python -m labor_jax.forecast``) is a thin layer over
:func:`run_forecast`, which renders the workers of a history file or of a dataset split, batches
them, runs the sampler and writes the outputs (:func:`write_outputs`)::

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

Mesh: ``run_forecast(..., mesh=)`` restores the parameters straight into ``model.param_shardings`` (``RunDir.load_model(mesh=)``), places the
worker batches over the mesh's batch axes ``("data", "fsdp")`` and lets XLA propagate the
sharding through the sampler (rows stay worker-major, so a worker's samples share its shard).
It is a hook, tested for equal results on a small fake-device mesh only; the scorer's own mesh
support is separate work.

Shape suffixes: B workers, S samples per worker, R = B * S rows, N prompt tokens, M cache slots,
W tokens appended per year (longest candidate + longest entry prefix), P entry-prefix tokens,
Y future years, J titles, C a candidate's tokens, D hidden size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm import tqdm

from data_pipeline import resume as resume_lib
from data_pipeline.dataset_dir import DatasetDir
from data_pipeline.errors import PanelError
from data_pipeline.history import load_history
from data_pipeline.titles import TitleTable
from data_pipeline.tokenizer import ResumeTokenizer
from labor_jax import model, runtime, scorer
from labor_jax.config import LlamaConfig
from labor_jax.rundir import RunDir

SUBGROUPS = ("education", "sex", "race", "ethnicity", "region")  # panel columns the transition matrix is split by


class Cache(NamedTuple):
  """Per row: keys/values of its tokens so far, how many there are, and the final normed hidden
  state of the last one (it predicts the next title's first token)."""
  kv: tuple  # model.KV per layer, [R, M, K, E] each; slots >= length_R[r] are unused
  length_R: jax.Array  # int32 [R]
  hidden_RD: jax.Array  # [R, D]


class Forecast(NamedTuple):
  titles_BSY: jax.Array  # int32: the title sampled for worker b, sample s, future year y
  probs_BSYJ: jax.Array  # float32: the model's distribution over titles at year y given sample s's path before y


def init_cache(config: LlamaConfig, params: Any, tokens_BN: jax.Array, mask_BN: jax.Array, capacity: int) -> Cache:
  """Encodes right-padded prompts once, into caches of ``capacity`` slots per row."""
  b, n = tokens_BN.shape
  if capacity < n:
    raise ValueError(f"capacity {capacity} is below the prompt width {n}")
  x_BND, kv = scorer.encode(config, params, tokens_BN, mask_BN)
  length_B = jnp.sum(mask_BN, axis=1).astype(jnp.int32)
  grow = lambda x_BNKE: jnp.pad(x_BNKE, ((0, 0), (0, capacity - n), (0, 0), (0, 0)))  # noqa: E731
  return Cache(tuple(model.KV(grow(layer.k), grow(layer.v)) for layer in kv), length_B,
               x_BND[jnp.arange(b), length_B - 1])


def append(config: LlamaConfig, params: Any, cache: Cache, tokens_RW: jax.Array, count_R: jax.Array) -> Cache:
  """The cache with the first ``count_R[r]`` (>= 1) tokens of ``tokens_RW[r]`` appended to row r.

  One forward pass over the W new tokens against the cached ones, at positions
  ``length_R + 0, 1, ...`` (what re-encoding the whole text would give); their keys/values are
  written at each row's length. The caller keeps ``length_R + W`` within the capacity."""
  r, w = tokens_RW.shape
  m = cache.kv[0].k.shape[1]
  mask_RW = jnp.arange(w)[None, :] < count_R[:, None]
  positions_RW = cache.length_R[:, None] + jnp.arange(w)[None, :]
  prefix_mask_RM = jnp.arange(m)[None, :] < cache.length_R[:, None]
  x_RWD, new = model.forward(config, params, tokens_RW, mask_BT=mask_RW, positions_BT=positions_RW,
                             prefix=cache.kv, prefix_mask_BS=prefix_mask_RM, return_kv=True, return_hidden=True)
  write = jax.vmap(lambda old, upd, at: jax.lax.dynamic_update_slice_in_dim(old, upd.astype(old.dtype), at, axis=0))
  kv = tuple(model.KV(write(old.k, upd.k, cache.length_R), write(old.v, upd.v, cache.length_R))
             for old, upd in zip(cache.kv, new))
  return Cache(kv, cache.length_R + count_R, x_RWD[jnp.arange(r), count_R - 1])


def next_logprobs(config: LlamaConfig, params: Any, tree: scorer.CandidateTree, cache: Cache) -> jax.Array:
  """log P(title j is each row's next entry), renormalised over the titles: [R, J]."""
  return scorer.score_from_cache(config, params, tree, cache.kv, cache.hidden_RD[:, None], cache.length_R[:, None],
                                 normalize=True)[:, 0]


def continuation(tree: scorer.CandidateTree, j_R: jax.Array, prefix_RP: jax.Array, prefix_len_R: jax.Array):
  """(tokens [R, W], count [R]) appended after sampling title ``j_R``: the title's candidate tokens (title +
  entry terminator) then the next entry's prefix tokens; W = longest candidate + P."""
  tokens_JC = jnp.asarray(tree.tokens_JC)
  c, p = tokens_JC.shape[1], prefix_RP.shape[1]
  len_R = jnp.asarray(tree.lengths_J)[j_R]
  i_W = jnp.arange(c + p)
  title_RW = jnp.pad(tokens_JC[j_R], ((0, 0), (0, p)))
  prefix_RW = jnp.take_along_axis(prefix_RP, jnp.clip(i_W[None] - len_R[:, None], 0, p - 1), axis=1)
  count_R = len_R + prefix_len_R
  tokens_RW = jnp.where(i_W[None] < len_R[:, None], title_RW, prefix_RW)
  return jnp.where(i_W[None] < count_R[:, None], tokens_RW, 0), count_R


def sample_paths(config: LlamaConfig, params: Any, tree: scorer.CandidateTree, tokens_BN: jax.Array,
                 mask_BN: jax.Array, next_prefix_BYP: jax.Array, next_prefix_len_BY: jax.Array, samples: int,
                 rng: jax.Array) -> Forecast:
  """Samples ``samples`` future paths of Y = ``next_prefix_BYP.shape[1] + 1`` years per worker.

  Args:
    config, params, tree: the model and the titles' candidate tree (:class:`labor_jax.scorer.CandidateTree`).
    tokens_BN, mask_BN: right-padded prompts, each ending with the first future entry opened
      (``tokenizer.encode_resume(resume.prompt(year, education)).ids``).
    next_prefix_BYP, next_prefix_len_BY: the tokens (right padded) of the entry prefixes of future
      years 2 .. Y (``tokenizer.encode_piece(resume.entry_prefix(year, education))``), Y - 1 per worker.
      They do not depend on the sampled titles, so the host computes them.
    samples: S, paths per worker (a static batch axis).
    rng: a typed key (``jax.random.key``), or one per worker ([B]) so that a worker's paths do not
      depend on which other workers share its batch.

  Returns a :class:`Forecast`. The cache holds N + (Y - 1) * W slots per row.
  """
  tokens_BN = jnp.asarray(tokens_BN)
  b, n = tokens_BN.shape
  y = next_prefix_BYP.shape[1] + 1
  keys_B = rng if rng.shape == (b,) else jax.random.split(rng, b)
  keys_YB = jax.vmap(lambda k: jax.random.split(k, y), out_axes=1)(keys_B)
  w = tree.tokens_JC.shape[1] + next_prefix_BYP.shape[2]
  cache = init_cache(config, params, tokens_BN, mask_BN, n + (y - 1) * w)
  # Year 1: one distribution per worker (its S rows would share one cache), S draws from it.
  logp_BJ = next_logprobs(config, params, tree, cache)
  j_BS = jax.vmap(lambda k, logp_J: jax.random.categorical(k, logp_J, shape=(samples,)))(keys_YB[0], logp_BJ)
  p_BSJ = jnp.broadcast_to(jnp.exp(logp_BJ)[:, None], (b, samples, logp_BJ.shape[1]))
  if y == 1:
    return Forecast(j_BS[:, :, None].astype(jnp.int32), p_BSJ[:, :, None])
  cache = jax.tree.map(lambda x: jnp.repeat(x, samples, axis=0), cache)  # rows r = b * S + s

  def year(carry, xs):
    cache, j_BS = carry
    keys_B, prefix_BP, prefix_len_B = xs
    tokens_RW, count_R = continuation(tree, j_BS.reshape(-1), jnp.repeat(prefix_BP, samples, axis=0),
                                      jnp.repeat(prefix_len_B, samples))
    cache = append(config, params, cache, tokens_RW, count_R)
    logp_BSJ = next_logprobs(config, params, tree, cache).reshape(b, samples, -1)
    j_BS = jax.vmap(lambda k, logp_SJ: jax.random.categorical(k, logp_SJ, axis=-1))(keys_B, logp_BSJ)
    return (cache, j_BS), (j_BS, jnp.exp(logp_BSJ))

  _, (j_YBS, p_YBSJ) = jax.lax.scan(year, (cache, j_BS), (keys_YB[1:], jnp.swapaxes(next_prefix_BYP, 0, 1),
                                                         jnp.swapaxes(next_prefix_len_BY, 0, 1)))
  j_YBS = jnp.concatenate([j_BS[None], j_YBS], axis=0).astype(jnp.int32)
  p_YBSJ = jnp.concatenate([p_BSJ[None], p_YBSJ], axis=0)
  return Forecast(jnp.transpose(j_YBS, (1, 2, 0)), jnp.transpose(p_YBSJ, (1, 2, 0, 3)))


# ----------------------------------------------------------------------------- host side


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
  if years < 1 or samples < 1 or batch_workers < 1:
    raise ValueError(f"--years ({years}), --samples ({samples}) and --batch-workers ({batch_workers}) must be >= 1")
  run = RunDir(run_dir).check()
  data = DatasetDir(data_dir).check() if data_dir else run.dataset()
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
  if mesh is not None and batch_workers % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"--batch-workers {batch_workers} does not divide over the mesh's data x fsdp = "
                     f"{mesh.shape['data'] * mesh.shape['fsdp']} devices")
  tok = run.tokenizer()
  config, params, step = run.load_model(step, mesh=mesh)  # with a mesh: restored straight into its shardings
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
  doc = {"run": str(run.path), "step": int(step), "data": str(data.path),
         "workers_from": str(history) if history is not None else f"split {split}", "seed": seed}
  doc.update(write_outputs(Path(out_dir), workers, titles, np.concatenate(titles_WSY), np.concatenate(probs_WYJ),
                           show_paths=show_paths, split_mode=history is None))
  (Path(out_dir) / "forecast.json").write_text(json.dumps(doc, indent=1) + "\n")
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
                  *, show_paths: int, split_mode: bool) -> dict:
  """Writes ``paths.csv`` and, for a split, the transition files; returns the ``forecast.json`` content."""
  out.mkdir(parents=True, exist_ok=True)
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
    plot_transitions(out, table, titles, y)
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


def main(argv=None) -> int:
  runtime.tune_malloc()  # before JAX's first computation starts its CPU thread pools
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="run directory of labor_jax.train")
  ap.add_argument("--history", help="one worker's history (JSON or panel CSV, as labor_jax.predict reads it)")
  ap.add_argument("--data", help="dataset directory (titles, and the split's workers); default: the run's own")
  ap.add_argument("--split", default="test", choices=("train", "validation", "test"),
                  help="without --history: forecast every worker of this split")
  ap.add_argument("--years", type=int, default=5, help="future years per path (Y)")
  ap.add_argument("--samples", type=int, default=100, help="sampled paths per worker (S)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--education", help="education written in every future entry (default: carried forward)")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--batch-workers", type=int, default=8, help="workers per sampler call (each with S rows)")
  ap.add_argument("--show-paths", type=int, default=5, help="sample paths per worker in forecast.json")
  ap.add_argument("--step", default="best", help='checkpoint step, "best" or "latest"')
  args = ap.parse_args(argv)
  step = None if args.step == "latest" else (int(args.step) if args.step.isdigit() else args.step)
  try:
    doc = run_forecast(args.run, args.out, history=args.history, data_dir=args.data, split=args.split,
                       years=args.years, samples=args.samples, seed=args.seed, education=args.education,
                       batch_workers=args.batch_workers, show_paths=args.show_paths, step=step)
  except (PanelError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.history:
    for year in doc["workers"][0]["forecast"]:
      top = list(year["probability"].items())[:3]
      print(f"{year['year']}: " + "; ".join(f"{t} {p:.3f}" for t, p in top))
  print(f"{len(doc['workers'])} worker(s), {args.samples} paths of {args.years} years each: {Path(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
