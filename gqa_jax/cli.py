"""The `gqa-jax` command line.

Each subcommand is one `_add_<name>(subparsers)` function that declares its
flags and sets `run`, a callback taking the parsed args and returning an exit
code; the work itself lives in library modules. Command families with their own
module (cli_bench: `bench`; cli_experiments: `sweep`, `quickstart`) expose
`register(subparsers)` instead. Model selection (a preset or T5X-style gin files,
with T5X's flag spelling) is shared by all subcommands: `add_model_flags` and
`model_config`.
"""

import argparse
import importlib
import json
import os
import sys
import traceback
from typing import Optional, Sequence

import numpy as np

from gqa_jax import checkpoints
from gqa_jax import convert as convert_lib
from gqa_jax import gin_utils
from gqa_jax import info
from gqa_jax import network
from gqa_jax.errors import UserInputError

PROG = 'gqa-jax'


class UserError(UserInputError):
  """A mistake in the command line or the gin files: one line on stderr, exit status 2."""


class _Exit(Exception):
  """Raised instead of sys.exit by --help, so that main() can return the status."""

  def __init__(self, status):
    super().__init__(status)
    self.status = status


class _Parser(argparse.ArgumentParser):
  # argparse would print the usage and call sys.exit; main() returns a status instead.
  def error(self, message):
    raise UserError(message)

  def exit(self, status=0, message=None):
    if message:
      sys.stderr.write(message)
    raise _Exit(status)


# ------------------------------------------------------- shared flags ----

def add_model_flags(parser: argparse.ArgumentParser):
  group = parser.add_argument_group(
      'model', 'A preset, or T5X-style gin files (files and bindings are applied in order, '
      'later ones win). With gin flags, the --size model file models/t5_1_1/SIZE.gin is '
      'loaded first when --size is given or no --gin_file is.')
  group.add_argument('--size', '--preset', dest='size', choices=list(network.PRESETS),
                     metavar='NAME', help='model size preset: '
                     f'{", ".join(network.PRESETS)} (default: small).')
  group.add_argument('--gin_file', action='append', default=[], metavar='PATH',
                     help='gin file, absolute or relative to a search path; repeatable.')
  group.add_argument('--gin_bindings', action='append', default=[], metavar='BINDING',
                     help="gin binding such as 'NUM_KV_HEADS = 4'; repeatable. T5X's "
                          'shorthand --gin.NUM_KV_HEADS=4 works too.')
  group.add_argument('--gin_search_paths', action='append', default=[], metavar='DIRS',
                     help='comma-separated directories searched for gin files, before the '
                          "defaults (the repository's gin_configs/, then '.'); repeatable.")


def model_config(args) -> tuple:
  """(T5Config, a name for it) from --size and the gin flags."""
  if not (args.gin_file or args.gin_bindings):
    return network.get_preset(args.size or 'small'), f'preset {args.size or "small"}'
  files = list(args.gin_file)
  if args.size or not files:
    files.insert(0, f'models/t5_1_1/{args.size or "small"}.gin')
  paths = [p for value in args.gin_search_paths for p in value.split(',') if p]
  try:
    config = gin_utils.load_config(files, args.gin_bindings, paths)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from e
  return config, 'gin ' + ' + '.join(files)


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
  return stacks


# ---------------------------------------------------------- commands ----

