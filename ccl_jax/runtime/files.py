"""Writing a file atomically: readers see the old file or the whole new one, never a part.

Every file ccl_jax writes (run directories, variable files, predictions, figures) goes
through `atomic_write`; a folder that must appear whole (an exported model) is written
inside `atomic_directory`.

A write the file system refuses (no space, quota, read-only, permission) is recognised by
`storage_error` however deep in a library's exception it lies, and programs end on it with
one line (`StorageError`) and STORAGE_EXIT_CODE.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import shutil
import sys
from typing import Callable, Iterator

STORAGE_EXIT_CODE = 74  # EX_IOERR of sysexits.h
# The failures of a file system rather than of the program. Orbax and TensorStore report them
# in their own exception types, with the operating system's text (os.strerror) in the message.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageError(OSError):
  """A write that the file system refused; str() is one line naming the path, the reason and,
  for a full disk, the space left there."""

  def __init__(self, code: int, path: str, needed_bytes: int | None = None):
    super().__init__(code, os.strerror(code), path)
    self.needed_bytes = needed_bytes

  def __str__(self) -> str:
    text = f"cannot write {self.filename}: {self.strerror}"
    if self.errno in _SPACE_ERRNOS:
      space = disk_space(self.filename)
      text += (f" ({_size(space[0])} free of {_size(space[1])} on its file system"
               if space else " (free space unknown")
      if self.needed_bytes:
        text += f", {_size(self.needed_bytes)} needed"
      text += ")"
    return text


@contextlib.contextmanager
def storage_failures_end_the_program(consequence: Callable[[], str]) -> Iterator[None]:
  """A storage failure inside ends the program (SystemExit, STORAGE_EXIT_CODE) with one line
  on stderr: the failure, then `consequence()` (what was kept, what to do)."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    failure = storage_error(error)
    if failure is None:
      raise
    print(f"error: {failure}. {consequence()}", file=sys.stderr, flush=True)
    raise SystemExit(STORAGE_EXIT_CODE) from None


def disk_space(path: str) -> tuple[int, int] | None:
  """(free, total) bytes of the file system that holds `path` (or its nearest existing
  folder), None if the system does not say."""
  existing = os.path.abspath(os.path.expanduser(path))
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  try:
    stats = os.statvfs(existing)
  except OSError:
    return None
  return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize


def _size(size: int) -> str:
  return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def storage_error(error: BaseException, path: str | None = None) -> StorageError | None:
  """The file system's refusal behind `error` (itself, its cause or context, or an error
  whose message carries the system's text), as a StorageError naming the file (or else
  `path`); None when `error` is of another kind."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, StorageError):
      return error
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
      return StorageError(error.errno, os.fsdecode(error.filename or path or "?"))
    for code in _STORAGE_ERRNOS:
      if path is not None and os.strerror(code) in str(error):
        return StorageError(code, path)
    error = error.__cause__ or error.__context__
  return None


def atomic_write(path: str, content: Callable[[io.IOBase], None] | bytes | str) -> str:
  """Replaces `path` with `content` (bytes, str as UTF-8, or a function writing to a
  binary file) and returns the path; creates the folder if needed.

  The bytes go to a temporary file in the target's folder (so the final rename never
  crosses file systems), are flushed to disk, then replace `path` in one `os.replace`, and
  the folder is synced so the rename itself survives a crash. An error or a kill at any
  point leaves the old file and no temporary one.
  """
  path = os.path.expanduser(path)
  directory = os.path.dirname(os.path.abspath(path))
  with _named_storage_errors(path):
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 lets the umask decide the final permissions, as open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
      with os.fdopen(fd, "wb") as f:
        if callable(content):
          content(f)
        else:
          f.write(content.encode("utf-8") if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
  _fsync_directory(directory)
  return path


def check_writable(path: str) -> None:
  """Raises StorageError unless a file can be created beside `path` (a file to be written):
  for programs that would otherwise find out after their long work."""
  path = os.path.expanduser(path)
  directory = os.path.dirname(os.path.abspath(path))
  with _named_storage_errors(path):
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    os.unlink(probe)


@contextlib.contextmanager
def _named_storage_errors(path: str) -> Iterator[None]:
  """A storage failure inside names `path`, the file asked for, not a temporary one."""
  try:
    yield
  except OSError as error:
    failure = storage_error(error)
    if failure is None:
      raise
    raise StorageError(failure.errno, path) from error


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields an empty temporary folder beside `path`; when the block ends without an error,
  the folder replaces `path` (and whatever `path` held is deleted), else it is deleted.

  `path` is never half-written: files go to the temporary folder (through `atomic_write`),
  which is renamed into place whole. A kill leaves at most a hidden '.<name>.<token>.tmp'
  folder beside `path`, or, in the instant between moving the old folder aside and the new
  one in, the old one as '.<name>.<token>.old'.
  """
  path = os.path.abspath(os.path.expanduser(path))
  parent, name = os.path.split(path)
  token = secrets.token_hex(6)
  tmp = os.path.join(parent, f".{name}.{token}.tmp")
  with _named_storage_errors(path):
    os.makedirs(parent, exist_ok=True)
    os.mkdir(tmp)
    try:
      yield tmp
      old = os.path.join(parent, f".{name}.{token}.old")
      if os.path.lexists(path):
        os.replace(path, old)
      os.replace(tmp, path)
      _fsync_directory(parent)
      shutil.rmtree(old, ignore_errors=True)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise


def _fsync_directory(directory: str) -> None:
  # Not every platform can open a directory for this.
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
