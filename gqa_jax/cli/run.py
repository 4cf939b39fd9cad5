"""`gqa-jax train`, `eval` and `infer`: the gin-configured entry points, T5X's flags."""

import json

from gqa_jax import gin_utils
from gqa_jax import partitioning
from gqa_jax.cli import flags


def register(subparsers):
  _add_train(subparsers)
  _add_eval_or_infer(subparsers, 'eval')
  _add_eval_or_infer(subparsers, 'infer')


def _add_run_flags(parser):
  flags.add_gin_flags(parser, files_required=True, example="'TRAIN_STEPS = 100'",
                      shorthand='--gin.TRAIN_STEPS=100')
  flags.add_multihost_flags(parser)


def _add_train(subparsers):
  parser = subparsers.add_parser(
      'train', help='pretrain, uptrain or finetune, configured with gin files (T5X flags).',
      description='Runs gqa_jax.train.train as configured by gin: a model file '
                  '(models/t5_1_1/*.gin), optionally an attention file (attention/*.gin) and '
                  'a run file (runs/pretrain.gin, runs/uptrain.gin, runs/finetune.gin), or '
                  'an experiment file that includes them. A run resumes from the latest '
                  'checkpoint in MODEL_DIR.')
  _add_run_flags(parser)
  parser.set_defaults(run=_run_train)


def _run_train(args) -> int:
  # Imported here, not at the top: train pulls in the model, optax, Orbax and TensorFlow
  # data, seconds of start-up that `gqa-jax --help` and `gqa-jax info` should not pay.
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
  _add_run_flags(parser)
  parser.set_defaults(run=lambda args: _run_evaluation(args, name))


def _run_evaluation(args, name: str) -> int:
  # Imported here for the same reason as train: the model and TensorFlow data are slow
  # to import, and only these two commands need them.
  from gqa_jax import evaluation
  summary = _run_gin_entry(args, evaluation.evaluate if name == 'eval' else evaluation.infer)
  print(json.dumps(summary, default=str))
  return 0


def _run_gin_entry(args, fn):
  try:
    gin_utils.parse(args.gin_file, args.gin_bindings, flags.search_paths(args))
  except (FileNotFoundError, ValueError) as e:
    raise flags.UserError(str(e)) from e
  partitioning.initialize_distributed(args.coordinator_address, args.process_count,
                                      args.process_index, cpu_collectives=args.cpu_collectives)
  try:
    return gin_utils.call(fn)
  except Exception as e:  # gin wraps missing macros and bad bindings raised at call time
    if 'Required bindings' in str(e) or 'gin.REQUIRED' in str(e) or ' is not set: ' in str(e):
      raise flags.UserError(flags.one_line(e).split(' In call to configurable')[0]) from e
    unbound = gin_utils.unbound_macros()
    if isinstance(e, TypeError) and 'macro()' in str(e) and unbound:
      raise flags.UserError(f'the gin files use {", ".join("%" + m for m in unbound)} but '
                            'nothing binds it: add a file that defines it, or pass '
                            f'--gin.{unbound[0]}=VALUE.') from e
    raise
