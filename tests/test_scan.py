"""Scanned layers and rematerialisation: the same model, run another way.

Oracles: the unscanned network (T5X's tree, checked against T5X-written fixtures in
test_network.py) on the same parameters; `stack_layers` / `unstack_layers` as exact
inverses; every remat policy against 'none'.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from gqa_jax import checkpoints, models, network
from gqa_jax.checkpoints import training as ckpt_lib
from test_hf import hf_config, hf_state, write

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny'
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')


def small_config(**kw):
  base = dict(decoder_self_kv_heads=2, decoder_cross_kv_heads=1, num_encoder_layers=3)
  return network.get_preset('tiny', **{**base, **kw})


def tokens(seed, shape, vocab=100):
  return jnp.asarray(np.random.RandomState(seed).randint(2, vocab, shape), jnp.int32)


@jax.jit(static_argnums=0)
def logits_of(config, params, enc, dec):
  return network.Transformer(config).apply({'params': params}, enc, dec, dec,
                                           enable_dropout=False)


def max_abs_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


# --- the tree ------------------------------------------------------------------------------
def test_stacked_tree_is_the_scanned_networks_tree_and_unstacks_exactly():
  cfg = small_config()
  scanned = dataclasses.replace(cfg, scan_layers=True)
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  stacked = network.stack_layers(params, cfg)
  assert (jax.tree.map(lambda x: x.shape, stacked)
          == jax.tree.map(lambda x: x.shape, network.param_shapes(scanned)))
  flat = flatten_dict(stacked)
  assert flat[('encoder', 'encoder', 'attention', 'query', 'kernel')].shape == (32, 3, 32)
  assert flat[('decoder', 'decoder', 'pre_mlp_layer_norm', 'scale')].shape == (32, 2)
  # One relative-position table per stack, not stacked; no layers_<i> left.
  assert flat[('encoder', 'relpos_bias', 'rel_embedding')].shape == (4, 32)
  assert not any(k[1].startswith('layers_') for k in flat)
  back = network.unstack_layers(stacked, cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert max_abs_diff(back, params) == 0.0
  # NumPy in, NumPy out (a checkpoint on the host is stacked without a device).
  host = network.stack_layers(jax.tree.map(np.asarray, params), cfg)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))


def test_logical_axes_put_layers_at_position_one():
  cfg = small_config(scan_layers=True)
  axes = network.param_logical_axes(cfg)
  assert tuple(axes['encoder']['encoder']['attention']['query']['kernel']) == (
      'embed', 'layers', 'joined_kv')
  assert tuple(axes['decoder']['decoder']['pre_self_attention_layer_norm']['scale']) == (
      'embed', 'layers')
  assert tuple(axes['decoder']['relpos_bias']['rel_embedding']) == ('heads', 'relpos_buckets')


def test_checkpoint_names_and_records_stay_unscanned():
  cfg = small_config(scan_layers=True, remat_policy='full')
  assert network.flat_param_shapes(cfg) == network.flat_param_shapes(network.unscanned(cfg))
  assert 'scan_layers' not in cfg.to_dict() and 'remat_policy' not in cfg.to_dict()
  assert cfg.to_dict() == small_config().to_dict()


def test_bad_options_fail_at_construction():
  with pytest.raises(ValueError, match="remat_policy='some'.*'minimal'"):
    small_config(remat_policy='some')
  with pytest.raises(ValueError, match='cannot run with scan_layers=True'):
    small_config(scan_layers=True, decoder_self_kv_layers='cla2')
  with pytest.raises(ValueError, match='scan_layers=1'):
    small_config(scan_layers=1)


# --- the numbers ----------------------------------------------------------------------------
# Scanned with 'minimal' remat is checked through training (test_scan_train.py).
@pytest.mark.parametrize('scan,policy', [(False, 'minimal'), (False, 'full'), (True, 'none'),
                                         (True, 'full')])
def test_logits_and_gradients_equal_the_unscanned_networks(scan, policy):
  cfg = small_config()
  run = dataclasses.replace(cfg, scan_layers=scan, remat_policy=policy)
  params = network.init_params(cfg, jax.random.PRNGKey(1))
  theirs = network.stack_layers(params, cfg) if scan else params
  enc, dec = tokens(0, (2, 7)), tokens(1, (2, 5))
  np.testing.assert_allclose(logits_of(run, theirs, enc, dec), logits_of(cfg, params, enc, dec),
                             atol=1e-5)
  grad = jax.jit(lambda c, p: jax.grad(lambda q: jnp.sum(logits_of(c, q, enc, dec) ** 2))(p),
                 static_argnums=0)
  want = grad(cfg, params)
  got = network.unstack_layers(grad(run, theirs), cfg)
  for path, w in flatten_dict(want).items():
    np.testing.assert_allclose(flatten_dict(got)[path], w, rtol=2e-5,
                               atol=2e-5 * float(jnp.max(jnp.abs(w))), err_msg=str(path))


@pytest.mark.parametrize('policy', ['minimal', 'full'])
def test_remat_keeps_the_loss_and_gradient_with_dropout(policy):
  """Remat recomputes the forward pass: with dropout on, the recomputation must draw the
  same masks, so loss and gradient equal 'none''s on the same key."""
  cfg = small_config(dropout_rate=0.3)
  params = network.init_params(cfg, jax.random.PRNGKey(2))
  batch = {'encoder_input_tokens': tokens(3, (2, 7)), 'decoder_input_tokens': tokens(4, (2, 5)),
           'decoder_target_tokens': tokens(5, (2, 5))}
  rng = jax.random.PRNGKey(7)

  def value_and_grad(config):
    model = models.EncoderDecoderModel(network.Transformer(config))
    return jax.value_and_grad(lambda p: model.loss_fn(p, batch, rng)[0])(params)

  loss, grads = value_and_grad(cfg)
  loss_r, grads_r = value_and_grad(dataclasses.replace(cfg, remat_policy=policy))
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  assert max_abs_diff(grads_r, grads) <= 1e-5 * max(
      float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))


