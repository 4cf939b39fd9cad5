"""EncoderDecoderModel: loss against a NumPy implementation, scores, initial variables."""

import jax
import numpy as np
import pytest

from gqa_jax import models, network

VOCAB = 30


@pytest.fixture(scope='module')
def setup():
  cfg = network.get_preset('tiny', vocab_size=VOCAB).with_kv_heads(2)
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  tgt = rng.randint(2, VOCAB, (3, 5))
  batch = {'encoder_input_tokens': rng.randint(2, VOCAB, (3, 6)),
           'decoder_input_tokens': np.concatenate([np.zeros((3, 1), int), tgt[:, :-1]], 1),
           'decoder_target_tokens': tgt,
           'decoder_loss_weights': (rng.rand(3, 5) > 0.3).astype(np.float32)}
  module = network.Transformer(cfg)
  logits = np.asarray(module.apply({'params': params}, batch['encoder_input_tokens'],
                                   batch['decoder_input_tokens'], tgt, enable_dropout=False),
                      np.float64)
  return module, params, batch, logits


def np_loss(logits, targets, weights, smoothing, z_loss, factor):
  """T5X's loss written from its definition, in float64."""
  v = logits.shape[-1]
  log_z = np.log(np.exp(logits).sum(-1))
  log_p = logits - log_z[..., None]
  on, off = 1 - smoothing, smoothing / (v - 1)
  soft = np.full(logits.shape, off)
  np.put_along_axis(soft, targets[..., None], on, -1)
  entropy = -(on * np.log(on) + (v - 1) * off * np.log(off + 1e-20))
  per_token = -(soft * log_p).sum(-1) - entropy + z_loss * log_z ** 2
  return (per_token * weights).sum() / factor, (z_loss * log_z ** 2 * weights).sum() / factor


@pytest.mark.parametrize('smoothing,z_loss', [(0.0, 0.0), (0.1, 1e-4), (0.2, 1e-2)])
def test_loss_matches_numpy(setup, smoothing, z_loss):
  module, params, batch, logits = setup
  model = models.EncoderDecoderModel(module, label_smoothing=smoothing, z_loss=z_loss)
  loss, metrics = model.loss_fn(params, batch, None)
  w = batch['decoder_loss_weights']
  ref, ref_z = np_loss(logits, batch['decoder_target_tokens'], w, smoothing, z_loss, 1.0)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics['z_loss'], ref_z, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(metrics['weight_sum'], w.sum())


@pytest.mark.parametrize('factor', [4.0, 'NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS',
                                    'num_real_target_tokens'])
def test_loss_normalizing_factor(setup, factor):
  module, params, batch, logits = setup
  w = batch['decoder_loss_weights']
  model = models.EncoderDecoderModel(module, z_loss=1e-4, loss_normalizing_factor=factor)
  expected_factor = {'NUM_REAL_TARGET_TOKENS': w.sum(), 'NUM_TOTAL_TARGET_TOKENS': w.size}.get(
      str(factor).upper(), factor)
  ref, _ = np_loss(logits, batch['decoder_target_tokens'], w, 0.0, 1e-4, expected_factor)
  np.testing.assert_allclose(model.loss_fn(params, batch, None)[0], ref, rtol=1e-5)


@pytest.fixture(scope='module')
def padded(setup):
  """The 3x5 batch with padded targets and no decoder_loss_weights, and its logits."""
  module, params, batch, _ = setup
  tgt = np.array(batch['decoder_target_tokens'])
  tgt[0, 3:], tgt[1, 1:], tgt[2, 4:] = 0, 0, 0
  padded = {'encoder_input_tokens': batch['encoder_input_tokens'],
            'decoder_input_tokens': np.concatenate([np.zeros((3, 1), int), tgt[:, :-1]], 1),
            'decoder_target_tokens': tgt}
  logits = np.asarray(module.apply({'params': params}, padded['encoder_input_tokens'],
                                   padded['decoder_input_tokens'], tgt, enable_dropout=False),
                      np.float64)
  return padded, logits


@pytest.mark.parametrize('factor', ['NUM_REAL_TARGET_TOKENS', 'num_real_target_tokens',
                                    'NUM_TOTAL_TARGET_TOKENS', 'Num_Total_Target_Tokens',
                                    'average_per_sequence', 3.0, None])
def test_loss_without_weights_is_t5xs(setup, padded, factor):
  """T5X (losses.get_loss_normalizing_factor_and_weights): a named factor, in any case,
  builds the weights as targets > 0, so padding adds nothing; a number or None keeps
  T5X's unweighted sum over every position, padding included."""
  module, params, _, _ = setup
  batch, logits = padded
  tgt = batch['decoder_target_tokens']
  real = (tgt > 0).astype(np.float64)
  name = factor.upper() if isinstance(factor, str) else None
  if name == 'NUM_REAL_TARGET_TOKENS':
    weights, norm = real, real.sum()
  elif name == 'NUM_TOTAL_TARGET_TOKENS':
    weights, norm = real, tgt.size
  elif name == 'AVERAGE_PER_SEQUENCE':
    weights = real / real.sum(-1, keepdims=True)
    norm = weights.sum()
  else:
    weights, norm = np.ones_like(real), 1.0 if factor is None else factor
  ref, _ = np_loss(logits, tgt, weights, 0.1, 1e-4, norm)
  model = models.EncoderDecoderModel(module, label_smoothing=0.1, z_loss=1e-4,
                                     loss_normalizing_factor=factor)
  loss, metrics = model.loss_fn(params, batch, None)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics['weight_sum'], weights.sum(), rtol=1e-6)
  if name:  # the padding really is left out: the unweighted sum differs
    unweighted, _ = np_loss(logits, tgt, np.ones_like(real), 0.1, 1e-4, norm)
    assert not np.isclose(ref, unweighted, rtol=1e-3)


