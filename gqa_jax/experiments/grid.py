"""Experiment grids: the paper's pipeline over G, alpha, conversion method, seed and task.

A grid (a gin file configuring `Grid`) expands into runs. Each run is a chain of stages,
each one `gqa-jax` command line, so that a run can be executed here, one after another,
or printed for a cluster scheduler exactly as it would run:

    pretrain   gqa-jax train  (per seed; skipped when the grid names a source checkpoint)
    calibrate  gqa-jax calibrate SRC ... (Grid.calibrate_args; for conversions that use it)
    convert    gqa-jax convert SRC DST --num-kv-heads G --method M  (not for MHA)
    gap        gqa-jax eval   ... Grid.gap_gins: the pretraining loss of the converted
               checkpoint (with gap_gins only)
    uptrain    gqa-jax train  ... runs/uptrain.gin, ALPHA  (not for alpha = 0)
    gap        the same for the uptrained checkpoint, where finetuning starts
    finetune   gqa-jax train  ... the task's finetune files, TRAIN_STEPS absolute
    eval       gqa-jax eval   ... the task's eval files (greedy, the task's metrics)
    bench      gqa-jax bench decode over every G of the grid (once per grid)

Stages shared by several runs (a seed's pretraining, a conversion, an uptraining) have
one folder and run once. A finished stage leaves a marker in OUTPUT/.done/; a rerun
skips it, and an interrupted training stage resumes from its latest checkpoint (what
`gqa-jax train` does in any MODEL_DIR). Stages take a file lock while they run, so
runs of one grid can execute concurrently on one file system (a job array).

Layout of OUTPUT:
    pretrain/s<seed>/                  convert/s<seed>/<variant>_<method>/
    uptrain/s<seed>/<variant>_<method>_a<alpha>/      gap/s<seed>/<variant>_<method>_a<alpha>/
    runs/<run name>/finetune/, eval/, result.json
    bench/decode.{json,md,png}         results.csv, results.md, fig*.png
"""

import dataclasses
import difflib
import json
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from gqa_jax import checkpoints, gin_utils, locks, network
from gqa_jax import convert as convert_lib
from gqa_jax import train as train_lib
from gqa_jax.errors import ConfigError

METHODS = ('mean', 'first', 'random')
CALIBRATION = '{calibration}'  # in method_options' convert flags: the grid's statistics
GAP_TASK = 'gap'  # the task of a gap-only grid's runs (no finetuning; the score is the gap)


