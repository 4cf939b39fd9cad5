"""`gqa-jax bench`: speed benchmarks (decode: time per sample vs number of KV heads)."""

import argparse
import os
import sys

import jax

from gqa_jax.experiments import bench
from gqa_jax.experiments import bench_hf
from gqa_jax import info
from gqa_jax import locks
from gqa_jax import network
from gqa_jax import outputs
from gqa_jax import train_utils
from gqa_jax.cli import flags
from gqa_jax.errors import UserInputError


REPEATS, STEP_REPEATS, HF_ROUNDS = 3, 20, 3
# What only a timed run uses: refused with --topology, where nothing runs.
TIMING_FLAGS = (('repeats', '--repeats'), ('step_repeats', '--step-repeats'),
                ('rounds', '--rounds'), ('matmul_size', '--matmul-size'), ('hf', '--hf'),
                ('hf_rounds', '--hf-rounds'))


def _kv_heads_list(text: str) -> tuple:
  try:
    values = tuple(int(v) for v in text.split(',') if v.strip())
  except ValueError:
    values = ()
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(
        f'{text!r}: give a comma-separated list of positive integers, e.g. 1,8,64')
  return values


def _non_negative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value < 0:
    raise argparse.ArgumentTypeError(f'must be an integer >= 0, got {text!r}')
  return value


def register(subparsers):
  parser = subparsers.add_parser(
      'bench', help='speed benchmarks (decode: time per sample vs number of KV heads).',
      description='Benchmarks. decode: time per sample of MHA, GQA-G and MQA with identical '
                  'weights (K/V mean-pooled from one MHA init), with the bytes moved per '
                  'decode step against the memory bandwidth, and its FLOPs against a '
                  'matmul\'s rate, measured in the same run (a compute-aware roofline).')
  kinds = parser.add_subparsers(dest='bench', metavar='KIND')
  kinds.required = True
  decode = kinds.add_parser(
      'decode', conflict_handler='resolve', help='time per sample vs number of KV heads.',
      description='time per sample = (encoder + output length x decode step) / batch, '
                  'medians of timed runs after compiling and warming up. With --topology, '
                  'nothing is timed: each decode step is compiled for a TPU slice and its '
                  'time estimated from the compiler\'s counts (a lower bound, not a '
                  'measurement; see docs/running_at_scale.md).')
  flags.add_model_flags(decode)
  # --preset here names a benchmark setting; the model-size preset is --size.
  decode.add_argument('--preset', dest='bench_preset', choices=list(bench.PRESETS),
                      default='cpu-paper', metavar='NAME',
                      help=f'benchmark setting, {", ".join(bench.PRESETS)}: model, lengths '
                      'and batch; --size/gin flags replace its model and the length flags '
                      'its lengths (default: %(default)s).')
  decode.add_argument('--input-length', type=flags.positive_int, metavar='S',
                      help="encoder input length (default: the preset's).")
  decode.add_argument('--output-length', type=flags.positive_int, metavar='T',
                      help="decoder output length (default: the preset's).")
  decode.add_argument('--batch-size', type=flags.positive_int, metavar='B',
                      help="batch size (default: the preset's).")
  decode.add_argument('--num-kv-heads', type=_kv_heads_list, metavar='LIST',
                      help='comma-separated KV-head counts (default: every divisor of '
                           'num_heads, MQA..MHA).')
  decode.add_argument('--stacks', type=flags.stacks_list, default=network.PAPER_STACKS,
                      metavar='LIST',
                      help='attention stacks whose KV heads each variant sets '
                           "(default: the paper's decoder_self,decoder_cross).")
  decode.add_argument('--kv-layers', action='append', default=[], metavar='SPEC',
                      help="also time each KV-head count with K/V shared across layers of "
                           "--stacks: 'cla<s>' (CLA: groups of s adjacent layers share one "
                           "layer's K/V) or 'mlkv<m>' (MLKV: m layers project K/V); its cache "
                           'holds the producer layers only. Repeatable.')
  # The timing flags default to None so that --topology can tell they were given.
  decode.add_argument('--repeats', type=flags.positive_int, metavar='N',
                      help=f'timed encoder runs; the median is reported (default: '
                           f'{REPEATS}).')
  decode.add_argument('--step-repeats', type=flags.positive_int, metavar='N',
                      help='timed decode steps per variant; the median is reported '
                           f'(default: {STEP_REPEATS}).')
  decode.add_argument('--rounds', type=_non_negative_int, metavar='R',
                      help='decode steps are timed in R interleaved rounds over all variants '
                           '(all caches alive at once); 0 times variants one after another '
                           "(default: the preset's, 5 for the CPU presets, 0 for paper-fig6).")
  decode.add_argument('--matmul-size', type=flags.positive_int, metavar='M',
                      help='the peak-FLOP-rate probe of the compute-aware roofline: an '
                           '[M, M] x [M, M] matmul in the benchmark dtype, timed in the same '
                           'rounds as the decode steps (default: 2048 on a CPU, 8192 on an '
                           'accelerator).')
  decode.add_argument('--hf', action=argparse.BooleanOptionalAction, default=None,
                      help="also time Hugging Face transformers' T5 generate (MHA, same "
                           'shapes) as the peer; default: on when the interop extra is '
                           'installed and runs on this platform.')
  decode.add_argument('--hf-rounds', type=flags.positive_int, metavar='N',
                      help="timed transformers generates, each followed by gqa_jax's MHA "
                           'timed again (alternating rounds; the ratio is their median, '
                           f'with its range) (default: {HF_ROUNDS}).')
  decode.add_argument('--topology', metavar='NAME',
                      help='time nothing: compile each decode step for this TPU slice '
                           "(as `gqa-jax compile` names it: v4-8, v5e-8, v5p-64 ...) with "
                           "libtpu's compile-only devices and report compiler-count "
                           'ESTIMATES (FLOPs, bytes, memory, collectives, a roofline lower '
                           'bound on the step and the time per sample), not measurements; '
                           'needs pip install -e ".[tpu]".')
  decode.add_argument('--mesh-model', type=flags.positive_int, metavar='N',
                      help='with --topology: the model-parallel size of the mesh (heads, mlp, '
                           'vocabulary and, where they divide it, K/V heads over N devices; '
                           'the batch over the rest) (default: 1).')
  decode.add_argument('--output', metavar='DIR',
                      help='write DIR/decode.json, DIR/decode.md and DIR/decode.png (with '
                           '--topology, no plot: nothing was measured).')
  decode.set_defaults(run=_run_bench_decode)


