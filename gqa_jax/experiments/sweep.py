"""Running, scheduling and summarising an experiment grid (`gqa-jax sweep`).

    runs = grid_lib.plan(grid, output)
    run_all(grid, runs, output)          # here, one stage after another, skipping done ones
    emit(runs, ..., directory)           # or: one command per run and a job-array script
    rows = aggregate(grid, runs, output) # results.csv, results.md and the paper's figures
"""

import contextlib
import csv
import ctypes
import io
import json
import math
import os
import shlex
import signal
import subprocess
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

from gqa_jax import locks
from gqa_jax.data import metrics as metrics_lib
from gqa_jax.errors import OutputLocked
from gqa_jax.experiments import grid as grid_lib
from gqa_jax.experiments import plots

CSV_FIELDS = ('run', 'variant', 'kv_heads', 'alpha', 'method', 'seed', 'task', 'metric',
              'score', 'step', 'distinct_predictions', 'time_per_sample_s', 'metrics', 'gap',
              'gap_converted')
# Below this fraction of distinct predictions a run is flagged as degenerate: its score
# measures one repeated output, not the task.
DEGENERATE_BELOW = 0.5
# Metrics of decoded predictions, for the best-constant-output floor.
PREDICTION_METRICS = {**{k: metrics_lib.rouge for k in metrics_lib.ROUGE_TYPES},
                      'bleu': metrics_lib.bleu}


def run_all(grid: grid_lib.Grid, runs: Sequence[grid_lib.Run], output: str,
            runner: Callable[[Sequence[str]], int], log: Callable[[str], None] = print,
            search_paths: Sequence[str] = (), bench: bool = True) -> dict:
  """Executes every unfinished stage of `runs` (then the benchmark, unless `bench` is
  False); returns counts.

  search_paths: the sweep's --gin_search_paths (the plan's stages carry them already)."""
  stages, seen = [], set()
  for run in runs:
    for stage in run.stages:
      if stage.key not in seen:
        seen.add(stage.key)
        stages.append(stage)
  bench_stage = grid_lib.bench_stage(grid, output, search_paths) if bench else None
  if bench_stage is not None:
    stages.append(bench_stage)
  done = sum(grid_lib.is_done(output, s) for s in stages)
  log(f'sweep {grid.name}: {len(runs)} runs, {len(stages)} stages, {done} already done')
  finishing = defaultdict(list)  # a run's result is written once its last stage is done
  for run in runs:
    finishing[run.stages[-1].key].append(run)
  ran, stage = 0, None
  try:
    with _raising_on_signals():
      for i, stage in enumerate(stages):
        if grid_lib.execute(stage, output, runner,
                            log=lambda m, i=i: log(f'({i + 1}/{len(stages)}) {m}')):
          ran += 1
        for run in finishing[stage.key]:
          write_result(grid, run, output)
  except _Signalled as e:
    where = f' during {stage.kind} stage {stage.key}' if stage is not None else ''
    raise grid_lib.StageStopped(
        f'sweep stopped by {signal.Signals(e.signum).name}{where} (not marked done): rerun '
        'the same command to resume (finished stages are kept).', e.signum) from None
  return {'runs': len(runs), 'stages': len(stages), 'ran': ran, 'skipped': len(stages) - ran}


