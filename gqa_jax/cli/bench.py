"""`gqa-jax bench`: speed benchmarks (decode: time per sample vs number of KV heads)."""

import argparse
import os
import sys

import jax

from gqa_jax.experiments import bench
from gqa_jax.experiments import bench_hf
from gqa_jax import info
from gqa_jax import network
from gqa_jax import outputs
from gqa_jax import train_utils
from gqa_jax.cli import flags


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
                  'medians of timed runs after compiling and warming up.')
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
  decode.add_argument('--repeats', type=flags.positive_int, default=3, metavar='N',
                      help='timed encoder runs; the median is reported (default: %(default)s).')
  decode.add_argument('--step-repeats', type=flags.positive_int, default=20, metavar='N',
                      help='timed decode steps per variant; the median is reported '
                           '(default: %(default)s).')
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
  decode.add_argument('--hf-rounds', type=flags.positive_int, default=3, metavar='N',
                      help="timed transformers generates, each followed by gqa_jax's MHA "
                           'timed again (alternating rounds; the ratio is their median, '
                           'with its range) (default: %(default)s).')
  decode.add_argument('--output', metavar='DIR',
                      help='write DIR/decode.json, DIR/decode.md and DIR/decode.png.')
  decode.set_defaults(run=_run_bench_decode)


def _run_bench_decode(args) -> int:
  if args.output:  # checked now: the benchmark runs for minutes before it writes
    outputs.check_output_dir(args.output, '--output')
  setup, model = bench.PRESETS[args.bench_preset], f'bench preset {args.bench_preset}'
  if args.size or args.gin_file or args.gin_bindings:
    config, model = flags.model_config(args)
    setup = bench.Setup(config, setup.input_length, setup.output_length, setup.batch_size,
                        setup.rounds)
  lengths = (args.input_length or setup.input_length, args.output_length or setup.output_length,
             args.batch_size or setup.batch_size)
  try:  # a bad --num-kv-heads is the one error, before any notice or work
    bench.select_variants(setup.config, args.num_kv_heads, args.stacks, args.kv_layers)
  except ValueError as e:
    raise flags.UserError(str(e)) from e
  hf = args.hf
  if hf is None:
    why_not = bench_hf.available(jax.devices()[0].platform)
    hf = why_not is None
    if why_not:
      print(f'skipping the transformers comparison: {why_not}', file=sys.stderr)
  try:
    records = bench.benchmark(setup.config, *lengths, num_kv_heads=args.num_kv_heads,
                              stacks=args.stacks, kv_layers=args.kv_layers,
                              repeats=args.repeats, hf_repeats=args.hf_rounds,
                              step_repeats=args.step_repeats, hf=hf,
                              matmul_size=args.matmul_size,
                              rounds=setup.rounds if args.rounds is None else args.rounds,
                              log=train_utils.log)
  except ValueError as e:
    raise flags.UserError(str(e)) from e
  title = f'{model}: {info.describe(setup.config)}'
  print(title)
  print(bench.format_table(records))
  if args.output:
    for path in bench.write(records, os.path.expanduser(args.output), title):
      print(f'wrote {path}')
  return 0
