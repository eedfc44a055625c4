"""Orbax checkpoints of the train state and the grain iterator, restored only when they fit the run.

One CheckpointManager under ``RUN/checkpoints``: the last ``keep`` steps are kept, and so is
the best step by the run's validation metric (``AnyPreservationPolicy`` of ``LatestN`` and
``BestN``; :mod:`labor_jax.selection` names the metrics, ``val_occupation_ppl`` by default).
Each step holds ``state`` (the trainable parameters, optimizer state, step, RNG; restored
straight into their shardings) and ``data`` (every process's grain iterator state). Frozen
parameters (the base model under LoRA) are not in the steps: they are written once, to
``RUN/frozen`` (:func:`save_frozen`), and every restore rebuilds the model from both.

Restoring is strict (:func:`restore_latest`):

* the step's saved tree, shapes and dtypes are compared with the run's before anything is
  read; a difference (a changed hidden size, LoRA rank, dtype...) raises
  :class:`CheckpointMismatch` naming the first differing leaf, and every checkpoint stays;
* only a step that is really incomplete or damaged (no commit marker, a missing, truncated
  or unparsable file) is set aside as ``<step>.unreadable``, with the bad file named, and
  the previous step is tried;
* any other error (permissions, I/O, memory) propagates: nothing is moved.

Saving on a full disk (or past a file size limit) raises :class:`CheckpointWriteError`, one line
naming the step and the file: that step's partial files are removed, and the earlier steps are
untouched, so the next run resumes from the last good one.

Paths may be local or any URL orbax / etils accept (``gs://bucket/run``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from data_pipeline.errors import disk_full
from labor_jax import selection
from labor_jax.config import ConfigError
from labor_jax.labels import path_str

COMMIT_MARKER = "_CHECKPOINT_METADATA"  # written by orbax when a step is complete
ITEMS = ("state", "data")
# tensorstore status codes that mean the step's own files are missing, truncated or corrupt.
_DAMAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")
_FILE_IN_MESSAGE = re.compile(r'(?:local file|file) "([^"]+)"')


class CheckpointMismatch(ConfigError):
  """A checkpoint that holds another model or state than the run builds (exit code 2)."""


class CheckpointWriteError(OSError):
  """A checkpoint step that could not be written because the disk is full or a file size limit was hit
  (one line); its partial files were removed and the earlier steps kept."""


class _Manager(ocp.CheckpointManager):
  """orbax's manager; a save that fails for lack of space (synchronously, or in the background and
  reported by the next ``save`` or ``wait_until_finished``) raises :class:`CheckpointWriteError`
  after removing that step's partial files."""

  _pending: int | None = None  # the step whose background save may still fail

  def save(self, step, *args, **kwargs):
    try:
      out = super().save(step, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - anything but a full disk is re-raised as it is
      self._raise_if_full(e, step)
      raise
    self._pending = step
    return out

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise_if_full(e, self._pending)
      raise

  def _raise_if_full(self, e: Exception, step: int | None) -> None:
    full = disk_full(e)
    if full is None:
      return
    why, file = full
    root = epath.Path(self.directory)
    failed = sorted(s for s in {self._pending, step} if s is not None and not (root / str(s) / COMMIT_MARKER).exists())
    if jax.process_index() == 0:
      for s in failed:
        for leftover in [root / str(s), *root.glob(f"{s}.orbax-checkpoint-tmp*")]:
          if leftover.exists():
            leftover.rmtree()
    self._pending = None
    try:
      self.reload()
      kept = self.latest_step()
    except Exception:  # noqa: BLE001 - the report below matters more than the listing
      kept = None
    s = failed[0] if failed else step
    named = f" ({file})" if file else ""
    after = (f"step {kept} is kept: free space and rerun to resume from it" if kept is not None
             else "no earlier step exists")
    raise CheckpointWriteError(f"cannot write checkpoint step {s} in {root}{named}: {why}; its partial files "
                               f"were removed, {after}") from e


def as_path(path) -> epath.Path:
  """A local path made absolute, or a URL (``gs://...``) kept as it is."""
  p = epath.Path(path)
  return p if "://" in str(path) else epath.Path(p.absolute())


def manager(directory, keep: int, async_save: bool = True,
            metric: str = selection.key(selection.DEFAULT)) -> ocp.CheckpointManager:
  """The run's manager; ``metric`` (a recorded key, :mod:`labor_jax.selection`) is the one whose lowest
  value BestN keeps. A step saved with metrics that lack it (an older run resumed) counts as worst."""
  get = lambda m: m.get(metric, math.inf)  # noqa: E731
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep),
      # reverse=True: BestN keeps the end of the sorted order, so sort descending to keep the lowest value.
      cm.BestN(get_metric_fn=get, reverse=True, n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn makes orbax store each step's metrics.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True, best_fn=get, best_mode="min")
  return _Manager(as_path(directory), options=options, item_handlers=_handlers())


def _handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_iter, metrics: dict | None = None,
         wait: bool = False):
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=grain.checkpoint.CheckpointSave(data_iter)),
           metrics=metrics, force=True)
  if wait:
    mgr.wait_until_finished()