class _Signalled(BaseException):
  """SIGTERM or SIGINT during a stage run in this process. Not an Exception: `gqa-jax`'s
  main, which runs the stage, turns those (and KeyboardInterrupt) into an exit status."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


@contextlib.contextmanager
def _raising_on_signals():
  """SIGTERM and SIGINT stop the stage running in this process at once (_Signalled):
  convert, calibrate, eval and bench have nothing to save and are redone by a rerun. A
  train stage sets its own handlers while it trains: it saves a checkpoint, returns
  128 + the signal, and `grid_lib.execute` raises StageStopped."""
  if threading.current_thread() is not threading.main_thread():
    yield  # handlers can only be set from the main thread
    return

  def handle(signum, _):
    raise _Signalled(signum)
  previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


# Set by `run_parallel` in each run's process: the sweep's process id (see die_with_parent).
PARENT_ENV = 'GQA_JAX_SWEEP_PARENT'
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent():
  """In a run's process started by `run_parallel`: SIGTERM when the sweep that started it
  dies, SIGKILL and the OOM killer included, so that no orphan trains on beside a rerun
  (its training saves a checkpoint and stops, as on any SIGTERM). Linux: the kernel's
  parent-death signal (prctl), set here rather than in a preexec_fn, which is unsafe in a
  parent with threads; elsewhere a thread that watches the parent. Nothing outside such a
  process."""
  parent = os.environ.pop(PARENT_ENV, None)
  if not parent or not parent.isdigit():
    return
  parent = int(parent)
  armed = False
  if sys.platform.startswith('linux'):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
      armed = False
  if not armed:
    def watch():
      while os.getppid() == parent:
        time.sleep(1)
      os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name='die-with-parent', daemon=True).start()
  if os.getppid() != parent:  # it died before the signal was armed
    os.kill(os.getpid(), signal.SIGTERM)


RUN_LOCK = '.lock'  # in OUTPUT/runs/RUN/, held by the process that executes the run


@contextlib.contextmanager
def holding(runs: Sequence[grid_lib.Run], output: str, log: Callable[[str], None] = print):
  """Each run's lock (OUTPUT/runs/RUN/.lock) held for the block, so that a run never
  executes in two processes at once (a rerun beside a process of a killed sweep that has
  not stopped yet): this one waits, saying for whom, until the other has stopped."""
  with contextlib.ExitStack() as stack:
    for run in sorted(runs, key=lambda r: r.name):  # one order: no two waiters deadlock
      folder = Path(output) / 'runs' / run.name
      folder.mkdir(parents=True, exist_ok=True)
      what = f'run {run.name}'
      try:
        stack.enter_context(locks.hold(folder / RUN_LOCK, what, 'waiting for it to stop'))
      except OutputLocked as e:
        log(str(e))
        stack.enter_context(locks.hold(folder / RUN_LOCK, what, '', wait=True))
    yield


def run_parallel(runs: Sequence[grid_lib.Run], output: str,
                 command: Callable[[grid_lib.Run], List[str]], jobs: int,
                 log: Callable[[str], None] = print) -> dict:
  """Runs the unfinished runs `jobs` at a time, each in its own process (`command(run)`,
  a `gqa-jax sweep ... --only RUN` that leaves the benchmark out), its output in
  OUTPUT/logs/RUN.log. Stages that runs share (a conversion) are locked: whichever
  process comes second waits, then finds it done. The first failure stops new starts;
  SIGTERM or Ctrl-C is passed on to the running processes (their training saves a
  checkpoint); once they have stopped the sweep ends with StageStopped. Each process
  gets SIGTERM if this one dies (`die_with_parent`), and appends to its log, a rerun
  below a line that says so. Returns counts of runs."""
  todo = [r for r in runs
          if not all([grid_lib.is_done(output, s) for s in r.stages])]
  logs = Path(output) / 'logs'
  logs.mkdir(parents=True, exist_ok=True)
  log(f'{len(runs)} runs, {len(runs) - len(todo)} already done; {len(todo)} to run, '
      f'{jobs} at a time (each run\'s output: {logs}/RUN.log)')
  pending, running, failed, stopped, finished = list(todo), {}, [], [], 0

  def stop(signum, frame):
    stopped.append(signum)
    for proc, *_ in running.values():
      proc.send_signal(signal.SIGTERM)
  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while pending or running:
      while pending and len(running) < jobs and not failed and not stopped:
        run = pending.pop(0)
        path = logs / f'{run.name}.log'
        # Appended, never truncated: a process of an earlier attempt that still writes
        # to it cannot leave a hole of NUL bytes in it.
        with open(path, 'a') as f:
          if f.tell():
            f.write(f'\n---- rerun {time.strftime("%Y-%m-%d %H:%M:%S")} by sweep process '
                    f'{os.getpid()}; the earlier attempts\' output is above ----\n')
            f.flush()
          proc = subprocess.Popen(command(run), stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, PARENT_ENV: str(os.getpid())})
        running[proc.pid] = (proc, run, path, time.time())
        log(f'[{finished + len(running)}/{len(todo)}] started {run.name}')
      try:
        pid, status = os.wait()
      except ChildProcessError:
        break
      except InterruptedError:
        continue
      if pid not in running:
        continue
      proc, run, path, start = running.pop(pid)
      proc.returncode = os.waitstatus_to_exitcode(status)
      finished += 1
      if proc.returncode == 0:
        log(f'finished {run.name} in {time.time() - start:.0f} s')
      elif stopped and proc.returncode - 128 in (signal.SIGTERM, signal.SIGINT):
        log(f'stopped {run.name}: it saved where it was; its output: {path}')
      else:
        failed.append((run, path, proc.returncode))
        log(f'FAILED {run.name} (status {proc.returncode}); its output: {path}')
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if stopped:
    raise grid_lib.StageStopped(
        f'sweep stopped by {signal.Signals(stopped[0]).name}; the running runs saved their '
        'training where they were: rerun the same command to resume (finished stages are '
        'kept).', stopped[0])
  if failed:
    run, path, status = failed[0]
    tail = path.read_text().strip().splitlines()[-1:] or ['(no output)']
    raise grid_lib.StageFailed(
        f'{len(failed)} run(s) failed; the first, {run.name}, with status {status}: '
        f'{tail[0]} (its whole output: {path}'
        + ('' if 'rerun' in tail[0] else '; fix it and rerun: finished stages are kept')
        + ')')
  return {'runs': len(runs), 'ran': len(todo), 'skipped': len(runs) - len(todo)}


def write_result(grid: grid_lib.Grid, run: grid_lib.Run, output: str) -> Optional[dict]:
  """The run's RUN/result.json (its fields and score) if all its stages are done, else
  None. Raises grid_lib.StageChanged if one was done by another command."""
  if not all([grid_lib.is_done(output, s) for s in run.stages]):
    return None
  result = {**run_fields(run), **grid_lib.read_score(run, grid)}
  path = result_path(run, output)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')  # a stop while writing leaves the old file or the new
  tmp.write_text(json.dumps(result, indent=2) + '\n')
  os.replace(tmp, path)
  return result


def result_path(run: grid_lib.Run, output: str) -> Path:
  """OUTPUT/runs/RUN/result.json (beside the run's finetune/ and eval/ folders)."""
  return Path(output) / 'runs' / run.name / 'result.json'


def run_fields(run: grid_lib.Run) -> dict:
  return {'run': run.name, 'variant': run.variant, 'kv_heads': run.kv_heads,
          'alpha': run.alpha, 'method': run.method, 'seed': run.seed, 'task': run.task}


def dry_run(grid: grid_lib.Grid, runs: Sequence[grid_lib.Run], output: str,
            search_paths: Sequence[str] = ()) -> str:
  """Every run with its stages' commands, marking those already done (or done by a
  different command: 'changed')."""
  lines = [f'# sweep {grid.name}: {len(runs)} runs into {output}']
  for run in runs:
    lines.append(f'\n## {run.name}')
    for stage in run.stages:
      lines.append(f'[{_mark(output, stage)}] {stage.command()}')
  bench = grid_lib.bench_stage(grid, output, search_paths)
  if bench is not None:
    lines.append(f'\n## decoding benchmark\n[{_mark(output, bench)}] {bench.command()}')
  return '\n'.join(lines)


def _mark(output: str, stage: grid_lib.Stage) -> str:
  """todo, done, or changed (done by another command: running the sweep would refuse)."""
  try:
    return 'done' if grid_lib.is_done(output, stage) else 'todo'
  except grid_lib.StageChanged:
    return 'changed'


def emit(runs: Sequence[grid_lib.Run], sweep_argv: Sequence[str], directory: str) -> List[str]:
  """Writes DIRECTORY/commands.txt (one `gqa-jax sweep ... --only RUN` per line) and
  DIRECTORY/array.sbatch (a Slurm job array running line $SLURM_ARRAY_TASK_ID + 1).
  Shared stages take a file lock, so array tasks that need one wait for whichever
  started it. Returns the paths."""
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  base = 'gqa-jax sweep ' + ' '.join(shlex.quote(a) for a in sweep_argv)
  commands = [f'{base} --only {shlex.quote(run.name)}' for run in runs]
  (out / 'commands.txt').write_text('\n'.join(commands) + '\n')
  script = out / 'array.sbatch'
  script.write_text(
      '#!/bin/bash\n'
      f'#SBATCH --array=0-{len(commands) - 1}\n'
      '#SBATCH --job-name=gqa-sweep\n'
      '# One run per array task; then, once all finished, the decoding benchmark (alone\n'
      '# on its machine) and the results with:\n'
      f'#   {base}\n'
      'set -euo pipefail\n'
      f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(out / "commands.txt"))})\n'
      'eval "$line"\n')
  return [str(out / 'commands.txt'), str(script)]


