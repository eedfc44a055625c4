"""The one door to a model for scoring: open any source, build the scoring step once.

:func:`open_model` takes any model source and returns a :class:`Loaded` (config, parameters
placed on the mesh, tokenizer, what was loaded):

* a ``labor_jax.train`` run directory, at its best checkpoint (``step="best"``, by the run's
  ``eval_metric``), its newest (``"last"``) or step N; the run's own tokenizer and dataset;
* a Hugging Face checkpoint directory (config.json + safetensors), optionally with a PEFT LoRA
  ``adapter`` directory on top;
* a GGUF file (``*.gguf``), converted once into a cached Hugging Face directory
  (:func:`labor_jax.interop.gguf.resolve`).

With a ``mesh`` every parameter is restored straight into its sharding (never gathered on one
host). A vocabulary that the mesh's tensor axis does not divide is padded to the next multiple
(as Levanter and MaxText do): the embedding rows and head columns past ``vocab_size`` are
zeros, and the model and the scorer give their logits -inf, so padded rows never receive
probability.

:func:`scoring_step` builds the jitted scoring step (:func:`labor_jax.scorer.score` on a batch of
resumes, log-probabilities renormalised over the titles and raw) once per model, titles, mesh
and chunk in a process; evaluation, prediction, the Python API (:mod:`labor_jax.api`),
validation during training and the memory planner all use it. :func:`score_examples` runs it
over any number of tokenised resumes in fixed-shape batches. :func:`batch_size` is the number
of devices a batch is split over (the mesh's ``data`` x ``fsdp``).

Shape suffixes: B workers per batch, N tokens, T entries, J titles.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from data_pipeline import resume
from data_pipeline.dataset_dir import DatasetDir
from data_pipeline.titles import TitleTable
from data_pipeline.tokenizer import ResumeTokenizer
from labor_jax import labels, losses, model, scorer, sharding
from labor_jax.config import ConfigError, LlamaConfig
from labor_jax.interop import hf, peft
from labor_jax.rundir import RunDir

LARGE_MODEL = 1e9  # parameters above which the tree pass runs one worker per batch device at a time
RUN, HF, GGUF = "run", "hf", "gguf"  # the kinds of model source
STEPS = ("best", "last", "latest")  # named checkpoints of a run ("latest" = "last"), or an int step


def batch_size(mesh: Mesh | None) -> int:
  """Devices a batch of workers is split over: the mesh's ``data`` x ``fsdp`` (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def source_kind(source: str | os.PathLike) -> str:
  """Which kind of model ``source`` is (RUN, HF or GGUF); FileNotFoundError when none."""
  path = Path(source)
  if path.suffix.lower() == ".gguf":
    if not path.is_file():
      raise FileNotFoundError(f"{source}: no such GGUF file")
    return GGUF
  if RunDir(source).is_run:
    return RUN
  if (path / "config.json").exists():
    return HF
  raise FileNotFoundError(f"{source}: neither a labor_jax.train run (model_config.json), a Hugging Face "
                          "checkpoint (config.json) nor a .gguf file")


def source_dtype(source: str | os.PathLike, dtype: str | None) -> str | None:
  """The ``dtype`` :func:`open_model` takes for ``source``: ``dtype`` for a Hugging Face or GGUF model, None for a
  run (which computes in its own ``model.dtype``), so that one setting applies to a mix of both."""
  return None if source_kind(source) == RUN else dtype


class TokenizerMismatch(ConfigError):
  """A dataset whose tokens another tokenizer made than the model's (:func:`check_dataset`)."""


def source_tokenizer(source: str | os.PathLike) -> ResumeTokenizer:
  """The tokenizer of a run, Hugging Face directory or GGUF file, without reading a weight of a run or a Hugging Face
  directory (a GGUF file not converted yet is converted whole, once, into the cache that scoring it reads)."""
  if source_kind(source) == RUN:
    return RunDir(source).tokenizer()
  return ResumeTokenizer.from_dir(hf_dir(source))