@dataclasses.dataclass(frozen=True)
class Grid:
  """What to run. Gin files are given as lists applied in order; bindings apply last.

  model_gin: the model file (e.g. 'models/t5_1_1/xxl.gin'); every stage starts with it.
  source_checkpoint / source_steps: an MHA checkpoint to start from (a folder or
    builtin:<name>) and the steps it was pretrained for (default: read from its
    checkpoint_<step> folder name); or pretrain_gins (with pretrain_steps) to pretrain
    one per seed.
  kv_heads, alphas, methods, seeds, tasks: the grid's axes. With no tasks (and gap_gins)
    the grid only scores the conversion gap: each run ends with its gap eval, and its
    score is that gap (the conversion ablation, experiments/grids/conversion.gin). For MHA (kv_heads = the
    model's num_heads) the method does not apply and alpha 0 always runs (the source
    model, the paper's baseline); with uptrain_mha the other alphas run too, continuing
    to pretrain the MHA model (a compute-matched baseline).
  method_kv_heads: the G values that run every method (default: all); others run only
    methods[0] (the paper compares methods for MQA).
  uptrain_gins: files for uptraining (a pretraining setup plus runs/uptrain.gin).
  finetune_gins / eval_gins: files per task; finetune_steps per task (or one number);
    metric per task: the key of the score in the task's metrics, e.g. 'rougeL'.
  eval_subdir: which checkpoint of the finetuning folder to score: '' the latest,
    'best' the best dev checkpoint kept by BEST_METRIC (the paper's choice).
  bench_args: extra `gqa-jax bench decode` flags (None: no decoding benchmark);
    bench_kv_heads: its G values (default: kv_heads).
  gap_gins / gap_bindings: eval files that score the pretraining objective on held-out
    data (e.g. ['runs/eval.gin', 'experiments/pretrained/gap.gin']), or () for none.
    Every checkpoint a finetuning starts from (the source MHA model, each conversion at
    alpha 0, each uptraining) is scored once, before finetuning: the conversion gap, the
    mechanism behind the paper's Figs. 4 and 5. gap_metric: the key of that score in the
    eval's metrics (lower is better).
  method_options: conversions beyond mean/first/random, by a name used in `methods`:
    {'wgqa-col': {'convert': ['--method', 'wgqa', '--wgqa-weights', 'col'],
                  'gin': ['attention/wgqa.gin', "WGQA_WEIGHTS='col'"]}}. 'convert' are
    the `gqa-jax convert` flags (instead of --method NAME), 'gin' the files ('.gin') and
    bindings that every later stage of such a run applies after its attention file (the
    model the conversion made: WGQA, CLA/MLKV, ...); 'kv_heads', if given, the only G
    values the method runs for (e.g. a grouping search, which means nothing for MQA).
    A convert flag '{calibration}' stands for the statistics of `calibrate_args`.
  calibrate_args: `gqa-jax calibrate` flags (--task, --num-examples, lengths) for the
    calibration statistics that conversions naming '{calibration}' read; one calibrate
    stage per source checkpoint (OUTPUT/calibrate/s<seed>/stats.npz), before them.
  """
  name: str
  model_gin: str
  kv_heads: Sequence[int]
  alphas: Sequence[float] = (0.05,)
  methods: Sequence[str] = ('mean',)
  method_kv_heads: Optional[Sequence[int]] = None
  uptrain_mha: bool = False
  seeds: Sequence[int] = (0,)
  tasks: Sequence[str] = ()
  source_checkpoint: Optional[str] = None
  source_steps: Optional[int] = None
  pretrain_gins: Sequence[str] = ()
  pretrain_steps: Optional[int] = None
  pretrain_bindings: Sequence[str] = ()
  uptrain_gins: Sequence[str] = ()
  uptrain_bindings: Sequence[str] = ()
  finetune_gins: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  finetune_steps: Mapping[str, int] = dataclasses.field(default_factory=dict)
  finetune_bindings: Sequence[str] = ()
  eval_gins: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  eval_bindings: Sequence[str] = ()
  metric: Mapping[str, str] = dataclasses.field(default_factory=dict)
  eval_subdir: str = ''
  bench_args: Optional[Sequence[str]] = None
  bench_kv_heads: Optional[Sequence[int]] = None
  gap_gins: Sequence[str] = ()
  gap_bindings: Sequence[str] = ()
  gap_metric: str = 'nll'
  method_options: Mapping[str, Mapping[str, Sequence[str]]] = dataclasses.field(
      default_factory=dict)
  calibrate_args: Optional[Sequence[str]] = None

  def __post_init__(self):
    _check_values(self)
    if (self.source_checkpoint is None) == (not self.pretrain_gins):
      raise ValueError(f'grid {self.name}: give either source_checkpoint (with source_steps) '
                       'or pretrain_gins (with pretrain_steps).')
    if not self.source_checkpoint and self.pretrain_steps is None:
      raise ValueError(f'grid {self.name}: set pretrain_steps.')
    bad = [m for m in self.methods if m not in METHODS and m not in self.method_options]
    if bad:
      raise ValueError(f'grid {self.name}: methods {bad} unknown; use {METHODS} or a name '
                       'defined in method_options.')
    for label, options in self.method_options.items():
      wrong = sorted(set(options) - {'convert', 'gin', 'kv_heads'})
      if wrong or not isinstance(options.get('convert', []), (list, tuple)):
        raise ValueError(f"grid {self.name}: method_options[{label!r}] has keys {wrong}: "
                         "give {'convert': [convert flags], 'gin': [gin files and "
                         "bindings], 'kv_heads': [the G values it runs for]}.")
      if label in METHODS or '_' in label:
        raise ValueError(f'grid {self.name}: method_options name {label!r}: choose a name '
                         f'that is not one of {METHODS} and has no underscore (it goes '
                         'into run names), e.g. wgqa-col.')
    wants = [m for m, o in self.method_options.items()
             if CALIBRATION in o.get('convert', [])]
    if wants and self.calibrate_args is None:
      raise ValueError(f'grid {self.name}: method_options {wants} convert with '
                       f'{CALIBRATION!r}: set calibrate_args (the `gqa-jax calibrate` flags, '
                       "e.g. ['--task', 'gqa_builtin_span_corruption', '--num-examples', "
                       "'256']).")
    for field in ('finetune_gins', 'eval_gins', 'metric'):
      missing = [t for t in self.tasks if t not in getattr(self, field)]
      if missing:
        raise ValueError(f'grid {self.name}: {field} has no entry for tasks {missing}.')
    if not self.tasks and not self.gap_gins:
      raise ValueError(f'grid {self.name}: tasks is empty: name the tasks to finetune on, '
                       'or set gap_gins for a grid that only scores the conversion gap.')

  def steps_of(self, task: str) -> int:
    steps = self.finetune_steps
    return steps if isinstance(steps, int) else steps[task]


# What each field of a Grid holds, checked when the grid is made (before any stage runs),
# so that a bad value is named as the user wrote it, not as the stage command it turns
# into (a negative finetune_steps is not a `--gin.TRAIN_STEPS=4995` of train's).
_STRINGS = ('pretrain_gins', 'pretrain_bindings', 'uptrain_gins', 'uptrain_bindings',
            'finetune_bindings', 'eval_bindings', 'gap_gins', 'gap_bindings')
