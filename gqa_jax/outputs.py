"""Output folders the user names, checked before any work is done.

A benchmark that runs for minutes and then cannot write its result, or an evaluation
that decodes a whole split into a path that is a file, loses the work: every command
checks its outputs first with `check_output_dir`.
"""

import os
from pathlib import Path

from gqa_jax.errors import ConfigError


def check_output_dir(path, what: str) -> Path:
  """`path` as an absolute Path (`~` and relative parts resolved), or ConfigError naming
  `what` (e.g. '--output', 'EVAL_OUTPUT_DIR') when it cannot be a folder we write.

  Refused: `path` or one of its parents is a file; the nearest existing parent is not
  writable. Nothing is created.
  """
  if path is None or not str(path).strip():
    raise ConfigError(f'{what} is empty: give the folder to write.')
  resolved = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  for parent in (resolved, *resolved.parents):
    if parent.exists():
      if not parent.is_dir():
        where = 'is' if parent == resolved else f'is under {parent}, which is'
        raise ConfigError(f'{what} {path} {where} a file, not a folder: choose another '
                          'path (or move the file away).')
      if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f'{what} {path}: {parent} is not writable by this user: choose '
                          'another folder.')
      break
  return resolved
