"""Directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, writer: bool = True) -> Iterator[Path | None]:
  """A temporary sibling of ``path`` that replaces ``path`` when the block ends without error (and is
  removed when it raises: nothing half-written is left). Writers racing for one ``path`` each replace
  it whole; the last one wins, never a mix of two. Yields None on processes that do not write."""
  if not writer:
    yield None
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
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
