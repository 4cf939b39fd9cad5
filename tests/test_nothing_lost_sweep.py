"""Nothing lost in sweeps: a stopped sweep or quickstart exits 128 + the signal after its
running stage saved; the processes of `sweep --jobs N` die with the sweep and a rerun
never runs beside them (nor truncates their logs); a grid's bad values are refused before
any stage runs, as the user wrote them; a second `bench decode --output` into the same
folder is refused."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import assert_user_error
from gqa_jax import cli, locks
from gqa_jax.errors import ConfigError
from gqa_jax.experiments import grid as grid_lib
from gqa_jax.experiments import sweep

TASK = 'gqa_builtin_docstring'
QUICKSTART = 'experiments/grids/quickstart.gin'


def _grid(**overrides):
  fields = dict(
      name='t', model_gin='experiments/quickstart/model.gin', kv_heads=[8, 2, 1],
      alphas=[0.0, 0.1], methods=['mean'], seeds=[0], tasks=[TASK],
      pretrain_gins=['runs/pretrain.gin'], pretrain_steps=100,
      uptrain_gins=['runs/uptrain.gin'], finetune_gins={TASK: ['runs/finetune.gin']},
      finetune_steps={TASK: 30}, eval_gins={TASK: ['runs/eval.gin']},
      metric={TASK: 'rougeL'})
  fields.update(overrides)
  return grid_lib.Grid(**fields)


# == A grid's values are checked before any stage runs ==============================

@pytest.mark.parametrize('field,value,shown', [
    ('finetune_steps', {TASK: -5}, f"Grid.finetune_steps = {{'{TASK}': -5}}"),
    ('finetune_steps', -5, 'Grid.finetune_steps = -5'),
    ('finetune_steps', 0, 'Grid.finetune_steps = 0'),
    ('finetune_steps', {TASK: '250'}, f"Grid.finetune_steps = {{'{TASK}': '250'}}"),
    ('finetune_steps', 2.5, 'Grid.finetune_steps = 2.5'),
    ('finetune_steps', {'other_task': 30}, "Grid.finetune_steps = {'other_task': 30}"),
    ('alphas', [0.05, -0.1], 'Grid.alphas = [0.05, -0.1]'),
    ('alphas', [1.5], 'Grid.alphas = [1.5]'),
    ('alphas', '0.05', "Grid.alphas = '0.05'"),
    ('alphas', [True], 'Grid.alphas = [True]'),
    ('alphas', [], 'Grid.alphas = []'),
    ('kv_heads', [8, 0], 'Grid.kv_heads = [8, 0]'),
    ('kv_heads', [8, 2.0], 'Grid.kv_heads = [8, 2.0]'),
    ('kv_heads', [8, 8], 'Grid.kv_heads = [8, 8]'),
    ('seeds', [0, -1], 'Grid.seeds = [0, -1]'),
    ('seeds', 0, 'Grid.seeds = 0'),
    ('pretrain_steps', -100, 'Grid.pretrain_steps = -100'),
    ('pretrain_steps', 0, 'Grid.pretrain_steps = 0'),
    ('pretrain_steps', '100', "Grid.pretrain_steps = '100'"),
    ('bench_kv_heads', [0, 8], 'Grid.bench_kv_heads = [0, 8]'),
    ('method_kv_heads', ['1'], "Grid.method_kv_heads = ['1']"),
    ('uptrain_mha', 'yes', "Grid.uptrain_mha = 'yes'"),
    ('finetune_bindings', 'BATCH_SIZE=2', "Grid.finetune_bindings = 'BATCH_SIZE=2'"),
    ('bench_args', ['--batch-size', 50], "Grid.bench_args = ['--batch-size', 50]"),
    ('method_options', {'wgqa-col': {'convert': ['--method', 'wgqa'], 'kv_heads': [-2]}},
     'Grid.method_options = '),
])
def test_a_bad_grid_value_is_named_as_written(field, value, shown):
  """Each field's type and range is checked when the grid is made: one line naming the
  field and the value as the grid wrote it (not the stage command it would become)."""
  with pytest.raises(ConfigError) as e:
    _grid(**{field: value})
  message = str(e.value)
  assert '\n' not in message and message.startswith('grid t: '), message
  assert shown in message, message
  assert 'TRAIN_STEPS' not in message and '--gin.ALPHA' not in message, message


@pytest.mark.parametrize('field', ['kv_heads', 'bench_kv_heads', 'method_kv_heads'])
def test_g_values_that_do_not_divide_the_heads_are_refused_when_planned(field, tmp_path):
  grid = _grid(**{field: [8, 3] if field == 'kv_heads' else [3]})
  with pytest.raises(ConfigError, match=rf'Grid.{field} = \[.*3\] holds 3, which does not '
                                        r'divide num_heads 8 .*use G values among'):
    grid_lib.plan(grid, str(tmp_path), num_heads=8)


class _Stages:
  """The stages of a sweep run by cli.main, recorded; train returns `train_status`."""

  def __init__(self, monkeypatch, train_status=0):
    self.calls, self.train_status = [], train_status
    monkeypatch.setattr(cli, 'main', lambda argv, _main=cli.main: (
        self(argv) if argv and argv[0] not in ('sweep', 'quickstart') else _main(argv)))

  def __call__(self, argv):
    self.calls.append(list(argv))
    if argv[0] == 'eval':  # the summary a real eval writes (the gap's nll, the task's score)
      out = Path(json.loads(next(a for a in argv if 'EVAL_OUTPUT_DIR' in a).split('=', 1)[1]))
      out.mkdir(parents=True, exist_ok=True)
      (out / 'summary_130.json').write_text(json.dumps(
          {'step': 130, 'metrics': {TASK: {'rougeL': 1.0, 'nll': 2.0}}}))
    return self.train_status if argv[0] == 'train' else 0


def test_a_negative_finetune_steps_fails_before_any_stage(tmp_path, monkeypatch, gqa):
  """Today's findings: such a grid ran its first stages (their outputs and markers) and
  failed only at the finetune stage, with train's message about a TRAIN_STEPS the user
  never wrote."""
  stages = _Stages(monkeypatch)
  r = gqa('sweep', QUICKSTART, '--output', tmp_path / 'out', '--gin.Grid.bench_args=None',
          f"--gin.Grid.finetune_steps={{'{TASK}': -5}}")
  assert_user_error(r, f"Grid.finetune_steps = {{'{TASK}': -5}}", 'positive integer')
  assert stages.calls == [] and not (tmp_path / 'out' / '.done').exists()


# == A stopped sweep exits 128 + the signal ==========================================

@pytest.mark.parametrize('command,sig', [('sweep', signal.SIGTERM),
                                         ('quickstart', signal.SIGINT)])
def test_a_sweep_stopped_in_a_train_stage_exits_128_plus_the_signal(command, sig, tmp_path,
                                                                    monkeypatch, gqa):
  """`gqa-jax train` saves and exits 128 + the signal; so does the sweep or quickstart
  that ran it (not 2, which a scheduler that requeues on 143 reads as a failed job)."""
  stages = _Stages(monkeypatch, train_status=128 + sig)
  argv = ['sweep', QUICKSTART] if command == 'sweep' else ['quickstart']
  r = gqa(*argv, '--output', tmp_path / 'out', '--gin.Grid.bench_args=None')
  assert r.status == 128 + sig, (r.status, r.err[-2000:])
  lines = [l for l in r.err.splitlines() if l.startswith('gqa-jax: ')]
  assert len(lines) == 1 and 'error' not in lines[0], r.err[-2000:]
  assert f'stopped by {sig.name}' in lines[0] and 'rerun the same command' in lines[0]
  assert [c[0] for c in stages.calls] == ['eval', 'train']  # the gap eval, then finetuning
  done = sorted(p.name for p in (tmp_path / 'out' / '.done').glob('*.json'))
  assert done == ['gap-s0-MHA-none-a0.json']  # the stopped finetuning is not marked done


def test_a_signal_during_a_stage_run_here_stops_the_sweep_and_a_rerun_redoes_it(tmp_path):
  """A stage without a handler of its own (convert, eval, bench) run in the sweep's
  process: SIGTERM stops it at once, unmarked, and the sweep raises StageStopped (exit
  143); the handlers are restored; a rerun starts with that stage."""
  grid = _grid(kv_heads=[8, 1], alphas=[0.0])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  calls, stopped = [], []

  def runner(argv):
    calls.append(argv[0])
    if argv[0] == 'convert' and not stopped:
      stopped.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(30)  # the sweep's handler interrupts this
      return 0
    if argv[0] == 'eval':
      out = Path(json.loads(next(a for a in argv if 'EVAL_OUTPUT_DIR' in a).split('=', 1)[1]))
      out.mkdir(parents=True, exist_ok=True)
      (out / 'summary_130.json').write_text(json.dumps(
          {'step': 130, 'metrics': {TASK: {'rougeL': 1.0}}}))
    return 0

  def unhandled(signum, frame):
    raise RuntimeError('SIGTERM reached the test: the sweep did not handle it')
  previous = signal.signal(signal.SIGTERM, unhandled)
  try:
    start = time.time()
    with pytest.raises(grid_lib.StageStopped,
                       match='stopped by SIGTERM during convert stage convert-s0-MQA-mean.*'
                             'rerun the same command') as e:
      sweep.run_all(grid, runs, str(tmp_path), runner, log=lambda m: None)
    assert e.value.signum == signal.SIGTERM and time.time() - start < 20
    assert signal.getsignal(signal.SIGTERM) is unhandled  # restored
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert calls == ['train', 'train', 'eval', 'convert']  # pretrain, MHA's finetune, eval
  assert not (tmp_path / '.done' / 'convert-s0-MQA-mean.json').exists()
  calls.clear()
  counts = sweep.run_all(grid, runs, str(tmp_path), runner, log=lambda m: None)
  assert calls == ['convert', 'train', 'eval'] and counts['ran'] == 3


def _saving_child(tmp_path):
  """A stand-in for a run's `gqa-jax sweep --only RUN`: says it started, then on SIGTERM
  says it saved and exits 143, as train does."""
  script = tmp_path / 'child.py'
  script.write_text(
      'import signal, sys, time\n'
      'def stop(s, f):\n'
      '  print("saved", flush=True); sys.exit(128 + s)\n'
      'signal.signal(signal.SIGTERM, stop)\n'
      'print("started", flush=True)\n'
      'time.sleep(120)\n')
  return script


def test_jobs_stopped_by_sigterm_forward_it_wait_for_the_saves_and_say_so(tmp_path):
  """`sweep --jobs 2`: SIGTERM is passed on to the running runs, which save and exit; the
  sweep then raises StageStopped (the command exits 143) and starts nothing new."""
  grid = _grid(seeds=[0, 1], alphas=[0.1])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  script = _saving_child(tmp_path)
  logs = [tmp_path / 'logs' / f'{r.name}.log' for r in runs[:2]]

  def stop_when_started():
    deadline = time.time() + 60
    while time.time() < deadline and not all(
        p.exists() and 'started' in p.read_text() for p in logs):
      time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=stop_when_started, daemon=True).start()
  with pytest.raises(grid_lib.StageStopped, match='stopped by SIGTERM.*rerun') as e:
    sweep.run_parallel(runs, str(tmp_path), lambda run: [sys.executable, str(script)],
                       jobs=2, log=lambda m: None)
  assert e.value.signum == signal.SIGTERM
  for path in logs:
    assert path.read_text() == 'started\nsaved\n'
  assert sorted(p.name for p in (tmp_path / 'logs').iterdir()) == sorted(p.name for p in logs)


# == The processes of `sweep --jobs N` die with it ===================================

TINY_GRID = f"""
from __gin__ import dynamic_registration
from gqa_jax.experiments import grid

