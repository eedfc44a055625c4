"""Orbax checkpoints of the train state and the grain iterator, with a fallback for bad ones.

One CheckpointManager under ``RUN/checkpoints``: the last ``keep`` steps are kept, and so is
the best step by validation loss (``AnyPreservationPolicy`` of ``LatestN`` and ``BestN``).
Each step holds ``state`` (params, optimizer state, step, RNG; restored straight into its
shardings) and ``data`` (every process's grain iterator state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm


def manager(directory: str | Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep),
      # reverse=True: BestN keeps the end of the sorted order, so sort descending to keep the lowest loss.
      cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn makes orbax store each step's metrics (and answers best_step()).
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True, best_fn=lambda m: m["val_loss"],
                                         best_mode="min")
  return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "data"))


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_iter, metrics: dict | None = None,
         wait: bool = False):
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=grain.checkpoint.CheckpointSave(data_iter)),
           metrics=metrics, force=True)
  if wait:
    mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any, data_iter, log=print):
  """Restores the newest readable step into ``abstract_state``'s shardings and ``data_iter``.

  Returns (step, state), or (None, None) when there is no checkpoint. A step that fails to
  restore (partial or corrupt files) is reported, moved aside to ``<step>.unreadable`` (kept
  for inspection, invisible to orbax) and the previous one is tried.
  """
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                      data=grain.checkpoint.CheckpointRestore(data_iter)))
      return step, out["state"]
    except Exception as e:  # orbax raises many types for a damaged directory
      msg = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
      log(f"warning: checkpoint step {step} in {mgr.directory} cannot be restored ({msg}); "
          f"moved to {step}.unreadable, trying the previous one")
      if jax.process_index() == 0:
        src = Path(mgr.directory) / str(step)
        src.rename(src.with_name(f"{step}.unreadable"))
      multihost_utils.sync_global_devices(f"labor_jax: set aside checkpoint {step}")
      mgr.reload()
  return None, None


def abstract(state: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_params(directory: str | Path, step: int | str | None = None, shardings: Any = None):
  """(step, params) of a run's checkpoint, on any topology (default: the first local device).

  ``step``: an int, None for the newest, or "best" for the lowest validation loss (the
  newest when no step has one). Reads the saved state's metadata for shapes and dtypes, so
  it needs no config. Pass ``shardings`` (a tree matching the params) to place them on a
  mesh instead.
  """
  options = ocp.CheckpointManagerOptions(create=False, best_fn=lambda m: m["val_loss"], best_mode="min")
  mgr = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                              item_handlers={"state": ocp.StandardCheckpointHandler(),
                                             "data": grain.checkpoint.CheckpointHandler()})
  if step == "best":
    step = mgr.best_step()
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  meta = mgr.item_metadata(step)["state"]
  meta = getattr(meta, "tree", meta)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
  if shardings is not None:
    target["params"] = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                                    target["params"], shardings)
  state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  return step, state["params"]
