"""What a prepared run is: the :class:`Trainer` the loop steps and every hook watches.

It lives apart from the loop (:mod:`labor_jax.training.loop`, which builds it) and the hooks
(:mod:`labor_jax.training.hooks`, which watch it), so that both import it and neither imports the
other.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax

from data_pipeline.dataset_dir import DatasetDir
from labor_jax import checkpoint as ckpt_lib
from labor_jax import labels
from labor_jax.config import LlamaConfig
from labor_jax.rundir import RunDir
from labor_jax.training import core as train_core
from labor_jax.training.config import TrainConfig


def split_state(state: train_core.TrainState, label_tree):
  """(the state a checkpoint step holds: trainable params, optimizer state, step, RNG; the frozen params)."""
  trainable, frozen = labels.split(state.params, label_tree)
  return state.replace(params=trainable), frozen


@dataclasses.dataclass
class Trainer:
  """A run's prepared pieces (:func:`setup`): what the loop steps and what the hooks watch."""
  cfg: TrainConfig  # the resolved run config
  run_dir: RunDir  # where everything is written
  data: DatasetDir  # the dataset trained on
  config: LlamaConfig  # the model trained
  mesh: jax.sharding.Mesh  # the devices
  state: train_core.TrainState  # parameters, optimizer state, step, RNG (sharded)
  start: int  # the step the loop continues from (0 for a fresh run)
  train_step: Callable  # jitted (state, batch) -> (state, metrics)
  eval_step: Callable  # jitted (params, batch) -> (loss sum, tokens)
  data_iter: Any  # the training batches (grain, checkpointed with the state)
  data_kw: dict  # loader arguments (validation reuses them)
  batch_sh: Any  # the batch sharding
  mgr: Any  # the orbax CheckpointManager
  label_tree: Any  # trainable / frozen / adapter label of every parameter
  occupation: Callable | None  # params -> validation occupation perplexity (and token loss), or None
  metric: str  # the recorded key whose lowest value is the best checkpoint
  sizes: dict  # parameter counts and bytes (summary.json)
  frozen_cache: Any = None  # lora.cache_frozen: the frozen lower blocks' output per training row (or None)
  last_save: float = dataclasses.field(default_factory=time.monotonic)  # monotonic time of the last save

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def multi(self) -> bool:
    return jax.process_count() > 1

  def global_batch(self, local):
    """This process's host batch as a slice of the global batch on the mesh."""
    if self.multi:
      return jax.make_array_from_process_local_data(self.batch_sh, local)
    return jax.device_put(local, self.batch_sh)

  def train_batch(self, local):
    """A training batch on the mesh, with its rows' cached lower-block output when ``lora.cache_frozen``."""
    if self.frozen_cache is not None:
      local = dict(local, hidden=self.frozen_cache.lookup(local))
    return self.global_batch(local)

  def save(self, step: int, metrics: dict | None = None, wait: bool = False) -> None:
    """Checkpoints the trainable state (and the data iterator) at ``step``."""
    ckpt_lib.save(self.mgr, step, split_state(self.state, self.label_tree)[0], self.data_iter, metrics, wait=wait)
    self.last_save = time.monotonic()