def check_dataset(source: str | os.PathLike, data: DatasetDir, tokenizer: ResumeTokenizer | None = None) -> None:
  """Stops (one line) when ``data``'s tokens were not made by the tokenizer of ``source`` (``tokenizer``: that
  tokenizer, when it is already open); cheap, so callers check every model before scoring the first."""
  mine = tokenizer or source_tokenizer(source)
  probe = "\n1984 (some college): Clerical and kindred workers\n<END OF DATA>"
  theirs = data.tokenizer()
  if mine.vocab_size != theirs.vocab_size or mine.encode_piece(probe) != theirs.encode_piece(probe):
    run = source_kind(source) == RUN
    own = RunDir(source).tokenizer_dir if run else source  # what data_pipeline.build reads
    raise TokenizerMismatch(f"{data.path} was tokenised with another tokenizer than {source}'s: rebuild it with "
                            f"python -m data_pipeline.build --tokenizer-dir {own}"
                            + (" (or leave out --data: the run's own dataset)" if run else ""))


def hf_dir(source: str | os.PathLike) -> Path:
  """The Hugging Face directory of an HF or GGUF source (a GGUF file is converted once, cached)."""
  if source_kind(source) == GGUF:
    from labor_jax.interop import gguf  # the GGUF reader loads only for GGUF sources
    return gguf.resolve(source)
  return Path(source)


def model_config(source: str | os.PathLike) -> LlamaConfig:
  """The architecture of ``source`` without reading a weight (for choosing a mesh)."""
  if source_kind(source) == RUN:
    return RunDir(source).model_config()
  return LlamaConfig.from_hf_file(hf_dir(source) / "config.json")


def default_chunk(config: LlamaConfig, mesh: Mesh | None, batch_workers: int) -> int:
  """Workers per tree pass when none is given: the whole batch for small models (fastest), one
  worker per device of the batch axes for large ones (the least memory; the scoring plans in
  docs/training.md size Llama-2-7B this way)."""
  if config.num_params() < LARGE_MODEL:
    return batch_workers
  return batch_size(mesh)


# ---------------------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Loaded:
  """A model ready to score: what :func:`open_model` returns."""
  config: LlamaConfig  # the architecture (with padded_vocab_size when the mesh needed it)
  params: Any  # parameters on ``mesh`` (or the first local device)
  tokenizer: ResumeTokenizer  # the model's tokenizer
  source: str  # what was opened
  kind: str  # RUN, HF or GGUF
  description: str  # one line: which checkpoint, adapter, conversion
  mesh: Mesh | None = None  # where the parameters live
  step: int | None = None  # the checkpoint step of a run

  @property
  def run(self) -> RunDir | None:
    return RunDir(self.source) if self.kind == RUN else None

  def dataset(self) -> DatasetDir:
    """The dataset a run trained on (ConfigError for other sources: they need one named)."""
    if self.kind != RUN:
      raise ConfigError(f"{self.source}: a {'Hugging Face' if self.kind == HF else 'GGUF'} model needs a dataset "
                        "directory (--data)")
    return self.run.dataset()

  def check_dataset(self, data: DatasetDir) -> None:
    """Stops (one line) when ``data``'s tokens were not made by this model's tokenizer."""
    check_dataset(self.source, data, self.tokenizer)

  def candidates(self, titles: TitleTable, variant: str = "titles") -> tuple[tuple[int, ...], ...]:
    """The titles' candidate tokens (title segment + entry terminator) under this model's tokenizer."""
    return tuple(map(tuple, self.tokenizer.candidate_tokens(resume.candidate_texts(titles, variant))))



