"""Training a scanned (and rematerialised) model: the same run as the unrolled one.

Oracle: the unrolled run of the same gin config, data and seed. Adafactor factors at
16 here, so that the per-layer factoring of stacked kernels is on the path.
"""

import json
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict

from gqa_jax import checkpoints, cli

RUN = ['train', '--gin_file=experiments/tiny_pretrain.gin',
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", '--gin.BATCH_SIZE=4',
       '--gin.optimizers.adafactor.min_dim_size_to_factor=16', '--gin.LOG_PERIOD=1']


def train(model_dir, steps, *extra):
  assert cli.main([*RUN, f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={steps}',
                   *extra]) == 0
  return [json.loads(line)['loss'] for line in (Path(model_dir) / 'metrics.jsonl').open()]


def state(model_dir):
  source = checkpoints.open_checkpoint(model_dir)
  tensors = {**source.params, **source.opt_state}
  return source, {k: np.asarray(t.read()) for k, t in tensors.items()}


def assert_same_state(got, want):
  assert set(got) == set(want)
  for name, value in want.items():
    scale = float(np.max(np.abs(value))) if value.size else 0.0
    np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-6 * max(scale, 1.0),
                               err_msg=name)


def test_a_scanned_remat_run_takes_the_unrolled_runs_steps_and_checkpoints_alike(tmp_path):
  """One run, resumed across layouts: unrolled to step 1, scanned with remat to step 4
  (restoring an unscanned checkpoint into stacked parameters and Adafactor slots), then
  unrolled again to step 5 (restoring what the scanned run saved). Every step's loss and
  the final state equal an unrolled run's. (A fresh scanned initialisation draws its own
  values, so both start from the same initialisation here.)"""
  want_losses = train(tmp_path / 'unrolled', 5)
  _, want = state(tmp_path / 'unrolled')
  mixed = tmp_path / 'mixed'
  train(mixed, 1)
  train(mixed, 4, '--gin.SCAN_LAYERS=True', "--gin.REMAT_POLICY='minimal'")
  scanned_checkpoint = json.loads((mixed / 'checkpoint_4' / '_CHECKPOINT_METADATA').read_text())
  assert scanned_checkpoint['custom_metadata']['gqa_jax']['layout'] == 'unscanned'
  assert 'scan_layers' not in scanned_checkpoint['custom_metadata']['gqa_jax']['config']
  losses = train(mixed, 5)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  _, got = state(mixed)
  assert any(k.startswith('encoder/layers_1/') for k in got)  # T5X's names on disk
  assert any(k.endswith('/v_row') for k in got)  # factored slots, per layer
  assert_same_state(got, want)
  flat = flatten_dict(checkpoints.load_model(mixed, scan_layers=True)[1])
  assert flat[('decoder', 'decoder', 'mlp', 'wo', 'kernel')].shape[1] == 2  # 2 layers stacked
