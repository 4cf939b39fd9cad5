"""Gin files and bindings -> T5Config, with T5X's flag conventions.

Model files bind `network.T5Config` fields and `network.Transformer.config =
@network.T5Config()` with dynamic registration, so `network` itself carries no
gin decorators; attention files under gin_configs/attention/ set the KV heads.
"""

import ast
import contextlib
import difflib
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import gin
from gin import config as gin_config

from gqa_jax import network
from gqa_jax.errors import ConfigError

# The repository's gin_configs/ (present in a source checkout or an editable install).
REPO_GIN_DIR = Path(__file__).resolve().parent.parent / 'gin_configs'
# A binding whose left side has no '.' binds a macro ('TRAIN_STEPS = 2', 'train/X = 1').
_MACRO_BINDING = re.compile(r'\s*([A-Za-z_][\w/]*)\s*=(.*)', re.S)
_GIN_MACRO = '/gin.macro'


def default_gin_search_paths() -> List[str]:
  """The repository's gin_configs/ if it exists, then the current directory.

  Gin files are code (a file can import and call any Python), so the shipped files come
  first: a `models/t5_1_1/tiny.gin` in the working directory must not replace the one a
  shipped file includes. A file of the user's own is still found in '.', and explicit
  `--gin_search_paths` come before both.
  """
  return ([str(REPO_GIN_DIR)] if REPO_GIN_DIR.is_dir() else []) + ['.']


def rewrite_gin_args(argv: Sequence[str]) -> List[str]:
  """T5X's shorthand: `--gin.NAME=VALUE` becomes `--gin_bindings=NAME = VALUE`."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      if '=' not in arg:
        raise ConfigError(f'{arg!r} has no value: write --gin.NAME=VALUE.')
      name, value = arg[len('--gin.'):].split('=', 1)
      arg = f'--gin_bindings={name} = {value}'
    out.append(arg)
  return out


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
  """The path of gin file `name`: absolute, or under the first search path holding it.

  A name written relative to the working directory ('./mine.gin', '../x.gin') is taken as
  typed, so that a user's own copy of a shipped file can be chosen on purpose.
  """
  explicit = Path(name).is_absolute() or name.startswith(('./', '../'))
  candidates = [Path(name)] if explicit else [Path(p) / name for p in search_paths]
  for path in candidates:
    if path.is_file():
      # Absolute: gin would otherwise search its own path list for it again.
      return os.path.abspath(path)
  raise FileNotFoundError(
      f'gin file {name!r} not found; searched {[str(p) for p in search_paths]} '
      '(add a directory with --gin_search_paths).')


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
          search_paths: Sequence[str] = (), check_macros: bool = True):
  """Clears gin, then parses files and bindings (bindings last, so they win).

  Search order, for the files and for `include` statements inside them:
  `search_paths`, the shipped gin_configs/, then the working directory.

  Args:
    check_macros: refuse a macro binding ('TRAIN_STEP = 2') that no parsed file refers
      to: a misspelt name would otherwise be ignored silently.

  Raises:
    FileNotFoundError: a gin file is in none of the search paths.
    ValueError: gin rejected a file or binding (syntax, unknown name, invalid value);
      ConfigError for an unused macro binding or an unquoted string value.
  """
  paths = list(search_paths) + default_gin_search_paths()
  files = [resolve_gin_file(f, paths) for f in gin_files]
  gin.clear_config()
  quiet = _QuietSearch()
  logging.getLogger().addFilter(quiet)
  try:
    with _search_order(paths):
      gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=False)
  except Exception as e:  # gin reports syntax, names and values with several exception types
    unquoted = _unquoted_string(gin_bindings)
    if unquoted:
      raise ConfigError(unquoted) from e
    raise ValueError(f'in gin config: {e}') from e
  finally:
    logging.getLogger().removeFilter(quiet)
  if check_macros:
    _check_macros_used(gin_bindings)


@contextlib.contextmanager
def _search_order(paths: Sequence[str]):
  """Gin's include search path set to `paths`, in that order, while parsing.

  gin keeps one global list that starts with '' (the working directory) and only grows
  (`add_config_file_search_path` appends), so it would always look in '.' first; it is
  replaced for the parse and restored afterwards.
  """
  prefixes = gin_config._LOCATION_PREFIXES  # pylint: disable=protected-access
  saved = list(prefixes)
  prefixes[:] = list(paths)
  try:
    yield
  finally:
    prefixes[:] = saved


def _unquoted_string(gin_bindings: Sequence[str]) -> Optional[str]:
  """For the first binding whose value is a bare word or path (`MODEL_DIR = /x`), a
  message showing it quoted; None if every value at least looks like a gin value."""
  for binding in gin_bindings:
    if '=' not in binding:
      continue
    name, value = (part.strip() for part in binding.split('=', 1))
    if not value or value[0] in '\'"[{(%@' or '\n' in value:
      continue
    if value in ('None', 'True', 'False') or re.fullmatch(r'inf|nan', value):
      continue
    try:
      ast.literal_eval(value)
      continue
    except (ValueError, SyntaxError):
      pass
    return (f'{name} = {value}: a string value must be quoted: '
            f'--gin.{name}=\\"{value}\\" on the command line, or {name} = '
            f"'{value}' in a gin file or --gin_bindings.")
  return None


def _check_macros_used(gin_bindings: Sequence[str]):
  """Raises ConfigError for a bound macro that no parsed file (or other binding) uses."""
  bound = []
  for binding in gin_bindings:
    match = _MACRO_BINDING.match(binding)
    if match and not match.group(1).startswith('gin'):
      bound.append(match.group(1))
  if not bound:
    return
  used = used_macros()
  for name in bound:
    if name not in used:
      close = difflib.get_close_matches(name, sorted(used), n=3, cutoff=0.6)
      hint = (f'did you mean {" or ".join(close)}?' if close else
              f'the files use {", ".join(sorted(used)) or "no macros"}.')
      raise ConfigError(f'{name} is bound but no gin file uses it: {hint}')


def used_macros() -> set:
  """The macros referred to (`%NAME`) anywhere in the parsed gin config."""
  macro = gin.get_configurable(gin_config.macro)
  return {ref.scoped_selector[:-len(_GIN_MACRO)]
          for ref in gin_config.iterate_references(gin_config._CONFIG, to=macro)  # pylint: disable=protected-access
          if ref.scoped_selector.endswith(_GIN_MACRO)}


def unbound_macros() -> List[str]:
  """Macros referred to (`%NAME`) in the parsed config that nothing binds."""
  bound = {scope for (scope, selector), values in gin_config._CONFIG.items()  # pylint: disable=protected-access
           if selector == 'gin.macro' and 'value' in values}
  return sorted(used_macros() - bound)


class _QuietSearch(logging.Filter):
  """Drops gin's 'Path not found' lines: it logs one for every search path that does not
  hold an included file, before the one that does (a missing file still raises)."""

  def filter(self, record):
    return not str(record.getMessage()).startswith('Path not found')


def load_config(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                search_paths: Sequence[str] = (), check_macros: bool = True
                ) -> network.T5Config:
  """Parses gin files, then bindings (after clearing gin), and returns the T5Config.

  The config is `network.Transformer.config` when that is bound (T5X's model
  file convention), else `network.T5Config` called with its bindings.

  Args:
    gin_files: paths, absolute or relative to a search path.
    gin_bindings: binding strings such as 'NUM_KV_HEADS = 4', applied last.
    search_paths: directories tried before the defaults (gin_configs/, cwd).
    check_macros: see `parse`.
  """
  parse(gin_files, gin_bindings, search_paths, check_macros)
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
