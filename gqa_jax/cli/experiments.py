"""`gqa-jax sweep` and `gqa-jax quickstart`: the experiment layer's commands.

A sweep checks every stage's command line with the whole `gqa-jax` parser and runs each
stage through `gqa-jax`'s main: both come from the package (`register`'s `build_parser`
and `main`), since this module cannot import the package it is part of without a cycle.
"""

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from gqa_jax import gin_utils
from gqa_jax import outputs
from gqa_jax.cli import flags
from gqa_jax.train_utils import log

QUICKSTART_GRID = 'experiments/grids/quickstart.gin'


def _add_grid_flags(parser, output_default=None):
  parser.add_argument('--output', default=output_default, required=output_default is None,
                      metavar='DIR', help='folder of every stage, result and figure'
                      + (' (default: %(default)s).' if output_default else '.'))
  flags.add_gin_flags(parser, files=False, example="'Grid.seeds = [0, 1, 2]' (changes the "
                      'grid)', shorthand='--gin.Grid.seeds=[0,1,2]')


def add_sweep(subparsers, build_parser, main):
  parser = subparsers.add_parser(
      'sweep', help='run a grid over G, alpha, conversion method, seed and task.',
      description='Expands a grid (a gin file configuring gqa_jax.experiments.grid.Grid, e.g. '
                  'experiments/grids/report.gin or experiments/grids/paper_xxl.gin) into runs '
                  '(pretrain, convert, uptrain, finetune, eval; and a decoding benchmark over '
                  'G) and runs the unfinished stages one after another, or prints them '
                  '(--dry-run) or writes one command per run with a Slurm job-array script '
                  '(--emit-commands). Results: DIR/results.csv, DIR/results.md, figures. '
                  'SIGTERM or Ctrl-C: the running stages save where they are and the command '
                  'exits 143 or 130, as train does; rerunning it resumes.')
  parser.add_argument('grid', metavar='GRID', help='grid gin file.')
  _add_grid_flags(parser)
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--dry-run', action='store_true',
                    help='list every run with its stage commands; run nothing.')
  mode.add_argument('--emit-commands', metavar='DIR',
                    help='write DIR/commands.txt (one command per run) and DIR/array.sbatch.')
  mode.add_argument('--aggregate-only', action='store_true',
                    help='only summarise the finished runs.')
  parser.add_argument('--only', action='append', default=[], metavar='RUN',
                      help='run only this run (its name as --dry-run lists it); repeatable. '
                           'The decoding benchmark is left to a sweep without --only, so '
                           'that it times an otherwise idle machine.')
  parser.add_argument('--jobs', type=flags.positive_int, default=1, metavar='N',
                      help='run N runs at once, each in its own process (output in '
                           'DIR/logs/RUN.log), then the benchmark alone (default: 1, every '
                           'stage in this process). Small models on CPU: 2 jobs on 2 cores '
                           'finished two 250-step finetunings 1.2x faster than one after '
                           'the other.')
  parser.set_defaults(run=_user_errors(_run_sweep), build_parser=build_parser, main=main)


def add_quickstart(subparsers, build_parser, main):
  parser = subparsers.add_parser(
      'quickstart', help='the whole pipeline on the built-in data, on CPU in minutes.',
      description='Pretrains a small MHA T5 on the built-in span-corruption data, converts '
                  'it to GQA-2 and MQA (mean pooling), uptrains them (alpha 0.1), finetunes '
                  'all three on the built-in summarisation task, scores ROUGE-L, times '
                  'decoding and prints a table like the paper\'s Table 1. Rerunning resumes: '
                  'finished stages are skipped (SIGTERM or Ctrl-C: the running stage saves and '
                  f'the command exits 143 or 130). The grid is {QUICKSTART_GRID}.')
  _add_grid_flags(parser, output_default='gqa_quickstart')
  parser.set_defaults(run=_user_errors(_run_quickstart), build_parser=build_parser,
                      main=main)


def _load(args, grid_file):
  # The experiment layer is imported by the commands that use it: it imports train, the
  # model and TensorFlow data, seconds that `gqa-jax --help` and `gqa-jax info` skip.
  from gqa_jax.experiments import grid as grid_lib
  paths = flags.search_paths(args)
  # `~` is expanded here; relative folders stay relative (to the working directory, as
  # every stage command runs from it), so the printed paths read as the user typed them.
  args.output = os.path.expanduser(args.output)
  outputs.check_output_dir(args.output, '--output')  # before any stage runs
  if getattr(args, 'emit_commands', None):
    args.emit_commands = os.path.expanduser(args.emit_commands)
    outputs.check_output_dir(args.emit_commands, '--emit-commands')
  try:
    grid = grid_lib.load_grid(grid_file, args.gin_bindings, paths)
    runs = grid_lib.plan(grid, args.output, search_paths=paths)
    grid_lib.check_tasks_and_metrics(grid)
  except (FileNotFoundError, ValueError, TypeError) as e:
    raise flags.UserError(f'grid {grid_file}: {flags.one_line(e)}') from e
  _check_stages(grid, runs, args.output, paths, args.build_parser())
  return grid, runs


