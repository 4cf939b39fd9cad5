"""Convert -> uptrain through the CLI, at a size where Adafactor factors the K/V kernels.

emb 256, 4 heads of 64: a source K/V kernel [256, 256] is factored; pooled to K = 2 it
is [256, 128], factored the other way round (v_row over its 128 columns); to K = 1 it is
[256, 64], which Adafactor keeps a full v for (64 < min_dim_size_to_factor = 128). The
converted slots must be what the uptraining optimizer wants, or the run cannot restore
them. Runs go through `cli.main` from a temporary working directory with relative
paths, as users type them; 2 steps, batch 4, short sequences keep each run to seconds.
"""

import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from gqa_jax import checkpoints, cli, network, optimizers
from gqa_jax.checkpoints import t5x, training

FIXTURE = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny'
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')
N, SOURCE_STEP = 4, 2
FACTORED = network.get_preset('tiny', vocab_size=4224, emb_dim=256, head_dim=64)
SHORT = ["--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", '--gin.BATCH_SIZE=4']
PRETRAIN = ['--gin_file=experiments/tiny_pretrain.gin', '--gin.network.T5Config.emb_dim=256',
            '--gin.network.T5Config.head_dim=64', *SHORT]


def uptrain_args(k, initial, model_dir, alpha=1.0):
  return ['train', '--gin_file=attention/gqa.gin', '--gin_file=runs/uptrain.gin',
          f'--gin.NUM_KV_HEADS={k}', f'--gin.ALPHA={alpha}',
          f'--gin.INITIAL_CHECKPOINT_PATH="{initial}"', f'--gin.MODEL_DIR="{model_dir}"']


def trained_steps(model_dir):
  records = [json.loads(line) for line in (Path(model_dir) / 'metrics.jsonl').open()]
  assert all(math.isfinite(r['loss']) for r in records), records
  return [r['step'] for r in records]


def slot_shapes(path):
  return {k: tuple(t.shape) for k, t in checkpoints.open_checkpoint(path).opt_state.items()}


def wanted_shapes(config):
  """The slots the runs' optimizer (runs/pretrain.gin: adafactor at 128) restores into."""
  return {k: tuple(v.shape) for k, v in optimizers.t5x_param_state_shapes(
      optimizers.adafactor(), network.param_shapes(config)).items()}


