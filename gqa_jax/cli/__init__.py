"""The `gqa-jax` command line.

One module per command group, each with `register(subparsers)` that declares its
commands' flags and sets `run`, a callback taking the parsed args and returning an exit
code; the work itself lives in library modules:

  checkpoints.py  info, convert, inspect
  run.py          train, eval, infer (gin-configured, T5X's flags)
  compile.py      compile (a run's step compiled for a TPU slice: memory, FLOPs, roofline)
  bench.py        bench decode
  experiments.py  sweep, quickstart
  flags.py        what they share: model selection (a preset or T5X-style gin files),
                  the gin and multi-host flags, value types, UserError

This module builds the parser from them and runs a command line (`main`).
"""

import os
import sys
import traceback
from typing import Optional, Sequence

from gqa_jax.cli import bench
from gqa_jax.cli import calibrate
from gqa_jax.cli import checkpoints
from gqa_jax.cli import compile as compile_command
from gqa_jax.cli import experiments
from gqa_jax.cli import flags
from gqa_jax.cli import run
from gqa_jax.cli.flags import PROG, UserError
from gqa_jax.errors import UserInputError

__all__ = ['PROG', 'UserError', 'build_parser', 'main']


def build_parser() -> flags.Parser:
  parser = flags.Parser(prog=PROG,
                        description='Grouped-query attention (GQA) on T5.1.1 in JAX.',
                        epilog=f"Run '{PROG} COMMAND --help' for a command's flags.")
  subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
  checkpoints.register(subparsers)
  calibrate.register(subparsers)
  run.register(subparsers)
  compile_command.register(subparsers)
  bench.register(subparsers)
  # A sweep parses its stages' command lines and runs them in this process: it gets the
  # parser and main from here. `main` is looked up when the parser is built, so that a
  # replaced `gqa_jax.cli.main` (tests fake the stages) is the one the sweep calls.
  experiments.register(subparsers, build_parser=build_parser, main=main)
  return parser


DEBUG_FLAG = '--debug'


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit status.

  Bad input (a UserInputError: flags, gin bindings, files, checkpoints) is one line on
  stderr and status 2; an unexpected error is one line and status 1, with the
  traceback under --debug (accepted anywhere on the line).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = DEBUG_FLAG in argv
  argv = [a for a in argv if a != DEBUG_FLAG]
  try:
    args = build_parser().parse_args(flags.rewrite_gin_args(argv))
    if args.command is None:
      raise UserError(f"no command given; run '{PROG} --help'.")
    return args.run(args)
  except flags.Exit as e:
    return e.status
  except BrokenPipeError:  # `gqa-jax inspect CKPT | head`: the reader left, not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  except UserInputError as e:  # a bad flag, binding, file or checkpoint: the fix is named
    if debug:
      traceback.print_exc()
    print(f'{PROG}: error: {flags.one_line(e)}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'{PROG}: interrupted.', file=sys.stderr)
    return 130
  except Exception as e:  # a bug or an environment problem: say so, traceback on request
    if debug:
      traceback.print_exc()
    hint = '' if debug else f' (rerun with {DEBUG_FLAG} for the traceback)'
    print(f'{PROG}: error: unexpected {type(e).__name__}: {flags.one_line(e)}{hint}',
          file=sys.stderr)
    return 1
