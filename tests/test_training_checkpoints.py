"""Training checkpoints: round trip, T5X layout readable by every reader, clear errors."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from gqa_jax import checkpoints, network
from gqa_jax.checkpoints import CheckpointError, training


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