def _add_info(subparsers):
  parser = subparsers.add_parser(
      'info', help='parameter counts and KV-cache sizes of MHA, GQA-G and MQA.',
      description='For MHA, GQA-G (every divisor G of num_heads with 1 < G < N) and MQA: '
                  'exact parameter counts from the parameter tree, K/V-projection parameters '
                  'per attention stack, and the KV cache that decoding keeps. The '
                  f'{info.NO_ENCODER_CACHE[len("the "):]}.')
  add_model_flags(parser)
  parser.add_argument('--input-length', type=positive_int, default=2048, metavar='S',
                      help='encoder input length; sets the cross-attention cache '
                           '(default: %(default)s).')
  parser.add_argument('--output-length', type=positive_int, default=512, metavar='T',
                      help='decoder output length; sets the self-attention cache '
                           '(default: %(default)s).')
  parser.add_argument('--batch-size', type=positive_int, default=32, metavar='B',
                      help='batch size for the per-batch cache total (default: %(default)s).')
  parser.add_argument('--stacks', type=stacks_list, default=network.PAPER_STACKS,
                      metavar='LIST', help='comma-separated attention stacks whose KV heads '
                      f'each variant sets, from {",".join(network.STACKS)} '
                      "(default: the paper's decoder_self,decoder_cross).")
  parser.add_argument('--cache-dtype', metavar='DTYPE',
                      help="dtype of the cache, e.g. bfloat16 or float32 (default: the "
                           "model's activation dtype).")
  parser.add_argument('--json', action='store_true',
                      help='print a JSON list of records, one per variant, instead of tables.')
  parser.set_defaults(run=_run_info)


def _run_info(args) -> int:
  config, model = model_config(args)
  try:
    records = info.report(config, input_length=args.input_length,
                          output_length=args.output_length, batch_size=args.batch_size,
                          stacks=args.stacks, cache_dtype=args.cache_dtype)
  except ValueError as e:
    raise UserError(str(e)) from e
  if args.json:
    print(json.dumps([{'model': model, **r} for r in records], indent=2))
  else:
    print(info.format_report(records, model, config))
  return 0


def _add_convert(subparsers):
  parser = subparsers.add_parser(
      'convert', help='convert an MHA checkpoint to GQA-G or MQA (T5X, Orbax or HF in).',
      description='Reads a T5X legacy, T5X Orbax, gqa_jax or Hugging Face T5 checkpoint and '
                  'writes it with NUM_KV_HEADS key/value heads in the chosen stacks, pooling '
                  'contiguous groups of heads. Every other tensor is copied unchanged. The '
                  'output appears at DST only when complete, with a CRC-32 of every tensor in '
                  'its gqa_jax.json (checked by inspect --verify). DST is locked while it is '
                  'written: a second conversion to it is refused; what killed conversions '
                  'left beside DST is cleaned up (or put back) by the next one, which says '
                  'so. The source step is kept, so learning-rate schedules and Adafactor '
                  'continue from it.')
  parser.add_argument('src', metavar='SRC', help='source checkpoint: a checkpoint_<step> '
                      'folder, a folder of them (latest used), or a Hugging Face folder.')
  parser.add_argument('dst', metavar='DST', help='output folder (gets checkpoint_<step>/).')
  parser.add_argument('--num-kv-heads', type=positive_int, required=True, metavar='G',
                      help='KV heads per converted stack: 1 is MQA, G is GQA-G, the number '
                           'of query heads is an identity copy.')
  parser.add_argument('--method', choices=convert_lib.METHODS, default='mean',
                      help="pooling of each group's K/V heads: mean (the paper), first "
                           'head, or random re-initialisation (default: %(default)s).')
  parser.add_argument('--stacks', type=stacks_list, default=network.PAPER_STACKS, metavar='LIST',
                      help='comma-separated stacks to convert, from '
                      f'{",".join(network.STACKS)} (default: decoder_self,decoder_cross).')
  parser.add_argument('--output-format', choices=convert_lib.OUTPUT_FORMATS, default='orbax',
                      help='orbax (what gqa-jax train restores) or t5x (legacy msgpack + '
                           'zarr) (default: %(default)s).')
  parser.add_argument('--opt-state', choices=convert_lib.OPT_STATE, default='reinit',
                      help='reinit: keep Adafactor moments of unchanged tensors and zero '
                           'those of converted K/V kernels; drop: write no optimizer state '
                           '(default: %(default)s).')
  parser.add_argument('--reset-step', action='store_true',
                      help='start the converted checkpoint at step 0 instead of the source '
                           'step.')
  parser.add_argument('--dtype', metavar='DTYPE', help='activation dtype recorded in the '
                      "output's model config (default: the source's; bfloat16 for T5X).")
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of --method random (default: %(default)s).')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace DST if it exists (only once the new output is complete); '
                           'DST must be a folder of checkpoint_<step> folders.')
  parser.add_argument('--allow-pickle', action='store_true',
                      help='allow reading pytorch_model.bin, a pickle that can run code.')
  _add_external_links_flag(parser)
  parser.add_argument('--quiet', action='store_true', help='no progress bar.')
  parser.set_defaults(run=_run_convert)