def open_model(source: str | os.PathLike, *, step: int | str | None = None, adapter: str | os.PathLike | None = None,
               mesh: Mesh | None = None, rules: sharding.Rules = sharding.DEFAULT_RULES,
               dtype: str | None = None) -> Loaded:
  """Opens a run directory, a Hugging Face directory (+ PEFT ``adapter``) or a GGUF file.

  ``step``: for a run, "best" (the default: lowest value of its ``eval_metric``), "last" or an int.
  ``dtype``: the compute dtype of a Hugging Face or GGUF source ("float32", "bfloat16", or "auto":
  :func:`labor_jax.runtime.auto_dtype`; default float32); a run computes in its own ``model.dtype``.
  With ``mesh`` the parameters are restored straight into their shardings under ``rules``; a
  vocabulary the mesh does not divide is padded (see the module docstring).
  """
  source = str(source)
  kind = source_kind(source)
  pad_to = _padded_rows(model_config(source).vocab_size, mesh, rules)
  load_rules = rules if pad_to is None else tuple((k, None if k == "vocab" else v) for k, v in rules)
  if kind == RUN:
    if adapter is not None:
      raise ConfigError(f"{source}: --adapter applies to Hugging Face checkpoints; a run carries its own adapters")
    if dtype is not None:
      raise ConfigError(f"{source}: a run computes in its own model.dtype; dtype applies to Hugging Face sources")
    step = "best" if step is None else step
    if isinstance(step, bool) or (step not in STEPS and not isinstance(step, numbers.Integral)):
      raise ConfigError(f"step must be 'best', 'last' or an integer, got {step!r}")
    step = step if step in STEPS else int(step)  # numpy integers too
    run = RunDir(source)
    config, params, step = run.load_model(None if step in ("last", "latest") else step, mesh=mesh, rules=load_rules)
    tokenizer, what = run.tokenizer(), f"step {step}"
  else:
    if step is not None:
      raise ConfigError(f"{source}: a checkpoint step applies to labor_jax.train runs only")
    directory = hf_dir(source)
    if dtype == "auto":
      from labor_jax import runtime
      dtype = runtime.auto_dtype()[0]
    config, params = hf.load(directory, mesh=mesh, rules=load_rules, **({"dtype": dtype} if dtype else {}))
    if adapter is not None:
      config, params = peft.load_adapter(adapter, config, params, mesh=mesh, rules=load_rules)
    tokenizer = ResumeTokenizer.from_dir(directory)
    what = ("Hugging Face " if kind == HF else f"GGUF (converted to {directory}) ") + source + (
        f" + adapter {adapter}" if adapter else "") + (f", {dtype} compute" if dtype else "")
    step = None
  if pad_to is not None:
    config, params = pad_vocab(config, params, mesh, pad_to, rules)
    what += f", vocabulary padded {config.vocab_size} -> {pad_to} for the mesh's tensor axis"
  return Loaded(config, params, tokenizer, source, kind, what, mesh, step)


