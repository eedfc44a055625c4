"""What watches the training loop: one hook per concern, called at its own cadence (Levanter's callbacks).

The loop (:func:`labor_jax.training.loop.train`) runs the pure train step and, after every step,
calls each hook's :meth:`Hook.after_step` with a :class:`StepInfo`: the step number, the step's
metrics, the host batch, the record that becomes one line of ``metrics.jsonl`` and the validation
results of this step. Hooks run in list order (:func:`default_hooks`); each writes only its own
keys, so adding a hook touches no other. A hook sees the run's prepared pieces (the
:class:`~labor_jax.training.trainer.Trainer`: config, state, run directory, checkpoint manager) but
changes the state only through ``trainer.save``.

* :class:`LossCheck`: the loss, learning rate, gradient norm and batch CRC of every step; a
  non-finite loss stops the run (:class:`NonFiniteLoss`).
* :class:`Throughput`: tokens per second and MFU at every ``log_every`` steps.
* :class:`Progress`: the progress bar.
* :class:`Validation`: validation loss and occupation perplexity every ``eval_every`` steps.
* :class:`MetricsWriter`: ``metrics.jsonl`` and TensorBoard (process 0).
* :class:`Preemption`: SIGTERM (one process) or JAX's preemption sync point (several) saves and stops.
* :class:`Checkpointing`: orbax checkpoints every ``ckpt_every`` steps or ``ckpt_every_minutes``.
* :class:`Summary`: ``summary.json`` when the run completes.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from data_pipeline import loader
from labor_jax import flops, selection
from labor_jax.training.trainer import Trainer


class NonFiniteLoss(RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class StepInfo:
  """One finished step, as every hook sees it."""
  step: int  # the step just taken (1-based)
  metrics: dict  # the train step's device metrics (loss, lr, grad_norm, tokens)
  batch: dict  # this process's host batch
  record: dict  # the step's metrics.jsonl line; hooks add their keys
  evals: dict = dataclasses.field(default_factory=dict)  # validation results of this step (Validation)
  logged: bool = False  # a log_every step (Throughput)
  stop: bool = False  # end the run after this step (Preemption)


class Hook:
  """A no-op hook: override what you need."""

  def start(self, trainer: Trainer) -> None:
    """Before the first step."""

  def after_step(self, trainer: Trainer, info: StepInfo) -> None:
    """After every step."""

  def done(self, trainer: Trainer, last: dict) -> None:
    """After the last step of a run that completed (not preempted, not failed)."""

  def close(self, trainer: Trainer) -> None:
    """Always, when the loop ends (in reverse list order)."""


class LossCheck(Hook):
  def after_step(self, trainer, info):
    loss = float(info.metrics["loss"])
    if not math.isfinite(loss):
      last = trainer.mgr.latest_step()
      kept = (f"the last good checkpoint (step {last}) is kept in {trainer.mgr.directory}" if last is not None else
              f"no checkpoint was saved before it (the run's settings, e.g. optim.lr, make it diverge at once)")
      raise NonFiniteLoss(f"loss is {loss} at step {info.step}: stopping; {kept}")
    info.record.update(loss=loss, lr=float(info.metrics["lr"]), grad_norm=float(info.metrics["grad_norm"]),
                       batch_crc=zlib.crc32(np.ascontiguousarray(info.batch["inputs"]).tobytes()))


class Throughput(Hook):
  """Tokens per second (loss tokens) and MFU (model FLOPs of every position a step computes, padding
  included, over the chips' peak bf16 FLOP/s) since the last logged step."""

  def start(self, trainer):
    cfg = trainer.cfg
    cached = trainer.frozen_cache.n_layers if trainer.frozen_cache is not None else 0
    self.per_position = flops.train_flops_per_token(trainer.config, cfg.data.seq_len, frozen_base=cfg.lora.enabled,
                                                    cached_layers=cached)
    chip = flops.peak_flops(jax.devices()[0].device_kind, cfg.peak_flops_per_chip)
    self.peak = None if chip is None else chip * jax.device_count()
    self.since, self.tokens, self.steps = time.perf_counter(), 0.0, 0

  def after_step(self, trainer, info):
    cfg = trainer.cfg
    self.tokens += float(info.metrics["tokens"])
    self.steps += 1
    info.logged = info.step % cfg.log_every == 0 or info.step == cfg.steps
    if not info.logged:
      return
    now = time.perf_counter()
    elapsed = max(now - self.since, 1e-9)
    info.record["tokens_per_s"] = self.tokens / elapsed
    if self.peak is not None:
      positions_per_s = self.steps * cfg.batch_size * cfg.data.seq_len / elapsed
      info.record["mfu"] = flops.mfu(positions_per_s, self.per_position, self.peak)
    self.since, self.tokens, self.steps = now, 0.0, 0


class Progress(Hook):
  def start(self, trainer):
    self.bar = tqdm(total=trainer.cfg.steps, initial=trainer.start, dynamic_ncols=True, file=sys.stdout,
                    disable=not (trainer.is_main and trainer.cfg.progress))

  def after_step(self, trainer, info):
    self.bar.update(1)
    rec = info.record
    if info.logged and "tokens_per_s" in rec:
      self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                           **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}))

  def close(self, trainer):
    self.bar.close()


