"""Training on 8 fake CPU devices and on two processes matches one device, step by step."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 3
BASE = ['train', '--gin_file=experiments/tiny_pretrain.gin',
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", '--gin.BATCH_SIZE=8',
        f'--gin.TRAIN_STEPS={STEPS}', f'--gin.CHECKPOINT_PERIOD={STEPS}']


def run(model_dir, *extra, devices=1, env=None, wait=True):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {}))
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'gqa_jax.cli', *BASE, f'--gin.MODEL_DIR="{model_dir}"', *extra],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return losses(model_dir)


def losses(model_dir):
  return [(r['step'], r['loss'], r['loss_per_token'])
          for r in map(json.loads, (Path(model_dir) / 'metrics.jsonl').open())]


def assert_same(got, want):
  assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(1, STEPS + 1))
  for (_, loss, per_token), (_, want_loss, want_per_token) in zip(got, want):
    assert abs(per_token - want_per_token) <= 1e-5
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)


@pytest.fixture(scope='module')
def single_dir(tmp_path_factory):
  """A 3-step run on one device (its losses: `single`)."""
  model_dir = tmp_path_factory.mktemp('single')
  run(model_dir)
  return model_dir


@pytest.fixture(scope='module')
def single(single_dir):
  return losses(single_dir)


@pytest.mark.parametrize('mesh,attention', [
    (['--gin.MESH_MODEL=2'], []),                             # data=4 x model=2, MHA
    (['--gin.MESH_MODEL=4'], ['--gin_file=attention/mqa.gin']),  # model=4, K=1 replicated
])
def test_eight_devices_match_one(tmp_path, single, mesh, attention):
  reference = single
  if attention:
    reference = run(tmp_path / 'mqa_single', *attention)
  assert_same(run(tmp_path / 'mesh', *attention, *mesh, devices=8), reference)


def test_two_processes_match_one(tmp_path, single):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [run(tmp_path / 'multi', f'--coordinator_address=127.0.0.1:{port}',
               '--process_count=2', f'--process_index={i}', '--cpu_collectives=gloo',
               wait=False) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  assert_same(losses(tmp_path / 'multi'), single)


def test_sharded_eval_decodes_like_one_device(tmp_path, single_dir):
  """`gqa-jax eval` shards the parameters over a data x model mesh (MESH_MODEL) as training
  does, and greedy decoding gives the same predictions as on one device."""
  model_dir = single_dir
  outputs = {}
  for devices, mesh in ((1, []), (8, ['--gin.MESH_MODEL=2'])):
    out = tmp_path / f'eval{devices}'
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    proc = subprocess.run(
        [sys.executable, '-m', 'gqa_jax.cli', 'eval', '--gin_file=models/t5_1_1/tiny.gin',
         '--gin.network.T5Config.vocab_size=4224', '--gin_file=runs/eval.gin',
         f'--gin.CHECKPOINT_PATH="{model_dir}"', f'--gin.EVAL_OUTPUT_DIR="{out}"',
         '--gin.MIXTURE_OR_TASK_NAME="gqa_builtin_docstring"',
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
         '--gin.EVAL_NUM_EXAMPLES=6', '--gin.EVAL_BATCH_SIZE=8', *mesh],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if mesh:
      assert "'model': 2" in proc.stderr and "'data': 4" in proc.stderr
    outputs[devices] = [json.loads(line)['output'] for line in
                        (out / f'gqa_builtin_docstring-{STEPS:06d}.jsonl').open()]
  assert len(outputs[1]) == 6 and outputs[8] == outputs[1]
