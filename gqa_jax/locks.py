"""Exclusive locks on output folders (MODEL_DIR, EVAL_OUTPUT_DIR, a conversion's DST, a
sweep stage).

A lock is an `fcntl.flock` on a small file that names its holder (process, host,
command, start time). The kernel drops the lock when the holder dies, SIGKILL
included, so a killed run never leaves a stale lock behind. The holder removes the
file when it is done; a waiter checks after locking that the file it locked is
still the one at the path (otherwise it locked a removed file and tries again).
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from gqa_jax.errors import ConfigError, OutputLocked


def _holder() -> dict:
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'command': ' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
          'since': time.strftime('%Y-%m-%d %H:%M:%S')}


def _describe(text: str) -> str:
  try:
    h = json.loads(text)
    return f"process {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
  except (ValueError, KeyError, TypeError):
    return 'another process'


@contextlib.contextmanager
def hold(lock_file, what: str, fix: str, wait: bool = False) -> Iterator[None]:
  """Holds an exclusive lock on `lock_file` for the duration of the block.

  Args:
    lock_file: the lock's path; its folder must exist.
    what: the locked thing, for the message ('MODEL_DIR /runs/a').
    fix: what the user can do instead ('wait for it to finish or choose another MODEL_DIR').
    wait: block until the lock is free instead of failing.

  Raises:
    OutputLocked: `wait` is False and another process holds the lock.
  """
  path = Path(lock_file)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      text = os.pread(fd, 4096, 0).decode(errors='replace')
      os.close(fd)
      raise OutputLocked(f'{what} is in use by {_describe(text)}: {fix}.') from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # the previous holder removed the file we locked: lock the new one
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder()) + '\n').encode(), 0)
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)  # while still holding it, so no waiter keeps a removed file
    os.close(fd)


@contextlib.contextmanager
def own(folder, what: str, fix: str, lock: bool = True,
        lock_name: str = '.lock') -> Iterator[None]:
  """`folder` created if need be and locked (`hold` on `folder/lock_name`) for the block,
  so that a second writer of it is refused. A folder that this created is removed again
  if the block fails while it is still empty: a refused command leaves nothing behind.

  Args:
    folder: the output folder (a Path).
    what: how the user names it, for messages ('MODEL_DIR /runs/a').
    fix: what the user can do when another process holds it.
    lock: False for the processes of a multi-host run other than the first, which
      share the folder (and its lock) with it.

  Raises:
    ConfigError: the folder cannot be created.
    OutputLocked: another process holds it.
  """
  folder = Path(folder)
  created = not folder.exists()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'{what} cannot be created ({e.strerror}): choose another folder.') from e
  try:
    if lock:
      with hold(folder / lock_name, what, fix):
        yield
    else:
      yield
  except BaseException:
    if created:
      with contextlib.suppress(OSError):
        folder.rmdir()  # only if still empty
    raise
