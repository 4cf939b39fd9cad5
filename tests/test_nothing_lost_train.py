"""Nothing lost in training and evaluation: the best checkpoint is swapped so that every
interruption leaves the old best or the new one (and the run remembers its value); an
eval that a kill interrupted is redone on resume; a model whose embedding is smaller
than the task's vocabulary is refused before any work; EVAL_OUTPUT_DIR has one writer.

Faults are injected at each filesystem step of the best-checkpoint swap (in-process,
with a stand-in evaluation) and by SIGKILLs of a real `gqa-jax train` during its evals.
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
import jax
import pytest

from conftest import assert_user_error
from gqa_jax import cli, evaluation, network
from gqa_jax.checkpoints import training as ckpt_lib
from gqa_jax.train_utils import DatasetConfig

FIXTURE = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny'
TASK = 'gqa_builtin_docstring'
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"
# Checkpoints only where an eval needs one (steps 2 and 4, and the last step, 5); the
# best checkpoint by the references' nll, which falls as the tiny model trains.
EVAL_RUN = ['--gin_file=experiments/tiny_pretrain.gin', LENGTHS, '--gin.BATCH_SIZE=2',
            f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"', '--gin.USE_PACKING=False',
            '--gin.TRAIN_STEPS=5', '--gin.CHECKPOINT_PERIOD=1000', '--gin.EVAL_PERIOD=2',
            '--gin.EVAL_NUM_EXAMPLES=4', '--gin.EVAL_BATCH_SIZE=4',
            f'--gin.BEST_METRIC="{TASK}/nll"', '--gin.BEST_MODE="min"']
EVAL_STEPS = [2, 4, 5]


def train_args(model_dir, *extra):
  return ['train', *EVAL_RUN, f'--gin.MODEL_DIR="{model_dir}"', *extra]


def eval_records(model_dir):
  return [json.loads(l) for l in (Path(model_dir) / 'eval_metrics.jsonl').read_text().splitlines()]


def best_of(model_dir):
  return json.loads((Path(model_dir) / 'best' / 'best.json').read_text())


def snapshot(folder):
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in Path(folder).rglob('*') if p.is_file()}


def assert_same_evals(run, reference):
  """The same eval lines (steps and values) and the same best checkpoint."""
  got, want = eval_records(run), eval_records(reference)
  assert [r['step'] for r in got] == [r['step'] for r in want] == EVAL_STEPS
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in w:
      assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (g['step'], key)
  b, w = best_of(run), best_of(reference)
  assert b['step'] == w['step'] and b['value'] == pytest.approx(w['value'], rel=1e-5)
  assert Path(b['path']) == Path(run) / 'best' / f'checkpoint_{b["step"]}'
  assert (Path(b['path']) / 'commit_success.txt').is_file()
  assert not list(Path(run).glob('.best*'))  # no half-made or set-aside copy left


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run: evals at 2, 4 and the last step 5, and its best checkpoint."""
  model_dir = tmp_path_factory.mktemp('reference') / 'run'
  status = cli.main(train_args(model_dir))
  gin.clear_config()
  assert status == 0
  assert [r['step'] for r in eval_records(model_dir)] == EVAL_STEPS
  values = {r['step']: r[f'{TASK}/nll'] for r in eval_records(model_dir)}
  best = best_of(model_dir)
  assert best['step'] == min(values, key=values.get) and best['value'] == min(values.values())
  return model_dir


# == 1. The best checkpoint is swapped atomically =====================================
class Crash(BaseException):
  """A kill at an injected point: nothing catches it, as nothing catches SIGKILL."""


# The filesystem operations a swap is made of, each a point where a kill can land.
FS_OPS = [(os, 'rename'), (os, 'replace'), (os, 'link'), (os, 'unlink'), (os, 'rmdir'),
          (os, 'mkdir'), (shutil, 'rmtree'), (evaluation, 'exchange_paths')]


class FaultInjector:
  """Counts the FS_OPS calls while armed, and raises Crash at call number `at`."""

  def __init__(self, monkeypatch):
    self.calls, self.at, self.armed = [], None, False
    for module, name in FS_OPS:
      monkeypatch.setattr(module, name, self._wrap(f'{name}', getattr(module, name)))

  def _wrap(self, name, fn):
    def op(*args, **kwargs):
      if self.armed:
        if len(self.calls) == self.at:
          self.calls.append(name)
          raise Crash(f'killed at {name}{args}')
        self.calls.append(name)
      return fn(*args, **kwargs)
    return op

  def run(self, fn, at=None):
    self.calls, self.at, self.armed = [], at, True
    try:
      return fn()
    finally:
      self.armed = False