def _bench_records(output: str) -> List[dict]:
  path = Path(output) / 'bench' / 'decode.json'
  return json.loads(path.read_text()) if path.exists() else []


def _bench_times(records: Sequence[dict]) -> Dict[int, float]:
  return {r['num_kv_heads']: r['time_per_sample_s'] for r in records
          if not r.get('kv_layers')}


def constant_floor(metric: str, predictions: Optional[str]) -> Optional[Tuple[float, str]]:
  """(score, output) of the best constant output on an eval's examples (the targets in its
  predictions file), or None for a metric not computed from predictions (e.g. nll)."""
  fn = PREDICTION_METRICS.get(metric)
  if fn is None or not predictions or not Path(predictions).exists():
    return None
  with open(predictions) as f:
    targets = [str(json.loads(line)['target']) for line in f]
  return metrics_lib.best_constant(targets, fn, metric) if targets else None


def csv_text(rows: Sequence[dict]) -> str:
  """results.csv: the rows' CSV_FIELDS, 'metrics' as JSON."""
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, CSV_FIELDS, extrasaction='ignore')
  writer.writeheader()
  writer.writerows({**r, 'metrics': json.dumps(r['metrics'], sort_keys=True)} for r in rows)
  return text.getvalue()


def load_rows(output: str) -> List[dict]:
  """The rows `aggregate` summarised, from OUTPUT/results.json: what results.md is made
  of (results.csv leaves out the per-example gap scores and the floor)."""
  return json.loads((Path(output) / 'results.json').read_text())