_OPTIONAL_STRINGS = ('bench_args', 'calibrate_args')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_list(value) -> bool:
  return isinstance(value, (list, tuple))


def _check_values(grid: 'Grid'):
  """ConfigError naming the first field of `grid` whose value has the wrong type or range
  (and the fix); the relations between fields are __post_init__'s and `plan`'s."""
  def bad(field, value, problem, fix):
    raise ConfigError(f'grid {grid.name}: Grid.{field} = {value!r} {problem}: {fix}.')

  def check_list(field, value, item_ok, what, example, empty=False, unique=True):
    if not _is_list(value):
      bad(field, value, 'is not a list', f'give a list of {what}, e.g. {example}')
    if not value and not empty:
      bad(field, value, 'is empty', f'give at least one value, e.g. {example}')
    for item in value:
      if not item_ok(item):
        bad(field, value, f'holds {item!r}', f'give {what}, e.g. {example}')
    if unique and len(set(map(repr, value))) != len(value):
      bad(field, value, 'repeats a value', 'list each value once')

  positive = lambda v: _is_int(v) and v >= 1
  text = lambda v: isinstance(v, str)
  for field in ('name', 'model_gin', 'eval_subdir', 'gap_metric'):
    if not isinstance(getattr(grid, field), str):
      bad(field, getattr(grid, field), 'is not a string', 'quote it')
  check_list('kv_heads', grid.kv_heads, positive, 'positive integers (the G values)',
             '[8, 2, 1]')
  check_list('alphas', grid.alphas,
             lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
             "numbers in [0, 1] (the fraction of the source's pretraining steps to uptrain "
             'for)', '[0, 0.05, 0.1]')
  check_list('methods', grid.methods, text, 'strings (conversion methods)', "['mean']")
  check_list('seeds', grid.seeds, lambda v: _is_int(v) and v >= 0,
             'integers >= 0', '[0, 1, 2]')
  check_list('tasks', grid.tasks, text, 'strings (task names)', "['gqa_builtin_docstring']",
             empty=True)
  for field in ('method_kv_heads', 'bench_kv_heads'):
    if getattr(grid, field) is not None:
      check_list(field, getattr(grid, field), positive, 'positive integers (G values)',
                 '[8, 1]')
  if not isinstance(grid.uptrain_mha, bool):
    bad('uptrain_mha', grid.uptrain_mha, 'is not True or False', 'write True or False')
  if grid.source_checkpoint is not None and not text(grid.source_checkpoint):
    bad('source_checkpoint', grid.source_checkpoint, 'is not a string',
        "give a folder or builtin:<name> in quotes, e.g. 'builtin:t5_mini'")
  for field in ('source_steps', 'pretrain_steps'):
    value = getattr(grid, field)
    if value is not None and not positive(value):
      bad(field, value, 'is not a positive integer', 'set it to the number of pretraining '
          'steps, e.g. 10000')
  for field in _STRINGS + _OPTIONAL_STRINGS:
    value = getattr(grid, field)
    if value is not None or field in _STRINGS:
      check_list(field, value, text, 'strings', "['--flag', 'value']" if field in
                 _OPTIONAL_STRINGS else "['runs/finetune.gin']", empty=True, unique=False)
  for field in ('finetune_gins', 'eval_gins', 'metric', 'method_options'):
    value = getattr(grid, field)
    if not isinstance(value, Mapping):
      bad(field, value, 'is not a dict', "write {'TASK': ...}")
  for field in ('finetune_gins', 'eval_gins'):
    for task, files in getattr(grid, field).items():
      if not _is_list(files) or not all(map(text, files)):
        bad(field, getattr(grid, field), f'gives {task!r} {files!r}, not a list of gin files',
            f"e.g. {{{task!r}: ['runs/finetune.gin']}}")
  for task, key in grid.metric.items():
    if not text(key):
      bad('metric', grid.metric, f'gives {task!r} {key!r}, not a metric name',
          f"e.g. {{{task!r}: 'rougeL'}}")
  steps = grid.finetune_steps
  example = f"{{{(list(grid.tasks) or ['TASK'])[0]!r}: 250}}"
  if _is_int(steps):
    if steps < 1:
      bad('finetune_steps', steps, 'is not a positive integer',
          f'set the finetuning steps of every task, e.g. 250 or {example}')
  elif isinstance(steps, Mapping):
    for task, value in steps.items():
      if not positive(value):
        bad('finetune_steps', steps, f'gives {task!r} {value!r}, not a positive integer',
            f'set each task\'s finetuning steps, e.g. {example}')
    missing = [t for t in grid.tasks if t not in steps]
    if missing:
      bad('finetune_steps', steps, f'has no entry for tasks {missing}',
          f'add one per task, e.g. {example}')
  else:
    bad('finetune_steps', steps, 'is neither a positive integer nor a dict of them',
        f'e.g. 250 or {example}')
  for label, options in grid.method_options.items():
    if not isinstance(options, Mapping):
      bad('method_options', grid.method_options, f'gives {label!r} {options!r}, not a dict',
          "write {'NAME': {'convert': [...], 'gin': [...]}}")
    if 'kv_heads' in options:
      values = options['kv_heads']
      if not _is_list(values) or not values or not all(map(positive, values)):
        bad('method_options', grid.method_options, f'gives {label!r} kv_heads {values!r}, '
            'not a list of positive integers', "e.g. 'kv_heads': [4, 2]")
    if 'gin' in options and (not _is_list(options['gin'])
                             or not all(map(text, options['gin']))):
      bad('method_options', grid.method_options, f"gives {label!r} gin {options['gin']!r}, "
          'not a list of gin files and bindings', "e.g. 'gin': ['attention/wgqa.gin']")


