"""Training checkpoints: round trip, T5X layout readable by every reader, clear errors."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from gqa_jax import checkpoints, network
from gqa_jax.checkpoints import CheckpointError, base, training


def tiny(k=None):
  cfg = network.get_preset('tiny', vocab_size=64, dtype='float32')
  if k:
    cfg = cfg.with_kv_heads(k)
  return cfg, network.init_params(cfg, jax.random.PRNGKey(0))


def test_round_trip_and_readers(tmp_path):
  cfg, params = tiny(2)
  states = {f'param_states/{"/".join(k)}/v_row': np.full(v.shape[:1], 0.5, np.float32)
            for k, v in flatten_dict(params).items()}
  ckpt = training.TrainCheckpointer(tmp_path, keep=2, config=cfg)
  for step in (10, 20, 30):
    ckpt.save(step, params, states, {'batches': step * 2})
  assert ckpt.latest_step() == 30
  assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint_20', 'checkpoint_30']

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  abstract_states = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in states.items()}
  got, got_states, step, position = ckpt.restore(30, abstract, abstract_states)
  assert step == 30 and position == {'batches': 60}
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert set(got_states) == set(states)

  source = checkpoints.open_checkpoint(tmp_path)  # the latest step, as any checkpoint
  assert source.format == 'gqa-jax' and source.step == 30 and source.config == cfg
  assert set(source.opt_state) == set(states)


def test_mha_checkpoint_into_gqa_run_names_the_converter(tmp_path):
  mha_cfg, params = tiny()
  training.TrainCheckpointer(tmp_path, config=mha_cfg).save(5, params, {}, {})
  source = checkpoints.open_checkpoint(tmp_path)
  training.check_initial_checkpoint(source, mha_cfg, str(tmp_path))  # fits: no error
  gqa_cfg, _ = tiny(1)
  with pytest.raises(CheckpointError, match='gqa-jax convert .* --num-kv-heads 1'):
    training.check_initial_checkpoint(source, gqa_cfg, str(tmp_path))


def _source(cfg, metadata=None):
  """A checkpoint of `cfg` as a reader gives it (tensors never read)."""
  shapes = {'/'.join(k): v.shape for k, v in flatten_dict(network.param_shapes(cfg)).items()}
  return checkpoints.Source('gqa-jax', 'ckpt', {k: base.Tensor(s, np.dtype('float32'), None)
                                                for k, s in shapes.items()}, cfg, 3, None,
                            metadata or {})


@pytest.mark.parametrize('theirs,ours,fragments', [
    # Pooled heads cannot be split again: name the checkpoint it was converted from.
    (dict(k=2), dict(), ['converting to more KV heads (decoder_self, decoder_cross) is not '
                         'possible', 'converted from (/src/mha)']),
    (dict(), dict(k=2, stacks=('encoder',)), ['gqa-jax convert ckpt OUT --num-kv-heads 2 '
                                              '--stacks encoder']),
    (dict(), dict(k=1), ['gqa-jax convert ckpt OUT --num-kv-heads 1`']),
])
def test_kv_heads_mismatch_names_a_fix_that_works(theirs, ours, fragments):
  base_cfg = network.get_preset('tiny', vocab_size=64)
  cfg = lambda kw: base_cfg.with_kv_heads(kw['k'], **{k: v for k, v in kw.items()
                                                       if k != 'k'}) if kw else base_cfg
  source = _source(cfg(theirs), {'source': {'path': '/src/mha'}})
  with pytest.raises(CheckpointError) as e:
    training.check_initial_checkpoint(source, cfg(ours), 'ckpt')
  for fragment in fragments:
    assert fragment in str(e.value)
