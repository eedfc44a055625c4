"""Directories that appear whole or not at all, and the removal of what a killed writer left."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from data_pipeline.errors import output_problem, write_problem
from labor_jax.config import ConfigError

LOCK = ".lock"  # suffix of the file whose flock says a temporary directory's writer is alive


class OutputExists(ConfigError):
  """An output path that holds something this writer did not write (never replaced), or that cannot be made (a file
  on the way)."""


def check_replaceable(path: str | os.PathLike, marker: str | None, what: str = "output", writer: bool = True) -> None:
  """Raises :class:`OutputExists` (one line) unless ``path`` is absent, an empty directory, or a directory holding
  ``marker`` (an earlier ``what`` of the same kind, which a new one replaces whole): a file, a training run, a
  dataset or anything else named as an output is left alone. ``marker`` None: any directory. On the ``writer``
  process, also a :class:`~data_pipeline.errors.WriteError` (an OSError) when the file system lets no file be made
  there (read-only, full, no permission; :func:`data_pipeline.errors.write_problem`); the others do not write
  there, and their hosts may not even share that file system."""
  problem = output_problem(path, marker, what)
  if problem:
    raise OutputExists(f"{path} {problem}")
  unwritable = write_problem(path) if writer else None
  if unwritable:
    raise unwritable


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, writer: bool = True, *, marker: str | None = None,
               what: str = "output") -> Iterator[Path | None]:
  """A temporary sibling of ``path`` that replaces ``path`` when the block ends without error (and is
  removed when it raises: nothing half-written is left). Writers racing for one ``path`` each replace
  it whole; the last one wins, never a mix of two. Yields None on processes that do not write. An existing
  ``path`` is replaced only when :func:`check_replaceable` allows it (``marker``: the file every such output
  holds; ``what`` names it in the error), checked before anything is written.

  A process killed outright (SIGKILL, out of memory) cannot remove its temporary directory. So the writer
  holds an exclusive ``flock`` on a sibling ``.lock`` file for as long as the directory exists, which the
  kernel releases when the process dies, whatever its host or process-id namespace; the next writer of
  ``path`` removes the directories whose lock it can take (:func:`remove_stale`)."""
  if not writer:
    yield None
    return
  path = Path(path)
  check_replaceable(path, marker, what)
  path.parent.mkdir(parents=True, exist_ok=True)
  path = path.parent.resolve() / path.name  # "run/../out": the parent must still resolve once "run" is set aside
  remove_stale(path.parent, path.name)
  fd, lock_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=LOCK, dir=path.parent)
  lock, tmp = Path(lock_name), Path(lock_name[:-len(LOCK)])
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until the directory is gone: its writer is alive
    os.mkdir(tmp)  # the lock file's name without .lock: unique because mkstemp made that name
    try:
      yield tmp
      _replace(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  finally:
    lock.unlink(missing_ok=True)
    os.close(fd)


def _replace(new: Path, path: Path, attempts: int = 100) -> None:
  """Moves the directory ``new`` to ``path``, setting aside (then deleting) whatever is there; after ``attempts``
  tries that another writer won, or a rename that keeps failing, the last OSError is raised (never a busy loop)."""
  for _ in range(attempts):
    old = path.parent / f".{path.name}.old.{uuid.uuid4().hex}"
    try:
      os.rename(path, old)
    except FileNotFoundError:
      old = None
    try:
      os.rename(new, path)
    except OSError as e:
      raced = e.errno in (errno.EEXIST, errno.ENOTEMPTY) and new.exists()  # another writer's directory is there
      if not raced:  # our directory is gone (removed by hand?) or cannot be moved: put back what was there, stop
        if old is not None:
          with contextlib.suppress(OSError):
            os.rename(old, path)
        raise
      if old is not None:  # set the earlier output aside and try again
        shutil.rmtree(old, ignore_errors=True)
      error = e
      continue
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return
  raise error


_STALE_TMP = re.compile(r"\.(?P<name>.+)\.tmp-[a-z0-9_]+" + re.escape(LOCK))
_SET_ASIDE = re.compile(r"\.(?P<name>.+)\.old\.[0-9a-f]{32}")


def _writer_gone(lock: Path) -> bool:
  """Whether no process holds ``lock`` (taken and released at once). A file system without flock, or a lock
  file that cannot be opened, counts as held: nothing is removed on a guess."""
  try:
    fd = os.open(lock, os.O_RDWR)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError:
    return False
  finally:
    os.close(fd)  # releases the lock if it was taken


def remove_stale(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
  """Removes from ``parent`` what :func:`atomic_dir` writers of ``name`` (of any name when None) left when
  they were killed: the temporary directories whose lock no process holds (with their lock files), and
  directories set aside while replacing an entry that exists again (never read). A set-aside copy whose
  entry is missing (a writer killed between its two renames) is put back. Returns what was removed."""
  removed = []
  try:
    entries = list(Path(parent).iterdir())
  except OSError:
    return removed
  for entry in entries:
    m = _STALE_TMP.fullmatch(entry.name)
    if m and (name is None or m["name"] == name):
      tmp = entry.with_name(entry.name[:-len(LOCK)])
      # The directory is looked for before the lock: a writer makes it only once it holds the lock, so one seen here
      # whose lock is free is a dead writer's; one made after the look is a live writer's that took its lock just
      # after ours was released (between its mkstemp and its flock), never removed.
      # A lock file alone is left too: it may be such a writer's, whose later kill its lock must still reveal (one
      # left by a writer killed between its mkstemp and its mkdir is an empty file).
      if tmp.exists() and _writer_gone(entry):
        shutil.rmtree(tmp, ignore_errors=True)
        entry.unlink(missing_ok=True)
        if not tmp.exists():
          removed.append(tmp)
      continue
    m = _SET_ASIDE.fullmatch(entry.name)
    if m and (name is None or m["name"] == name) and entry.is_dir() and not entry.is_symlink():
      target = entry.with_name(m["name"])
      if not target.exists():
        with contextlib.suppress(OSError):
          os.rename(entry, target)  # a writer killed between its renames: the entry as it was
        continue
      shutil.rmtree(entry, ignore_errors=True)
      if not entry.exists():
        removed.append(entry)
  return removed
