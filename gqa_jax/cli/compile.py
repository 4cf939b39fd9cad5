"""`gqa-jax compile`: a run's step compiled for a TPU slice (or this machine), a pre-flight
check of memory, FLOPs and collectives before a run is launched (`gqa_jax.preflight`)."""

import json
import sys

from gqa_jax import gin_utils
from gqa_jax import outputs
from gqa_jax.cli import flags

# Exit statuses besides main()'s 0 (done), 1 (unexpected error) and 2 (bad input).
DOES_NOT_FIT = 3
REPORT_FILE = 'compile.json'


def register(subparsers):
  parser = subparsers.add_parser(
      'compile', help='compile a run\'s step for a TPU slice (or this machine) and report '
                      'its memory, FLOPs, collectives and a roofline, without running it.',
      description='Pre-flight check: builds the step `gqa-jax train` would run, from the '
                  'same gin files and flags, with abstract parameters, optimizer state and '
                  'batch (nothing allocated, no data or checkpoint read), compiles it for '
                  '--topology, and reports the compiler\'s memory per device (exit status '
                  f'{DOES_NOT_FIT} when it does not fit HBM), FLOPs, bytes, collectives and a '
                  'roofline lower bound. TPU topologies need the tpu extra: '
                  'pip install -e ".[tpu]". See docs/running_at_scale.md.')
  flags.add_gin_flags(parser, files_required=True, example="'MESH_MODEL = 2'",
                      shorthand='--gin.MESH_MODEL=2')
  parser.add_argument('--topology', default='local', metavar='NAME',
                      help="'local' (this machine's devices, the default), a TPU slice such "
                           'as v4-128 (v4/v5p count TensorCores: 64 chips), v5e-256 or v6e-8 '
                           '(chips), or a topology such as v4:4x4x4.')
  parser.add_argument('--num-slices', type=flags.positive_int, default=1, metavar='N',
                      help='slices of --topology joined over the data-centre network; the '
                           'data axis spans them (default: 1).')
  parser.add_argument('--step', choices=['train', 'eval', 'infer'], default='train',
                      help='train: the training step with its update (BATCH_SIZE); eval: '
                           'the scoring forward pass; infer: greedy decoding of a batch '
                           '(both with EVAL_BATCH_SIZE). Default: train.')
  parser.add_argument('--output', metavar='DIR',
                      help=f'write DIR/{REPORT_FILE} (also when the step does not fit); '
                           'default: print only.')
  parser.set_defaults(run=_run)


def _run(args) -> int:
  # Imported here, not at the top: the training layer pulls in the model and optax,
  # seconds of start-up that `gqa-jax --help` should not pay.
  from gqa_jax import preflight
  preflight.start_jax_quietly()  # before the gin files' model and optimizer touch jax
  output = outputs.check_output_dir(args.output, '--output') if args.output else None
  try:
    gin_utils.parse(args.gin_file, args.gin_bindings, flags.search_paths(args))
  except (FileNotFoundError, ValueError) as e:
    raise flags.UserError(str(e)) from e
  settings = preflight.settings_from_gin(args.step)
  topology = preflight.get_topology(args.topology, args.num_slices)
  try:
    report = preflight.compile_step(settings, topology, fit_options=gin_utils.used_macros())
  except preflight.DoesNotFit as e:
    _write(output, e.report)
    print(f'{flags.PROG}: {e.message}' + (f' Wrote {output / REPORT_FILE}.' if output else ''),
          file=sys.stderr)
    return DOES_NOT_FIT
  print(preflight.format_report(report))
  if output:
    _write(output, report)
    print(f'\nwrote {output / REPORT_FILE}')
  return 0


def _write(output, report):
  if output is None:
    return
  output.mkdir(parents=True, exist_ok=True)
  (output / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + '\n')
