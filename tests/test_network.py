"""The T5.1.1 network: T5X's parameter tree, T5X parity, masks and configuration."""

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from gqa_jax import models, network

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny'


def flat_shapes(config):
  return {'/'.join(k): tuple(v.shape) for k, v in
          flatten_dict(network.param_shapes(config)).items()}


def t5x_t5_1_1_small_shapes():
  """T5X's T5.1.1-small tree, written out from its published layout (not from our code)."""
  d, nh, f, v = 512, 6 * 64, 1024, 32128
  shapes = {'token_embedder/embedding': (v, d), 'encoder/relpos_bias/rel_embedding': (6, 32),
            'decoder/relpos_bias/rel_embedding': (6, 32), 'encoder/encoder_norm/scale': (d,),
            'decoder/decoder_norm/scale': (d,), 'decoder/logits_dense/kernel': (d, v)}
  mlp = {'mlp/wi_0/kernel': (d, f), 'mlp/wi_1/kernel': (d, f), 'mlp/wo/kernel': (f, d)}
  attn = lambda name: {f'{name}/query/kernel': (d, nh), f'{name}/key/kernel': (d, nh),
                       f'{name}/value/kernel': (d, nh), f'{name}/out/kernel': (nh, d)}
  for i in range(8):
    enc = {'pre_attention_layer_norm/scale': (d,), 'pre_mlp_layer_norm/scale': (d,),
           **attn('attention'), **mlp}
    dec = {'pre_self_attention_layer_norm/scale': (d,), 'pre_cross_attention_layer_norm/scale': (d,),
           'pre_mlp_layer_norm/scale': (d,), **attn('self_attention'),
           **attn('encoder_decoder_attention'), **mlp}
    shapes.update({f'encoder/layers_{i}/{k}': s for k, s in enc.items()})
    shapes.update({f'decoder/layers_{i}/{k}': s for k, s in dec.items()})
  return shapes


def test_small_preset_has_t5x_names_and_shapes():
  assert flat_shapes(network.get_preset('small')) == t5x_t5_1_1_small_shapes()


def test_decoder_gqa2_changes_only_decoder_kv_kernels():
  mha = flat_shapes(network.get_preset('small'))
  gqa = flat_shapes(network.get_preset('small').with_kv_heads(2))
  assert set(mha) == set(gqa)
  changed = {k for k in mha if mha[k] != gqa[k]}
  expected = {f'decoder/layers_{i}/{a}/{p}/kernel' for i in range(8)
              for a in ('self_attention', 'encoder_decoder_attention') for p in ('key', 'value')}
  assert changed == expected
  assert all(gqa[k] == (512, 2 * 64) for k in changed)


def test_param_logical_axes_cover_every_parameter():
  cfg = network.get_preset('tiny').with_kv_heads(1)
  axes = flatten_dict(network.param_logical_axes(cfg))
  shapes = flatten_dict(network.param_shapes(cfg))
  assert set(axes) == set(shapes)
  for key, spec in axes.items():
    assert len(spec) == len(shapes[key].shape) and None not in tuple(spec), key
  assert tuple(axes[('decoder', 'layers_0', 'self_attention', 'key', 'kernel')]) == (
      'embed', 'kv_heads')


@pytest.mark.parametrize('field', ['encoder_kv_heads', 'decoder_self_kv_heads',
                                   'decoder_cross_kv_heads'])
@pytest.mark.parametrize('bad', [3, 0, 16])
def test_invalid_kv_heads_fail_at_config_construction(field, bad):
  with pytest.raises(ValueError) as err:
    network.T5Config(num_heads=8, **{field: bad})
  assert f'{field}={bad}' in str(err.value) and 'num_heads=8' in str(err.value)


def test_with_kv_heads_defaults_to_the_papers_stacks():
  cfg = network.get_preset('xxl').with_kv_heads(8)
  assert (cfg.kv_heads('encoder'), cfg.kv_heads('decoder_self'),
          cfg.kv_heads('decoder_cross')) == (64, 8, 8)
  with pytest.raises(ValueError, match='unknown attention stack'):
    cfg.with_kv_heads(8, stacks=['decoder'])
  with pytest.raises(ValueError, match='unknown model preset'):
    network.get_preset('huge')