TARGETS = np.array([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0]])


@pytest.mark.parametrize('batch,factor,norm,weights', [
    # t5x losses_test SpecialLossNormalizingFactorTest, case by case.
    ({'decoder_target_tokens': TARGETS}, 'NUM_REAL_TARGET_TOKENS', 6.0,
     [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
    ({'decoder_target_tokens': TARGETS}, 'NUM_TOTAL_TARGET_TOKENS', 10.0,
     [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
    ({'decoder_target_tokens': TARGETS}, 'AVERAGE_PER_SEQUENCE', 2.0,
     [[0.25, 0.25, 0.25, 0.25, 0], [0.5, 0.5, 0, 0, 0]]),
    ({'decoder_target_tokens': TARGETS,
      'decoder_loss_weights': np.array([[0.5, 1.0, 0.25, 2.0, 0.0], [1.0, 1.0, 0, 0, 0]])},
     'AVERAGE_PER_SEQUENCE', 2.0,
     [[0.5 / 3.75, 1.0 / 3.75, 0.25 / 3.75, 2.0 / 3.75, 0], [0.5, 0.5, 0, 0, 0]]),
    ({'decoder_target_tokens': np.array([[1, 2, 3, 4, 5], [5, 6, 7, 8, 0]]),
      'decoder_loss_weights': np.array([[0.5, 1.0, 0.25, 2.0, 1.5], [1.0, 2.0, 3.0, 4.0, 5.0]]),
      'decoder_positions': np.array([[0, 1, 2, 0, 0], [0, 0, 1, 0, 0]]),
      'decoder_segment_ids': np.array([[1, 1, 1, 2, 3], [1, 2, 2, 3, 0]])},
     'average_per_sequence', 6.0,
     [[0.5 / 1.75, 1.0 / 1.75, 0.25 / 1.75, 1.0, 1.0], [1.0, 0.4, 0.6, 1.0, 0.0]]),
])
def test_t5x_special_normalizer_cases(batch, factor, norm, weights):
  got_norm, got_weights = models.loss_normalizing_factor_and_weights(factor, batch)
  np.testing.assert_allclose(got_norm, norm, rtol=1e-5)
  np.testing.assert_allclose(got_weights, weights, rtol=1e-5)


def test_numeric_normalizer_passes_weights_through():
  batch = {'decoder_target_tokens': TARGETS}
  assert models.loss_normalizing_factor_and_weights(2.5, batch) == (2.5, None)
  assert models.loss_normalizing_factor_and_weights(None, batch) == (None, None)


def test_unknown_normalizer_is_rejected(setup):
  with pytest.raises(ValueError, match='NUM_REAL_TARGET_TOKENS'):
    models.EncoderDecoderModel(setup[0], loss_normalizing_factor='PER_TOKEN')


def test_score_batch_is_the_weighted_log_likelihood(setup):
  module, params, batch, logits = setup
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token_lp = np.take_along_axis(log_p, batch['decoder_target_tokens'][..., None], -1)[..., 0]
  expected = (token_lp * batch['decoder_loss_weights']).sum(-1)
  np.testing.assert_allclose(models.EncoderDecoderModel(module).score_batch(params, batch),
                             expected, rtol=1e-5)


def test_dropout_rng_turns_dropout_on_and_gradients_are_finite(setup):
  module, params, batch, _ = setup
  cfg = network.get_preset('tiny', vocab_size=VOCAB, dropout_rate=0.2).with_kv_heads(2)
  model = models.EncoderDecoderModel(network.Transformer(cfg), z_loss=1e-4)
  no_drop = model.loss_fn(params, batch, None)[0]
  drop = model.loss_fn(params, batch, jax.random.PRNGKey(1))[0]
  assert not np.isclose(no_drop, drop)
  grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, jax.random.PRNGKey(1))[0]))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_initial_variables_carry_logical_axes(setup):
  model = models.EncoderDecoderModel(setup[0])
  variables = model.get_initial_variables(
      jax.random.PRNGKey(0), {'encoder_input_tokens': (1, 4), 'decoder_input_tokens': (1, 3)})
  assert jax.tree.structure(variables['params']) == jax.tree.structure(
      jax.tree.map(lambda s: 0, variables['params_axes'],
                   is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  kv = variables['params']['decoder']['layers_0']['self_attention']['key']['kernel']
  assert kv.shape == (32, 2 * 8)
  assert tuple(variables['params_axes']['decoder']['layers_0']['self_attention']['key']
               ['kernel']) == ('embed', 'kv_heads')