def _check_stages(grid, runs, output, paths, parser):
  """Every stage's command line goes through the CLI's parser, and the gin files and
  bindings of every distinct train/eval setup through gin (files found, every bound
  macro used, values valid, the task registered): a misspelt gin file or binding in
  the grid is refused now, not when its stage comes, hours into the sweep."""
  import gin
  # Lazy for start-up time, as in _load; data also loads TensorFlow.
  from gqa_jax import data
  from gqa_jax.experiments import grid as grid_lib
  stages = {s.key: s for run in runs for s in run.stages}
  bench = grid_lib.bench_stage(grid, output, paths)
  if bench is not None:
    stages[bench.key] = bench
  seen = set()
  for stage in stages.values():
    try:
      args = parser.parse_args(flags.rewrite_gin_args(list(stage.argv)))
      if stage.argv[0] not in ('train', 'eval'):
        continue
      setup = (stage.kind, tuple(args.gin_file),
               tuple(b.split('=', 1)[0].strip() for b in args.gin_bindings))
      if setup in seen:  # stages of one setup differ only in values the grid computes
        continue
      seen.add(setup)
      gin_utils.parse(args.gin_file, args.gin_bindings, paths)
      try:
        task = gin.query_parameter('%MIXTURE_OR_TASK_NAME')
      except ValueError:  # a setup without a task macro: its stage says what it needs
        task = None
      if isinstance(task, str):
        data.check_task(task, check_data=False)  # names only: data may live elsewhere
    except (FileNotFoundError, ValueError) as e:
      raise flags.UserError(f'grid {grid.name}: {stage.kind} stage {stage.key}: '
                            f'{flags.one_line(e)} (command: {stage.command()})') from e
  gin.clear_config()


def _check_source(grid):
  """A real sweep from a source checkpoint needs it now, not after its first stages."""
  from gqa_jax import checkpoints  # lazy for start-up time, as in _load
  source = grid.source_checkpoint
  if not source or '://' in source:
    return
  try:
    path = checkpoints.resolve_path(source, builtin=True)
  except checkpoints.CheckpointError as e:
    raise flags.UserError(f'grid {grid.name}: source_checkpoint {e}') from e
  if not path.exists():
    raise flags.UserError(f'grid {grid.name}: source_checkpoint {source} does not exist: '
                          'set Grid.source_checkpoint to an MHA checkpoint folder or a '
                          'builtin:<name> checkpoint.')


def _user_errors(run):
  """The command `run` with a failed or changed stage reported as one line, status 2; a
  sweep stopped by SIGTERM or SIGINT (its running stage saved) exits 128 + the signal, as
  `gqa-jax train` does: 143 or 130, which a scheduler that requeues preempted jobs knows."""
  def wrapped(args):
    from gqa_jax.experiments import grid as grid_lib  # lazy for start-up time, as in _load
    try:
      return run(args)
    except grid_lib.StageStopped as e:
      print(f'{flags.PROG}: {flags.one_line(e)}', file=sys.stderr)
      return 128 + e.signum
    except grid_lib.StageFailed as e:
      raise flags.UserError(str(e)) from e
    except grid_lib.StageChanged as e:
      raise flags.UserError(str(e)) from e
  return wrapped


def _use_compilation_cache(output):
  """Stages of a sweep compile the same train and eval steps again and again (every seed,
  every alpha): JAX's persistent compilation cache in OUTPUT/.jax_cache turns the repeats
  into loads. Compiled programs are the same, so are the results. An explicit
  JAX_COMPILATION_CACHE_DIR (or jax config) is left alone."""
  import jax
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(output, '.jax_cache')))


def _execute(grid, runs, output, main, paths, bench=True):
  from gqa_jax.experiments import sweep  # lazy for start-up time, as in _load
  _check_source(grid)
  Path(output).mkdir(parents=True, exist_ok=True)
  _use_compilation_cache(output)
  return sweep.run_all(grid, runs, output, main, log=log, search_paths=paths, bench=bench)