# ------------------------------------------------------------------------- comparison
def _saved_leaves(tree: Any, prefix: str = "") -> dict[str, tuple]:
  """{path: (shape, dtype)} of an orbax metadata tree (dicts and lists of ArrayMetadata; None for
  empty nodes such as the optimizer's masked-out leaves)."""
  out = {}
  items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
  if items is None:
    if tree is not None:
      out[prefix] = (tuple(tree.shape), str(tree.dtype))
    return out
  for k, v in items:
    out.update(_saved_leaves(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def _run_leaves(tree: Any) -> dict[str, tuple]:
  return {path_str(p): (tuple(x.shape), str(x.dtype)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _fmt(leaf: tuple | None) -> str:
  return "absent" if leaf is None else f"{leaf[1]}{list(leaf[0])}"


def difference(saved: Any, target: Any) -> str | None:
  """The first leaf (in the run's order) whose presence, shape or dtype differs between an orbax
  metadata tree and the run's abstract tree, as 'PATH is X there and Y here'; None if they match."""
  have, want = _saved_leaves(saved), _run_leaves(target)
  for path in list(want) + [p for p in have if p not in want]:
    if have.get(path) != want.get(path):
      return f"{path} is {_fmt(have.get(path))} there and {_fmt(want.get(path))} here"
  return None


# ---------------------------------------------------------------------------- damage
def _damage(e: BaseException) -> str | None:
  """What is wrong with the step's files when ``e`` says they are missing, truncated or unparsable;
  None for any other error (permissions, I/O, memory), which must not be mistaken for damage."""
  if isinstance(e, json.JSONDecodeError):
    return f"unparsable metadata ({e})"
  if isinstance(e, FileNotFoundError):
    return f"missing file {e.filename or e}"
  msg = str(e)
  if isinstance(e, ValueError) and msg.split(":", 1)[0] in _DAMAGE_CODES:
    files = _FILE_IN_MESSAGE.findall(msg)  # the last one named is the most specific
    return f"{msg.split(':', 1)[0].lower().replace('_', ' ')}: {files[-1] if files else msg.splitlines()[0][:200]}"
  cause = e.__cause__ or e.__context__
  return _damage(cause) if cause is not None else None


def _incomplete(step_dir) -> str | None:
  if not (step_dir / COMMIT_MARKER).exists():
    return f"no {COMMIT_MARKER} in {step_dir} (the save did not finish)"
  for item in ITEMS:
    if not (step_dir / item).exists():
      return f"missing {step_dir / item}"
  return None


def _set_aside(mgr: ocp.CheckpointManager, step: int, why: str, log: Callable) -> None:
  log(f"warning: checkpoint step {step} in {mgr.directory} cannot be restored ({why}); "
      f"moved to {step}.unreadable, trying the previous one")
  if jax.process_index() == 0:
    src = epath.Path(mgr.directory) / str(step)
    src.rename(src.parent / f"{step}.unreadable")
  multihost_utils.sync_global_devices(f"labor_jax: set aside checkpoint {step}")
  mgr.reload()


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any, data_iter, log=print):
  """Restores the newest complete step into ``abstract_state``'s shardings and ``data_iter``.

  Returns (step, state), or (None, None) when there is no checkpoint. Raises
  :class:`CheckpointMismatch` when a step holds another tree, shape or dtype than
  ``abstract_state`` (nothing moved); sets aside only damaged steps (see the module docstring).
  """
  for step in sorted(mgr.all_steps(), reverse=True):
    step_dir = epath.Path(mgr.directory) / str(step)
    why = _incomplete(step_dir)
    if why is None:
      try:
        saved = mgr.item_metadata(step)["state"]
      except Exception as e:  # noqa: BLE001 - classified below; anything not damage is re-raised
        why = _damage(e)
        if why is None:
          raise
      else:
        diff = difference(getattr(saved, "tree", saved), abstract_state)
        if diff is not None:
          raise CheckpointMismatch(
              f"checkpoint step {step} in {mgr.directory} does not match this run: {diff}; start a new run "
              "(--set run_dir=...) or undo the change (every checkpoint is kept)")
        try:
          out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                          data=grain.checkpoint.CheckpointRestore(data_iter)))
          return step, out["state"]
        except Exception as e:  # noqa: BLE001
          why = _damage(e)
          if why is None:
            raise
    _set_aside(mgr, step, why, log)
  return None, None


# ------------------------------------------------------------------- frozen weights
def save_frozen(directory, frozen: Any) -> None:
  """Writes the frozen parameters once (orbax; the directory appears when complete)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(as_path(directory), frozen)


def restore_frozen(directory, target: Any) -> Any:
  """The frozen parameters saved by :func:`save_frozen`, into ``target``'s shapes and shardings
  (ShapeDtypeStructs); a tree, shape or dtype difference raises :class:`CheckpointMismatch`."""
  path = as_path(directory)
  with ocp.StandardCheckpointer() as ckptr:
    diff = difference(ckptr.metadata(path).item_metadata.tree, target)
    if diff is not None:
      raise CheckpointMismatch(f"frozen weights in {path} do not match this run: {diff}; start a new run "
                               "(--set run_dir=...) or undo the change")
    return ckptr.restore(path, target)


# ------------------------------------------------------------------------- readers
def _reader(directory) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(as_path(directory), options=ocp.CheckpointManagerOptions(create=False),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                              "data": grain.checkpoint.CheckpointHandler()})


def resolve_step(directory, step: int | str | None = None, metric: str = selection.key(selection.DEFAULT)) -> int:
  """``step`` as a saved step number: an int, None for the newest, "best" for the lowest ``metric``
  (a recorded key; steps of older runs hold ``val_loss`` only and are judged by it,
  :func:`labor_jax.selection.best_step`), the newest when no step has a metric."""
  mgr = _reader(directory)
  if step == "best":
    step = selection.best_step({s: mgr.metrics(s) for s in mgr.all_steps()}, metric)
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  if int(step) not in mgr.all_steps():
    raise FileNotFoundError(f"{directory}: no checkpoint of step {step} (saved steps: "
                            f"{', '.join(map(str, sorted(mgr.all_steps())))})")
  return int(step)


def saved_params(directory, step: int) -> Any:
  """The metadata tree (ArrayMetadata leaves) of a step's saved parameters."""
  meta = _reader(directory).item_metadata(step)["state"]
  return getattr(meta, "tree", meta)["params"]


def restore_params(directory, step: int | str | None = None, shardings: Any = None,
                   metric: str = selection.key(selection.DEFAULT)):
  """(step, params) of a run's checkpoint: the parameters alone (never the optimizer state), from a
  checkpoint written on any topology.

  ``step`` and ``metric`` as in :func:`resolve_step`. Shapes and dtypes come from the saved metadata, so no
  config is needed. ``shardings`` (a tree matching the saved params, e.g. NamedShardings of a
  mesh) places each array straight into its sharding; the default is the first local device.
  Under LoRA a step holds the trainable leaves only: merge the frozen ones
  (:func:`restore_frozen`), as ``labor_jax.rundir.RunDir.load_model`` does.
  """
  step = resolve_step(directory, step, metric)
  mgr = _reader(directory)
  meta = mgr.item_metadata(step)["state"]
  saved = getattr(meta, "tree", meta)["params"]
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: dev, saved)
  target = {"params": jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), saved, shardings)}
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  return step, out["state"]["params"]
