"""A CAREER-style baseline (Vafa et al. 2024) in JAX: a transformer over occupation tokens.

Each year of a career is one position whose input is the sum of embeddings of the
previous occupation (or a start token) and of each covariate the multinomial logit uses
(:func:`labor_jax.baselines.covariate_features`: year, years of history, education,
demographics, birth cohort). A causal transformer
(Flax ``MultiHeadDotProductAttention`` blocks) reads the sequence; the two-stage head
predicts P(move | history) with a sigmoid and, given a move, the destination with a
softmax that excludes the current occupation (CAREER's stay/move factorisation):

  P(occ_t = j) = (1 - m)  if j == occ_{t-1},   m * softmax_{j != occ_{t-1}}(z)_j  otherwise.

Trained from scratch on the train split with AdamW, early-stopped on validation loss.
Shape suffixes: B careers, T entries, F covariates, D model width, J occupations.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from data_pipeline.panel import entry_table
from labor_jax.baselines import covariate_features, informative


@dataclasses.dataclass(frozen=True)
class CareerConfig:
  d_model: int = 64  # embedding width
  layers: int = 2  # transformer blocks
  heads: int = 4  # attention heads
  dropout: float = 0.1  # residual / embedding dropout
  lr: float = 3e-3  # AdamW peak learning rate
  weight_decay: float = 0.01  # AdamW weight decay
  epochs: int = 60  # passes over the training careers (early-stopped)
  batch: int = 64  # careers per step
  seed: int = 0  # init and shuffling


class Block(nn.Module):
  cfg: CareerConfig

  @nn.compact
  def __call__(self, x_BTD, mask_BTT, train: bool):
    h = nn.LayerNorm()(x_BTD)
    h = nn.MultiHeadDotProductAttention(num_heads=self.cfg.heads, dropout_rate=self.cfg.dropout,
                                        deterministic=not train)(h, h, mask=mask_BTT[:, None])
    x_BTD = x_BTD + nn.Dropout(self.cfg.dropout, deterministic=not train)(h)
    h = nn.Dense(4 * self.cfg.d_model)(nn.LayerNorm()(x_BTD))
    h = nn.Dense(self.cfg.d_model)(nn.gelu(h))
    return x_BTD + nn.Dropout(self.cfg.dropout, deterministic=not train)(h)


class CareerModel(nn.Module):
  cfg: CareerConfig
  num_occ: int
  features: tuple[str, ...]  # covariate names, in feats_BTF order
  vocab_sizes: tuple[int, ...]  # levels of each covariate

  @nn.compact
  def __call__(self, prev_BT, feats_BTF, valid_BT, train: bool = False):
    d = self.cfg.d_model
    x = nn.Embed(self.num_occ + 1, d, name="occ_embed")(prev_BT)  # index num_occ = start token
    for i, (name, n) in enumerate(zip(self.features, self.vocab_sizes)):
      x = x + nn.Embed(n, d, name=f"{name}_embed")(feats_BTF[..., i])
    x = nn.Dropout(self.cfg.dropout, deterministic=not train)(x)
    t = prev_BT.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid_BT[:, None, :].astype(bool)
    for _ in range(self.cfg.layers):
      x = Block(self.cfg)(x, mask, train)
    x = nn.LayerNorm()(x)
    move_logit = nn.Dense(1, name="move_head")(x)[..., 0]
    dest_logits = nn.Dense(self.num_occ, name="dest_head")(x)
    return move_logit, dest_logits


def two_stage_logprobs(move_logit_BT, dest_BTJ, prev_BT, num_occ: int):
  """log P(occ = j) under the stay/move factorisation; at the first entry (no previous job) the
  destination softmax alone."""
  has_prev = prev_BT < num_occ
  stay_J = jax.nn.one_hot(jnp.where(has_prev, prev_BT, 0), num_occ, dtype=bool) & has_prev[..., None]
  log_dest = jax.nn.log_softmax(jnp.where(stay_J, -1e9, dest_BTJ), axis=-1)
  log_move = jax.nn.log_sigmoid(move_logit_BT)[..., None]
  log_stay = jax.nn.log_sigmoid(-move_logit_BT)[..., None]
  two_stage = jnp.where(stay_J, log_stay, log_move + log_dest)
  return jnp.where(has_prev[..., None], two_stage, jax.nn.log_softmax(dest_BTJ, axis=-1))


class CareerBaseline:
  """Fits on whole careers; predicts the transition rows of :func:`baselines.transition_table`."""
  name = "CAREER-style transformer"

  def __init__(self, cfg: CareerConfig = CareerConfig()):
    self.cfg = cfg

  def _encode(self, panel: pd.DataFrame, fit: bool = False):
    e = entry_table(panel)
    cols = covariate_features(e)
    if fit:
      self.levels = {k: ["<unk>"] + v for k, v in informative(cols).items()}
    names = tuple(self.levels)
    feats = np.stack([np.maximum(pd.Categorical(cols[k], categories=self.levels[k]).codes, 0) for k in names], -1)
    occ = e["occupation"].map(self.index).to_numpy()
    starts = np.flatnonzero(e["t"].to_numpy() == 0)
    ends = np.r_[starts[1:], len(e)]
    tmax = int((ends - starts).max())
    n = len(starts)
    occ_BT = np.zeros((n, tmax), np.int32)
    prev_BT = np.full((n, tmax), self.j, np.int32)
    feats_BTF = np.zeros((n, tmax, len(names)), np.int32)
    valid_BT = np.zeros((n, tmax), bool)
    for i, (s, f) in enumerate(zip(starts, ends)):
      occ_BT[i, :f - s] = occ[s:f]
      prev_BT[i, 1:f - s] = occ[s:f - 1]
      feats_BTF[i, :f - s] = feats[s:f]
      valid_BT[i, :f - s] = True
    people = list(zip(e["dataset"].to_numpy()[starts], e["person_id"].to_numpy()[starts]))
    return occ_BT, prev_BT, feats_BTF, valid_BT, people

  def fit(self, panel: pd.DataFrame, titles_index: dict[str, int], log=lambda *a: None):
    self.index, self.j = titles_index, len(titles_index)
    train = self._encode(panel[panel["split"] == "train"], fit=True)
    valid = self._encode(panel[panel["split"] == "validation"])
    self.model = CareerModel(self.cfg, self.j, tuple(self.levels), tuple(len(v) for v in self.levels.values()))
    rng = jax.random.key(self.cfg.seed)
    params = self.model.init(rng, train[1][:1], train[2][:1], train[3][:1])["params"]
    steps_per_epoch = max(1, len(train[0]) // self.cfg.batch)
    opt = optax.adamw(optax.cosine_onecycle_schedule(self.cfg.epochs * steps_per_epoch, self.cfg.lr),
                      weight_decay=self.cfg.weight_decay)
    state = opt.init(params)

    def nll(params, batch, rng, train):
      occ, prev, feats, valid = batch
      move, dest = self.model.apply({"params": params}, prev, feats, valid, train,
                                    rngs={"dropout": rng} if train else None)
      lp = two_stage_logprobs(move, dest, prev, self.j)
      # Transitions (entries after the first) are what every model is scored on; the first
      # entry still trains the destination head.
      picked = jnp.take_along_axis(lp, occ[..., None], -1)[..., 0]
      return -(picked * valid).sum() / valid.sum()

    @jax.jit
    def step(params, state, batch, rng):
      loss, g = jax.value_and_grad(nll)(params, batch, rng, True)
      upd, state = opt.update(g, state, params)
      return optax.apply_updates(params, upd), state, loss

    eval_nll = jax.jit(lambda p, b: nll(p, b, None, False))
    best = (np.inf, params)
    order = np.random.default_rng(self.cfg.seed)
    bad = 0
    for epoch in range(self.cfg.epochs):
      perm = order.permutation(len(train[0]))
      for i in range(steps_per_epoch):
        idx = perm[i * self.cfg.batch:(i + 1) * self.cfg.batch]
        rng, sub = jax.random.split(rng)
        params, state, _ = step(params, state, tuple(x[idx] for x in train[:4]), sub)
      v = float(eval_nll(params, valid[:4]))
      if v < best[0]:
        best, bad = (v, params), 0
      else:
        bad += 1
        if bad >= 10:
          break
    log(f"CAREER baseline: best validation NLL {best[0]:.4f} after {epoch + 1} epochs")
    self.params = best[1]
    return self

  def predict_panel(self, panel: pd.DataFrame) -> tuple[np.ndarray, list]:
    """log-probs [workers, T, J] for every entry of every worker in ``panel`` and the worker keys."""
    occ, prev, feats, valid, people = self._encode(panel)
    move, dest = self.model.apply({"params": self.params}, prev, feats, valid, False)
    return np.asarray(two_stage_logprobs(move, dest, prev, self.j)), people

  def predict(self, table: pd.DataFrame, panel: pd.DataFrame) -> np.ndarray:
    """Probabilities for the rows of a transition table (entries t >= 1) drawn from ``panel``."""
    lp, people = self.predict_panel(panel)
    where = {k: i for i, k in enumerate(people)}
    rows = np.asarray([where[(d, p)] for d, p in zip(table["dataset"], table["person_id"])])
    return np.exp(lp[rows, table["t"].to_numpy()])