def aggregate(grid: grid_lib.Grid, runs: Sequence[grid_lib.Run], output: str) -> List[dict]:
  """results.csv (one row per finished run), results.json (the same rows in full),
  results.md (mean, spread, n per cell) and figures; runs not finished yet are left out
  (and counted in results.md's title). Rows of a prediction metric also carry the task's
  best-constant floor ('floor', 'floor_output'; one value per task), and rows of a grid
  with a conversion gap its per-example scores ('gap_examples',
  'gap_converted_examples'); neither goes to results.csv."""
  records = _bench_records(output)
  times = _bench_times(records)
  rows, floors = [], {}
  for run in runs:
    result = write_result(grid, run, output)
    if result is None:
      continue
    metric = grid.gap_metric if run.task == grid_lib.GAP_TASK else grid.metric[run.task]
    if run.task not in floors:  # every run of a task scores the same examples
      floors[run.task] = constant_floor(metric, result.get('predictions'))
    floor = floors[run.task]
    rows.append({**run_fields(run), 'metric': metric, 'score': result['score'],
                 'step': result['step'],
                 'distinct_predictions': result.get('distinct_predictions'),
                 'time_per_sample_s': times.get(run.kv_heads),
                 'metrics': result.get('metrics', {}), 'gap': result.get('gap'),
                 'gap_converted': result.get('gap_converted'),
                 'gap_examples': result.get('gap_examples'),
                 'gap_converted_examples': result.get('gap_converted_examples'),
                 **({'floor': floor[0], 'floor_output': floor[1]} if floor else {})})
  out = Path(output)
  (out / 'results.csv').write_text(csv_text(rows))
  (out / 'results.json').write_text(json.dumps(rows, separators=(',', ':')) + '\n')
  cells = summarize(rows)
  (out / 'results.md').write_text(results_markdown(rows, grid, len(runs)))
  times_md = stage_times_markdown(runs, output)
  if times_md:
    (out / 'stage_times.md').write_text(times_md)
  if cells:
    plots.sweep_figures(cells, str(out))
    if any(r.get('kv_layers') for r in records):  # cross-layer sharing was benchmarked
      plots.quality_vs_kv_bytes(cells, records, str(out / 'quality_vs_kv_bytes.png'))
  return rows


STAGE_ORDER = ('pretrain', 'calibrate', 'convert', 'uptrain', 'gap', 'finetune', 'eval',
               'bench')  # the order in which a run's stages run


def stage_times_markdown(runs: Sequence[grid_lib.Run], output: str) -> Optional[str]:
  """What the grid's finished stages cost: the seconds each took (its marker in
  OUTPUT/.done), per stage kind and method: how many, median and total. A stage that runs
  of several methods share (pretrain, calibrate, MHA's gap) counts once, as 'shared'.
  None when no stage has finished."""
  users = {}  # stage key -> (stage, the methods of the runs that use it)
  for run in runs:
    for stage in run.stages:
      users.setdefault(stage.key, (stage, set()))[1].add(run.method)
  groups = {}  # (kind, method) -> seconds of each finished stage
  for stage, methods in users.values():
    try:
      seconds = float(json.loads(grid_lib._marker(output, stage).read_text())['seconds'])
    except (OSError, ValueError, KeyError, TypeError):
      continue
    method = next(iter(methods)) if len(methods) == 1 else 'shared'
    groups.setdefault((stage.kind, method), []).append(seconds)
  if not groups:
    return None
  kinds = list(STAGE_ORDER) + sorted({kind for kind, _ in groups} - set(STAGE_ORDER))
  lines = ['# Stage times', '',
           '| stage | method | stages | median (s) | total (s) |', '|---|---|---:|---:|---:|']
  for kind, method in sorted(groups, key=lambda g: (kinds.index(g[0]), g[1] != 'shared',
                                                    g[1])):
    seconds = groups[(kind, method)]
    lines.append(f'| {kind} | {method} | {len(seconds)} | {statistics.median(seconds):.1f} '
                 f'| {sum(seconds):.0f} |')
  every = [t for seconds in groups.values() for t in seconds]
  lines += ['', f'{len(every)} finished stages, {sum(every):.0f} s of stage time in all '
            '(wall time of each stage, from its marker in .done/; the stages of a sweep with '
            '--jobs N overlap, so the sweep took less wall time than this).', '']
  return '\n'.join(lines)


CONFIDENCE = 0.95


def _std(values: Sequence[float]) -> float:
  return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE
                  ) -> Tuple[float, Optional[float], Optional[float]]:
  """(mean, low, high): the Student-t confidence interval of the mean of `values`, which
  are paired differences (one per seed), with n - 1 degrees of freedom; low and high are
  None below two values (no spread to estimate)."""
  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, None, None
  half = (stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
          * statistics.stdev(values) / math.sqrt(len(values)))
  return mean, mean - half, mean + half


def _paired_fields(name: str, deltas: Sequence[float]) -> dict:
  """A cell's `{name}_{mean,std,n,lo,hi,resolved}` for these paired differences: resolved
  when the interval excludes 0 (None without an interval)."""
  if not deltas:
    return {f'{name}_mean': None, f'{name}_std': None, f'{name}_n': 0, f'{name}_lo': None,
            f'{name}_hi': None, f'{name}_resolved': None}
  mean, lo, hi = mean_interval(deltas)
  return {f'{name}_mean': mean, f'{name}_std': _std(deltas), f'{name}_n': len(deltas),
          f'{name}_lo': lo, f'{name}_hi': hi,
          f'{name}_resolved': None if lo is None else bool(lo > 0 or hi < 0)}


