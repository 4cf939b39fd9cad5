"""Gin files and bindings -> T5Config, with T5X's flag conventions.

Model files bind `network.T5Config` fields and `network.Transformer.config =
@network.T5Config()` with dynamic registration, so `network` itself carries no
gin decorators; attention files under gin_configs/attention/ set the KV heads.
"""

import logging
from pathlib import Path
from typing import List, Sequence

import gin

from gqa_jax import network

# The repository's gin_configs/ (present in a source checkout or an editable install).
REPO_GIN_DIR = Path(__file__).resolve().parent.parent / 'gin_configs'
_added_search_paths = set()


def default_gin_search_paths() -> List[str]:
  """The current directory, then the repository's gin_configs/ if it exists."""
  return ['.'] + ([str(REPO_GIN_DIR)] if REPO_GIN_DIR.is_dir() else [])


def rewrite_gin_args(argv: Sequence[str]) -> List[str]:
  """T5X's shorthand: `--gin.NAME=VALUE` becomes `--gin_bindings=NAME = VALUE`."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      if '=' not in arg:
        raise ValueError(f'{arg!r} has no value: write --gin.NAME=VALUE.')
      name, value = arg[len('--gin.'):].split('=', 1)
      arg = f'--gin_bindings={name} = {value}'
    out.append(arg)
  return out


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
  """The path of gin file `name`: absolute, or under the first search path holding it."""
  candidates = ([Path(name)] if Path(name).is_absolute()
                else [Path(p) / name for p in search_paths])
  for path in candidates:
    if path.is_file():
      return str(path)
  raise FileNotFoundError(
      f'gin file {name!r} not found; searched {[str(p) for p in search_paths]} '
      '(add a directory with --gin_search_paths).')


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
          search_paths: Sequence[str] = ()):
  """Clears gin, then parses files and bindings (bindings last, so they win).

  Raises:
    FileNotFoundError: a gin file is in none of the search paths.
    ValueError: gin rejected a file or binding (syntax, unknown name, invalid value).
  """
  paths = list(search_paths) + default_gin_search_paths()
  files = [resolve_gin_file(f, paths) for f in gin_files]
  for path in paths:  # also used by `include` statements inside the files
    if path not in _added_search_paths:
      gin.add_config_file_search_path(path)
      _added_search_paths.add(path)
  gin.clear_config()
  quiet = _QuietSearch()
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=False)
  except Exception as e:  # gin reports syntax, names and values with several exception types
    raise ValueError(f'in gin config: {e}') from e
  finally:
    logging.getLogger().removeFilter(quiet)


class _QuietSearch(logging.Filter):
  """Drops gin's 'Path not found' lines: it logs one for every search path that does not
  hold an included file, before the one that does (a missing file still raises)."""

  def filter(self, record):
    return not str(record.getMessage()).startswith('Path not found')


def load_config(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                search_paths: Sequence[str] = ()) -> network.T5Config:
  """Parses gin files, then bindings (after clearing gin), and returns the T5Config.

  The config is `network.Transformer.config` when that is bound (T5X's model
  file convention), else `network.T5Config` called with its bindings.

  Args:
    gin_files: paths, absolute or relative to a search path.
    gin_bindings: binding strings such as 'NUM_KV_HEADS = 4', applied last.
    search_paths: directories tried before the defaults (cwd, gin_configs/).
  """
  parse(gin_files, gin_bindings, search_paths)
  try:
    config = None
    if _registered(network.Transformer):
      config = gin.get_bindings(network.Transformer).get('config')
    if config is None:
      config = (gin.get_configurable(network.T5Config)() if _registered(network.T5Config)
                else network.T5Config())
  except Exception as e:  # gin reports syntax, names and values with several exception types
    raise ValueError(f'in gin config: {e}') from e
  if not isinstance(config, network.T5Config):
    raise ValueError(f'network.Transformer.config is bound to {config!r}, not a T5Config.')
  return config


def call(fn):
  """Calls the gin-configured `fn` (registered by a parsed file's dynamic registration)."""
  if not _registered(fn):
    raise ValueError(f'no gin file configures {fn.__module__}.{fn.__name__}: add a run file '
                     'such as runs/pretrain.gin.')
  try:
    configured = gin.get_configurable(fn)
  except ValueError as e:
    raise ValueError(f'in gin config: {e}') from e
  return configured()


def _registered(fn) -> bool:
  # Dynamic registration happens when a file imports `network`; registrations outlive
  # gin.clear_config, so an unregistered class means no file has ever named it.
  try:
    gin.get_configurable(fn)
    return True
  except ValueError:
    return False