def tiny_batch(rng, vocab, b=2, s=9, t=6):
  enc = rng.randint(2, vocab, (b, s))
  enc[0, -3:] = 0  # padding
  dec_tgt = rng.randint(2, vocab, (b, t))
  dec_in = np.concatenate([np.zeros((b, 1), int), dec_tgt[:, :-1]], axis=1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': dec_tgt, 'decoder_loss_weights': np.ones((b, t), np.float32)}


@pytest.mark.parametrize('k', [1, 2, 4])
def test_packed_segments_equal_separate_sequences(k):
  """Two examples packed in one row give the same logits as each run alone: checks the
  segment masks (relative positions make packing exact for T5)."""
  cfg = network.get_preset('tiny', vocab_size=50).with_kv_heads(k, network.STACKS)
  params = network.init_params(cfg, jax.random.PRNGKey(k))
  rng = np.random.RandomState(k)
  a, b = tiny_batch(rng, 50, b=1, s=4, t=3), tiny_batch(rng, 50, b=1, s=5, t=4)
  a['encoder_input_tokens'][:] = rng.randint(2, 50, (1, 4))
  module = network.Transformer(cfg)
  run = lambda x, **kw: module.apply({'params': params}, x['encoder_input_tokens'],
                                     x['decoder_input_tokens'], x['decoder_target_tokens'],
                                     enable_dropout=False, **kw)
  cat = lambda key: np.concatenate([a[key], b[key]], axis=1)
  packed = {key: cat(key) for key in ('encoder_input_tokens', 'decoder_input_tokens',
                                      'decoder_target_tokens')}
  seg = lambda n1, n2: np.array([[1] * n1 + [2] * n2])
  logits = run(packed, encoder_segment_ids=seg(4, 5), decoder_segment_ids=seg(3, 4))
  np.testing.assert_allclose(logits[:, :3], run(a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 3:], run(b), atol=1e-5)


def test_tied_logits_are_attend_scaled_by_rsqrt_d():
  cfg = network.get_preset('tiny', vocab_size=40, logits_via_embedding=True)
  tied = network.init_params(cfg, jax.random.PRNGKey(0))
  assert 'logits_dense' not in tied['decoder']
  untied = jax.tree.map(lambda x: x, tied)
  untied['decoder']['logits_dense'] = {
      'kernel': tied['token_embedder']['embedding'].T / np.sqrt(cfg.emb_dim)}
  batch = tiny_batch(np.random.RandomState(0), 40)
  args = (batch['encoder_input_tokens'], batch['decoder_input_tokens'],
          batch['decoder_target_tokens'])
  out_tied = network.Transformer(cfg).apply({'params': tied}, *args, enable_dropout=False)
  cfg_untied = dataclasses.replace(cfg, logits_via_embedding=False)
  out_untied = network.Transformer(cfg_untied).apply({'params': untied}, *args,
                                                     enable_dropout=False)
  np.testing.assert_allclose(out_tied, out_untied, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_only_with_enable_dropout():
  cfg = network.get_preset('tiny', vocab_size=40, dropout_rate=0.3)
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  batch = tiny_batch(np.random.RandomState(0), 40)
  args = (batch['encoder_input_tokens'], batch['decoder_input_tokens'],
          batch['decoder_target_tokens'])
  module = network.Transformer(cfg)
  off = module.apply({'params': params}, *args, enable_dropout=False)
  on = lambda seed: module.apply({'params': params}, *args, enable_dropout=True,
                                 rngs={'dropout': jax.random.PRNGKey(seed)})
  assert not np.allclose(off, on(1))
  np.testing.assert_array_equal(on(1), on(1))


def zero_patterns(x):
  """[B, L, D] -> [B, L, D] bool: where dropout zeroed an entry (dropout is the only
  source of exact zeros in these outputs)."""
  return np.asarray(x) == 0


def test_final_encoder_dropout_mask_varies_along_length():
  """T5X's encoder output dropout (after encoder_norm) draws a full [B, S, D] mask; a
  mask broadcast over length would zero the same features at every position."""
  cfg = network.get_preset('tiny', vocab_size=40, dropout_rate=0.5)
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  batch = tiny_batch(np.random.RandomState(0), 40, s=12)
  module = network.Transformer(cfg)
  encode = lambda **kw: module.apply({'params': params}, batch['encoder_input_tokens'],
                                     method=module.encode, **kw)
  off = encode(enable_dropout=False)
  assert not zero_patterns(off).any()
  zeros = zero_patterns(encode(enable_dropout=True, rngs={'dropout': jax.random.PRNGKey(3)}))
  assert 0.3 < zeros.mean() < 0.7  # rate 0.5 on every entry
  for b in range(zeros.shape[0]):
    assert len({row.tobytes() for row in zeros[b]}) > 1, 'mask is shared over length'


def test_final_decoder_dropout_mask_is_shared_over_length():
  """T5X's decoder dropout after decoder_norm broadcasts over length (broadcast_dims
  (-2,)). An identity logits kernel makes the logits the dropped decoder output."""
  cfg = network.get_preset('tiny', vocab_size=32, dropout_rate=0.5)
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  params['decoder']['logits_dense']['kernel'] = np.eye(32, dtype=np.float32)
  batch = tiny_batch(np.random.RandomState(0), 32, t=8)
  args = (batch['encoder_input_tokens'], batch['decoder_input_tokens'],
          batch['decoder_target_tokens'])
  module = network.Transformer(cfg)
  assert not zero_patterns(module.apply({'params': params}, *args,
                                        enable_dropout=False)).any()
  zeros = zero_patterns(module.apply({'params': params}, *args, enable_dropout=True,
                                     rngs={'dropout': jax.random.PRNGKey(3)}))
  assert 0.3 < zeros.mean() < 0.7
  for b in range(zeros.shape[0]):
    assert (zeros[b] == zeros[b, :1]).all(), 'T5X shares this mask over length'
  assert (zeros[0] != zeros[1]).any()  # one mask per example, not per batch


# Every dropout in T5X's t5x/examples/t5/network.py and layers.py (MlpBlock), by the
# module that owns it, in creation order: all share one mask over length
# (broadcast_dims=(-2,)) except the encoder's output dropout after encoder_norm.
T5X_DROPOUT_BROADCAST_DIMS = {
    ('encoder', 'Dropout_0'): (-2,),  # embedding
    ('encoder', 'Dropout_1'): (),  # after encoder_norm
    ('encoder', 'layers_0', 'Dropout_0'): (-2,),  # after attention
    ('encoder', 'layers_0', 'Dropout_1'): (-2,),  # after mlp
    ('encoder', 'layers_0', 'mlp', 'Dropout_0'): (-2,),  # mlp hidden
    ('decoder', 'Dropout_0'): (-2,),  # embedding
    ('decoder', 'Dropout_1'): (-2,),  # after decoder_norm
    ('decoder', 'layers_0', 'Dropout_0'): (-2,),  # after self-attention
    ('decoder', 'layers_0', 'Dropout_1'): (-2,),  # after cross-attention
    ('decoder', 'layers_0', 'Dropout_2'): (-2,),  # after mlp
    ('decoder', 'layers_0', 'mlp', 'Dropout_0'): (-2,),  # mlp hidden
}


def test_every_dropout_broadcasts_as_t5x():
  cfg = network.get_preset('tiny', vocab_size=40, dropout_rate=0.1, num_encoder_layers=1,
                           num_decoder_layers=1)
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  batch = tiny_batch(np.random.RandomState(0), 40)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout) and context.method_name == '__call__':
      seen[context.module.path] = tuple(context.module.broadcast_dims)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    network.Transformer(cfg).apply(
        {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], enable_dropout=True,
        rngs={'dropout': jax.random.PRNGKey(0)})
  assert seen == T5X_DROPOUT_BROADCAST_DIMS


def test_tied_logits_in_float32_from_bfloat16_activations():
  """T5X's shared embedding attends in float32 (attend_dtype): logits are the bfloat16
  decoder output, upcast, times the float32 embedding, over sqrt(D). A bfloat16 product
  is off by ~1e-2 here."""
  cfg = network.get_preset('tiny', vocab_size=40, logits_via_embedding=True,
                           dtype='bfloat16')
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  batch = tiny_batch(np.random.RandomState(0), 40)
  module = network.Transformer(cfg)
  logits, state = module.apply(
      {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
      batch['decoder_target_tokens'], enable_dropout=False, capture_intermediates=True,
      mutable=['intermediates'])
  y = state['intermediates']['decoder']['decoder_norm']['__call__'][0]  # [B, T, D]
  assert y.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  emb = np.asarray(params['token_embedder']['embedding'], np.float32)
  ref = np.asarray(y, np.float32) @ emb.T / np.float32(np.sqrt(cfg.emb_dim))
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_float32_params():
  cfg = network.get_preset('tiny', vocab_size=40, dtype='bfloat16')
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  batch = tiny_batch(np.random.RandomState(0), 40)
  module = network.Transformer(cfg)
  enc = module.apply({'params': params}, batch['encoder_input_tokens'], enable_dropout=False,
                     method=module.encode)
  assert enc.dtype == jnp.bfloat16


# --- T5X parity: fixtures written by T5X's own code ------------------------------------

needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')


def load_fixture():
  cfg = network.T5Config(**json.loads((FIXTURE / 'config.json').read_text()))
  flat = np.load(FIXTURE / 'params_flat.npz')
  params = unflatten_dict({tuple(k.split('/')): flat[k] for k in flat.files})
  return cfg, params, dict(np.load(FIXTURE / 'reference_logits.npz'))


@needs_fixture
def test_t5x_fixture_tree_matches_ours():
  cfg, params, _ = load_fixture()
  theirs = {'/'.join(k): v.shape for k, v in flatten_dict(params).items()}
  assert theirs == flat_shapes(cfg)


@needs_fixture
def test_t5x_fixture_logits_encoder_output_and_scores():
  cfg, params, ref = load_fixture()
  module = network.Transformer(cfg)
  logits = module.apply({'params': params}, ref['encoder_input_tokens'],
                        ref['decoder_input_tokens'], ref['decoder_target_tokens'],
                        enable_dropout=False)
  np.testing.assert_allclose(logits, ref['logits'], atol=1e-4)
  encoded = module.apply({'params': params}, ref['encoder_input_tokens'],
                         enable_dropout=False, method=module.encode)
  np.testing.assert_allclose(encoded, ref['encoder_output'], atol=1e-4)
  scores = models.EncoderDecoderModel(module).score_batch(params, ref)
  np.testing.assert_allclose(scores, ref['score_batch'], rtol=1e-5, atol=1e-4)