def _gap_fields(name: str, pairs: Sequence[Tuple[dict, str, dict, str]]) -> dict:
  """`_paired_fields` for differences of the conversion gap, one pair (row a, its key,
  row b, its key) per seed, e.g. (GQA run, 'gap_converted', MHA run, 'gap').

  A gap is the mean nll of one fixed set of evaluation examples, so the seed-to-seed
  spread alone misses the noise of that sample (and is 0 where conversion is
  deterministic, e.g. mean pooling at alpha 0). With both rows' per-example scores
  (`grid.read_gap`) the interval adds, in quadrature, the half-width over
  seeds (Student t, n - 1 df; none from one seed) and the half-width over examples (the
  seed-averaged per-example differences, as a ratio of their nll sum to their token
  count: linearised standard error, Student t, m - 1 df). `{name}_examples` is m (0
  where an eval lacks per-example scores: then the interval is over seeds only)."""
  deltas = [a[ka] - b[kb] for a, ka, b, kb in pairs]
  fields = _paired_fields(name, deltas)
  examples = [(a.get(f'{ka}_examples'), b.get(f'{kb}_examples')) for a, ka, b, kb in pairs]
  fields[f'{name}_examples'] = 0
  if not pairs or any(ea is None or eb is None or len(ea) != len(eb) or len(ea) < 2
                      for ea, eb in examples):
    return fields
  ea, eb = np.asarray([e[0] for e in examples]), np.asarray([e[1] for e in examples])
  if not np.array_equal(ea[..., 1], eb[..., 1]):
    return fields  # not the same examples on both sides: no pairing by example
  tokens = ea[0, :, 1]
  per_example = (ea[..., 0] - eb[..., 0]).mean(axis=0)   # seed-averaged, per example
  m = len(tokens)
  ratio = per_example.sum() / tokens.sum()
  se = math.sqrt(((per_example - ratio * tokens) ** 2).sum() / (m * (m - 1))) / tokens.mean()
  half = stats.t.ppf(0.5 + CONFIDENCE / 2, m - 1) * se
  if fields[f'{name}_lo'] is not None:
    half = math.hypot(half, fields[f'{name}_hi'] - fields[f'{name}_mean'])
  mean = fields[f'{name}_mean']
  fields.update({f'{name}_lo': mean - half, f'{name}_hi': mean + half,
                 f'{name}_resolved': bool(mean - half > 0 or mean + half < 0),
                 f'{name}_examples': m})
  return fields


def summarize(rows: Sequence[dict]) -> List[dict]:
  """One cell per (task, variant, alpha, method): mean, sample std and n over seeds.

  Runs of one seed share their pretrained MHA checkpoint, so each cell also carries paired
  differences, score minus an MHA run's score of the same task and seed, averaged over
  the seeds that have both (seed-to-seed variation of the pretraining cancels in them):
  `delta_*` against MHA at alpha 0 (the source model, the paper's baseline) and
  `matched_delta_*` against MHA uptrained with the same alpha (a compute-matched
  baseline, present with Grid.uptrain_mha). Each comes as fields `_mean`, `_std`, `_n`,
  `_lo`/`_hi` (the 95% Student-t interval of the mean difference, from two seeds on) and
  `_resolved` (the interval excludes 0); None where no seed has the MHA run. `others`:
  the mean over the cell's runs of each other metric the task reported (rows'
  'metrics'), e.g. ROUGE-L beside a teacher-forced NLL. With a conversion gap
  (Grid.gap_gins), `gap_mean` is the pretraining objective's score where finetuning
  started and `gap_delta_*` its paired difference from MHA's at alpha 0 (the source model
  itself): what conversion cost and what uptraining recovered, before any finetuning;
  for converted models `gap_converted_mean` / `gap_converted_delta_*` are the same right
  after conversion, before uptraining.
  """
  groups = defaultdict(list)
  mha, mha_gap = {}, {}  # mha_gap: seed -> the source MHA run's row
  for r in rows:
    groups[(r['task'], r['kv_heads'], r['alpha'], r['method'])].append(r)
    if r['variant'] == 'MHA':
      mha[(r['task'], r['seed'], r['alpha'])] = r['score']
      if r.get('gap') is not None and not r['alpha']:
        mha_gap[r['seed']] = r
  cells = []
  for (task, k, alpha, method), group in sorted(groups.items(),
                                                key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2:])):
    scores = [r['score'] for r in group]
    cell = {'task': task, 'variant': group[0]['variant'], 'kv_heads': k, 'alpha': alpha,
            'method': method, 'metric': group[0]['metric'],
            'mean': statistics.fmean(scores), 'std': _std(scores),
            'min': min(scores), 'max': max(scores), 'n': len(scores),
            'degenerate': sum(_degenerate(r) for r in group),
            'time_per_sample_s': group[0]['time_per_sample_s'],
            'others': _other_means(group)}
    if group[0].get('floor') is not None:
      cell.update(floor=group[0]['floor'], floor_output=group[0]['floor_output'])
    for name, ref_alpha in (('delta', 0.0), ('matched_delta', alpha)):
      deltas = [r['score'] - mha[(task, r['seed'], ref_alpha)] for r in group
                if (task, r['seed'], ref_alpha) in mha]
      cell.update(_paired_fields(name, deltas))
    gaps = [r['gap'] for r in group if r.get('gap') is not None]
    if gaps:
      pairs = [(r, 'gap', mha_gap[r['seed']], 'gap') for r in group
               if r.get('gap') is not None and r['seed'] in mha_gap]
      cell.update({'gap_mean': statistics.fmean(gaps), 'gap_std': _std(gaps),
                   **_gap_fields('gap_delta', pairs)})
      converted = [r for r in group if r.get('gap_converted') is not None]
      if converted and group[0]['variant'] != 'MHA':
        cell['gap_converted_mean'] = statistics.fmean(r['gap_converted'] for r in converted)
        cell.update(_gap_fields('gap_converted_delta', [
            (r, 'gap_converted', mha_gap[r['seed']], 'gap') for r in converted
            if r['seed'] in mha_gap]))
    cells.append(cell)
  return cells