class FakeEvaluation:
  """Evaluation's interface with a scripted metric per step (no decoding)."""
  values = {}

  def __init__(self, **kwargs):
    del kwargs

  def run(self, model, params, step):
    del model, params
    return {TASK: {'nll': self.values[step]}}


def _fake_run_dir(model_dir):
  """checkpoint_<step> folders as Orbax commits them (a few files, one nested)."""
  for step in (2, 4, 6):
    d = model_dir / f'checkpoint_{step}'
    (d / 'state').mkdir(parents=True)
    (d / 'state' / 'data').write_bytes(bytes([step]) * 100)
    (d / 'commit_success.txt').write_text('ok')
    (d / '_CHECKPOINT_METADATA').write_text('{}')


def _periodic_eval(model_dir):
  cfg = DatasetConfig(TASK, {'inputs': 32, 'targets': 8}, split='validation')
  return evaluation.PeriodicEval(cfg, model_dir, period=2, num_examples=4,
                                 best_metric=f'{TASK}/nll', best_mode='min')


def _check_best(model_dir, allowed):
  """best/ is whole and is one of `allowed` {step: value}: best.json names it and its
  checkpoint holds every file of checkpoint_<step>."""
  best = best_of(model_dir)
  assert best['step'] in allowed and best['value'] == allowed[best['step']], best
  kept = model_dir / 'best' / f'checkpoint_{best["step"]}'
  original = model_dir / f'checkpoint_{best["step"]}'
  assert Path(best['path']) == kept
  assert snapshot(kept).keys() == snapshot(original).keys()
  assert [p.name for p in (model_dir / 'best').iterdir() if p.name.startswith('checkpoint_')] == [
      kept.name]
  return best


@pytest.mark.parametrize('old_best, atomic', [(False, True), (True, True), (True, False)],
                         ids=['first_best', 'replacing_a_best', 'replacing_without_exchange'])
def test_a_kill_at_any_step_of_keeping_a_new_best_leaves_old_or_new(old_best, atomic, tmp_path,
                                                                    monkeypatch):
  """A new best (step 4, nll 3) is kept over the old one (step 2, nll 5; or over none).
  A kill at each filesystem step of that: whatever best/ holds right after the kill is
  whole (the old best or the new one, never half deleted); the resumed run recovers
  best/, knows its value, redoes the eval of step 4 (one eval line per step), and a
  later worse eval (step 6, nll 4) never replaces the best."""
  monkeypatch.setattr(evaluation, 'Evaluation', FakeEvaluation)
  monkeypatch.setattr(FakeEvaluation, 'values', {2: 5.0, 4: 3.0, 6: 4.0} if old_best
                      else {2: 3.0, 4: 2.0, 6: 4.0})
  values = FakeEvaluation.values
  probe = tmp_path / 'probe'
  (probe / 'a').mkdir(parents=True)
  (probe / 'b').mkdir()
  if not atomic:  # a file system without renameat2's exchange: two renames
    monkeypatch.setattr(evaluation, 'exchange_paths', lambda a, b: False)
  elif not evaluation.exchange_paths(probe / 'a', probe / 'b'):
    pytest.skip('no atomic exchange of paths on this system')
  faults = FaultInjector(monkeypatch)

  def setup(name):
    model_dir = tmp_path / name
    _fake_run_dir(model_dir)
    if old_best:
      _periodic_eval(model_dir).run(None, None, 2)
      _check_best(model_dir, {2: values[2]})
    return model_dir

  faulted_step = 4 if old_best else 2
  model_dir = setup('dry')
  pe = _periodic_eval(model_dir)
  faults.run(lambda: pe.run(None, None, faulted_step))
  steps = list(faults.calls)
  assert len(steps) >= 4, steps
  for at in range(len(steps)):
    model_dir = setup(f'kill_{at}')
    before = {faulted_step - 2: values[faulted_step - 2]} if old_best else {}
    pe = _periodic_eval(model_dir)
    with pytest.raises(Crash):
      faults.run(lambda: pe.run(None, None, faulted_step), at=at)
    # Right after the kill: best/ is absent (only while nothing was kept yet, or between
    # the two renames of a swap without an atomic exchange) or whole.
    if old_best and atomic:
      assert (model_dir / 'best').exists(), f'kill at {steps[at]} (#{at}) left no best/'
    if (model_dir / 'best').exists():
      _check_best(model_dir, {**before, faulted_step: values[faulted_step]})
    elif old_best:
      assert list(model_dir.glob('.best*')), f'kill at {steps[at]} (#{at}) lost the best'
    # The run resumes: it recovers best/ and knows the best value so far.
    pe = _periodic_eval(model_dir)
    if before or (model_dir / 'best').exists():
      best = _check_best(model_dir, {**before, faulted_step: values[faulted_step]})
      assert pe.best['value'] == best['value'] and pe.best['step'] == best['step']
    else:
      assert pe.best is None
    assert not list(model_dir.glob('.best*')), (at, steps[at])
    # The eval that was killed is redone (once in eval_metrics.jsonl), then a worse one.
    pe.run(None, None, faulted_step)
    pe.run(None, None, 6)
    _check_best(model_dir, {faulted_step: values[faulted_step]})
    assert _periodic_eval(model_dir).best['value'] == values[faulted_step]
    assert [r['step'] for r in eval_records(model_dir)] == (
        [2, 4, 6] if old_best else [2, 6])
    assert not list(model_dir.glob('.best*'))