def test_scanned_model_decodes_as_the_unscanned_one():
  cfg = small_config()
  params = network.init_params(cfg, jax.random.PRNGKey(3))
  batch = {'encoder_input_tokens': tokens(6, (2, 7)), 'decoder_target_tokens': tokens(7, (2, 6))}
  want = models.EncoderDecoderModel(network.Transformer(cfg)).predict_batch_with_aux(
      params, batch, method='beam', num_decodes=2)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  got = models.EncoderDecoderModel(network.Transformer(scanned)).predict_batch_with_aux(
      network.stack_layers(params, cfg), batch, method='beam', num_decodes=2)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1]['scores'], want[1]['scores'], rtol=1e-5)


# --- every checkpoint reader loads into a scanned model -----------------------------------
def fixture_checkpoints(tmp_path):
  """(name, path) of a checkpoint in each format we read."""
  # Unit-variance weights blow activations up to where op order shows; T5's are smaller.
  state = {k: v * np.float32(0.1) for k, v in hf_state().items()}
  found = [('hf', write(tmp_path, state, hf_config(num_layers=2))),
           ('builtin', 'builtin:t5_mini')]
  if FIXTURE.exists():
    found += [('t5x-legacy', FIXTURE / 'legacy' / 'checkpoint_3'),
              ('t5x-orbax', FIXTURE / 'orbax' / 'checkpoint_3')]
  return found


def test_every_reader_loads_into_a_scanned_model_with_the_same_logits(tmp_path):
  names = []
  for name, path in fixture_checkpoints(tmp_path):
    config, params = checkpoints.load_model(path)
    s_config, stacked = checkpoints.load_model(path, scan_layers=True)
    assert s_config == dataclasses.replace(config, scan_layers=True)
    # float32 activations: the comparison is of the layouts, not of bfloat16 rounding.
    config, s_config = (dataclasses.replace(c, dtype='float32') for c in (config, s_config))
    enc, dec = tokens(8, (2, 7), 100), tokens(9, (2, 5), 100)
    np.testing.assert_allclose(logits_of(s_config, stacked, enc, dec),
                               logits_of(config, params, enc, dec), atol=1e-4,
                               err_msg=name)
    # The training readers place a scanned model's stacked leaves from the same tensors.
    source = checkpoints.open_checkpoint(path)
    shapes = network.param_shapes(s_config)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = ckpt_lib.place_tensors(source.params, jax.tree.map(lambda _: cpu, shapes))
    assert max_abs_diff(placed, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                                             stacked)) == 0.0
    names.append(name)
  assert {'hf', 'builtin'} <= set(names)