@dataclasses.dataclass(frozen=True)
class Stage:
  kind: str        # pretrain, convert, uptrain, gap, finetune, eval, bench
  key: str         # unique within the grid; names its marker
  argv: tuple      # the gqa-jax command line, without the program name
  output: str      # the folder it writes

  def command(self) -> str:
    return 'gqa-jax ' + ' '.join(shlex.quote(a) for a in self.argv)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  variant: str     # MHA, GQA-G, MQA
  kv_heads: int
  alpha: float
  method: str      # 'none' for MHA
  seed: int
  task: str
  stages: tuple    # of Stage, in order


def load_grid(grid_file: str, bindings: Sequence[str] = (),
              search_paths: Sequence[str] = ()) -> Grid:
  """The Grid configured by a gin file (and bindings such as 'Grid.seeds = [0, 1]')."""
  try:
    gin_utils.parse([grid_file], bindings, search_paths)
  except ValueError as e:  # ConfigError is one
    if "No module named 'gqa_jax.experiment'" in str(e):  # grids written before 0.2
      raise ConfigError('the grid file imports gqa_jax.experiment, which moved to '
                        'gqa_jax.experiments.grid: write `from gqa_jax.experiments import '
                        'grid` and `grid.Grid:` in it.') from e
    raise
  import gin
  return gin.get_configurable(Grid)()


def _alpha_tag(alpha: float) -> str:
  return f'a{alpha:g}'.replace('.', 'p')


def _gin_args(files: Sequence[str], bindings: Sequence[str]) -> List[str]:
  return [f'--gin_file={f}' for f in files] + [f'--gin.{b}' for b in bindings]


def _string(value: str) -> str:
  return json.dumps(str(value))  # a gin string literal


