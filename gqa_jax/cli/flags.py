"""What every `gqa-jax` command shares: the parser class, the user-error type, and the
flags declared once (model selection, gin files, multi-host, typed values)."""

import argparse
import sys

from gqa_jax import gin_utils
from gqa_jax import network
from gqa_jax.errors import UserInputError

PROG = 'gqa-jax'


class UserError(UserInputError):
  """A mistake in the command line or the gin files: one line on stderr, exit status 2."""


class Exit(Exception):
  """Raised instead of sys.exit by --help, so that main() can return the status."""

  def __init__(self, status):
    super().__init__(status)
    self.status = status


class Parser(argparse.ArgumentParser):
  # argparse would print the usage and call sys.exit; main() returns a status instead.
  def error(self, message):
    raise UserError(message)

  def exit(self, status=0, message=None):
    if message:
      sys.stderr.write(message)
    raise Exit(status)


def one_line(e: Exception) -> str:
  """The message on one line, without the 'In call to configurable ...' lines gin adds."""
  return ' | '.join(line.strip() for line in str(e).splitlines()
                    if line.strip() and not line.strip().startswith('In call to configurable'))


def rewrite_gin_args(argv):
  """T5X's `--gin.NAME=VALUE` shorthand as `--gin_bindings` flags."""
  try:
    return gin_utils.rewrite_gin_args(argv)
  except ValueError as e:
    raise UserError(str(e)) from e


# ---------------------------------------------------------- gin flags ----

def add_gin_flags(parser, *, files: bool = True, files_required: bool = False,
                  example: str = "'NUM_KV_HEADS = 4'", shorthand: str = '--gin.NUM_KV_HEADS=4'):
  """T5X's --gin_file / --gin_bindings / --gin_search_paths on `parser` (or a group)."""
  if files:
    parser.add_argument('--gin_file', action='append', default=[], metavar='PATH',
                        required=files_required,
                        help='gin file, absolute or relative to a search path; repeatable.')
  parser.add_argument('--gin_bindings', action='append', default=[], metavar='BINDING',
                      help=f"gin binding such as {example}; repeatable. T5X's "
                           f'shorthand {shorthand} works too.')
  parser.add_argument('--gin_search_paths', action='append', default=[], metavar='DIRS',
                      help='comma-separated directories searched for gin files, before the '
                           "defaults (the repository's gin_configs/, then '.'); repeatable.")


def search_paths(args) -> list:
  """--gin_search_paths, each a comma-separated list, as one list of directories."""
  return [p for value in args.gin_search_paths for p in value.split(',') if p]


# -------------------------------------------------------- model flags ----

def add_model_flags(parser: argparse.ArgumentParser):
  group = parser.add_argument_group(
      'model', 'A preset, or T5X-style gin files (files and bindings are applied in order, '
      'later ones win). With gin flags, the --size model file models/t5_1_1/SIZE.gin is '
      'loaded first when --size is given or no --gin_file is.')
  group.add_argument('--size', '--preset', dest='size', choices=list(network.PRESETS),
                     metavar='NAME', help='model size preset: '
                     f'{", ".join(network.PRESETS)} (default: small).')
  add_gin_flags(group)


def model_config(args) -> tuple:
  """(T5Config, a name for it) from --size and the gin flags."""
  if not (args.gin_file or args.gin_bindings):
    return network.get_preset(args.size or 'small'), f'preset {args.size or "small"}'
  files = list(args.gin_file)
  if args.size or not files:
    files.insert(0, f'models/t5_1_1/{args.size or "small"}.gin')
  try:
    config = gin_utils.load_config(files, args.gin_bindings, search_paths(args))
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from e
  return config, 'gin ' + ' + '.join(files)


def add_multihost_flags(parser):
  group = parser.add_argument_group(
      'multi-host', "T5X's flags for jax.distributed.initialize (leave unset on one host, "
      'or on TPU pods where JAX finds them).')
  group.add_argument('--coordinator_address', metavar='HOST:PORT',
                     help='address of process 0.')
  group.add_argument('--process_count', type=int, metavar='N', help='number of processes.')
  group.add_argument('--process_index', type=int, metavar='I', help='index of this process.')
  group.add_argument('--cpu_collectives', choices=['gloo', 'mpi'],
                     help='collectives between CPU processes (gloo for CPU-only multi-process '
                          'runs and tests).')


# -------------------------------------------------------- value types ----

def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be a positive integer, got {text!r}')
  return value


def stacks_list(text: str) -> tuple:
  stacks = tuple(s.strip() for s in text.split(',') if s.strip())
  unknown = [s for s in stacks if s not in network.STACKS]
  if unknown or not stacks:
    raise argparse.ArgumentTypeError(
        f'{text!r}: give a comma-separated subset of {",".join(network.STACKS)}')
  twice = [s for s in network.STACKS if stacks.count(s) > 1]
  if twice:
    raise argparse.ArgumentTypeError(
        f'{text!r} names {", ".join(twice)} more than once: give each stack once')
  return stacks