def _add_external_links_flag(parser):
  parser.add_argument(
      '--allow-external-links', action='store_true',
      help='read data through symlinks that lead out of the checkpoint folder (e.g. a '
           'tensor folder linked to another disk). Off by default: every file a checkpoint '
           'names must lie inside its folder, so a crafted checkpoint cannot read (and '
           'convert copy) other files. Absolute paths outside it are refused either way.')


def _run_convert(args) -> int:
  summary = convert_lib.convert(
      args.src, args.dst, args.num_kv_heads, method=args.method, stacks=args.stacks,
      output_format=args.output_format, opt_state=args.opt_state,
      reset_step=args.reset_step, dtype=args.dtype, overwrite=args.overwrite,
      allow_pickle=args.allow_pickle, seed=args.seed, progress=not args.quiet,
      allow_external_links=args.allow_external_links,
      notify=lambda message: print(f'{PROG}: note: {message}', file=sys.stderr))
  cfg = summary['config']
  heads = '/'.join(str(cfg[f'{s}_kv_heads'] or cfg['num_heads']) for s in network.STACKS)
  print(f"converted {summary['source']['format']} {args.src} (step "
        f"{summary['source']['step']}) -> {summary['path']} [{args.output_format}], "
        f"KV heads encoder/self/cross {heads}, method {args.method}, step {summary['step']}, "
        f"{summary['tensors']} tensors in {summary['seconds']:.1f} s")
  return 0


def _add_inspect(subparsers):
  parser = subparsers.add_parser(
      'inspect', help='format, step, config, KV heads and tensors of a checkpoint.',
      description='Opens any supported checkpoint without loading its tensors and prints '
                  'its format, step, inferred model config, KV heads per attention stack '
                  'and the parameter tree with shapes and dtypes. --verify also reads every '
                  'tensor.')
  parser.add_argument('ckpt', metavar='CKPT', help='checkpoint folder or file.')
  parser.add_argument('--opt-state', action='store_true',
                      help='also list every optimizer-state tensor.')
  parser.add_argument('--json', action='store_true', help='print JSON instead of text.')
  parser.add_argument('--allow-pickle', action='store_true',
                      help='allow reading pytorch_model.bin, a pickle that can run code.')
  parser.add_argument(
      '--verify', action='store_true',
      help='read every tensor (parameters and optimizer state, one at a time) and name each '
           'one that cannot be read, has the wrong shape or dtype, holds NaN or infinity, or '
           'whose CRC-32 differs from the one recorded in gqa_jax.json; exit status 2 if any '
           'is bad. What is detectable: a missing or truncated file, always; changed bytes '
           '(bit flips) in T5X legacy zarr chunks, which are gzip-compressed (gzip checks a '
           'CRC), and in anything `gqa-jax convert` wrote (it records a CRC-32 per tensor). '
           'Orbax/OCDBT data (T5X Orbax and gqa-jax training checkpoints) and safetensors '
           'carry no checksum: there changed bytes go unnoticed unless they make a value '
           'NaN or infinite.')
  _add_external_links_flag(parser)
  parser.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
  source = checkpoints.open_checkpoint(args.ckpt, args.allow_pickle,
                                       args.allow_external_links)
  tensors = lambda d: {k: {'shape': list(t.shape), 'dtype': str(t.dtype)}
                       for k, t in sorted((d or {}).items())}
  kv = {s: source.config.kv_heads(s) for s in network.STACKS}
  n = source.config.num_heads
  label = lambda k: 'MHA' if k == n else 'MQA' if k == 1 else f'GQA-{k}'
  report = {'path': args.ckpt, 'format': source.format, 'step': source.step,
            'config': source.config.to_dict(), 'kv_heads': kv,
            'num_params': int(sum(np.prod(t.shape) for t in source.params.values())),
            'params': tensors(source.params),
            'opt_state_tensors': len(source.opt_state or {}), 'metadata': source.metadata}
  if args.opt_state:
    report['opt_state'] = tensors(source.opt_state)
  if args.verify:
    bad, compared = checkpoints.verify(source, progress=not args.json)
    report['verify'] = {'tensors': len(source.params) + len(source.opt_state or {}),
                        'checksums_compared': compared, 'bad': bad}
  if args.json:
    print(json.dumps(report, indent=2, default=str))
    return _verify_status(report)
  print(f"{args.ckpt}: {source.format}, step {source.step}")
  print(f"model: {info.describe(source.config)}")
  print('KV heads: ' + ', '.join(f'{s} {k} ({label(k)})' for s, k in kv.items()))
  print(f"parameters: {report['num_params']:,} in {len(source.params)} tensors; optimizer "
        f"state: {report['opt_state_tensors']} tensors")
  if source.metadata.get('method'):
    md = source.metadata
    print(f"converted from {md['source']['format']} {md['source']['path']} with "
          f"{md['method']} pooling ({', '.join(md['stacks'])})")
  rows = report['params'].items() if not args.opt_state else {
      **report['params'], **report['opt_state']}.items()
  width = max(len(k) for k, _ in rows)
  for name, t in rows:
    print(f"  {name.ljust(width)}  {str(tuple(t['shape'])):>16}  {t['dtype']}")
  if args.verify:
    v = report['verify']
    for name, problem in sorted(v['bad'].items()):
      print(f'BAD {name}: {problem}')
    print(f"verified: {v['tensors'] - len(v['bad'])} of {v['tensors']} tensors intact "
          f"({v['checksums_compared']} against recorded CRC-32s)")
  return _verify_status(report)