def _run_bench_decode(args) -> int:
  # Imported here: the training layer, seconds that `gqa-jax --help` should not pay.
  from gqa_jax import preflight  # pylint: disable=import-outside-toplevel
  preflight.start_jax_quietly()  # libtpu's start-up warnings, where it is installed
  _check_mode_flags(args)
  if not args.output:
    return _bench_decode(args)
  outputs.check_output_dir(args.output, '--output')  # now: it runs for minutes, then writes
  # Held from here to the last file written: a second benchmark into the same folder is
  # refused at once, instead of overwriting this one's records with its own.
  with locks.own(os.path.expanduser(args.output), f'--output {args.output}',
                 'wait for that benchmark to finish, or choose another --output'):
    return _bench_decode(args)


def _bench_decode(args) -> int:
  setup, model = bench.PRESETS[args.bench_preset], f'bench preset {args.bench_preset}'
  preset_model = not (args.size or args.gin_file or args.gin_bindings)
  if not preset_model:
    config, model = flags.model_config(args)
    setup = bench.Setup(config, setup.input_length, setup.output_length, setup.batch_size,
                        setup.rounds)
  lengths = (args.input_length or setup.input_length, args.output_length or setup.output_length,
             args.batch_size or setup.batch_size)
  try:  # a bad --num-kv-heads is the one error, before any notice or work
    bench.select_variants(setup.config, args.num_kv_heads, args.stacks, args.kv_layers)
  except ValueError as e:
    raise flags.UserError(str(e)) from e
  if args.topology:
    return _estimate(args, setup, model, lengths, preset_model)
  hf = args.hf
  if hf is None:
    why_not = bench_hf.available(jax.devices()[0].platform)
    hf = why_not is None
    if why_not:
      print(f'skipping the transformers comparison: {why_not}', file=sys.stderr)
  try:
    records = bench.benchmark(setup.config, *lengths, num_kv_heads=args.num_kv_heads,
                              stacks=args.stacks, kv_layers=args.kv_layers,
                              repeats=args.repeats or REPEATS,
                              hf_repeats=args.hf_rounds or HF_ROUNDS,
                              step_repeats=args.step_repeats or STEP_REPEATS, hf=hf,
                              matmul_size=args.matmul_size,
                              rounds=setup.rounds if args.rounds is None else args.rounds,
                              log=train_utils.log)
  except ValueError as e:
    raise flags.UserError(str(e)) from e
  title = f'{model}: {info.describe(setup.config)}'
  print(title)
  print(bench.format_table(records))
  _write(args, records, title)
  return 0


def _check_mode_flags(args):
  if args.topology:
    given = [flag for name, flag in TIMING_FLAGS if getattr(args, name) is not None]
    if given:
      raise flags.UserError(f'{given[0]} sets how a run on this machine is timed, and '
                            f'--topology {args.topology} runs nothing: drop {given[0]}.')
  elif args.mesh_model is not None:
    raise flags.UserError('--mesh-model shapes the mesh of a --topology estimate: add '
                          '--topology NAME (e.g. v4-8), or drop --mesh-model.')


def _estimate(args, setup, model: str, lengths, preset_model: bool) -> int:
  """`--topology`: compiler-count estimates for a TPU slice; the paper's Fig. 6 beside
  them when the setting is its own (paper-fig6's model and lengths)."""
  paper = (bench.PAPER_FIG6 if args.bench_preset == 'paper-fig6' and preset_model
           and lengths[:2] == (setup.input_length, setup.output_length) else None)
  try:
    records = bench.estimate(setup.config, *lengths, args.topology,
                             num_kv_heads=args.num_kv_heads, stacks=args.stacks,
                             kv_layers=args.kv_layers, mesh_model=args.mesh_model or 1,
                             paper=paper, log=train_utils.log)
  except UserInputError as e:  # the partitioning rules name the gin macro, not the flag
    raise flags.UserError(str(e).replace('--gin.MESH_MODEL', '--mesh-model')) from e
  title = (f'{model}: {info.describe(setup.config)}; decode step on {args.topology} '
           f'(compile-only): ESTIMATES, not measurements')
  print(title)
  print(bench.format_estimates(records))
  _write(args, records, title)
  return 0


def _write(args, records, title: str):
  if args.output:
    for path in bench.write(records, os.path.expanduser(args.output), title):
      print(f'wrote {path}')
