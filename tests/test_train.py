"""End-to-end training runs of the tiny model on the built-in data (gin, CLI, checkpoints)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gqa_jax import checkpoints, cli, convert

TINY = ['--gin_file=experiments/tiny_pretrain.gin',
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", '--gin.BATCH_SIZE=8']


def run_args(model_dir, steps, *extra):
  return ['train', *TINY, f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={steps}',
          *extra]


def metrics(model_dir):
  return [json.loads(line) for line in (Path(model_dir) / 'metrics.jsonl').open()]


def cli_subprocess(args, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen([sys.executable, '-m', 'gqa_jax.cli', *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_tiny_pretrain_learns_and_checkpoints(tmp_path):
  assert cli.main(run_args(tmp_path, 40, '--gin.CHECKPOINT_PERIOD=20')) == 0
  records = metrics(tmp_path)
  assert [r['step'] for r in records] == list(range(1, 41))
  first = sum(r['loss_per_token'] for r in records[:5]) / 5
  last = sum(r['loss_per_token'] for r in records[-5:]) / 5
  assert last < first - 0.5, (first, last)
  assert {'loss', 'learning_rate', 'tokens_per_second'} <= set(records[0])
  assert sorted(p.name for p in tmp_path.glob('checkpoint_*')) == ['checkpoint_20',
                                                                    'checkpoint_40']
  assert list((tmp_path / 'tensorboard' / 'train').glob('events.out.tfevents.*'))
  source = checkpoints.open_checkpoint(tmp_path)
  assert source.step == 40 and source.format == 'gqa-jax'
  assert source.config.vocab_size == 4224 and source.opt_state

  # eval: ROUGE on the built-in summarisation task; infer: predictions as JSONL.
  common = ['--gin_file=models/t5_1_1/tiny.gin', '--gin.network.T5Config.vocab_size=4224',
            f'--gin.CHECKPOINT_PATH="{tmp_path}"',
            '--gin.MIXTURE_OR_TASK_NAME="gqa_builtin_docstring"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}"]
  assert cli.main(['eval', *common, '--gin_file=runs/eval.gin', '--gin.EVAL_NUM_EXAMPLES=6',
                   '--gin.EVAL_BATCH_SIZE=4', f'--gin.EVAL_OUTPUT_DIR="{tmp_path / "eval"}"']) == 0
  summary = json.loads((tmp_path / 'eval' / 'summary_40.json').read_text())
  scores = dict(summary['metrics']['gqa_builtin_docstring'])
  nll = scores.pop('nll')
  assert set(scores) == {'rouge1', 'rouge2', 'rougeL'} and all(0 <= v <= 100 for v in scores.values())
  # nll: the references' teacher-forced log-likelihood, pooled over all target tokens;
  # each example's (log-likelihood, tokens) is in the predictions file. The targets are
  # cut to 8 tokens (EOS included), so each counts min(len, 8).
  lines = [json.loads(l) for l in (tmp_path / 'eval' / 'gqa_builtin_docstring-000040.jsonl').open()]
  assert len(lines) == 6
  assert [l['score'][1] for l in lines] == [min(len(l['input']['targets']), 8) for l in lines]
  assert all(l['score'][0] < 0 for l in lines)
  assert nll == pytest.approx(-sum(l['score'][0] for l in lines) / sum(l['score'][1] for l in lines))
  assert 0 < nll < 9  # uniform guessing over the 4224 ids would give log(4224) = 8.35
  assert cli.main(['infer', *common, '--gin_file=runs/infer.gin', '--gin.INFER_NUM_EXAMPLES=6',
                   '--gin.INFER_BATCH_SIZE=4', f'--gin.INFER_OUTPUT_DIR="{tmp_path / "infer"}"']) == 0
  lines = (tmp_path / 'infer' / 'gqa_builtin_docstring-000040.jsonl').read_text().splitlines()
  assert len(lines) == 6 and all({'target', 'output'} <= set(json.loads(l)) for l in lines)


def test_periodic_eval_keeps_the_best_checkpoint(tmp_path):
  assert cli.main(run_args(tmp_path, 4, '--gin.MIXTURE_OR_TASK_NAME="gqa_builtin_docstring"',
                           '--gin.EVAL_PERIOD=2', '--gin.EVAL_NUM_EXAMPLES=4',
                           '--gin.EVAL_BATCH_SIZE=4', '--gin.KEEP_CHECKPOINTS=1',
                           '--gin.BEST_METRIC="gqa_builtin_docstring/rougeL"',
                           '--gin.BEST_MODE="min"', '--gin.USE_PACKING=False')) == 0
  evals = [json.loads(l) for l in (tmp_path / 'eval_metrics.jsonl').open()]
  assert [e['step'] for e in evals] == [2, 4]
  best = json.loads((tmp_path / 'best' / 'best.json').read_text())
  values = {e['step']: e['gqa_builtin_docstring/rougeL'] for e in evals}
  assert best['value'] == min(values.values()) and best['step'] == min(values, key=values.get)
  # Kept even when KEEP_CHECKPOINTS=1 has deleted the original.
  assert checkpoints.open_checkpoint(best['path']).step == best['step']
  assert [p.name for p in tmp_path.glob('checkpoint_*')] == ['checkpoint_4']


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
  steps = 16
  straight = tmp_path / 'straight'
  assert cli.main(run_args(straight, steps, '--gin.CHECKPOINT_PERIOD=4')) == 0

  resumed = tmp_path / 'resumed'
  proc = cli_subprocess(run_args(resumed, steps, '--gin.CHECKPOINT_PERIOD=4'))
  deadline = time.time() + 300
  while not list(resumed.glob('checkpoint_*/commit_success.txt')):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # Only committed checkpoints count: the kill may land inside a save (Orbax's tmp folder).
  killed_at = max(int(p.parent.name.split('_')[1])
                  for p in resumed.glob('checkpoint_*/commit_success.txt'))
  assert killed_at < steps
  assert cli.main(run_args(resumed, steps, '--gin.CHECKPOINT_PERIOD=4')) == 0
  by_step = {r['step']: r['loss'] for r in metrics(resumed)}  # later lines win
  for r in metrics(straight):
    assert abs(by_step[r['step']] - r['loss']) <= 1e-6 * max(1.0, abs(r['loss'])), r['step']


def test_convert_then_uptrain_runs_alpha_times_source_steps(tmp_path):
  assert cli.main(run_args(tmp_path / 'mha', 40, '--gin.CHECKPOINT_PERIOD=40')) == 0
  convert.convert(tmp_path / 'mha', tmp_path / 'gqa', 2, progress=False)
  args = ['train', '--gin_file=experiments/tiny_pretrain.gin', '--gin_file=attention/gqa.gin',
          '--gin_file=runs/uptrain.gin', '--gin.NUM_KV_HEADS=2', '--gin.ALPHA=0.05',
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", '--gin.BATCH_SIZE=8',
          f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path / "gqa"}"',
          f'--gin.MODEL_DIR="{tmp_path / "up"}"']
  assert cli.main(args) == 0
  # Source step 40, ALPHA 0.05: 2 uptraining steps, continuing the step count.
  assert [r['step'] for r in metrics(tmp_path / 'up')] == [41, 42]
  assert checkpoints.open_checkpoint(tmp_path / 'up').config.kv_heads('decoder_self') == 2


def test_mha_checkpoint_into_gqa_run_fails_naming_convert(tmp_path, capsys):
  assert cli.main(run_args(tmp_path / 'mha', 2)) == 0
  capsys.readouterr()
  code = cli.main(['train', *TINY, '--gin_file=attention/mqa.gin',
                   f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path / "mha"}"',
                   f'--gin.MODEL_DIR="{tmp_path / "mqa"}"', '--gin.TRAIN_STEPS=4'])
  assert code == 2 and 'gqa-jax convert' in capsys.readouterr().err


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys):
  assert cli.main(run_args(tmp_path, 4, '--gin.CHECKPOINT_PERIOD=2')) == 0
  capsys.readouterr()
  # Resumed with an absurd learning rate, the parameters overflow and the loss turns NaN.
  assert cli.main(run_args(
      tmp_path, 10, '--gin.CHECKPOINT_PERIOD=2', '--gin.LOG_PERIOD=5',
      '--gin.optimizers.create_learning_rate_schedule.base_learning_rate=1e38')) == 2
  err = capsys.readouterr().err
  assert 'last good checkpoint is' in err and 'checkpoint_4' in err and 'Traceback' not in err
  assert checkpoints.open_checkpoint(tmp_path).step == 4


@pytest.mark.parametrize('args,message', [
    (['--gin.MIXTURE_OR_TASK_NAME="no_such_task"'], 'no_such_task'),
    (['--gin.NO_SUCH_MACRO_BINDING.x=1'], 'NO_SUCH_MACRO_BINDING'),
    (['--gin.train.train.no_such_arg=1'], 'no_such_arg'),
])
def test_bad_configuration_gives_clear_errors(tmp_path, capsys, args, message):
  try:
    code = cli.main(run_args(tmp_path, 2, *args))
  except Exception as e:  # unknown task names surface from seqio as exceptions
    assert message in str(e)
    return
  assert code != 0 and message in capsys.readouterr().err


def test_missing_model_dir_is_named(capsys):
  code = cli.main(['train', *TINY, '--gin.TRAIN_STEPS=2'])
  assert code == 2 and 'MODEL_DIR' in capsys.readouterr().err
