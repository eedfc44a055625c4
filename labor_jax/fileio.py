"""Directories that appear whole or not at all, and the removal of what a killed writer left."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, writer: bool = True) -> Iterator[Path | None]:
  """A temporary sibling of ``path`` that replaces ``path`` when the block ends without error (and is
  removed when it raises: nothing half-written is left). Writers racing for one ``path`` each replace
  it whole; the last one wins, never a mix of two. Yields None on processes that do not write.
  A process killed outright (SIGKILL, out of memory) cannot remove its temporary directory; the next
  writer of ``path`` does (:func:`remove_stale`)."""
  if not writer:
    yield None
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_stale(path.parent, path.name)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=path.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # a plain directory's mode, not mkdtemp's private 0700
  try:
    yield tmp
    _replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _replace(new: Path, path: Path) -> None:
  """Moves the directory ``new`` to ``path``, setting aside (then deleting) whatever is there."""
  while True:
    old = path.parent / f".{path.name}.old.{uuid.uuid4().hex}"
    try:
      os.rename(path, old)
    except FileNotFoundError:
      old = None
    try:
      os.rename(new, path)
    except OSError:  # another writer put its directory there in between: set it aside too
      if old is not None:
        shutil.rmtree(old, ignore_errors=True)
      continue
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return


_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+|old\.[0-9a-f]{32})")


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def remove_stale(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
  """Removes from ``parent`` what :func:`atomic_dir` writers of ``name`` (of any name when None) left when
  they were killed: temporary directories of processes of this host that no longer run, and set-aside old
  copies (never read again). Another host's temporary directories are left: its processes cannot be seen
  from here. Returns what was removed."""
  removed = []
  try:
    entries = list(Path(parent).iterdir())
  except OSError:
    return removed
  host = socket.gethostname()
  for entry in entries:
    m = _STALE.fullmatch(entry.name)
    if not m or (name is not None and m["name"] != name) or not entry.is_dir() or entry.is_symlink():
      continue
    if m["pid"] is not None and (m["host"] != host or _running(int(m["pid"]))):
      continue
    shutil.rmtree(entry, ignore_errors=True)
    if not entry.exists():
      removed.append(entry)
  return removed
