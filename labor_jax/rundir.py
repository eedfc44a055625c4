"""The run directory: its layout, its writers and its readers, in one place.

A ``labor_jax.train`` run directory holds::

  RUN/
    config.yaml         the resolved run config (labor_jax.training.config.TrainConfig)
    model_config.json   the LlamaConfig that was trained (adapters included)
    tokenizer/          the dataset's tokenizer files
    data/               the embedded NLSY dataset, when the config names no data.dataset_dir
    checkpoints/        orbax checkpoints of the trainable state (labor_jax.checkpoint)
    frozen/             the frozen parameters (the base model under LoRA), written once
    metrics.jsonl       one JSON line per step (loss, lr, grad norm, tokens/s, batch CRC; at evaluations
                        validation loss and occupation perplexity)
    tb/                 TensorBoard events
    summary.json        final step, losses, parameter counts
    train.lock          while a labor_jax.train process writes the run: its pid and host (:meth:`RunDir.lock`)
    eval_<split>/       written by labor_jax.evaluate

The trainer writes it through :class:`RunDir`; evaluation, prediction, export and the main
job read it through :class:`RunDir` (the model at a step, the tokenizer, the dataset the run
used). The dataset side of the contract is :class:`data_pipeline.dataset_dir.DatasetDir`.

Paths are ``etils.epath`` paths: a run directory may be local or a URL orbax accepts
(``gs://bucket/runs/x``); it must be storage that every host of a multi-host run shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
from typing import Any, Iterator

import jax
import yaml
from etils import epath

from data_pipeline.dataset_dir import DatasetDir
from data_pipeline.tokenizer import ResumeTokenizer
from labor_jax import checkpoint, labels, model, selection, sharding
from labor_jax.training import config as train_config
from labor_jax.config import ConfigError, LlamaConfig

CONFIG = "config.yaml"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"
DATA = "data"
CHECKPOINTS = "checkpoints"
FROZEN = "frozen"
METRICS = "metrics.jsonl"
EVENTS = "tb"
SUMMARY = "summary.json"
LOCK = "train.lock"


class RunLocked(ConfigError):
  """Another live process is training this run directory."""


class RunDir:
  """One training run's directory (see the module docstring for its layout)."""

  def __init__(self, path: str | os.PathLike):
    self.path = epath.Path(path)

  def __repr__(self):
    return f"RunDir({str(self.path)!r})"

  @property
  def checkpoints(self) -> epath.Path:
    return self.path / CHECKPOINTS

  @property
  def frozen_dir(self) -> epath.Path:
    return self.path / FROZEN

  @property
  def metrics_file(self) -> epath.Path:
    return self.path / METRICS

  @property
  def events_dir(self) -> epath.Path:
    return self.path / EVENTS

  @property
  def tokenizer_dir(self) -> epath.Path:
    return self.path / TOKENIZER

  def eval_dir(self, split: str) -> epath.Path:
    return self.path / f"eval_{split}"

  # ------------------------------------------------------------------ readers
  @property
  def is_run(self) -> bool:
    """Whether the directory is a ``labor_jax.train`` run (else, for the scoring commands, a
    Hugging Face checkpoint directory)."""
    return (self.path / MODEL_CONFIG).exists()

  def check(self) -> "RunDir":
    if not self.is_run:
      raise FileNotFoundError(f"{self.path}: no {MODEL_CONFIG} (not a labor_jax.train run directory)")
    return self

  def train_config(self) -> train_config.TrainConfig:
    return train_config.load(self.path / CONFIG, resolved=True)  # steps recorded next to the epochs they came from

  def model_config(self) -> LlamaConfig:
    self.check()
    return LlamaConfig(**json.loads((self.path / MODEL_CONFIG).read_text()))

  def tokenizer(self) -> ResumeTokenizer:
    return ResumeTokenizer.from_dir(self.tokenizer_dir)

  def dataset(self) -> DatasetDir:
    """The dataset the run trained on: ``data.dataset_dir``, or the one built into ``RUN/data``."""
    return dataset_of(self.train_config(), self.path)

  def load_model(self, step: int | str | None = "best", mesh: jax.sharding.Mesh | None = None,
                 rules=None) -> tuple[LlamaConfig, Any, int]:
    """(config, params, step) of a checkpoint, LoRA adapters still separate, in the run's layer
    layout (stacked for ``scan_layers``; scoring, export and training take both).

    The step's parameters (never its optimizer state) are merged with the frozen ones saved
    once in ``frozen/`` (the base model of a LoRA run). With ``mesh`` every array is restored
    straight into its sharding (the logical-axis table, ``rules``), from a checkpoint of any
    topology; without, onto the first local device. ``step``: an int, "best" (lowest value of
    the run's ``eval_metric``, :meth:`best_metric`; the newest when no step has one) or None for
    the newest."""
    config = self.model_config()
    shapes = model.param_shapes(config)  # traced once: labels, shardings and the frozen target below
    label_tree = self.labels(config, shapes)
    if mesh is None:
      dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: dev, shapes)
    else:  # = model.param_shardings(config, mesh, rules)
      shardings = sharding.tree_shardings(shapes, model.param_logical_axes(config), mesh,
                                          rules or sharding.DEFAULT_RULES)
    # Full fine-tuning saves every parameter in the step; LoRA saves the adapters there and the rest once.
    frozen_dir = self.frozen_dir.exists()
    trainable_sh, frozen_sh = labels.split(shardings, label_tree) if frozen_dir else (shardings, {})
    step, params = checkpoint.restore_params(self.checkpoints, step, trainable_sh, metric=self.best_metric())
    if frozen_dir:
      target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            labels.split(shapes, label_tree)[1], frozen_sh)
      params = labels.merge(params, checkpoint.restore_frozen(self.frozen_dir, target))
    return config, params, step

  def best_metric(self) -> str:
    """The recorded key whose lowest value makes a step "best": the run config's ``eval_metric``
    (steps without it, as in runs from before it existed, are judged by ``val_loss``)."""
    eval_metric = self.train_config().eval_metric if (self.path / CONFIG).exists() else selection.DEFAULT
    return selection.key(eval_metric)

  @staticmethod
  def labels(config: LlamaConfig, shapes: Any = None) -> Any:
    """The run's label tree: the adapters train when the model has them, everything otherwise
    (``shapes``: ``model.param_shapes(config)`` when the caller has it)."""
    return labels.run_labels(model.param_shapes(config) if shapes is None else shapes, bool(config.lora_rank))

  def metrics(self) -> list[dict]:
    return [json.loads(line) for line in self.metrics_file.read_text().splitlines()]

  # ------------------------------------------------------------------ writers
  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """One writer per run directory: ``RUN/train.lock`` names this process (pid, host) while the block
    runs. A lock held by another live process on this host (or by any process on another host,
    whose life cannot be checked from here) raises :class:`RunLocked` with its pid; a lock left by a
    dead process on this host is taken over with a warning. Only process 0 of a multi-process run
    locks (the others belong to the same run); object-store run directories are not locked."""
    if jax.process_index() != 0 or "://" in str(self.path):
      yield
      return
    try:
      self.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # under a file, /proc, a read-only mount: the config's run_dir, in one line
      raise ConfigError(f"run_dir {self.path}: cannot create it ({e.strerror or e})") from None
    path = os.fspath(self.path / LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    tmp = f"{path}.{me['pid']}"
    with open(tmp, "w") as f:  # the lock appears whole: written aside, then linked (fails if it exists)
      json.dump(me, f)
    try:
      while True:
        try:
          os.link(tmp, path)
          break
        except FileExistsError:
          other = _read_lock(path)
          if other is None:  # removed in between: try again
            continue
          if other and (other.get("host") != me["host"] or _alive(other.get("pid"))):
            raise RunLocked(f"{self.path} is being trained by process {other.get('pid')} on {other.get('host')} "
                            f"(lock {path}); wait for it to finish, or remove the lock if that process is gone") from None
          print(f"warning: {path} was left by process {other.get('pid', '?')}, which is no longer running: "
                "taking it over", file=sys.stderr, flush=True)
          with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    finally:
      os.remove(tmp)
    try:
      yield
    finally:
      if _read_lock(path) == me:
        os.remove(path)

  def write_config(self, cfg: train_config.TrainConfig) -> None:
    self.path.mkdir(parents=True, exist_ok=True)
    (self.path / CONFIG).write_text(yaml.safe_dump(train_config.to_dict(cfg), sort_keys=False))

  def write_model_config(self, config: LlamaConfig) -> None:
    (self.path / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2))

  def copy_tokenizer(self, dataset: DatasetDir) -> None:
    self.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for f in dataset.tokenizer_dir.iterdir():
      f.copy(self.tokenizer_dir / f.name, overwrite=True)

  def append_metrics(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if "://" in str(self.path):  # object stores cannot append: rewrite (metrics files stay small)
      old = self.metrics_file.read_text() if self.metrics_file.exists() else ""
      self.metrics_file.write_text(old + line)
      return
    with self.metrics_file.open("a") as f:
      f.write(line)

  def write_summary(self, summary: dict) -> None:
    (self.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def _read_lock(path: str) -> dict | None:
  """The lock's holder; {} when the file is damaged (not JSON), None when there is none."""
  try:
    with open(path) as f:
      found = json.load(f)
  except FileNotFoundError:
    return None
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}
  return found if isinstance(found, dict) else {}


def _alive(pid) -> bool:
  """Whether process ``pid`` runs on this host (a zombie counts as gone)."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return True


def dataset_of(cfg: train_config.TrainConfig, run_dir: str | os.PathLike) -> DatasetDir:
  """The dataset a run config trains on (``data.dataset_dir``, else ``RUN/data``)."""
  return DatasetDir(cfg.data.dataset_dir) if cfg.data.dataset_dir else DatasetDir(epath.Path(run_dir) / DATA)