def _other_means(group: Sequence[dict]) -> Dict[str, float]:
  names = sorted(set.intersection(*[set(r.get('metrics') or {}) for r in group]))
  return {k: statistics.fmean(r['metrics'][k] for r in group)
          for k in names if k != group[0]['metric']}


def _others(cell: dict) -> str:
  return ', '.join(f'{k} {v:.2f}' for k, v in cell.get('others', {}).items())


def _degenerate(row: dict) -> bool:
  distinct = row.get('distinct_predictions')
  return distinct is not None and distinct < DEGENERATE_BELOW


def degenerate_warning(cells: Sequence[dict]) -> Optional[str]:
  """A warning naming the cells with degenerate runs, or None."""
  flagged = [f"{c['variant']} alpha {c['alpha']:g} {c['method']} ({c['degenerate']}/{c['n']})"
             for c in cells if c.get('degenerate')]
  if not flagged:
    return None
  return (f'WARNING: runs whose predictions are under {DEGENERATE_BELOW:.0%} distinct (the '
          'model writes nearly the same output for every input, so scores of its predictions '
          '(ROUGE, BLEU, F1) measure that one output, not the task; teacher-forced ones '
          '(nll) do not depend on them; train longer): ' + ', '.join(flagged))


def _interval(entry: dict, name: str) -> str:
  """'+0.250 [-1.234, +1.734] *': the mean paired difference `{name}_mean`, its 95%
  interval, * when the interval excludes 0; '+0.250 (n=1)' without an interval; '' with
  no pair."""
  if entry[f'{name}_mean'] is None:
    return ''
  if entry[f'{name}_lo'] is None:
    return f"{entry[f'{name}_mean']:+.3f} (n={entry[f'{name}_n']})"
  return (f"{entry[f'{name}_mean']:+.3f} [{entry[f'{name}_lo']:+.3f}, "
          f"{entry[f'{name}_hi']:+.3f}]{' *' if entry[f'{name}_resolved'] else ''}")


def _paired(cell: dict, name: str) -> str:
  """A cell's paired difference from MHA as `_interval` writes it; '' for MHA itself."""
  return '' if cell['variant'] == 'MHA' else _interval(cell, name)


def format_cells(cells: Sequence[dict], grid: grid_lib.Grid, planned: int,
                 finished: int) -> str:
  matched = any(c['variant'] == 'MHA' and c['alpha'] for c in cells)
  gaps = any('gap_mean' in c for c in cells)
  uptrained = gaps and any(c['alpha'] and 'gap_converted_mean' in c for c in cells)
  extra = ' minus MHA at same alpha (paired) |' if matched else ''
  extra += ' gap: pretraining nll | gap minus MHA (paired) |' if gaps else ''
  extra += ' gap at conversion minus MHA (paired) |' if uptrained else ''
  lines = [f'# sweep {grid.name}: {finished} of {planned} runs finished', '',
           '| task | variant | alpha | method | score (mean) | std | min | max | n | '
           f'minus MHA (paired) |{extra} time per sample (ms) | other metrics (mean) |',
           '|---|---|---:|---|---:|---:|---:|---:|---:|---:|' + ('---:|' if matched else '')
           + ('---:|---:|' if gaps else '') + ('---:|' if uptrained else '') + '---:|---|']
  for c in cells:
    t = c['time_per_sample_s']
    same = f" {_paired(c, 'matched_delta')} |" if matched else ''
    if gaps:
      same += (f" {c['gap_mean']:.3f} | {_paired(c, 'gap_delta')} |" if 'gap_mean' in c
               else ' | |')
    if uptrained:
      same += (f" {_paired(c, 'gap_converted_delta')} |" if 'gap_converted_mean' in c
               else ' |')
    lines.append(f"| {c['task']} | {c['variant']} | {c['alpha']:g} | {c['method']} | "
                 f"{c['mean']:.3f} | {c['std']:.3f} | {c['min']:.3f} | {c['max']:.3f} | "
                 f"{c['n']} | {_paired(c, 'delta')} |{same} "
                 f"{'' if t is None else f'{t * 1e3:.2f}'} | {_others(c)} |")
  lines += ['', 'score: the task metric named in the grid (ROUGE/BLEU as 0-100 where seqio '
            'reports so; nll: the references\' negative log-likelihood per token, lower is '
            'better); std: sample standard deviation over seeds; minus MHA (paired): the '
            'run\'s score minus that of the MHA run of the same seed (which shares its '
            'pretrained checkpoint) at alpha 0' + (' or, in the next column, uptrained with '
            'the same alpha (compute-matched)' if matched else '') + ', mean over seeds '
            f'[its {CONFIDENCE:.0%} confidence interval: Student t, n - 1 degrees of freedom]'
            ', * where the interval excludes 0 (a resolved difference); time per sample: `gqa-jax bench decode` over the grid\'s G values, in '
            'the same run; other metrics: the task\'s other metrics, mean over seeds.'
            + (' gap: the pretraining objective (Grid.gap_gins, lower is better) of the '
               'checkpoint that finetuning started from, after conversion and uptraining '
               'and before finetuning, mean over seeds; gap minus MHA (paired): minus that of '
               'the source MHA model of the same seed: the conversion gap. Its interval also '
               'covers the evaluation sample: the half-widths over seeds and over the '
               'examples of the gap eval (seed-averaged per-example differences) added in '
               'quadrature, so a conversion that is the same for every seed (mean, first at '
               'alpha 0) still gets one.' if gaps else '')
            + (' gap at conversion: the same for the converted checkpoint before uptraining.'
               if uptrained else '')]
  lines += floor_lines(cells)
  warning = degenerate_warning(cells)
  if warning:
    lines += ['', f'**{warning}**']
  return '\n'.join(lines)