grid.Grid:
  name = 'tiny'
  model_gin = 'models/builtin/t5_mini.gin'
  source_checkpoint = 'builtin:t5_mini'
  kv_heads = [8]
  alphas = [0.0]
  seeds = [0]
  tasks = ['{TASK}']
  finetune_gins = {{'{TASK}': [
      'runs/pretrain.gin', 'runs/finetune.gin', 'experiments/pretrained/docstring.gin']}}
  finetune_steps = {{'{TASK}': 5000}}
  finetune_bindings = ['BATCH_SIZE=2', "TASK_FEATURE_LENGTHS={{'inputs': 32, 'targets': 16}}",
                       'LOG_PERIOD=1', 'CHECKPOINT_PERIOD=100000']
  eval_gins = {{'{TASK}': ['runs/eval.gin', 'experiments/pretrained/docstring_eval.gin']}}
  eval_bindings = ['EVAL_NUM_EXAMPLES=4', 'EVAL_BATCH_SIZE=4',
                   "TASK_FEATURE_LENGTHS={{'inputs': 32, 'targets': 16}}"]
  metric = {{'{TASK}': 'rougeL'}}
"""


def _run_processes(output: Path):
  """Ids of the live `gqa-jax sweep ... --only RUN` processes writing into `output`."""
  pids = []
  for entry in Path('/proc').iterdir():
    if entry.name.isdigit() and _alive(int(entry.name)):
      try:
        argv = (entry / 'cmdline').read_bytes().decode(errors='replace').split('\0')
      except OSError:
        continue
      if '--only' in argv and str(output) in argv:
        pids.append(int(entry.name))
  return pids


def _alive(pid: int) -> bool:
  try:
    state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
  except (OSError, IndexError):
    return False
  return state not in ('Z', 'X')  # a zombie has stopped; its reaper may be slow


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_a_killed_sweeps_runs_die_with_it_and_the_rerun_resumes_with_whole_logs(tmp_path):
  """SIGKILL of `gqa-jax sweep --jobs 2` (the OOM killer, a scheduler): its run processes
  get SIGTERM from the kernel, save their training and stop, within seconds (today they
  trained on for minutes). The rerun
  resumes from what they saved, appends to their logs below a line that says so (no
  hole of NUL bytes where an orphan kept writing into a truncated log) and completes."""
  (tmp_path / 'tiny.gin').write_text(TINY_GRID)
  out = tmp_path / 'out'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  command = [sys.executable, '-m', 'gqa_jax.cli', 'sweep', 'tiny.gin', '--output', str(out),
             '--jobs', '2']
  names = [f'MHA_none_a0_s0_{TASK}']  # one run: each process takes seconds to start here
  logs = [out / 'logs' / f'{name}.log' for name in names]
  parent = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
  children = []
  try:
    deadline = time.time() + 400
    while not all(p.exists() and re.search(r'step 50\d\d/', p.read_text()) for p in logs):
      assert parent.poll() is None, parent.communicate()[1][-3000:]
      assert time.time() < deadline, [p.read_text()[-2000:] for p in logs if p.exists()]
      time.sleep(0.5)
    children = _run_processes(out)
    assert len(children) == len(names), children
    parent.kill()
    parent.communicate()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in children) and time.time() < deadline:
      time.sleep(0.2)
    assert not any(_alive(pid) for pid in children), 'the runs went on without the sweep'
  finally:
    for pid in [parent.pid, *children]:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  saved = [int(m.group(1)) for name in names
           for p in (out / 'runs' / name / 'finetune').iterdir()
           for m in [re.fullmatch(r'checkpoint_(\d+)', p.name)] if m]
  assert len(saved) == len(names), saved  # each run saved where the SIGTERM stopped it
  # The rerun finishes a few steps past the saved ones (what was left of 5000 steps would
  # take minutes here; the finetuning stages are not done, so their steps may change).
  source = grid_lib.source_step('builtin:t5_mini')
  steps = max(saved) + 3 - source
  rerun = subprocess.run([*command, f"--gin.Grid.finetune_steps={{'{TASK}': {steps}}}"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=500)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  for name, path in zip(names, logs):
    data = path.read_bytes()
    assert b'\0' not in data
    text = data.decode()
    assert text.count('---- rerun') == 1, text[-3000:]
    assert 'resuming from' in text.split('---- rerun')[1], text[-3000:]
    assert (out / 'runs' / name / 'result.json').exists()
  assert len((out / 'results.csv').read_text().splitlines()) == 1 + len(names)


def test_a_run_never_executes_beside_a_live_process_of_an_earlier_sweep(tmp_path,
                                                                        monkeypatch, capsys):
  """A run's process (`sweep --only RUN`, what --jobs starts) holds OUTPUT/runs/RUN/.lock:
  a rerun's process for the same run waits, saying for whom, until that one has stopped,
  and runs no stage beside it."""
  stages = _Stages(monkeypatch)
  name = f'MHA_none_a0_s0_{TASK}'
  out = tmp_path / 'out'
  (out / 'runs' / name).mkdir(parents=True)
  result = []
  with locks.hold(out / 'runs' / name / '.lock', f'run {name}', 'test'):
    thread = threading.Thread(target=lambda: result.append(cli.main(
        ['sweep', QUICKSTART, '--output', str(out), '--only', name,
         '--gin.Grid.bench_args=None'])), daemon=True)
    thread.start()
    said, deadline = '', time.time() + 120
    while f'run {name} is in use by process {os.getpid()}' not in said:
      assert thread.is_alive() and time.time() < deadline, said[-2000:]
      time.sleep(0.2)
      said += capsys.readouterr().err
    time.sleep(1)
    assert stages.calls == []  # waiting, not running beside it
  thread.join(120)
  assert result == [0] and [c[0] for c in stages.calls] == ['eval', 'train', 'eval']


# == bench decode --output is locked ================================================

def test_a_second_bench_decode_into_the_same_output_is_refused(tmp_path, gqa):
  out = tmp_path / 'bench'
  out.mkdir()
  with locks.hold(out / '.lock', 'test', 'test'):
    r = gqa('bench', 'decode', '--size', 'tiny', '--gin.network.T5Config.vocab_size=128',
            '--input-length', '4', '--output-length', '2', '--batch-size', '1',
            '--num-kv-heads', '1', '--repeats', '1', '--step-repeats', '1', '--rounds', '0',
            '--matmul-size', '8', '--no-hf', '--output', out)
  assert_user_error(r, f'--output {out} is in use by process {os.getpid()}',
                    'choose another --output')
  assert sorted(p.name for p in out.iterdir()) == []  # nothing written
