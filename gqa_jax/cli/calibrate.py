"""`gqa-jax calibrate`: the input second moments of the K/V projections, for `convert
--calibration` (svd / procrustes merging, similarity grouping)."""

import sys

from gqa_jax import calibration
from gqa_jax import network
from gqa_jax.cli import flags


def register(subparsers):
  parser = subparsers.add_parser(
      'calibrate', help='K/V input statistics of a checkpoint on a task, for convert '
                        '--calibration.',
      description='Runs the checkpoint (teacher-forced) over the first N examples of a '
                  "task's split and writes, for every attention module that projects K/V "
                  'in the chosen stacks, the second moment of its input over the real '
                  '(non-padding) tokens: E[x^T x], float64 [D, D]. Self-attention reads '
                  "its layer's normed input; every cross-attention layer reads the encoder "
                  'output, stored once. STATS is one .npz, rewritten atomically after '
                  'every batch: a rerun with the same settings and a larger N continues '
                  'after the examples already counted (a killed run too); one with '
                  'different settings is refused. Use the training split: the conversion '
                  'gap is measured on validation.')
  parser.add_argument('ckpt', metavar='CKPT', help='checkpoint: a checkpoint_<step> folder, '
                      'a folder of them (latest used), builtin:<name>, or a Hugging Face '
                      'folder.')
  parser.add_argument('--task', required=True, metavar='TASK',
                      help='seqio task or mixture, e.g. gqa_builtin_span_corruption.')
  parser.add_argument('--num-examples', type=flags.positive_int, required=True, metavar='N',
                      help="examples to count: the split's first N, in seqio's fixed order.")
  parser.add_argument('-o', '--output', required=True, metavar='STATS',
                      help='the .npz file to write (or continue).')
  parser.add_argument('--split', default=calibration.DEFAULT_SPLIT,
                      help='split to read (default: %(default)s).')
  parser.add_argument('--input-length', type=flags.positive_int,
                      default=calibration.DEFAULT_INPUT_LENGTH, metavar='S',
                      help="encoder length, as the task's inputs are cut and padded "
                           "(default: %(default)s, T5's span corruption; the built-in gap "
                           'eval uses 64).')
  parser.add_argument('--target-length', type=flags.positive_int,
                      default=calibration.DEFAULT_TARGET_LENGTH, metavar='T',
                      help='decoder length (default: %(default)s, what 512 inputs give in '
                           "T5's span corruption; the built-in gap eval uses 16).")
  parser.add_argument('--batch-size', type=flags.positive_int,
                      default=calibration.DEFAULT_BATCH_SIZE, metavar='B',
                      help='examples per forward pass; the result does not depend on it '
                           '(default: %(default)s).')
  parser.add_argument('--stacks', type=flags.stacks_list, default=network.PAPER_STACKS,
                      metavar='LIST',
                      help='comma-separated stacks whose modules to calibrate, from '
                      f'{",".join(network.STACKS)} (default: decoder_self,decoder_cross, '
                      "what convert converts by default).")
  parser.add_argument('--quiet', action='store_true', help='no progress bar.')
  parser.add_argument('--allow-pickle', action='store_true',
                      help='allow reading pytorch_model.bin, a pickle that can run code.')
  parser.add_argument('--allow-external-links', action='store_true',
                      help='read data through symlinks that lead out of the checkpoint '
                           'folder (off by default, as for convert).')
  parser.set_defaults(run=_run_calibrate)


def _run_calibrate(args) -> int:
  summary = calibration.collect(
      args.ckpt, args.task, args.num_examples, args.output, split=args.split,
      input_length=args.input_length, target_length=args.target_length,
      batch_size=args.batch_size, stacks=args.stacks, progress=not args.quiet,
      allow_pickle=args.allow_pickle, allow_external_links=args.allow_external_links,
      notify=lambda message: print(f'{flags.PROG}: note: {message}', file=sys.stderr))
  done, tokens = summary['num_examples'], summary['tokens']
  if not summary['new_examples']:
    why = ('the split has no more examples' if summary['exhausted'] and done < args.num_examples
           else f'--num-examples {args.num_examples}')
    print(f"{summary['path']} already holds {done} examples ({why}): nothing to do.")
    return 0
  print(f"calibrated {args.ckpt} (step {summary['step']}) on {args.task}:{args.split} -> "
        f"{summary['path']}: {summary['modules']} modules ({summary['entries']} [D, D] "
        f"moments, D = {summary['emb_dim']}), {done} examples "
        f"({summary['new_examples']} new), {tokens['encoder']} encoder / "
        f"{tokens['decoder']} decoder tokens in {summary['seconds']:.1f} s")
  return 0