def _label(variant: str, alpha: float, method: str) -> str:
  return f"{variant} {method} alpha {alpha:g}" if method != 'none' else f'{variant} alpha {alpha:g}'


def contrasts(rows: Sequence[dict]) -> List[dict]:
  """Paired comparisons behind the paper's findings, between cells of one task (same seed
  on both sides, 95% t interval over seeds), each "a minus b":

  - conversion methods at one G and alpha: mean - first, first - random, mean - random,
    and each method of Grid.method_options minus mean (e.g. WGQA - mean pooling);
  - neighbouring G at one alpha and method: e.g. GQA-4 - GQA-2, GQA-2 - MQA;
  - more uptraining at one G and method: alpha 0.05 - alpha 0, alpha 0.1 - alpha 0.05.

  For the task score (`score_*`) and, where the grid scores it, the conversion gap
  (`gap_*`, where finetuning started)."""
  cells = defaultdict(dict)
  for r in rows:
    cells[(r['task'], r['kv_heads'], r['alpha'], r['method'])][r['seed']] = r
  pairs = []
  order = {'mean': 0, 'first': 1, 'random': 2}
  keys = sorted(cells, key=lambda c: (c[0], -c[1], c[2], order.get(c[3], -1)))
  for task, k, alpha in dict.fromkeys((t, k, a) for t, k, a, _ in keys):
    others = [m for t, kk, a, m in keys if (t, kk, a) == (task, k, alpha)
              and m not in order and m != 'none']   # Grid.method_options, e.g. WGQA
    pairs += [('method', (task, k, alpha, a), (task, k, alpha, b))
              for a, b in (('mean', 'first'), ('mean', 'random'), ('first', 'random'),
                           *((m, 'mean') for m in others))
              if (task, k, alpha, a) in cells and (task, k, alpha, b) in cells]
  for task, alpha, method in sorted({(t, a, m) for t, _, a, m in keys if m != 'none'}):
    ks = sorted((k for t, k, a, m in keys if (t, a, m) == (task, alpha, method)), reverse=True)
    pairs += [('G', (task, a, alpha, method), (task, b, alpha, method))
              for a, b in zip(ks, ks[1:])]
  for task, k, method in sorted({(t, k, m) for t, k, _, m in keys if m != 'none'},
                                key=lambda c: (c[0], -c[1], order.get(c[2], -1), c[2])):
    alphas = sorted(a for t, kk, a, m in keys if (t, kk, m) == (task, k, method))
    pairs += [('alpha', (task, k, b, method), (task, k, a, method))
              for a, b in zip(alphas, alphas[1:])]
  out = []
  for kind, a, b in pairs:
    seeds = sorted(set(cells[a]) & set(cells[b]))
    if not seeds:
      continue
    ra, rb = cells[a][seeds[0]], cells[b][seeds[0]]
    entry = {'task': a[0], 'kind': kind, 'metric': ra['metric'],
             'a': _label(ra['variant'], a[2], a[3]), 'b': _label(rb['variant'], b[2], b[3]),
             **_paired_fields('score', [cells[a][s]['score'] - cells[b][s]['score']
                                        for s in seeds])}
    entry.update(_gap_fields('gap', [
        (cells[a][s], 'gap', cells[b][s], 'gap') for s in seeds
        if cells[a][s].get('gap') is not None and cells[b][s].get('gap') is not None]))
    out.append(entry)
  return out