class _Planner:
  """Builds the stages of one grid; a stage asked for twice is the same object."""

  def __init__(self, grid: Grid, output: str, num_heads: int, search_paths: Sequence[str]):
    self.grid, self.out, self.num_heads = grid, Path(output), num_heads
    self.search_paths = search_paths
    self.source_steps = grid.pretrain_steps
    if grid.source_checkpoint:
      self.source_steps = grid.source_steps or source_step(grid.source_checkpoint)
      if self.source_steps is None:
        raise ValueError(f'grid {grid.name}: source_steps is not set and the step of '
                         f'{grid.source_checkpoint} cannot be read (no checkpoint_<step> '
                         'folder there): set Grid.source_steps to the steps it was '
                         'pretrained for.')
    self.stages: Dict[str, Stage] = {}

  def _stage(self, kind: str, key: str, argv: List[str], output_dir) -> Stage:
    if self.search_paths and argv[0] in ('train', 'eval'):
      argv = [*argv, f'--gin_search_paths={",".join(self.search_paths)}']
    return self.stages.setdefault(key, Stage(kind, key, tuple(argv), str(output_dir)))

  def _gin_command(self, command: str, kv_heads: int, files: Sequence[str],
                   bindings: Sequence[str], *flags: str, method: str = 'none') -> List[str]:
    """A train or eval command line: the model file, the stage's own files and bindings,
    then the attention of `kv_heads` KV heads (applied last, so that it holds whatever
    those files bind) and the method's gin (Grid.method_options), then `flags`."""
    attention = (['--gin_file=attention/mha.gin'] if kv_heads == self.num_heads else
                 ['--gin_file=attention/gqa.gin', f'--gin.NUM_KV_HEADS={kv_heads}'])
    extra = self.grid.method_options.get(method, {}).get('gin', [])
    attention += _gin_args([g for g in extra if g.endswith('.gin')],
                           [g for g in extra if not g.endswith('.gin')])
    return [command, f'--gin_file={self.grid.model_gin}', *_gin_args(files, bindings),
            *attention, *flags]

  @staticmethod
  def seed_bindings(seed: int) -> List[str]:
    return [f'RANDOM_SEED={seed}', f'train/train_utils.DatasetConfig.seed={seed}']

  def methods(self, kv_heads: int) -> Sequence[str]:
    """The conversion methods that run for `kv_heads` ('none' for MHA)."""
    grid = self.grid
    if kv_heads == self.num_heads:
      return ('none',)
    if grid.method_kv_heads is None or kv_heads in grid.method_kv_heads:
      return tuple(m for m in grid.methods
                   if kv_heads in grid.method_options.get(m, {}).get('kv_heads', [kv_heads]))
    return tuple(grid.methods[:1])

  def alphas(self, kv_heads: int) -> Sequence[float]:
    """MHA is the baseline: the source itself, uptrained only with uptrain_mha."""
    if kv_heads == self.num_heads:
      return [0.0] + [a for a in self.grid.alphas if a and self.grid.uptrain_mha]
    return self.grid.alphas

  def pretrain(self, seed: int) -> Tuple[Optional[Stage], str]:
    """(the pretraining stage or None, the MHA checkpoint that every run of `seed` uses)."""
    grid = self.grid
    if grid.source_checkpoint:
      return None, grid.source_checkpoint
    pre_dir = self.out / 'pretrain' / f's{seed}'
    bindings = [f'TRAIN_STEPS={grid.pretrain_steps}', *grid.pretrain_bindings,
                *self.seed_bindings(seed)]
    stage = self._stage('pretrain', f'pretrain-s{seed}',
                        self._gin_command('train', self.num_heads, grid.pretrain_gins,
                                          bindings, f'--gin.MODEL_DIR={_string(pre_dir)}'),
                        pre_dir)
    return stage, str(pre_dir)

  def calibrate(self, seed: int, method: str, source: str) -> Optional[Stage]:
    """The calibration statistics of `source` that the method's conversion reads, or None
    when it reads none."""
    if CALIBRATION not in self.grid.method_options.get(method, {}).get('convert', []):
      return None
    out = self.out / 'calibrate' / f's{seed}' / 'stats.npz'
    return self._stage('calibrate', f'calibrate-s{seed}',
                       ['calibrate', source, *self.grid.calibrate_args, '--output', str(out),
                        '--quiet'], out)

  def convert(self, seed: int, kv_heads: int, method: str, source: str) -> Stage:
    variant = network.variant_name(kv_heads, self.num_heads)
    conv_dir = self.out / 'convert' / f's{seed}' / f'{variant}_{method}'
    stats = str(self.out / 'calibrate' / f's{seed}' / 'stats.npz')
    flags = self.grid.method_options.get(method, {}).get('convert', ['--method', method])
    given = lambda flag: flags[flags.index(flag) + 1] if flag in flags[:-1] else None
    # The seed only where the conversion draws weights (convert refuses it elsewhere).
    seeded = (['--seed', str(seed)] if convert_lib.uses_seed(given('--method'),
                                                             given('--wgqa-init')) else [])
    return self._stage('convert', f'convert-s{seed}-{variant}-{method}',
                       ['convert', source, str(conv_dir), '--num-kv-heads', str(kv_heads),
                        *(stats if f == CALIBRATION else f for f in flags),
                        *seeded, '--overwrite', '--quiet'],
                       conv_dir)

  def uptrain(self, seed: int, kv_heads: int, method: str, alpha: float,
              start: str) -> Stage:
    grid, tag = self.grid, _alpha_tag(alpha)
    variant = network.variant_name(kv_heads, self.num_heads)
    up_dir = self.out / 'uptrain' / f's{seed}' / f'{variant}_{method}_{tag}'
    return self._stage('uptrain', f'uptrain-s{seed}-{variant}-{method}-{tag}',
                       self._gin_command(
                           'train', kv_heads, grid.uptrain_gins,
                           [*grid.uptrain_bindings, *self.seed_bindings(seed)],
                           f'--gin.ALPHA={alpha}',
                           f'--gin.UPTRAIN_SOURCE_STEPS={self.source_steps}',
                           f'--gin.INITIAL_CHECKPOINT_PATH={_string(start)}',
                           f'--gin.MODEL_DIR={_string(up_dir)}', method=method), up_dir)

  def gap(self, seed: int, kv_heads: int, method: str, alpha: float,
          checkpoint: str) -> Optional[Stage]:
    """The pretraining objective's score of `checkpoint`, where finetuning starts."""
    grid, tag = self.grid, _alpha_tag(alpha)
    if not grid.gap_gins:
      return None
    variant = network.variant_name(kv_heads, self.num_heads)
    gap_dir = self.out / 'gap' / f's{seed}' / f'{variant}_{method}_{tag}'
    return self._stage('gap', f'gap-s{seed}-{variant}-{method}-{tag}',
                       self._gin_command('eval', kv_heads, grid.gap_gins, grid.gap_bindings,
                                         f'--gin.CHECKPOINT_PATH={_string(checkpoint)}',
                                         f'--gin.EVAL_OUTPUT_DIR={_string(gap_dir)}',
                                         method=method),
                       gap_dir)

  def finetune(self, name: str, seed: int, kv_heads: int, task: str, total_steps: int,
               start: str, method: str = 'none') -> Stage:
    grid, run_dir = self.grid, self.out / 'runs' / name
    return self._stage('finetune', f'finetune-{name}',
                       self._gin_command(
                           'train', kv_heads, grid.finetune_gins[task],
                           [*grid.finetune_bindings, *self.seed_bindings(seed)],
                           f'--gin.TRAIN_STEPS={total_steps}',
                           f'--gin.INITIAL_CHECKPOINT_PATH={_string(start)}',
                           f'--gin.MODEL_DIR={_string(run_dir / "finetune")}',
                           method=method),
                       run_dir / 'finetune')

  def eval(self, name: str, kv_heads: int, task: str, method: str = 'none') -> Stage:
    grid, run_dir = self.grid, self.out / 'runs' / name
    return self._stage('eval', f'eval-{name}',
                       self._gin_command(
                           'eval', kv_heads, grid.eval_gins[task], grid.eval_bindings,
                           f'--gin.CHECKPOINT_PATH='
                           f'{_string(run_dir / "finetune" / grid.eval_subdir)}',
                           f'--gin.EVAL_OUTPUT_DIR={_string(run_dir / "eval")}',
                           method=method),
                       run_dir / 'eval')


