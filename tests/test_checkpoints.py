"""Checkpoint readers and writers against T5X-written fixtures and Orbax's own restore."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from flax.traverse_util import flatten_dict

from gqa_jax import checkpoints, network
from gqa_jax.checkpoints import CheckpointError, orbax, t5x

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny'
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')
FIXTURE_PATHS = [FIXTURE / 'legacy', FIXTURE / 'legacy' / 'checkpoint_3',
                 FIXTURE / 'orbax' / 'checkpoint_3']


def tiny_params(seed=0, **overrides):
  cfg = network.get_preset('tiny', vocab_size=64, **overrides)
  params = network.init_params(cfg, jax.random.PRNGKey(seed))
  return cfg, {'/'.join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def write_legacy(ckpt_dir, params, step=7, opt_state=None):
  leaves = [(f'target/{k}', v) for k, v in params.items()] + [('state/step', np.int32(step))]
  leaves += [(f'state/{k}', v) for k, v in (opt_state or {}).items()]
  t5x.write_all(pathlib.Path(ckpt_dir), leaves)


@needs_fixture
@pytest.mark.parametrize('path', FIXTURE_PATHS, ids=['legacy-model-dir', 'legacy', 'orbax'])
def test_t5x_fixtures_read_exactly(path):
  ref = np.load(FIXTURE / 'params_flat.npz')
  source = checkpoints.open_checkpoint(path)
  assert source.format == ('t5x-orbax' if 'orbax' in str(path) else 't5x-legacy')
  assert source.step == 3
  assert set(source.params) == set(ref.files)
  for name in ref.files:
    np.testing.assert_array_equal(source.params[name].read(), ref[name])
  expected = json.loads((FIXTURE / 'config.json').read_text())
  assert dataclasses.replace(source.config, dtype='float32').to_dict() == {
      **network.T5Config(**expected).to_dict()}
  # T5X's Adafactor state: 4 slots per parameter, factored kernels have v_row/v_col.
  assert len(source.opt_state) == 4 * len(ref.files)
  assert source.opt_state['param_states/encoder/layers_0/mlp/wi_0/kernel/v_col'].shape == (64,)


@needs_fixture
def test_load_model_reproduces_t5x_logits():
  config, params = checkpoints.load_model(FIXTURE / 'orbax' / 'checkpoint_3')
  ref = np.load(FIXTURE / 'reference_logits.npz')
  config = dataclasses.replace(config, dtype='float32')  # activations are not in a checkpoint
  logits = network.Transformer(config).apply(
      {'params': params}, ref['encoder_input_tokens'], ref['decoder_input_tokens'],
      ref['decoder_target_tokens'], enable_dropout=False)
  np.testing.assert_allclose(logits, ref['logits'], atol=1e-4)


def test_legacy_writer_round_trip_with_bfloat16_and_inline_leaves(tmp_path):
  _, params = tiny_params()
  params = {k: v.astype(jax.numpy.bfloat16) if 'mlp' in k else v for k, v in params.items()}
  slots = {'param_states/decoder/decoder_norm/scale/v': np.ones(32, np.float32),
           'param_states/decoder/decoder_norm/scale/v_row': np.zeros(1, np.float32)}
  write_legacy(tmp_path / 'checkpoint_7', params, opt_state=slots)
  source = checkpoints.open_checkpoint(tmp_path)
  assert source.step == 7 and source.format == 't5x-legacy'
  for name, value in params.items():
    got = source.params[name].read()
    assert got.dtype == value.dtype, name
    np.testing.assert_array_equal(got, value)
  np.testing.assert_array_equal(source.opt_state[
      'param_states/decoder/decoder_norm/scale/v'].read(), np.ones(32))
  # Parameters are zarr folders; the step and v_row stay inline, as T5X writes them.
  assert (tmp_path / 'checkpoint_7' / 'target.token_embedder.embedding' / '.zarray').exists()
  assert not (tmp_path / 'checkpoint_7' / 'state.step').exists()


@pytest.mark.parametrize('variant', ['top-level-path', 'gcs', 'gfile'])
def test_legacy_spec_variants(tmp_path, variant):
  """Older files put the path at the top level; gcs/gfile specs name the same folders."""
  _, params = tiny_params()
  write_legacy(tmp_path / 'checkpoint_1', params)
  msgpack = tmp_path / 'checkpoint_1' / 'checkpoint'
  tree = serialization.msgpack_restore(msgpack.read_bytes())

  def edit(node):
    if isinstance(node, dict) and 'driver' in node:
      if variant == 'top-level-path':
        node['path'] = node.pop('kvstore')['path']
      else:
        node['kvstore'] = {'driver': variant, 'bucket': 'some-bucket',
                           'path': node['kvstore']['path']}
      return node
    return {k: edit(v) for k, v in node.items()} if isinstance(node, dict) else node
  msgpack.write_bytes(serialization.msgpack_serialize(edit(tree)))
  source = checkpoints.open_checkpoint(tmp_path / 'checkpoint_1')
  name = 'decoder/layers_1/self_attention/value/kernel'
  np.testing.assert_array_equal(source.params[name].read(), params[name])


def test_orbax_writer_output_restores_with_orbax_itself(tmp_path):
  """What the converter writes is a plain Orbax PyTree checkpoint (what training restores)."""
  _, params = tiny_params()
  writer = orbax.OrbaxWriter(tmp_path / 'checkpoint_5', buffer_bytes=20_000)  # many flushes
  for name, value in params.items():
    writer.add(f'target/{name}', value)
  writer.add('state/step', np.int32(5))
  writer.close()
  restored = ocp.PyTreeCheckpointer().restore(tmp_path / 'checkpoint_5' / 'state')
  assert int(restored['state']['step']) == 5
  flat = {'/'.join(k): v for k, v in flatten_dict(restored['target']).items()}
  assert set(flat) == set(params)
  for name, value in params.items():
    np.testing.assert_array_equal(flat[name], value)
  manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      step_prefix='checkpoint', read_only=True))
  assert manager.latest_step() == 5


def test_latest_step_folder_is_used(tmp_path):
  _, params = tiny_params()
  write_legacy(tmp_path / 'checkpoint_2', params, step=2)
  write_legacy(tmp_path / 'checkpoint_10', params, step=10)
  assert checkpoints.open_checkpoint(tmp_path).step == 10


def test_missing_and_unknown_paths(tmp_path):
  with pytest.raises(CheckpointError, match='does not exist'):
    checkpoints.open_checkpoint(tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match='not a checkpoint this version reads'):
    checkpoints.open_checkpoint(tmp_path / 'empty')


def test_truncated_msgpack_and_corrupted_chunks(tmp_path):
  _, params = tiny_params()
  write_legacy(tmp_path / 'checkpoint_1', params)
  ckpt = tmp_path / 'checkpoint_1'
  chunk = next((ckpt / 'target.token_embedder.embedding').glob('0*'))
  chunk.write_bytes(chunk.read_bytes()[:50])  # truncated gzip data
  source = checkpoints.open_checkpoint(ckpt)  # metadata is intact
  with pytest.raises(CheckpointError, match='truncated or corrupted'):
    source.params['token_embedder/embedding'].read()
  (ckpt / 'checkpoint').write_bytes((ckpt / 'checkpoint').read_bytes()[:100])
  with pytest.raises(CheckpointError, match='truncated or corrupted'):
    checkpoints.open_checkpoint(ckpt)


def test_unfinished_orbax_save_is_refused(tmp_path):
  _, params = tiny_params()
  writer = orbax.OrbaxWriter(tmp_path / 'checkpoint_1')
  for name, value in params.items():
    writer.add(f'target/{name}', value)
  writer.close()
  for marker in tmp_path.rglob('commit_success.txt'):
    marker.unlink()
  with pytest.raises(CheckpointError, match='unfinished'):
    checkpoints.open_checkpoint(tmp_path / 'checkpoint_1')


def test_infer_config_for_original_t5_and_gqa():
  cfg, params = tiny_params(mlp_activations=('relu',), logits_via_embedding=True)
  cfg = cfg.with_kv_heads(2, network.STACKS)
  shapes = {'/'.join(k): v.shape for k, v in flatten_dict(network.param_shapes(cfg)).items()}
  assert checkpoints.infer_config(shapes, dtype='float32') == cfg
  with pytest.raises(CheckpointError, match='missing'):
    checkpoints.infer_config({'token_embedder/embedding': (4, 4)})