def format_contrasts(entries: Sequence[dict]) -> str:
  """The `contrasts` as a markdown table, or '' when there are none."""
  if not entries:
    return ''
  gaps = any(e['gap_mean'] is not None for e in entries)
  lines = ['## Paired contrasts', '',
           '| task | compares | a | b | score: a minus b |' + (' gap: a minus b |' if gaps else '')
           + ' seeds |', '|---|---|---|---|---:|' + ('---:|' if gaps else '') + '---:|']
  for e in entries:
    lines.append(f"| {e['task']} | {e['kind']} | {e['a']} | {e['b']} | "
                 f"{_interval(e, 'score')} |" + (f" {_interval(e, 'gap')} |" if gaps else '')
                 + f" {e['score_n']} |")
  lines += ['', 'Each row: the mean over seeds of (a\'s run minus b\'s run of the same seed) '
            f'[{CONFIDENCE:.0%} Student-t interval], * where it excludes 0. The score is the '
            'task metric of the table above (for nll, lower is better, so a negative '
            'difference favours a)' + ('; the gap is the pretraining objective\'s nll where '
            'finetuning started (lower is better), its interval over seeds and evaluation '
            'examples as above.' if gaps else '.')]
  return '\n'.join(lines)


def results_markdown(rows: Sequence[dict], grid: grid_lib.Grid, planned: int) -> str:
  """results.md: the per-cell table (`format_cells`), then the paired contrasts."""
  text = format_cells(summarize(rows), grid, planned, len(rows)) + '\n'
  table = format_contrasts(contrasts(rows))
  return text + (f'\n{table}\n' if table else '')


def floor_lines(cells: Sequence[dict]) -> List[str]:
  """One line per task with a best-constant floor (see `constant_floor`), and one naming
  the cells whose mean score does not beat it."""
  floors = {c['task']: c for c in cells if c.get('floor') is not None}
  if not floors:
    return []
  lines = ['', *[f"Floor: one constant output for every example scores {c['metric']} "
                 f"{c['floor']:.2f} on {task} (the best of its references, "
                 f"{c['floor_output']!r}); a score is evidence of input-dependent output "
                 'only above it.' for task, c in sorted(floors.items())]]
  below = [f"{c['variant']} alpha {c['alpha']:g} {c['method']} ({c['mean']:.2f})"
           for c in cells if c.get('floor') is not None and c['mean'] <= c['floor']]
  if below:
    lines.append('At or below the floor: ' + ', '.join(below) + '.')
  return lines


def table1(cells: Sequence[dict], alpha: Optional[float] = None) -> str:
  """The paper's Table 1 shape: variant, time per sample, score (one alpha, mean method)."""
  if alpha is None and cells:
    alpha = max(c['alpha'] for c in cells)
  chosen = [c for c in cells if c['method'] in ('mean', 'none')
            and (c['alpha'] == alpha or c['variant'] == 'MHA')]
  best = {}
  for c in chosen:  # MHA: the alpha-matching cell if there is one, else the first
    key = (c['task'], c['variant'])
    if key not in best or c['alpha'] == alpha:
      best[key] = c
  metric = cells[0]['metric'] if cells else 'score'
  gaps = any('gap_mean' in c for c in best.values())
  lines = [f'| variant | task | time per sample (ms) | speedup over MHA | {metric} | n | '
           + ('pretraining nll (minus MHA): converted -> uptrained | ' if gaps else '')
           + 'other metrics |',
           '|---|---|---:|---:|---:|---:|' + ('---:|' if gaps else '') + '---|']
  mha = {c['task']: c['time_per_sample_s'] for c in best.values() if c['variant'] == 'MHA'}
  for c in best.values():
    t, ref = c['time_per_sample_s'], mha.get(c['task'])
    speed = f'{ref / t:.2f}x' if t and ref else ''
    score = f"{c['mean']:.2f}" + (f" +- {c['std']:.2f}" if c['n'] > 1 else '')
    gap = ''
    if gaps and 'gap_mean' in c:
      gap = f"{c['gap_mean']:.3f}" + ('' if c['variant'] == 'MHA' or c['gap_delta_mean'] is None
                                      else f" ({c['gap_delta_mean']:+.3f})")
      if c['alpha'] and c.get('gap_converted_delta_mean') is not None:
        gap = (f"{c['gap_converted_mean']:.3f} ({c['gap_converted_delta_mean']:+.3f}) -> "
               + gap)
    lines.append(f"| {c['variant']} | {c['task']} | {'' if t is None else f'{t * 1e3:.2f}'} | "
                 f"{speed} | {score} | {c['n']} | " + (f'{gap} | ' if gaps else '')
                 + f"{_others(c)} |")
  floors = {c['task']: c['floor'] for c in best.values() if c.get('floor') is not None}
  for task, floor in sorted(floors.items()):
    lines.append(f"| best constant output | {task} | | | {floor:.2f} | | "
                 + ('| ' if gaps else '') + 'the floor: no model input used |')
  return '\n'.join(lines)
