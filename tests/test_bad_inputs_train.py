"""Every bad `gqa-jax train` input of issue 13 is one line and exit status 2 with nothing
written; faults (a leftover run.json, a second run, damaged checkpoints, Ctrl-C) leave
the data intact and the run resumable.

The CLI runs in-process as typed, from a temporary working directory with relative
paths. Settings are checked before anything is compiled, so the table costs
milliseconds a case; the fault tests share one tiny trained MODEL_DIR (copied per test).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import numpy as np
import pytest

from conftest import assert_nothing_loads, assert_user_error
from gqa_jax import checkpoints, cli, convert
from gqa_jax import train as train_lib

TINY = ['--gin_file=experiments/tiny_pretrain.gin',
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", '--gin.BATCH_SIZE=2']
UPTRAIN = ['--gin_file=attention/gqa.gin', '--gin_file=runs/uptrain.gin',
           '--gin.NUM_KV_HEADS=2']
DOCSTRING = '--gin.MIXTURE_OR_TASK_NAME="gqa_builtin_docstring"'


def train(*extra, model_dir='run', steps=None):
  return ['train', *TINY, f'--gin.MODEL_DIR="{model_dir}"',
          *([f'--gin.TRAIN_STEPS={steps}'] if steps is not None else []), *extra]


def metrics(model_dir):
  return [json.loads(line) for line in (Path(model_dir) / 'metrics.jsonl').open()]


def _last_logged_step(model_dir) -> int:
  """The last step in metrics.jsonl that a running process has written whole (0 if none)."""
  path = Path(model_dir) / 'metrics.jsonl'
  lines = path.read_text().splitlines(keepends=True) if path.exists() else []
  return max((json.loads(l)['step'] for l in lines if l.endswith('\n')), default=0)


def step_dirs(model_dir):
  return sorted(p.name for p in Path(model_dir).glob('checkpoint_*') if p.name[11:].isdigit())


def snapshot(folder):
  """Every file under `folder` with its size and modification time."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in Path(folder).rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 3-step MHA run (checkpoint_1..3) typed as --gin.MODEL_DIR="~/trained" from another
  folder (issue 13 item 12: `~` is the user's home, not a folder named `~`), and its
  GQA-2 conversion (step 3)."""
  home, cwd = tmp_path_factory.mktemp('home'), tmp_path_factory.mktemp('cwd')
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('HOME', str(home))
    mp.chdir(cwd)
    status = cli.main(train('--gin.CHECKPOINT_PERIOD=1', model_dir='~/trained', steps=3))
    gin.clear_config()
  assert status == 0
  assert not (cwd / '~').exists() and step_dirs(home / 'trained') == [
      'checkpoint_1', 'checkpoint_2', 'checkpoint_3']
  convert.convert(home / 'trained', home / 'gqa2', 2, progress=False)
  return {'mha': home / 'trained', 'gqa2': home / 'gqa2'}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  return tmp_path


def _garbage_metadata(path):
  (next(path.glob('checkpoint_*')) / 'gqa_jax.json').write_text('{"config": {"num_he')


# id -> (extra CLI arguments, setup(workdir, trained), fragments the one line must hold).
# '{mha}' and '{gqa2}' in an argument name the shared checkpoints.
BAD = {
    'train_steps_zero': (['--gin.TRAIN_STEPS=0'], None, ['TRAIN_STEPS=0', 'positive integer']),
    'train_steps_negative': (['--gin.TRAIN_STEPS=-5'], None, ['TRAIN_STEPS=-5', 'positive']),
    'batch_size_zero': (['--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=0'], None,
                        ['BATCH_SIZE=0', 'positive integer']),
    'batch_size_negative': (['--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=-4'], None,
                            ['BATCH_SIZE=-4', 'positive integer']),
    'checkpoint_period_zero': (['--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_PERIOD=0'], None,
                               ['CHECKPOINT_PERIOD=0', 'positive integer']),
    'log_period_zero': (['--gin.TRAIN_STEPS=2', '--gin.LOG_PERIOD=0'], None,
                        ['LOG_PERIOD=0', 'positive integer']),
    'keep_checkpoints_zero': (['--gin.TRAIN_STEPS=2', '--gin.KEEP_CHECKPOINTS=0'], None,
                              ['KEEP_CHECKPOINTS=0', 'None keeps every checkpoint']),
    'eval_period_zero': (['--gin.TRAIN_STEPS=2', '--gin.EVAL_PERIOD=0'], None,
                         ['EVAL_PERIOD=0', 'None turns periodic eval off']),
    'eval_num_examples_negative': (['--gin.TRAIN_STEPS=2', '--gin.EVAL_NUM_EXAMPLES=-1'], None,
                                   ['EVAL_NUM_EXAMPLES=-1', 'positive integer']),
    'eval_batch_size_zero': (['--gin.TRAIN_STEPS=2', DOCSTRING, '--gin.EVAL_PERIOD=1',
                              '--gin.EVAL_BATCH_SIZE=0'], None, ['EVAL_BATCH_SIZE=0']),
    'best_mode_unknown': (['--gin.TRAIN_STEPS=2', '--gin.BEST_MODE="best"'], None,
                          ['BEST_MODE=', "'max' or 'min'"]),
    'best_metric_without_task': (['--gin.TRAIN_STEPS=2', DOCSTRING, '--gin.EVAL_PERIOD=1',
                                  '--gin.BEST_METRIC="rougeL"'], None,
                                 ['BEST_METRIC=', 'task/metric', 'gqa_builtin_docstring']),
    'best_metric_unknown': (['--gin.TRAIN_STEPS=2', DOCSTRING, '--gin.EVAL_PERIOD=1',
                             '--gin.BEST_METRIC="gqa_builtin_docstring/rogueL"'], None,
                            ['BEST_METRIC=', "no 'rogueL'", 'rougeL']),
    'best_metric_without_eval': (['--gin.TRAIN_STEPS=2', DOCSTRING,
                                  '--gin.BEST_METRIC="gqa_builtin_docstring/rougeL"'], None,
                                 ['BEST_METRIC=', 'EVAL_PERIOD']),
    'mesh_model_3_on_one_device': (['--gin.TRAIN_STEPS=2', '--gin.MESH_MODEL=3'], None,
                                   ['MESH_MODEL=3', 'devices', 'use one of']),
    'mesh_data_too_big': (['--gin.TRAIN_STEPS=2', '--gin.MESH_DATA=4'], None,
                          ['MESH_DATA=4', 'MESH_DATA=-1']),
    'random_seed_negative': (['--gin.TRAIN_STEPS=2', '--gin.RANDOM_SEED=-1'], None,
                             ['RANDOM_SEED=-1']),
    'random_seed_string': (['--gin.TRAIN_STEPS=2', '--gin.RANDOM_SEED="x"'], None,
                           ['RANDOM_SEED=', 'integer']),
    'feature_length_zero': (['--gin.TRAIN_STEPS=2',
                             "--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 8}"], None,
                            ['TASK_FEATURE_LENGTHS=', 'positive integers']),
    'unknown_task': (['--gin.TRAIN_STEPS=2', '--gin.MIXTURE_OR_TASK_NAME="gqa_no_such_task"'],
                     None, ['gqa_no_such_task', 'registered']),
    'model_dir_is_a_file': (['--gin.TRAIN_STEPS=2'], lambda d, t: (d / 'run').write_text('x'),
                            ['MODEL_DIR', 'is a file', 'choose another']),
    'model_dir_under_a_file': (['--gin.TRAIN_STEPS=2', '--gin.MODEL_DIR="notes/run"'],
                               lambda d, t: (d / 'notes').write_text('x'),
                               ['MODEL_DIR', 'under', 'a file']),
    'model_dir_is_a_step_folder': (['--gin.TRAIN_STEPS=5', '--gin.MODEL_DIR="{mha}/checkpoint_3"'],
                                   None, ['checkpoint step folder', 'INITIAL_CHECKPOINT_PATH']),
    'initial_checkpoint_missing': (['--gin.TRAIN_STEPS=2',
                                    '--gin.INITIAL_CHECKPOINT_PATH="no_such_ckpt"'], None,
                                   ['no_such_ckpt', 'does not exist']),
    'initial_checkpoint_garbage_metadata': (
        ['--gin.TRAIN_STEPS=9', '--gin.INITIAL_CHECKPOINT_PATH="bad"'] + UPTRAIN[:1]
        + UPTRAIN[2:],
        lambda d, t: _garbage_metadata(Path(shutil.copytree(t['gqa2'], d / 'bad'))),
        ['gqa_jax.json']),
    'finetune_steps_not_beyond_start': (['--gin.TRAIN_STEPS=2',
                                         '--gin.INITIAL_CHECKPOINT_PATH="{mha}"'], None,
                                        ['TRAIN_STEPS=2', 'not beyond step 3', 'absolute',
                                         '--gin.TRAIN_STEPS=5']),
    'gqa_checkpoint_into_mha_run': (['--gin.TRAIN_STEPS=5',
                                     '--gin.INITIAL_CHECKPOINT_PATH="{gqa2}"'], None,
                                    ['KV heads', 'not possible', 'converted from']),
    'mha_checkpoint_into_gqa_run': (['--gin.TRAIN_STEPS=5', '--gin.INITIAL_CHECKPOINT_PATH="{mha}"',
                                     '--gin_file=attention/gqa.gin', '--gin.NUM_KV_HEADS=2'],
                                    None, ['gqa-jax convert', '--num-kv-heads 2']),
    'alpha_negative': (UPTRAIN + ['--gin.ALPHA=-0.1', '--gin.INITIAL_CHECKPOINT_PATH="{gqa2}"'],
                       None, ['ALPHA=-0.1', '[0, 1]']),
    'alpha_above_one': (UPTRAIN + ['--gin.ALPHA=1.5', '--gin.INITIAL_CHECKPOINT_PATH="{gqa2}"'],
                        None, ['ALPHA=1.5', '[0, 1]']),
    'alpha_zero': (UPTRAIN + ['--gin.ALPHA=0.0', '--gin.INITIAL_CHECKPOINT_PATH="{gqa2}"'],
                   None, ['ALPHA=0', 'no uptraining', 'finetune']),
    'alpha_rounds_to_zero_steps': (UPTRAIN + ['--gin.ALPHA=0.1',
                                              '--gin.INITIAL_CHECKPOINT_PATH="{gqa2}"'],
                                   None, ['ALPHA=0.1 x 3 source steps', '0 uptraining steps']),
    'uptrain_source_steps_zero': (UPTRAIN + ['--gin.ALPHA=0.5', '--gin.UPTRAIN_SOURCE_STEPS=0',
                                             '--gin.INITIAL_CHECKPOINT_PATH="{gqa2}"'],
                                  None, ['UPTRAIN_SOURCE_STEPS=0', 'positive integer']),
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, gqa, workdir, trained):
  args, setup, fragments = BAD[case]
  if setup:
    setup(workdir, trained)
  args = [a.replace('{mha}', str(trained['mha'])).replace('{gqa2}', str(trained['gqa2']))
          for a in args]
  before = snapshot(workdir)
  r = gqa(*train(model_dir='run'), *args)
  assert_user_error(r, *fragments)
  assert snapshot(workdir) == before  # no MODEL_DIR, no run.json, no metrics, no lock
  assert_nothing_loads(workdir / 'run')


# Bad inputs into a MODEL_DIR that holds a run: refused, and the run's files untouched.
EXISTING = {
    'another_model': (['--gin.TRAIN_STEPS=5', '--gin_file=attention/gqa.gin',
                       '--gin.NUM_KV_HEADS=2'],
                      ['MODEL_DIR', 'another model', "'decoder_self': 4", "'decoder_self': 2",
                       'choose another MODEL_DIR']),
    'train_steps_below_its_step': (['--gin.TRAIN_STEPS=2'],
                                   ['already at step 3', 'TRAIN_STEPS is absolute']),
    'another_initial_checkpoint': (['--gin.TRAIN_STEPS=5', '--gin.INITIAL_CHECKPOINT_PATH="{mha}"'],
                                   ['started from a fresh initialisation', 'run.json',
                                    'Choose another MODEL_DIR']),
}


@pytest.mark.parametrize('case', list(EXISTING))
def test_bad_input_into_a_run_leaves_it_intact(case, gqa, workdir, trained):
  args, fragments = EXISTING[case]
  shutil.copytree(trained['mha'], 'run')
  before = snapshot(workdir / 'run')
  r = gqa(*train(model_dir='run'), *[a.replace('{mha}', str(trained['mha'])) for a in args])
  assert_user_error(r, *fragments)
  assert snapshot(workdir / 'run') == before


def test_second_run_on_a_locked_model_dir_is_refused_naming_the_holder(gqa, workdir, trained):
  """Issue 13 item 2: two runs on one MODEL_DIR. The first holds MODEL_DIR/.lock for
  its whole run (here a process that takes the same lock and waits)."""
  shutil.copytree(trained['mha'], 'run')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from gqa_jax import locks\n'
       'with locks.hold(sys.argv[1], "x", "y"):\n  print("held", flush=True); time.sleep(300)',
       str(workdir / 'run' / train_lib.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    before = snapshot(workdir / 'run')
    r = gqa(*train(model_dir='run', steps=5))
    assert_user_error(r, f'MODEL_DIR {workdir / "run"} is in use by process {holder.pid}',
                      'wait for that run to finish, or choose another MODEL_DIR')
  finally:
    holder.kill()
    holder.wait()
  assert snapshot(workdir / 'run') == before  # nothing deleted, nothing appended


def test_leftover_run_json_does_not_turn_uptraining_into_a_no_op(gqa, workdir, trained):
  """Issue 13 item 1, as the user ran it: a run into MODEL_DIR fails (unknown task),
  another is killed before its first checkpoint (its run.json left behind, as older
  versions wrote it), then an uptraining run into the same MODEL_DIR must uptrain."""
  r = gqa(*train(model_dir='up', steps=2), '--gin.MIXTURE_OR_TASK_NAME="gqa_no_such_task"')
  assert_user_error(r, 'gqa_no_such_task')
  assert not Path('up').exists()
  Path('up').mkdir()
  Path('up/run.json').write_text('{"start_step": 0}\n')  # a run killed before saving
  # ALPHA 0.67 x the source's 3 steps = 2 steps, from step 3 of the converted checkpoint.
  r = gqa(*train(model_dir='up'), *UPTRAIN, '--gin.ALPHA=0.67',
          f'--gin.INITIAL_CHECKPOINT_PATH="{trained["gqa2"]}"')
  assert r.status == 0, r.err[-3000:]
  assert 'ignoring' in r.err and 'from step 3 to 5' in r.err
  assert [m['step'] for m in metrics('up')] == [4, 5]
  assert json.loads(Path('up/run.json').read_text())['start_step'] == 3
  trained_params = checkpoints.load_model('up')[1]
  converted = checkpoints.load_model(trained['gqa2'])[1]
  assert checkpoints.open_checkpoint('up').step == 5
  assert not np.allclose(trained_params['decoder']['layers_0']['self_attention']['key']['kernel'],
                         converted['decoder']['layers_0']['self_attention']['key']['kernel'])
  assert not Path('up', train_lib.LOCK_FILE).exists()  # released


def _largest_file(folder):
  return max((p for p in Path(folder).rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE = {
    'truncated_tensor_data': lambda d: os.truncate(_largest_file(d / 'state'), 100),
    'garbage_tree_metadata': lambda d: (d / 'state' / '_METADATA').write_text('{"tree_me'),
    'no_commit_marker': lambda d: (d / 'commit_success.txt').unlink(),
}


def test_unfinished_saves_of_a_killed_run_are_removed_on_resume(gqa, workdir, trained):
  """A SIGKILL inside a save leaves Orbax's temporary folder; the next run removes it and
  says so, and resumes from the last committed checkpoint."""
  shutil.copytree(trained['mha'], 'run')
  tmp = workdir / 'run' / 'checkpoint_4.orbax-checkpoint-tmp-1700000000'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'partial').write_bytes(b'x' * 1000)
  r = gqa(*train('--gin.CHECKPOINT_PERIOD=1', model_dir='run', steps=4))
  assert r.status == 0, r.err[-3000:]
  assert 'removing 1 unfinished save(s) of an interrupted run' in r.err
  assert 'checkpoint_4.orbax-checkpoint-tmp-1700000000' in r.err
  assert 'resuming from' in r.err and 'checkpoint_3' in r.err
  assert not tmp.exists() and step_dirs(workdir / 'run')[-1] == 'checkpoint_4'


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, gqa, workdir, trained):
  """Issue 13 item 4: the bad checkpoint is named and kept (moved aside), the run
  resumes from the newest one that restores and redoes the steps exactly. (One kind of
  damage trains again; for the others TRAIN_STEPS=2 ends the run where it resumed.)"""
  shutil.copytree(trained['mha'], 'run')
  DAMAGE[damage](workdir / 'run' / 'checkpoint_3')
  retrain = damage == 'truncated_tensor_data'
  r = gqa(*train('--gin.CHECKPOINT_PERIOD=1', model_dir='run', steps=3 if retrain else 2))
  assert r.status == 0, r.err[-3000:]
  assert 'checkpoint_3 in MODEL_DIR does not restore' in r.err
  assert 'resuming from' in r.err and 'checkpoint_2, the newest checkpoint that restores' in r.err
  aside = list(Path('run').glob('checkpoint_3.corrupt-*'))
  assert len(aside) == 1 and f'moved checkpoint_3 aside to {workdir / aside[0]}' in r.err
  assert sorted(p.name for p in aside[0].iterdir()) == sorted(
      p.name for p in (trained['mha'] / 'checkpoint_3').iterdir() if damage != 'no_commit_marker'
      or p.name != 'commit_success.txt')  # kept as it was
  if not retrain:
    assert step_dirs('run') == ['checkpoint_1', 'checkpoint_2']
    assert checkpoints.open_checkpoint('run').step == 2
    return
  assert checkpoints.open_checkpoint('run').step == 3
  # Step 3 again, from checkpoint_2's state and data position: the same loss as before.
  redone = metrics('run')[-1]
  first = [m for m in metrics(trained['mha']) if m['step'] == 3][0]
  assert redone['step'] == 3 and redone['loss'] == pytest.approx(first['loss'], rel=1e-6)


def test_no_checkpoint_restores_is_one_line_and_moves_nothing(gqa, workdir, trained):
  shutil.copytree(trained['mha'], 'run')
  os.truncate(_largest_file(workdir / 'run' / 'checkpoint_3' / 'state'), 100)
  (workdir / 'run' / 'checkpoint_2' / '_CHECKPOINT_METADATA').unlink()
  (workdir / 'run' / 'checkpoint_1' / 'state' / '_METADATA').write_text('')
  before = snapshot(workdir / 'run')
  r = gqa(*train(model_dir='run', steps=5))
  assert_user_error(r, 'no checkpoint in MODEL_DIR', 'checkpoint_3: ', 'checkpoint_2: ',
                    '_CHECKPOINT_METADATA missing', 'checkpoint_1: ', 'Nothing was moved')
  assert snapshot(workdir / 'run') == before


def test_ctrl_c_and_sigterm_save_exit_non_zero_and_the_rerun_resumes(workdir):
  """Issue 13 item 13: SIGINT (Ctrl-C) is handled like SIGTERM (preemption): a checkpoint
  where it stopped, a line saying so, exit status 128 + the signal (not done: a sweep
  does not mark it finished), and the next run resumes there."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  step = 0
  for sig in (signal.SIGINT, signal.SIGTERM):  # the second run resumes the first
    proc = subprocess.Popen([sys.executable, '-m', 'gqa_jax.cli',
                             *train('--gin.CHECKPOINT_PERIOD=100000', model_dir='run',
                                    steps=100000)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _last_logged_step('run') <= step:
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
      time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
    if step:
      assert f'resuming from {workdir / "run"}/checkpoint_{step}' in err
    stopped = checkpoints.open_checkpoint('run').step
    assert stopped > step and json.loads(out.strip().splitlines()[-1])['signal'] == sig.name
    assert (f'{sig.name}: stopped at step {stopped} of 100000; saved '
            f'{workdir / "run"}/checkpoint_{stopped}' in err)
    step = stopped
