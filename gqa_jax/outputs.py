"""Output folders and files the user names, checked before any work is done.

A benchmark that runs for minutes and then cannot write its result, or an evaluation
that decodes a whole split into a path that is a file, loses the work: every command
checks its outputs first with `check_output_dir`. A name the file system refuses (longer
than its limit on one name, by itself or once a command's hidden sibling such as
`.NAME.lock` is written beside it) is refused here too, by `check_output_name`.
"""

import os
from pathlib import Path

from gqa_jax.errors import ConfigError

DEFAULT_NAME_MAX = 255  # bytes in one file name: Linux's and macOS's file systems


def name_max(folder) -> int:
  """The longest file name (in bytes) that the file system of `folder`, or of its
  nearest existing parent, allows (os.pathconf's PC_NAME_MAX; 255 when unknown)."""
  for parent in (Path(folder), *Path(folder).parents):
    try:
      if parent.is_dir():
        return int(os.pathconf(parent, 'PC_NAME_MAX'))
    except (OSError, ValueError):
      continue  # a component too long to look up, or no such setting: go up
  return DEFAULT_NAME_MAX


def _short(text: str) -> str:
  return text if len(text) <= 48 else f'{text[:24]}...{text[-12:]}'


def _check_lengths(path: Path, what: str, shown: str):
  """ConfigError if a component of the absolute `path` is longer than its folder allows."""
  limit = name_max(path)
  for part in path.parts[1:]:
    size = len(os.fsencode(part))
    if size > limit:
      raise ConfigError(f'{what} {_short(shown)}: the name {_short(part)!r} is {size} bytes, '
                        f'more than the {limit} this file system allows in one name: choose '
                        'a shorter name.')


def check_output_dir(path, what: str) -> Path:
  """`path` as an absolute Path (`~` and relative parts resolved), or ConfigError naming
  `what` (e.g. '--output', 'EVAL_OUTPUT_DIR') when it cannot be a folder we write.

  Refused: a name in `path` longer than the file system allows; `path` or one of its
  parents is a file; the nearest existing parent is not writable. Nothing is created.
  """
  if path is None or not str(path).strip():
    raise ConfigError(f'{what} is empty: give the folder to write.')
  resolved = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  _check_lengths(resolved, what, str(path))
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


def check_output_name(path, what: str, hidden_suffix: str = '') -> Path:
  """`path` as an absolute Path, or ConfigError naming `what` when its name, or the name
  of the hidden file `.NAME<hidden_suffix>` that a command writes beside it (its longest:
  a lock, a temporary copy), is longer than the file system allows. Give the suffix at
  its longest (e.g. '.partial-12345678' for eight hex digits).

  Checked before any work, so that a command does not fail with 'File name too long'
  once it has done it. Nothing is created.
  """
  resolved = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  _check_lengths(resolved, what, str(path))
  limit = name_max(resolved.parent)
  size, extra = len(os.fsencode(resolved.name)), len(os.fsencode('.' + hidden_suffix))
  if hidden_suffix and size + extra > limit:
    raise ConfigError(f'{what} {_short(str(path))}: its name is {size} bytes, and the hidden '
                      f'.NAME{hidden_suffix} written beside it would be {size + extra}, more '
                      f'than the {limit} this file system allows in one name: choose a name '
                      f'of at most {limit - extra} bytes.')
  return resolved