def _padded_rows(vocab_size: int, mesh: Mesh | None, rules: sharding.Rules) -> int | None:
  """The padded vocabulary size when the mesh axes of "vocab" do not divide it, else None."""
  if mesh is None:
    return None
  split = sharding.axis_size(mesh, dict(rules).get("vocab"))
  return None if vocab_size % split == 0 else -(-vocab_size // split) * split


def padded_config(config: LlamaConfig, mesh: Mesh | None, rules: sharding.Rules = sharding.DEFAULT_RULES) -> LlamaConfig:
  """``config`` with ``padded_vocab_size`` set when ``mesh`` needs it (for abstract plans)."""
  rows = _padded_rows(config.vocab_size, mesh, rules)
  return config if rows is None else config.replace(padded_vocab_size=rows)


def pad_vocab(config: LlamaConfig, params: Any, mesh: Mesh, rows: int,
              rules: sharding.Rules = sharding.DEFAULT_RULES) -> tuple[LlamaConfig, Any]:
  """(config with ``padded_vocab_size=rows``, params with every "vocab" axis zero-padded to ``rows``),
  placed in the padded shardings on ``mesh``."""
  padded = config.replace(padded_vocab_size=rows)
  axes = model.param_logical_axes(config)

  def pad(x, spec):
    if "vocab" not in tuple(spec):
      return x
    widths = [(0, 0)] * x.ndim
    widths[tuple(spec).index("vocab")] = (0, rows - x.shape[tuple(spec).index("vocab")])
    return jnp.pad(x, widths)
  shardings = model.param_shardings(padded, mesh, rules)
  return padded, jax.jit(lambda p: jax.tree.map(pad, p, axes), out_shardings=shardings)(params)


# ---------------------------------------------------------------------------------------------- scoring
@functools.lru_cache(maxsize=8)
def scoring_step(config: LlamaConfig, candidates: tuple[tuple[int, ...], ...], mesh: Mesh | None = None,
                 chunk: int | None = None, token_loss: bool = False, first_layer: int = 0) -> Callable:
  """The jitted ``(params, tokens_BN, mask_BN, ends_BT) -> {"logp": [B, T, J], "raw": [B, T, J]}``.

  ``logp`` is log P(title j | resume b's first ``ends_BT[b, t]`` tokens) renormalised over the
  candidates, ``raw`` the same before renormalising (:func:`labor_jax.scorer.score`). With
  ``token_loss`` the step takes a fifth argument, ``weight_BN`` (the weight of target token
  ``i + 1`` at position ``i``), and adds ``xent`` (the weighted token cross-entropy summed) and
  ``tokens`` (the weights summed) from the same encoding of the resumes (validation during training).
  Built once per config, candidates, mesh, chunk and loss in a process: runs of the same shapes (the
  main job's seeds) share the compiled code. Inputs arrive placed (:func:`place_batch`).
  ``first_layer``: the step takes ``lower=``, the batch's :func:`lower_step` output, and runs the blocks from
  ``first_layer`` up only (validation of a run whose lower blocks are frozen)."""
  tree = scorer.CandidateTree.build(candidates)

  def step(params, tokens_BN, mask_BN, ends_BT, weight_BN=None, lower=None):
    if (lower is None) != (first_layer == 0):
      raise ValueError("a step built with first_layer takes lower= (the first blocks' output), and only it does")
    raw_BTJ, x_BND = scorer.score(config, params, tree, tokens_BN, mask_BN, ends_BT, chunk=chunk, mesh=mesh,
                                  return_hidden=True, lower=lower, first_layer=first_layer)
    out = {"logp": jax.nn.log_softmax(raw_BTJ, axis=-1), "raw": raw_BTJ}
    if token_loss:
      next_BN = jnp.concatenate([tokens_BN[:, 1:], jnp.zeros_like(tokens_BN[:, :1])], axis=1)
      head_DV = scorer.head_weight(config, params)[:, :config.vocab_size]  # no padded rows in the softmax
      out["xent"] = losses.linear_cross_entropy(x_BND, head_DV, next_BN, weight_BN, config.loss_chunk,
                                                dtype=config.jnp_dtype)
      out["tokens"] = jnp.sum(weight_BN)
    return out
  return jax.jit(step)


@functools.lru_cache(maxsize=8)
def lower_step(config: LlamaConfig, candidates: tuple[tuple[int, ...], ...], n_layers: int, mesh: Mesh | None = None,
               chunk: int | None = None) -> Callable:
  """The jitted ``(params, tokens_BN, mask_BN, ends_BT) -> scorer.Lower``: the first ``n_layers`` blocks'
  output for a batch (:func:`labor_jax.scorer.encode_lower`), which ``scoring_step(..., first_layer=n_layers)``
  continues."""
  tree = scorer.CandidateTree.build(candidates)
  return jax.jit(lambda params, tokens_BN, mask_BN, ends_BT: scorer.encode_lower(
      config, params, tree, tokens_BN, mask_BN, ends_BT, n_layers, chunk=chunk, mesh=mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Workers split over the mesh's batch axes (``data`` and ``fsdp``)."""
  return NamedSharding(mesh, sharding.logical_to_mesh(("batch", "length"), what="workers"))


def place_batch(x: np.ndarray, mesh: Mesh | None) -> jax.Array | np.ndarray:
  """A host batch [B, ...] on the mesh's batch axes; every process holds the whole batch and supplies
  its devices' rows. Without a mesh: unchanged."""
  if mesh is None:
    return x
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda idx: x[idx])


def pack(rows: Sequence[tuple[np.ndarray, np.ndarray]], batch: int, n: int, t: int):
  """(tokens_BN, mask_BN, ends_BT) of up to ``batch`` (tokens, title starts) rows, right padded;
  unused steps end at 1 (any prefix length in [1, N] works; their scores are ignored)."""
  tokens_BN = np.zeros((batch, n), np.int32)
  mask_BN = np.zeros_like(tokens_BN)
  ends_BT = np.ones((batch, t), np.int32)
  for i, (tokens, ends) in enumerate(rows):
    tokens_BN[i, :len(tokens)], mask_BN[i, :len(tokens)] = tokens, 1
    ends_BT[i, :len(ends)] = ends
  return tokens_BN, mask_BN, ends_BT


def lower_fingerprint(config: LlamaConfig, params: Any, n_layers: int) -> str | None:
  """A hash of the bytes, dtypes and shapes of the embedding and the first ``n_layers`` blocks' weights, with the
  compute dtype: equal for two models whose first blocks compute the same outputs. None when those blocks are
  not separately held (scanned layers, ``n_layers`` not below the model's depth) or hold LoRA adapters."""
  if not 0 < n_layers < config.num_hidden_layers or config.scan_layers:
    return None
  digest = hashlib.blake2b(repr((config.dtype, config.padded_vocab_size, config.hidden_size)).encode(),
                           digest_size=16)
  for name in ["embed_tokens", *(f"layers_{i}" for i in range(n_layers))]:
    for path, x in jax.tree_util.tree_leaves_with_path(params[name]):
      if labels.is_adapter(labels.path_str(path)):
        return None
      digest.update(f"{name}/{labels.path_str(path)}:{x.dtype}{x.shape}".encode())
      digest.update(np.ascontiguousarray(sharding.to_host(x)).tobytes())
  return digest.hexdigest()


class SharedLower:
  """The first ``n_layers`` blocks' output on scoring batches (:func:`lower_step`), kept for every model scored
  with it whose embedding and first ``n_layers`` blocks are the same weights computed in the same dtype: a base
  model and its fine-tunes with adapters in the top blocks only (``lora.top_layers``), as the main job scores
  them. Such a model runs only the blocks above. The first model that qualifies fixes the weights: each model's
  lower weights are fingerprinted (a hash of their bytes), and one whose fingerprint differs is scored whole,
  as is one without those blocks (scanned layers, adapters in them, fewer blocks)."""

  def __init__(self, n_layers: int):
    self.n_layers = n_layers
    self.fingerprint: str | None = None
    self.lowers: dict[tuple, scorer.Lower] = {}
    self.last_used = False  # whether the last model scored with this used it

  def _fingerprint(self, loaded: Loaded) -> str | None:
    return lower_fingerprint(loaded.config, loaded.params, self.n_layers)

  def usable(self, loaded: Loaded) -> bool:
    """Whether ``loaded`` has the lower blocks of the models scored with this before (the first always has)."""
    found = self._fingerprint(loaded)
    if found is None:
      return False
    if self.fingerprint is None:
      self.fingerprint = found
    return found == self.fingerprint

  def get(self, key: tuple, compute: Callable[[], scorer.Lower]) -> scorer.Lower:
    if key not in self.lowers:
      self.lowers[key] = compute()
    return self.lowers[key]


def check_batch(mesh: Mesh | None, batch_workers: int, chunk: int | None) -> None:
  """Raises ConfigError (one line) unless ``batch_workers`` rows per call divide over ``mesh``'s batch axes and
  ``chunk`` (workers per tree pass, None: the default) divides them: what :func:`score_examples` and the memory
  plan (labor_jax.plan) both need."""
  if batch_workers % batch_size(mesh):
    raise ConfigError(f"--batch-workers {batch_workers} does not divide over the mesh's data x fsdp = "
                      f"{batch_size(mesh)}")
  if chunk is not None and batch_workers % chunk:
    raise ConfigError(f"--chunk {chunk} does not divide --batch-workers {batch_workers} (workers per tree pass "
                      "must divide a batch's)")


def even_batches(rows: int, most: int, multiple: int = 1) -> int:
  """Rows per call when ``rows`` rows go in calls of at most ``most`` (a multiple of ``multiple``): the fewest
  calls, each as small as holds them all, rounded up to ``multiple``; never more than ``most``."""
  if rows <= 0:
    return most
  calls = -(-rows // most)  # ceil(rows / most)
  per = -(-rows // calls)
  return min(most, -(-per // multiple) * multiple)


def score_examples(loaded: Loaded, titles: TitleTable, variant: str, rows: Sequence[tuple[np.ndarray, np.ndarray]], *,
                   batch_workers: int = 16, chunk: int | None = None, progress: bool = False,
                   desc: str = "scoring", shared: SharedLower | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
  """(normalised, raw) log-probs [T_i, J] of each row (tokens, the token index where each of its T_i
  titles starts), at most ``batch_workers`` rows per call of the scoring step (a multiple of
  :func:`batch_size`), in batches of one shape (compiled once): the rows are split evenly over the fewest
  calls that hold them (:func:`even_batches`), so that the last call is not mostly padding (113 workers in
  batches of 16: 8 calls of 15, not 7 of 16 and one of 1 padded to 16). Every process gets every score.
  ``shared``: the first blocks' output, computed by the first model scored with it and reused by later ones
  that have the same first blocks (:class:`SharedLower`)."""
  check_batch(loaded.mesh, batch_workers, chunk)
  first = shared.n_layers if shared is not None and shared.usable(loaded) else 0
  if shared is not None:
    shared.last_used = bool(first)
  cands = loaded.candidates(titles, variant)
  batch_workers = even_batches(len(rows), batch_workers, math.lcm(batch_size(loaded.mesh), chunk or 1))
  chunk = chunk or default_chunk(loaded.config, loaded.mesh, batch_workers)
  step = scoring_step(loaded.config, cands, loaded.mesh, chunk, False, first)
  n = max(len(tokens) for tokens, _ in rows)
  t = max(max(len(ends) for _, ends in rows), 1)
  if n > loaded.config.max_position_embeddings and jax.process_index() == 0:
    print(f"warning: {desc}: a row of {n} tokens, beyond the model's {loaded.config.max_position_embeddings} "
          "positions (its scores are extrapolated); every row of a call is padded to the longest", file=sys.stderr)
  out = []
  bar = tqdm(total=len(rows), unit="worker", desc=desc, dynamic_ncols=True, file=sys.stdout,
             disable=not (progress and jax.process_index() == 0))
  for s in range(0, len(rows), batch_workers):
    part = rows[s:s + batch_workers]
    host = pack(part, batch_workers, n, t)
    batch = [place_batch(x, loaded.mesh) for x in host]
    lower = None
    if first:
      key = (cands, first, *(x.tobytes() for x in host))
      lower = shared.get(key, lambda: lower_step(loaded.config, cands, first, loaded.mesh, chunk)(loaded.params, *batch))
    found = step(loaded.params, *batch, lower=lower)
    logp, raw = sharding.to_host(found["logp"]), sharding.to_host(found["raw"])
    out += [(logp[i, :len(ends)], raw[i, :len(ends)]) for i, (_, ends) in enumerate(part)]
    bar.update(len(part))
  bar.close()
  return out