def _verify_status(report: dict) -> int:
  """0, or a UserError naming the bad tensors of `inspect --verify` (exit status 2)."""
  bad = (report.get('verify') or {}).get('bad')
  if bad:
    names = sorted(bad)
    raise UserError(f"{report['path']}: {len(bad)} of {report['verify']['tensors']} tensors "
                    f"are damaged ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; "
                    'each is listed above): copy the checkpoint again from a good source.')
  return 0


def _add_train(subparsers):
  parser = subparsers.add_parser(
      'train', help='pretrain, uptrain or finetune, configured with gin files (T5X flags).',
      description='Runs gqa_jax.train.train as configured by gin: a model file '
                  '(models/t5_1_1/*.gin), optionally an attention file (attention/*.gin) and '
                  'a run file (runs/pretrain.gin, runs/uptrain.gin, runs/finetune.gin), or '
                  'an experiment file that includes them. A run resumes from the latest '
                  'checkpoint in MODEL_DIR.')
  _add_gin_flags(parser)
  _add_multihost_flags(parser)
  parser.set_defaults(run=_run_train)


def _add_gin_flags(parser):
  parser.add_argument('--gin_file', action='append', default=[], metavar='PATH', required=True,
                      help='gin file, absolute or relative to a search path; repeatable.')
  parser.add_argument('--gin_bindings', action='append', default=[], metavar='BINDING',
                      help="gin binding such as 'TRAIN_STEPS = 100'; repeatable. T5X's "
                           'shorthand --gin.TRAIN_STEPS=100 works too.')
  parser.add_argument('--gin_search_paths', action='append', default=[], metavar='DIRS',
                      help="comma-separated directories searched for gin files before the "
                           "repository's gin_configs/ and '.'; repeatable.")


def _add_multihost_flags(parser):
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


def _run_gin_entry(args, fn):
  from gqa_jax import partitioning
  paths = [p for value in args.gin_search_paths for p in value.split(',') if p]
  try:
    gin_utils.parse(args.gin_file, args.gin_bindings, paths)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from e
  partitioning.initialize_distributed(args.coordinator_address, args.process_count,
                                      args.process_index, cpu_collectives=args.cpu_collectives)
  try:
    return gin_utils.call(fn)
  except Exception as e:  # gin wraps missing macros and bad bindings raised at call time
    if 'Required bindings' in str(e) or 'gin.REQUIRED' in str(e) or ' is not set: ' in str(e):
      raise UserError(_one_line(e).split(' In call to configurable')[0]) from e
    unbound = gin_utils.unbound_macros()
    if isinstance(e, TypeError) and 'macro()' in str(e) and unbound:
      raise UserError(f'the gin files use {", ".join("%" + m for m in unbound)} but nothing '
                      'binds it: add a file that defines it, or pass '
                      f'--gin.{unbound[0]}=VALUE.') from e
    raise