def source_step(checkpoint: str) -> Optional[int]:
  """The pretraining step of a source checkpoint from its folder name (checkpoint_<step>,
  or the newest such sub-folder; builtin:<name> too), or None when there is none."""
  try:
    path = checkpoints.resolve_path(checkpoint, builtin=True)
  except checkpoints.CheckpointError:
    return None
  if path.is_dir() and checkpoints.step_of_dir(path) is None:
    path = checkpoints.latest_step_dir(path) or path
  return checkpoints.step_of_dir(path)


def plan(grid: Grid, output: str, num_heads: Optional[int] = None,
         search_paths: Sequence[str] = ()) -> List[Run]:
  """Every run of the grid with its stages (shared stages are the same objects).

  Runs are ordered by seed, then G as listed, method, alpha and task; each is the chain
  pretrain -> convert -> gap -> uptrain -> gap -> finetune -> eval, less the stages it
  does not need (the gap stages with Grid.gap_gins: the first scores the checkpoint
  uptraining starts from, the second the one finetuning starts from).

  search_paths: the sweep's --gin_search_paths; every train and eval stage gets them,
  so that a grid's own gin files are found by its stages as they were by the sweep.
  """
  num_heads = num_heads or gin_utils.load_config([grid.model_gin],
                                                 search_paths=search_paths).num_heads
  for field in ('kv_heads', 'bench_kv_heads', 'method_kv_heads'):
    values = getattr(grid, field) or ()
    for k in values:
      if num_heads % k:
        divisors = [d for d in range(num_heads, 0, -1) if num_heads % d == 0]
        raise ConfigError(f'grid {grid.name}: Grid.{field} = {list(values)!r} holds {k}, '
                          f'which does not divide num_heads {num_heads} of {grid.model_gin}: '
                          f'use G values among {divisors}.')
  planner = _Planner(grid, output, num_heads, search_paths)
  runs, seen = [], set()
  for seed in grid.seeds:
    pre, source = planner.pretrain(seed)
    for k in grid.kv_heads:
      variant = network.variant_name(k, num_heads)
      for method in planner.methods(k):
        conv = None if k == num_heads else planner.convert(seed, k, method, source)
        calib = None if k == num_heads else planner.calibrate(seed, method, source)
        start = source if conv is None else conv.output
        for alpha in planner.alphas(k):
          up_steps = train_lib.uptrain_steps(alpha, planner.source_steps)
          up = planner.uptrain(seed, k, method, alpha, start) if up_steps else None
          gap = planner.gap(seed, k, method, alpha, start if up is None else up.output)
          # The loss right after conversion too, where uptraining starts (item 2 of the
          # paper's mechanism: what conversion costs, then what uptraining recovers).
          converted = planner.gap(seed, k, method, 0.0, start) if up is not None else None
          if not grid.tasks:  # a gap-only grid
            name = f'{variant}_{method}_{_alpha_tag(alpha)}_s{seed}'
            chain = tuple(s for s in (pre, calib, conv, converted, up, gap) if s is not None)
            runs.append(Run(name, variant, k, alpha, method, seed, GAP_TASK, chain))
          for task in grid.tasks:
            name = f'{variant}_{method}_{_alpha_tag(alpha)}_s{seed}_{task}'
            if name in seen:
              continue
            seen.add(name)
            total = planner.source_steps + up_steps + grid.steps_of(task)
            ft = planner.finetune(name, seed, k, task, total,
                                  start if up is None else up.output, method)
            ev = planner.eval(name, k, task, method)
            chain = tuple(s for s in (pre, calib, conv, converted, up, gap, ft, ev)
                          if s is not None)
            runs.append(Run(name, variant, k, alpha, method, seed, task, chain))
  return runs


