"""Writing a file atomically: readers see the old file or the whole new one, never a part.

Every file ccl_jax writes (run directories, variable files, predictions, figures) goes
through `atomic_write`; a folder that must appear whole (an exported model) is written
inside `atomic_directory`.
"""
from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
from typing import Callable, Iterator


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
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
  # os.open with 0o666 lets the umask decide the final permissions, as a plain open() would.
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
  os.makedirs(parent, exist_ok=True)
  token = secrets.token_hex(6)
  tmp = os.path.join(parent, f".{name}.{token}.tmp")
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