class Validation(Hook):
  """Every ``eval_every`` steps and at the last: the validation token loss and, with
  ``eval_metric: occupation_perplexity``, the occupation perplexity that picks the best checkpoint
  (one scoring pass gives both for unpacked rows; packed rows take the loader's token loss)."""

  def after_step(self, trainer, info):
    cfg = trainer.cfg
    if not (info.step % cfg.eval_every == 0 or info.step == cfg.steps):
      return
    found = trainer.occupation(trainer.state.params) if trainer.occupation is not None else {}
    info.evals["val_loss"] = found.pop("val_loss") if "val_loss" in found else self.token_loss(trainer)
    info.evals.update(found)
    info.record.update(info.evals)
    tqdm.write(f"step {info.step}: train loss {info.record['loss']:.4f}, "
               + ", ".join(f"{selection.LABELS[k]} {v:.4f}" for k, v in info.evals.items()), file=sys.stdout)

  @staticmethod
  def token_loss(trainer) -> float:
    """The validation token loss over the loader's unshuffled validation batches (``eval_batches`` of them)."""
    cfg = trainer.cfg
    it = iter(loader.make_dataset(trainer.data, "validation", shuffle=False, num_epochs=1, **trainer.data_kw))
    total = tokens = 0.0
    for i, local in enumerate(it):
      if cfg.eval_batches and i >= cfg.eval_batches:
        break
      s, n = trainer.eval_step(trainer.state.params, trainer.global_batch(local))
      total, tokens = total + float(s), tokens + float(n)
    return total / max(tokens, 1.0)


def summary_writer_class():
  """tensorboardX's ``SummaryWriter``, imported when a run starts writing. tensorboardX's writer tries ``import
  torch`` when it is imported (to accept PyTorch tensors): where PyTorch is installed (the [test] extra) that cost
  every training and evaluation command about a second and a few hundred MB. labor_jax logs Python floats, so
  unless PyTorch is loaded already, tensorboardX is imported with it hidden (``sys.modules["torch"] = None`` makes
  that ``import torch`` raise ImportError, which tensorboardX catches), and PyTorch stays unloaded."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter(Hook):
  """One JSON line per step in ``metrics.jsonl``, and TensorBoard scalars (process 0)."""
  TRAIN = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")

  def start(self, trainer):
    self.tb = summary_writer_class()(str(trainer.run_dir.events_dir)) if trainer.is_main else None

  def after_step(self, trainer, info):
    if self.tb is None:
      return
    trainer.run_dir.append_metrics(info.record)
    for k in self.TRAIN:
      if k in info.record:
        self.tb.add_scalar(f"train/{k}", info.record[k], info.step)
    for k, v in info.evals.items():
      self.tb.add_scalar(selection.TB_TAGS[k], v, info.step)

  def close(self, trainer):
    if self.tb is not None:
      self.tb.close()


class Preemption(Hook):
  """With several processes JAX's preemption service catches SIGTERM on any of them and names one step
  at which every process saves; alone, a Python handler does. Then the run stops (exit 0)."""

  def start(self, trainer):
    self.signal = None
    self.old = None
    if not trainer.multi:
      self.old = signal.signal(signal.SIGTERM, self._on_term)

  def _on_term(self, signum, frame):
    self.signal = signum

  def after_step(self, trainer, info):
    preempted = (multihost_utils.reached_preemption_sync_point(info.step) if trainer.multi
                 else self.signal is not None)
    if preempted:
      trainer.save(info.step, wait=True)
      tqdm.write(f"preemption notice (SIGTERM): saved checkpoint at step {info.step}, exiting", file=sys.stdout)
      info.stop = True

  def close(self, trainer):
    if self.old is not None:
      signal.signal(signal.SIGTERM, self.old)


class Checkpointing(Hook):
  """A checkpoint every ``ckpt_every`` steps and at the last, and (``ckpt_every_minutes``) at a logged
  step once that many minutes passed since the last save (every process decides as process 0 does)."""

  def after_step(self, trainer, info):
    cfg = trainer.cfg
    if info.stop:  # Preemption saved this step
      return
    due = info.step % cfg.ckpt_every == 0 or info.step == cfg.steps
    if cfg.ckpt_every_minutes and info.logged and not due:
      late = time.monotonic() - trainer.last_save >= 60 * cfg.ckpt_every_minutes
      due = bool(multihost_utils.broadcast_one_to_all(np.asarray(late))) if trainer.multi else late
    if due:
      trainer.save(info.step, info.evals or None)

  def close(self, trainer):
    trainer.mgr.wait_until_finished()


class Summary(Hook):
  """``summary.json`` (process 0) when the run completes."""

  def after_step(self, trainer, info):
    if "val_loss" in info.evals:
      self.val_loss = info.evals["val_loss"]

  def done(self, trainer, last):
    if not trainer.is_main:
      return
    trainer.run_dir.write_summary({
        "final_step": last["step"], "final_loss": last.get("loss"), "val_loss": getattr(self, "val_loss", None),
        "val_occupation_ppl": last.get("val_occupation_ppl"), "best_by": trainer.metric, **trainer.sizes})


def default_hooks() -> list[Hook]:
  """The hooks of every run, in the order they run after a step."""
  return [LossCheck(), Throughput(), Progress(), Validation(), MetricsWriter(), Preemption(), Checkpointing(),
          Summary()]
