"""The data pipeline's errors, each one line: :class:`PanelError` (bad input: file, row, column,
value) and :class:`WriteError` (an output that could not be written: a full disk, a file size limit).
:func:`disk_full` tells the latter apart from other failures (also used for checkpoints); :func:`output_problem`
says why an output path must not be replaced and :func:`write_problem` whether the file system lets it be written
(both also used by :mod:`labor_jax.fileio`)."""

from __future__ import annotations

import errno
import os
import re
import tempfile


def output_problem(path: str | os.PathLike, marker: str | None, what: str = "output") -> str | None:
  """Why writing the ``what`` to ``path`` must not replace what is there, or None when it may: ``path`` is absent, an
  empty directory, or a directory holding ``marker`` (an earlier ``what`` of the same kind; None: any directory). A
  file, a training run, a dataset or anything else named as an output is left alone, and a path under a file cannot be
  made. Whether the file system lets the writer write there is :func:`write_problem`'s question."""
  if not os.path.lexists(path):
    above = _nearest_existing(_writer_parent(path))
    return None if os.path.isdir(above) else f"cannot be made: {above} is not a directory"
  if not os.path.isdir(path):
    return f"exists and is not a directory: name another output directory for the {what}"
  if marker is None or os.path.exists(os.path.join(path, marker)) or not os.listdir(path):
    return None
  return (f"holds files that are not an earlier {what} (no {marker} there), which writing the {what} would replace: "
          "name another output directory, or remove it first")


def write_problem(path: str | os.PathLike) -> WriteError | None:
  """A :class:`WriteError` (one line) when no file can be made where the writer of the output ``path`` puts its
  temporary sibling, else None: found by making and removing an empty file in ``path``'s parent as the writer resolves
  it (symbolic links followed), or in the nearest folder above it that exists (the writer makes the rest). Catches a
  read-only or pseudo file system (``/proc``), a folder without write permission, a full disk, before any work."""
  parent = _nearest_existing(_writer_parent(path))
  if not os.path.isdir(parent):
    return None  # output_problem's case
  try:
    fd, probe = tempfile.mkstemp(prefix=".labor_jax-write-probe-", dir=parent)
  except OSError as e:
    full = disk_full(e)
    err = WriteError(f"{path} cannot be written: no file can be made in {parent} ({full[0] if full else e.strerror or e})")
    err.errno = e.errno  # disk_full() still tells a full disk apart
    return err
  os.close(fd)
  os.unlink(probe)
  return None


def _writer_parent(path: str | os.PathLike) -> str:
  """The folder an output ``path``'s writer writes in (labor_jax.fileio.atomic_dir: the parent, links resolved)."""
  return os.path.realpath(os.path.dirname(os.fspath(path)) or ".")


def _nearest_existing(folder: str) -> str:
  while not os.path.lexists(folder):
    folder = os.path.dirname(folder)
  return folder


class PanelError(ValueError):
  """Invalid panel or titles input. ``str()`` is a single line: file, row, column, value, problem."""

  def __init__(self, file, problem: str, row: int | None = None, column: str | None = None,
               value=None, has_value: bool = False):
    parts = [str(file)]
    if row is not None:
      parts.append(f"row {row}")
    if column is not None:
      parts.append(f"column '{column}'")
    where = ", ".join(parts)
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():  # 1980, not np.int64(1980)
      value = value.item()
    shown = f" (value {value!r})" if has_value else ""
    super().__init__(f"{where}: {problem}{shown}".replace("\n", " "))
    self.file, self.row, self.column, self.value = file, row, column, value


class WriteError(OSError):
  """An output that could not be written (the disk is full, a file size limit was hit). One line."""


_FULL = {errno.ENOSPC: "no space left on device (the disk is full)",
         errno.EDQUOT: "disk quota exceeded (the disk is full for this user)",
         errno.EFBIG: "file too large (a file size limit was hit)"}
_FULL_TEXT = {os.strerror(code).lower(): why for code, why in _FULL.items()}
_WRITING = re.compile(r'(?:writing|file|path) "?(/[^";,\s]+)')


def disk_full(e: BaseException) -> tuple[str, str | None] | None:
  """(why, the file named if any) when ``e`` or an exception it was raised from says the disk is full
  or a file size limit was hit (errno ENOSPC, EDQUOT, EFBIG, or their message inside a C++ library's
  error, e.g. tensorstore's or array_record's); None for any other failure."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _FULL:
      return _FULL[e.errno], e.filename
    msg = str(e)
    for text, why in _FULL_TEXT.items():
      if text in msg.lower():
        m = _WRITING.search(msg)
        return why, m[1] if m else None
    e = e.__cause__ or e.__context__
  return None