def _execute_jobs(args, grid, runs, paths):
  """--jobs N: every run in its own `gqa-jax sweep ... --only RUN` process, N at once;
  then the benchmark here, alone on the machine."""
  from gqa_jax.experiments import sweep  # lazy for start-up time, as in _load
  _check_source(grid)
  base = [sys.executable, '-m', 'gqa_jax.cli', 'sweep', args.grid, '--output', args.output]
  for binding in args.gin_bindings:
    base += ['--gin_bindings', binding]
  if paths:
    base += ['--gin_search_paths', ','.join(paths)]
  counts = sweep.run_parallel(runs, args.output, lambda run: base + ['--only', run.name],
                              args.jobs, log=log)
  if not args.only:
    _execute(grid, [], args.output, args.main, paths)  # the benchmark, if not done
  return counts


def _run_sweep(args) -> int:
  from gqa_jax.experiments import sweep  # lazy for start-up time, as in _load
  sweep.die_with_parent()  # a run's process of `--jobs N`: stops when that sweep dies
  grid, runs = _load(args, args.grid)
  all_runs = runs
  if args.only:
    unknown = sorted(set(args.only) - {r.name for r in runs})
    if unknown:
      raise flags.UserError(f'--only {unknown}: no such run in {args.grid}; see --dry-run.')
    runs = [r for r in runs if r.name in args.only]
  if args.dry_run:
    print(sweep.dry_run(grid, runs, args.output, flags.search_paths(args)))
    return 0
  if args.emit_commands:
    # a job array's tasks start wherever the scheduler puts them: absolute output
    argv = [args.grid, '--output', os.path.abspath(args.output)]
    for b in args.gin_bindings:
      argv += ['--gin_bindings', b]
    # absolute too: the tasks' working directory is the scheduler's
    paths = [os.path.abspath(os.path.expanduser(p)) for p in flags.search_paths(args)]
    if paths:
      argv += ['--gin_search_paths', ','.join(paths)]
    for path in sweep.emit(runs, argv, args.emit_commands):
      print(f'wrote {path}')
    return 0
  if args.jobs > 1 and not args.aggregate_only:
    counts = _execute_jobs(args, grid, runs, flags.search_paths(args))
    log(f"sweep {grid.name}: ran {counts['ran']} runs, skipped {counts['skipped']} done")
  elif not args.aggregate_only:
    with (sweep.holding(runs, args.output, log) if args.only else contextlib.nullcontext()):
      counts = _execute(grid, runs, args.output, args.main, flags.search_paths(args),
                        bench=not args.only)
    log(f"sweep {grid.name}: ran {counts['ran']} stages, skipped {counts['skipped']} done")
  if args.only:  # one task of a job array: the summary over all runs is --aggregate-only's
    for run in runs:
      result = sweep.result_path(run, args.output)
      print(result.read_text().strip() if result.exists() else f'{run.name}: not finished')
    return 0
  rows = sweep.aggregate(grid, all_runs, args.output)
  print((Path(args.output) / 'results.md').read_text())
  print(f'{len(rows)} results in {args.output}/results.csv')
  return 0


def _run_quickstart(args) -> int:
  from gqa_jax.experiments import sweep  # lazy for start-up time, as in _load
  start = time.time()
  grid, runs = _load(args, QUICKSTART_GRID)
  counts = _execute(grid, runs, args.output, args.main, flags.search_paths(args))
  rows = sweep.aggregate(grid, runs, args.output)
  cells = sweep.summarize(rows)
  minutes = (time.time() - start) / 60
  print(f'\ngqa-jax quickstart: {len(runs)} variants, {counts["ran"]} stages run, '
        f'{counts["skipped"]} reused, {minutes:.1f} min; artifacts in {args.output}/')
  print(sweep.table1(cells))
  print('\n'.join(sweep.floor_lines(cells)))
  warning = sweep.degenerate_warning(cells)
  if warning:
    print(f'\n{warning}')
  print(f'\nscore: {grid.metric[grid.tasks[0]]} on {grid.tasks[0]} (validation); time per '
        f'sample: {args.output}/bench/decode.md. Per-run results: {args.output}/results.csv; '
        f'figures: {args.output}/fig*.png.')
  (Path(args.output) / 'table1.md').write_text(sweep.table1(cells) + '\n')
  print(json.dumps({'output': args.output, 'minutes': round(minutes, 2)}))
  return 0


def register(subparsers, build_parser, main):
  """`sweep` and `quickstart`; `build_parser()` and `main(argv)` are the package's."""
  add_sweep(subparsers, build_parser, main)
  add_quickstart(subparsers, build_parser, main)