def test_a_half_deleted_best_left_by_an_older_version_is_replaced_by_the_whole_new_one(
    tmp_path, monkeypatch):
  """An older version deleted best/ before renaming the new one into place: a kill
  between left a half-deleted best/ (no best.json) beside the whole new one."""
  monkeypatch.setattr(evaluation, 'Evaluation', FakeEvaluation)
  monkeypatch.setattr(FakeEvaluation, 'values', {2: 5.0, 4: 3.0, 6: 4.0})
  _fake_run_dir(tmp_path)
  _periodic_eval(tmp_path).run(None, None, 4)
  shutil.copytree(tmp_path / 'best', tmp_path / '.best.partial')
  (tmp_path / 'best' / 'best.json').unlink()
  assert _periodic_eval(tmp_path).best['value'] == 3.0
  _check_best(tmp_path, {4: 3.0})
  assert not (tmp_path / '.best.partial').exists()


# == 2. A killed periodic eval is redone ============================================
def _committed(model_dir, step):
  return (Path(model_dir) / f'checkpoint_{step}' / 'commit_success.txt').is_file()


def test_sigkills_of_a_real_train_during_its_evals_lose_nothing(tmp_path, reference):
  """`gqa-jax train` killed (SIGKILL) as soon as an eval's checkpoint is committed, i.e.
  during the eval (and the keeping of a new best) of step 2, then, resumed, during that
  of the last step, 5. Each rerun evaluates the checkpoint whose eval was killed before
  it trains on (also when it resumes at the last step, with nothing left to train), so
  the eval lines (one per step) and the best checkpoint are the uninterrupted run's."""
  run = tmp_path / 'run'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  command = [sys.executable, '-m', 'gqa_jax.cli', *train_args(run)]
  for step, evaluated in ((2, []), (5, [2, 4])):
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _committed(run, step):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert [r['step'] for r in _records_if_any(run)] == evaluated, err[-3000:]
    if step == 5:
      assert 'evaluating checkpoint_2 first: eval_metrics.jsonl has no line for it' in err
  proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'already at step 5' in proc.stderr and 'evaluating checkpoint_5 first' in proc.stderr
  assert_same_evals(run, reference)
  lines = (run / 'eval' / f'{TASK}-metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == EVAL_STEPS


def _records_if_any(model_dir):
  return eval_records(model_dir) if (model_dir / 'eval_metrics.jsonl').exists() else []


# == 3. A vocabulary larger than the model's embedding is refused ====================
EVAL_COMMON = ['--gin_file=models/t5_1_1/tiny.gin', '--gin.network.T5Config.vocab_size=128',
               f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"', LENGTHS]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  return tmp_path


@pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')
@pytest.mark.parametrize('command', ['eval', 'infer'])
def test_eval_and_infer_of_a_checkpoint_smaller_than_the_vocabulary_are_refused(
    command, gqa, workdir):
  """The T5X fixture embeds 128 ids; the built-in task has 4100."""
  shutil.copytree(FIXTURE / 'legacy' / 'checkpoint_3', 'ckpt')
  before = snapshot(workdir)
  prefix = command.upper()
  r = gqa(command, *EVAL_COMMON, f'--gin_file=runs/{command}.gin',
          '--gin.CHECKPOINT_PATH="ckpt"', f'--gin.{prefix}_OUTPUT_DIR="out"',
          f'--gin.{prefix}_NUM_EXAMPLES=2', f'--gin.{prefix}_BATCH_SIZE=2')
  assert_user_error(r, f'{TASK} has a vocabulary of 4100 ids', 'embeds only 128',
                    'vocab_size >= 4100')
  assert snapshot(workdir) == before and not Path('out').exists()


TRAIN_VOCAB = {
    'fresh': [],
    'from_the_t5x_fixture': [f'--gin.INITIAL_CHECKPOINT_PATH="{FIXTURE / "legacy" / "checkpoint_3"}"'],
}


@pytest.mark.parametrize('case', list(TRAIN_VOCAB))
def test_train_with_a_model_smaller_than_the_vocabulary_is_refused(case, gqa, workdir):
  if case == 'from_the_t5x_fixture' and not FIXTURE.exists():
    pytest.skip(f'no T5X fixture at {FIXTURE}')
  extra = TRAIN_VOCAB[case]
  r = gqa('train', '--gin_file=experiments/tiny_pretrain.gin', LENGTHS, '--gin.BATCH_SIZE=2',
          '--gin.TRAIN_STEPS=10', '--gin.MODEL_DIR="run"',
          '--gin.network.T5Config.vocab_size=128', *extra)
  assert_user_error(r, 'gqa_builtin_span_corruption has a vocabulary of 4100 ids',
                    'embeds only 128', 'vocab_size >= 4100')
  assert not Path('run').exists() and list(workdir.iterdir()) == []


# == 4. EVAL_OUTPUT_DIR has one writer at a time =====================================
def test_a_second_eval_into_the_same_output_dir_is_refused(tmp_path, gqa, monkeypatch):
  """While one eval writes EVAL_OUTPUT_DIR, a second `gqa-jax eval` into it (started from
  inside the first one's evaluation) is refused with one line naming the first, and
  writes nothing; the first finishes and leaves no lock file behind."""
  cfg = network.get_preset('tiny', vocab_size=4224, dtype='float32')
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  ckpt_lib.TrainCheckpointer(tmp_path / 'run', config=cfg).save(1, params, {}, {})
  monkeypatch.chdir(tmp_path)
  args = ['eval', '--gin_file=models/t5_1_1/tiny.gin', '--gin.network.T5Config.vocab_size=4224',
          f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"', LENGTHS, '--gin_file=runs/eval.gin',
          '--gin.CHECKPOINT_PATH="run"', '--gin.EVAL_OUTPUT_DIR="out"',
          '--gin.EVAL_NUM_EXAMPLES=2', '--gin.EVAL_BATCH_SIZE=2']
  second = {}
  run = evaluation.Evaluation.run

  def run_with_a_second_eval(self, *a, **kw):
    # flock locks conflict between two opens of the file, also within one process.
    if not second:  # once (were it not refused, the second would get here too)
      second['status'] = None
      before = snapshot(tmp_path / 'out')
      second['status'] = cli.main(args)
      second['unchanged'] = snapshot(tmp_path / 'out') == before
    return run(self, *a, **kw)
  monkeypatch.setattr(evaluation.Evaluation, 'run', run_with_a_second_eval)
  r = gqa(*args)
  assert second == {'status': 2, 'unchanged': True}, r.err[-3000:]
  assert r.status == 0, r.err[-3000:]
  lines = [l for l in r.err.splitlines() if l.startswith('gqa-jax: error: ')]
  assert len(lines) == 1 and 'Traceback' not in r.err, r.err[-3000:]
  assert f'EVAL_OUTPUT_DIR {tmp_path / "out"} is in use by process {os.getpid()}' in lines[0]
  assert 'choose another EVAL_OUTPUT_DIR' in lines[0]
  assert (tmp_path / 'out' / 'summary_1.json').is_file()
  assert not list((tmp_path / 'out').glob('.lock*'))