def is_kv(name):
  return name.startswith('param_states/decoder/') and name.split('/')[-3] in ('key', 'value')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A folder holding `pre`: a step-2 training checkpoint of the factored size with the
  optimizer's own slot layout, every slot in use non-zero (what `gqa-jax train` writes,
  without spending a compile on pretraining)."""
  root = tmp_path_factory.mktemp('uptrain')
  params = network.init_params(FACTORED, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  states = {k: (v if v.shape == (1,) else rng.random(v.shape, np.float32) + 0.1)
            for k, v in optimizers.to_t5x_param_states(
                optimizers.adafactor().init(params), params).items()}
  training.TrainCheckpointer(root / 'pre', config=FACTORED).save(
      SOURCE_STEP, params, states, {'batches': SOURCE_STEP})
  return root


@pytest.mark.parametrize('k,fmt', [(1, 't5x'), (2, 'orbax'), (N, 'orbax')])
def test_converted_optimizer_state_restores_and_uptrains(workdir, monkeypatch, capsys, k, fmt):
  monkeypatch.chdir(workdir)
  out, run = f'g{k}-{fmt}', f'up{k}-{fmt}'
  assert cli.main(['convert', 'pre', out, '--num-kv-heads', str(k), '--output-format', fmt,
                   '--quiet']) == 0
  # Every slot has the shape the optimizer wants for the converted model; K/V moments
  # start from zero, all others are the source's.
  assert slot_shapes(out) == wanted_shapes(FACTORED.with_kv_heads(k))
  source = checkpoints.open_checkpoint('pre').opt_state
  for name, tensor in checkpoints.open_checkpoint(out).opt_state.items():
    if is_kv(name) and k != N:
      assert not tensor.read().any(), name
    else:
      np.testing.assert_array_equal(tensor.read(), source[name].read(), err_msg=name)

  capsys.readouterr()
  assert cli.main([*uptrain_args(k, out, run), *PRETRAIN]) == 0
  log = capsys.readouterr().err
  assert 'restored the optimizer state of 52 parameters at step 2' in log, log
  assert 'refactored' not in log
  assert trained_steps(run) == [3, 4]
  assert checkpoints.open_checkpoint(run).step == 4


def test_dropped_optimizer_state_uptrains_from_zeros(workdir, monkeypatch, capsys):
  monkeypatch.chdir(workdir)
  assert cli.main(['convert', 'pre', 'g2-drop', '--num-kv-heads', '2', '--opt-state', 'drop',
                   '--quiet']) == 0
  assert checkpoints.open_checkpoint('g2-drop').opt_state is None
  capsys.readouterr()
  assert cli.main([*uptrain_args(2, 'g2-drop', 'up2-drop'), *PRETRAIN]) == 0
  assert 'has no optimizer state: Adafactor starts from zeros at step 2' in capsys.readouterr().err
  assert trained_steps('up2-drop') == [3, 4]


def test_unfixable_optimizer_state_is_a_one_line_error_naming_opt_state(
    workdir, monkeypatch, capsys):
  """What gqa-jax before this fix wrote: a pooled [256, 128] kernel's zeroed slots in the
  source's factoring (v_row (256,), v_col (128,)). No factoring explains them."""
  monkeypatch.chdir(workdir)
  assert cli.main(['convert', 'pre', 'g2-good', '--num-kv-heads', '2', '--quiet']) == 0
  good = checkpoints.open_checkpoint('g2-good')
  name = 'param_states/decoder/layers_0/self_attention/key/kernel'
  leaves = {f'target/{k}': t.read() for k, t in good.params.items()}
  leaves.update({f'state/{k}': t.read() for k, t in good.opt_state.items()})
  leaves.update({f'state/{name}/v_row': np.zeros(256, np.float32),
                 f'state/{name}/v_col': np.zeros(128, np.float32),
                 'state/step': np.int32(SOURCE_STEP)})
  t5x.write_all(workdir / 'g2-old' / f'checkpoint_{SOURCE_STEP}', leaves.items())
  capsys.readouterr()
  assert cli.main([*uptrain_args(2, 'g2-old', 'up2-old'), *PRETRAIN]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('gqa-jax: error: ') and '--opt-state drop' in err[-1], err
  assert name in err[-1] and not any('Traceback' in line for line in err)


# --- a source written with another factoring: T5X at min_dim_size_to_factor=16 -----------
TINY_TASK = 'gqa_test_tiny_vocab'


def _register_tiny_vocab_task():
  """Token ids below the fixture's vocab of 128 (the built-in tasks use 4224)."""
  import seqio
  import tensorflow as tf
  from gqa_jax.data import registry

  def dataset_fn(split, shuffle_files, seed=None):
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 100, (64, 24)).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices({'inputs': ids[:, :16], 'targets': ids[:, 16:]})
  vocabulary = seqio.PassThroughVocabulary(size=128, eos_id=1)
  features = {k: seqio.Feature(vocabulary=vocabulary, add_eos=True)
              for k in ('inputs', 'targets')}
  registry.add_task(TINY_TASK, source=seqio.FunctionDataSource(dataset_fn, ['train']),
                    output_features=features, preprocessors=[
                        seqio.preprocessors.append_eos_after_trim])


@needs_fixture
def test_t5x_source_factored_at_16_is_refactored_and_says_so(tmp_path, monkeypatch, capsys):
  _register_tiny_vocab_task()
  monkeypatch.chdir(tmp_path)
  source = os.path.relpath(FIXTURE / 'legacy', tmp_path)
  assert cli.main(['convert', source, 'g2', '--num-kv-heads', '2', '--quiet']) == 0
  record = json.loads(Path('g2/checkpoint_3/gqa_jax.json').read_text())
  # The pooled [32, 16] kernels get slots of one threshold that fits all the fixture's
  # slots (factored [.., 32] kernels, unfactored relpos [4, 32]): not 128.
  assert 4 < record['min_dim_size_to_factor'] <= 32
  capsys.readouterr()
  args = uptrain_args(2, 'g2', 'up', alpha=0.67)  # round(0.67 x 3) = 2 steps
  assert cli.main([*args, '--gin_file=models/t5_1_1/tiny.gin', '--gin_file=runs/pretrain.gin',
                   '--gin.network.T5Config.vocab_size=128',
                   f'--gin.MIXTURE_OR_TASK_NAME="{TINY_TASK}"', *SHORT]) == 0
  log = capsys.readouterr().err
  # At 128 (the run's optimizer) the fixture's factored kernels need a full v: every 2-D
  # kernel but the relpos tables (unfactored at 16 too) and the 8 pooled K/V kernels
  # (written for the run): embedding, logits, 2 x 7 encoder, 2 x 7 decoder = 30.
  lines = [line for line in log.splitlines() if 'refactored' in line]
  assert len(lines) == 1 and 'second moments of 30 of 52 parameters' in lines[0], log
  assert 'min_dim_size_to_factor' in lines[0]
  assert 'restored the optimizer state of 52 parameters at step 3' in log
  assert trained_steps('up') == [4, 5]