def check_tasks_and_metrics(grid: Grid):
  """ConfigError unless every task of the grid is registered and reports its metric."""
  # TensorFlow (seconds): only the commands that run a grid load it, not `--dry-run`'s
  # importers such as `gqa-jax --help`.
  from gqa_jax import data
  from gqa_jax.data import metrics
  for task in grid.tasks:
    data.check_task(task, what='Grid.tasks entry', check_data=False)
    names = metrics.metric_names(task)
    wanted = grid.metric[task]
    if names is not None and wanted not in names:
      close = difflib.get_close_matches(str(wanted), sorted(names), n=1)
      hint = f'did you mean {close[0]!r}? ' if close else ''
      raise ConfigError(f'Grid.metric[{task!r}] = {wanted!r} is not a '
                        f'metric of {task}: {hint}it reports '
                        f'{", ".join(sorted(names)) or "no metrics"}.')


def bench_stage(grid: Grid, output: str,
                search_paths: Sequence[str] = ()) -> Optional[Stage]:
  """The decoding benchmark over every G of the grid, or None when bench_args is None.

  search_paths: the sweep's --gin_search_paths, which find the grid's model gin."""
  if grid.bench_args is None:
    return None
  out = Path(output) / 'bench'
  heads = ','.join(str(k) for k in sorted(set(grid.bench_kv_heads or grid.kv_heads)))
  paths = (f'--gin_search_paths={",".join(search_paths)}',) if search_paths else ()
  return Stage('bench', 'bench', ('bench', 'decode', f'--gin_file={grid.model_gin}',
                                  '--num-kv-heads', heads, *grid.bench_args,
                                  '--output', str(out), *paths), str(out))


def _marker(output: str, stage: Stage) -> Path:
  return Path(output) / '.done' / f'{stage.key}.json'


class StageChanged(ValueError):
  """A stage is marked done in the output folder, but by a different command."""


def is_done(output: str, stage: Stage) -> bool:
  """Whether the stage finished in `output`, with exactly this command.

  Raises:
    StageChanged: the marker records another command (the grid changed since): reusing its
      outputs would mix settings silently. (Edits inside gin files are not detected.)
  """
  marker = _marker(output, stage)
  if not marker.exists():
    return False
  recorded = json.loads(marker.read_text()).get('command')
  if recorded is not None and recorded != stage.command():
    raise StageChanged(
        f'stage {stage.key} in {output} was done by a different command (the grid changed '
        f'since): done: {recorded} | now: {stage.command()} | use a new --output, or delete '
        f'{marker} to run the stage again.')
  return True


def _locked(output: str, stage: Stage):
  """An exclusive lock on the stage, so that concurrent runs (job-array tasks) execute it
  once: a second one waits for the first, then finds the stage done."""
  path = Path(output) / '.done' / f'{stage.key}.lock'
  path.parent.mkdir(parents=True, exist_ok=True)
  return locks.hold(path, f'stage {stage.key}', 'wait for it', wait=True)


class StageFailed(RuntimeError):
  pass


class StageStopped(StageFailed):
  """SIGTERM or SIGINT stopped the sweep (its running stage saved where it was): the
  command exits 128 + `signum`, as `gqa-jax train` does, so that a scheduler requeues it."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = int(signum)


def execute(stage: Stage, output: str, runner: Callable[[Sequence[str]], int],
            log: Callable[[str], None] = print) -> bool:
  """Runs the stage unless it is done; returns whether it ran. Raises StageFailed."""
  if is_done(output, stage):
    return False
  with _locked(output, stage):
    if is_done(output, stage):  # another process finished it while we waited
      return False
    log(f'[{stage.kind}] {stage.command()}')
    start = time.time()
    status = runner(list(stage.argv))
    if status - 128 in (signal.SIGINT, signal.SIGTERM):  # train saved where it stopped
      raise StageStopped(f'{stage.kind} stage {stage.key} was stopped by '
                         f'{signal.Signals(status - 128).name} after saving a checkpoint: '
                         'rerun the same command to resume it (finished stages are kept).',
                         status - 128)
    if status != 0:
      raise StageFailed(f'{stage.kind} stage {stage.key} failed with status {status}: '
                        f'{stage.command()} (fix it and rerun: finished stages are kept)')
    marker = _marker(output, stage)
    tmp = marker.with_suffix('.tmp')
    tmp.write_text(json.dumps({'command': stage.command(), 'seconds': time.time() - start,
                               'finished': time.strftime('%Y-%m-%d %H:%M:%S')}) + '\n')
    os.replace(tmp, marker)
  return True


def distinct_fraction(predictions_jsonl: Path) -> Optional[float]:
  """Distinct predictions / examples in an eval's predictions file (None if empty).

  A model that writes (nearly) the same output for every input scores by that one
  string's overlap with the targets; a low fraction flags such a degenerate run."""
  outputs = []
  with open(predictions_jsonl) as f:
    for line in f:
      record = json.loads(line)
      outputs.append(str(record.get('prediction', record.get('output'))))
  return len(set(outputs)) / len(outputs) if outputs else None