def _run_train(args) -> int:
  from gqa_jax import train as train_lib
  summary = _run_gin_entry(args, train_lib.train)
  print(json.dumps(summary, default=str))
  return train_lib.exit_status(summary)  # non-zero when a signal stopped it: not done


def _add_eval_or_infer(subparsers, name: str):
  run_file = 'runs/eval.gin' if name == 'eval' else 'runs/infer.gin'
  parser = subparsers.add_parser(
      name, help=('decode a split and score it with the task metrics.' if name == 'eval' else
                  'decode a split and write the predictions as JSONL.'),
      description=f'Runs gqa_jax.evaluation.{"evaluate" if name == "eval" else "infer"} as '
                  f'configured by gin: a model file, optionally an attention file, and '
                  f'{run_file} (CHECKPOINT_PATH, the output folder, MIXTURE_OR_TASK_NAME, '
                  'TASK_FEATURE_LENGTHS). Decoding is greedy unless DECODE_METHOD says beam or '
                  'sample (BEAM_ALPHA, TEMPERATURE, TOPK, TOPP, MAX_DECODE_STEPS, '
                  'PROMPT_WITH_TARGETS, DECODE_SEED).')
  _add_gin_flags(parser)
  _add_multihost_flags(parser)
  parser.set_defaults(run=lambda args: _run_evaluation(args, name))


def _run_evaluation(args, name: str) -> int:
  from gqa_jax import evaluation
  summary = _run_gin_entry(args, evaluation.evaluate if name == 'eval' else evaluation.infer)
  print(json.dumps(summary, default=str))
  return 0


def _register(module: str):
  """A command family kept in its own module, imported when the parser is built."""
  return lambda sub: importlib.import_module(f'gqa_jax.{module}').register(sub)


COMMANDS = (_add_info, _add_convert, _add_inspect, _add_train,
            lambda sub: _add_eval_or_infer(sub, 'eval'),
            lambda sub: _add_eval_or_infer(sub, 'infer'),
            _register('cli_bench'), _register('cli_experiments'))


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description='Grouped-query attention (GQA) on T5.1.1 in JAX.',
                   epilog=f"Run '{PROG} COMMAND --help' for a command's flags.")
  subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
  for add in COMMANDS:
    add(subparsers)
  return parser


def _rewrite_gin_args(argv):
  try:
    return gin_utils.rewrite_gin_args(argv)
  except ValueError as e:
    raise UserError(str(e)) from e


def _one_line(e: Exception) -> str:
  """The message on one line, without the 'In call to configurable ...' lines gin adds."""
  return ' | '.join(line.strip() for line in str(e).splitlines()
                    if line.strip() and not line.strip().startswith('In call to configurable'))


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
    args = build_parser().parse_args(_rewrite_gin_args(argv))
    if args.command is None:
      raise UserError(f"no command given; run '{PROG} --help'.")
    return args.run(args)
  except _Exit as e:
    return e.status
  except BrokenPipeError:  # `gqa-jax inspect CKPT | head`: the reader left, not an error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  except UserInputError as e:  # a bad flag, binding, file or checkpoint: the fix is named
    if debug:
      traceback.print_exc()
    print(f'{PROG}: error: {_one_line(e)}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f'{PROG}: interrupted.', file=sys.stderr)
    return 130
  except Exception as e:  # a bug or an environment problem: say so, traceback on request
    if debug:
      traceback.print_exc()
    hint = '' if debug else f' (rerun with {DEBUG_FLAG} for the traceback)'
    print(f'{PROG}: error: unexpected {type(e).__name__}: {_one_line(e)}{hint}',
          file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