def _latest_summary(eval_dir: Path) -> dict:
  summaries = sorted(eval_dir.glob('summary_*.json'),
                     key=lambda p: int(p.stem.split('_')[1]))
  if not summaries:
    raise FileNotFoundError(f'no eval summary in {eval_dir}: run the sweep first.')
  return json.loads(summaries[-1].read_text())


def read_gap(run: Run, grid: Grid, where: str = 'finetune'
             ) -> Tuple[Optional[float], Optional[List[List[float]]]]:
  """The pretraining objective's score (Grid.gap_gins) where the run's finetuning started
  (where='finetune') or where its uptraining started, right after conversion
  (where='conversion'; the same checkpoint without uptraining), and that eval's
  per-example [negative log-likelihood summed over target tokens, target tokens] in the
  order of its examples (the `score` of its predictions file; `nll` is the first
  column's sum over the second's), None where it wrote no such file. Every gap eval of a
  grid scores the same examples, so two runs' lists pair example by example. (None,
  None) when the grid scores no gap."""
  stages = [s for s in run.stages if s.kind == 'gap']
  if not stages:
    return None, None
  out = Path((stages[0] if where == 'conversion' else stages[-1]).output)
  summary = _latest_summary(out)
  metrics = {k: v for task in summary['metrics'].values() for k, v in task.items()}
  if grid.gap_metric not in metrics:
    raise KeyError(f'the gap eval in {out} reports {sorted(metrics)}, not '
                   f'{grid.gap_metric!r}: fix Grid.gap_metric or Grid.gap_gins.')
  return metrics[grid.gap_metric], _gap_examples(out, summary)


def _gap_examples(out: Path, summary: dict) -> Optional[List[List[float]]]:
  files = [out / f'{task}-{summary["step"]:06d}.jsonl' for task in sorted(summary['metrics'])]
  files = [f for f in files if f.exists()]
  if len(files) != 1:
    return None
  examples = []
  with open(files[0]) as f:
    for line in f:
      score = json.loads(line).get('score')
      if not isinstance(score, list) or len(score) != 2:
        return None
      examples.append([-float(score[0]), float(score[1])])
  return examples or None


def read_score(run: Run, grid: Grid) -> dict:
  """The run's eval summary: {'step', 'score', 'metrics', 'distinct_predictions',
  'predictions', 'gap', 'gap_converted'} (score: grid.metric[task]; distinct_predictions:
  `distinct_fraction` of its predictions file, whose absolute path (as in the eval's
  summary, readable from any working directory) is 'predictions', both None if the file
  is missing; gap, gap_converted and gap_examples, gap_converted_examples: `read_gap`
  where finetuning and where uptraining started)."""
  if run.stages[-1].kind == 'gap':  # a gap-only grid: the gap is the score
    gap, gap_examples = read_gap(run, grid)
    converted, converted_examples = read_gap(run, grid, 'conversion')
    step = _latest_summary(Path(run.stages[-1].output))['step']
    return {'step': step, 'score': gap, 'metrics': {grid.gap_metric: gap},
            'distinct_predictions': None, 'predictions': None, 'gap': gap,
            'gap_examples': gap_examples, 'gap_converted': converted,
            'gap_converted_examples': converted_examples}
  eval_dir = Path(run.stages[-1].output)
  summary = _latest_summary(eval_dir)
  metrics = summary['metrics'].get(run.task, {})
  key = grid.metric[run.task]
  if key not in metrics:
    raise KeyError(f'{run.task} metrics {sorted(metrics)} have no {key!r}: fix Grid.metric.')
  predictions = eval_dir / f'{run.task}-{summary["step"]:06d}.jsonl'
  distinct = distinct_fraction(predictions) if predictions.exists() else None
  gap, gap_examples = read_gap(run, grid)
  converted, converted_examples = read_gap(run, grid, 'conversion')
  return {'step': summary['step'], 'score': metrics[key], 'metrics': metrics,
          'distinct_predictions': distinct,
          'predictions': os.path.abspath(predictions) if predictions.exists() else None,
          'gap': gap, 'gap_examples': gap_examples, 'gap_converted': converted,
          'gap_converted_examples': converted_examples}
