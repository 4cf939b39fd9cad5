"""The work around GQA as options of the same attention: WGQA (learned KV-head weights),
SQA (fewer query heads) and CLA / MLKV (K/V projected by some layers, reused by the
next ones). Oracles: the base model (options at their neutral values give its tree and
outputs bit for bit), mean-pooled GQA (WGQA at 1/group size), the fold of WGQA into
plain GQA, and the teacher-forced forward pass for cached decoding."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_jax import checkpoints, convert, layers, network, optimizers

VOCAB, B, S, T = 40, 2, 7, 6


def _config(**overrides):
  base = network.get_preset('tiny', vocab_size=VOCAB, num_encoder_layers=3,
                            num_decoder_layers=3)
  return dataclasses.replace(base, **overrides)


def _tokens(seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, (B, S)).astype(np.int32)
  enc[1, -2:] = 0
  dec = rng.randint(2, VOCAB, (B, T)).astype(np.int32)
  dec[:, 0] = 0
  return enc, dec


def _forward(cfg, params, seed=0):
  enc, dec = _tokens(seed)
  return np.asarray(network.Transformer(cfg).apply(
      {'params': params}, enc, dec, np.ones_like(dec), enable_dropout=False))


def _flat(params):
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _cached_logits(cfg, params, seed=0):
  """Logits of decoding `dec` token by token with the cache, and the cache itself."""
  module = network.Transformer(cfg)
  enc, dec = _tokens(seed)
  encoded = module.apply({'params': params}, enc, enable_dropout=False, method=module.encode)
  _, variables = module.apply({'params': params}, encoded, enc, dec, dec, enable_dropout=False,
                              decode=True, max_decode_length=T, mutable=['cache'],
                              method=module.decode)
  cache, steps = variables['cache'], []
  for i in range(T):
    logits, variables = module.apply(
        {'params': params, 'cache': cache}, None, enc, dec[:, i:i + 1], dec[:, i:i + 1],
        enable_dropout=False, decode=True, max_decode_length=T, mutable=['cache'],
        method=module.decode)
    cache = variables['cache']
    steps.append(np.asarray(logits[:, 0]))
  return np.stack(steps, 1), cache


# == Layer lists ======================================================================
def test_cla_and_mlkv_producer_layers_by_hand():
  assert network.cla_layers(6, 2) == (0, 2, 4)
  assert network.cla_layers(5, 2) == (0, 1, 3)      # the short group first
  assert network.cla_layers(7, 3) == (0, 1, 4)
  assert network.cla_layers(4, 1) == (0, 1, 2, 3)
  assert network.mlkv_layers(6, 3) == (0, 2, 4)     # [0] + [int((i+1) * 6 / 3)]
  assert network.mlkv_layers(5, 2) == (0, 2)
  assert network.mlkv_layers(24, 4) == (0, 6, 12, 18)
  assert network.mlkv_layers(4, 1) == (0,)
  cfg = _config(decoder_self_kv_layers=(0, 2))
  assert [cfg.kv_producer('decoder_self', i) for i in range(3)] == [0, 0, 2]
  assert [cfg.kv_producer('decoder_cross', i) for i in range(3)] == [0, 1, 2]


@pytest.mark.parametrize('field,value,match', [
    ('decoder_self_kv_layers', (1, 2), 'from layer 0'),
    ('decoder_self_kv_layers', (0, 3), 'below 3'),
    ('decoder_cross_kv_layers', (0, 2, 1), 'increasing'),
    ('encoder_kv_layers', (), 'from layer 0'),
    ('decoder_self_kv_weights', 'diag', "'scalar', 'row', 'col'"),
    ('kv_weights_init', 'zeros', "'mean'"),
    ('encoder_query_heads', 0, 'positive number of query heads'),
])
def test_invalid_options_fail_at_construction_naming_the_fix(field, value, match):
  with pytest.raises(ValueError, match=match):
    _config(**{field: value})


def test_sqa_kv_heads_must_divide_the_query_heads():
  with pytest.raises(ValueError, match=r'encoder_kv_heads=3 is invalid for num_heads=2'):
    _config(encoder_query_heads=2, encoder_kv_heads=3)
  cfg = _config(encoder_query_heads=2)
  assert cfg.kv_heads('encoder') == 2  # None: as many KV heads as query heads


# == Neutral settings are the base model ==============================================
def test_neutral_settings_give_the_base_tree_and_outputs_bit_for_bit():
  base = _config()
  params = network.init_params(base, jax.random.PRNGKey(0))
  reference = _forward(base, params)
  for neutral in (dict(encoder_query_heads=4, decoder_self_query_heads=4,
                       decoder_cross_query_heads=4),
                  dict(encoder_kv_layers=(0, 1, 2), decoder_self_kv_layers=(0, 1, 2),
                       decoder_cross_kv_layers=network.cla_layers(3, 1))):
    cfg = _config(**neutral)
    assert network.flat_param_shapes(cfg) == network.flat_param_shapes(base)
    np.testing.assert_array_equal(_forward(cfg, params), reference)


# == SQA ===========================================================================
def test_sqa_shrinks_the_query_out_and_position_bias_of_its_stack():
  cfg = _config(encoder_query_heads=2, encoder_kv_heads=1)
  shapes = network.flat_param_shapes(cfg)
  h, d = cfg.head_dim, cfg.emb_dim
  assert shapes['encoder/layers_0/attention/query/kernel'] == (d, 2 * h)
  assert shapes['encoder/layers_0/attention/key/kernel'] == (d, 1 * h)
  assert shapes['encoder/layers_0/attention/out/kernel'] == (2 * h, d)
  assert shapes['encoder/relpos_bias/rel_embedding'] == (2, 32)
  assert shapes['decoder/relpos_bias/rel_embedding'] == (4, 32)
  assert shapes['decoder/layers_0/self_attention/query/kernel'] == (d, 4 * h)


# == WGQA ============================================================================
def _mha_params(cfg, seed=0):
  return network.init_params(cfg.with_kv_heads(cfg.num_heads), jax.random.PRNGKey(seed))


@pytest.mark.parametrize('kind', layers.KV_WEIGHT_SHAPES)
@pytest.mark.parametrize('k', [1, 2])
def test_wgqa_at_one_over_group_size_is_mean_pooled_gqa(kind, k):
  """Weights initialised to K/N on the MHA kernels give the mean-pooled GQA-K model."""
  base = _config()
  mha = _mha_params(base)
  wgqa = _config(decoder_self_kv_heads=k, decoder_cross_kv_heads=k,
                 decoder_self_kv_weights=kind, decoder_cross_kv_weights=kind)
  fresh = _flat(network.init_params(wgqa, jax.random.PRNGKey(1)))
  flat = _flat(mha)
  for name, value in fresh.items():
    if name.endswith('_weights'):
      np.testing.assert_array_equal(value, np.full(value.shape, k / base.num_heads))
      flat[name] = value
  assert set(flat) == set(fresh)
  assert all(flat[n].shape == fresh[n].shape for n in flat)
  params = traverse_util.unflatten_dict({tuple(n.split('/')): v for n, v in flat.items()})
  gqa_cfg = base.with_kv_heads(k)
  pooled = convert.pool_params(mha, base, gqa_cfg)
  np.testing.assert_allclose(_forward(wgqa, params), _forward(gqa_cfg, pooled),
                             atol=2e-5, rtol=0)


@pytest.mark.parametrize('kind', layers.KV_WEIGHT_SHAPES)
def test_pool_kv_kernel_by_hand(kind):
  rng = np.random.RandomState(0)
  d, n, k, h = 5, 4, 2, 3
  kernel = rng.randn(d, n * h).astype(np.float32)
  weights = rng.randn(*layers.kv_weight_shape(kind, n, d, h)).astype(np.float32)
  got = np.asarray(layers.pool_kv_kernel(jnp.asarray(kernel), jnp.asarray(weights), kind, k))
  heads = kernel.reshape(d, n, h)
  for g in range(k):
    expected = np.zeros((d, h), np.float64)
    for src in range(g * n // k, (g + 1) * n // k):
      w = weights[src]
      w = w if kind == 'scalar' else w[:, None] if kind == 'row' else w[None, :]
      expected += w * heads[:, src]
    np.testing.assert_allclose(got[:, g * h:(g + 1) * h], expected, atol=1e-5)


@pytest.mark.parametrize('kind', layers.KV_WEIGHT_SHAPES)
def test_folding_random_wgqa_weights_into_plain_gqa_is_exact(kind):
  cfg = _config(decoder_self_kv_heads=2, decoder_cross_kv_heads=2,
                decoder_self_kv_weights=kind, decoder_cross_kv_weights=kind,
                kv_weights_init='normal')
  params = network.init_params(cfg, jax.random.PRNGKey(3))
  folded, plain = convert.fold_kv_weights(params, cfg)
  assert plain == dataclasses.replace(cfg, decoder_self_kv_weights=None,
                                     decoder_cross_kv_weights=None)
  assert network.flat_param_shapes(plain) == {n: v.shape for n, v in _flat(folded).items()}
  np.testing.assert_allclose(_forward(plain, folded), _forward(cfg, params), atol=2e-5, rtol=0)


# == Cached decoding, every variant ====================================================
VARIANTS = {
    'wgqa-scalar': lambda k: dict(decoder_self_kv_weights='scalar',
                                  decoder_cross_kv_weights='scalar', kv_weights_init='normal'),
    'wgqa-row': lambda k: dict(decoder_self_kv_weights='row', decoder_cross_kv_weights='row',
                               kv_weights_init='normal'),
    'wgqa-col': lambda k: dict(decoder_self_kv_weights='col', decoder_cross_kv_weights='col',
                               kv_weights_init='normal'),
    'sqa': lambda k: dict(decoder_self_query_heads=2 * k if k < 4 else 4,
                          decoder_cross_query_heads=2 * k if k < 4 else 4,
                          encoder_query_heads=2, encoder_kv_heads=1),
    'cla2': lambda k: dict(decoder_self_kv_layers=network.cla_layers(3, 2),
                           decoder_cross_kv_layers=network.cla_layers(3, 2),
                           encoder_kv_layers=network.cla_layers(3, 2)),
    'mlkv1': lambda k: dict(decoder_self_kv_layers=network.mlkv_layers(3, 1),
                            decoder_cross_kv_layers=network.mlkv_layers(3, 1)),
}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.parametrize('k', [1, 2, 4])
def test_cached_decoding_equals_the_forward_pass(variant, k):
  cfg = _config(decoder_self_kv_heads=k, decoder_cross_kv_heads=k, **VARIANTS[variant](k))
  params = network.init_params(cfg, jax.random.PRNGKey(k))
  full = _forward(cfg, params)
  cached, cache = _cached_logits(cfg, params)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=0)
  # The cache: K heads per producer layer, nothing but a position elsewhere.
  for i in range(cfg.num_decoder_layers):
    layer = cache['decoder'][f'layers_{i}']
    for stack, name in (('decoder_self', 'self_attention'),
                        ('decoder_cross', 'encoder_decoder_attention')):
      held = layer.get(name, {})
      if cfg.kv_producer(stack, i) == i:
        assert held['cached_key'].shape[1] == k, (stack, i)
      else:
        assert 'cached_key' not in held and 'cached_value' not in held, (stack, i)


# == The config record (gqa_jax.json) ==================================================
def test_plain_records_are_unchanged_and_options_round_trip():
  from gqa_jax.checkpoints import orbax
  plain = _config().to_dict()
  assert not set(plain) & set(network.OPTION_FIELDS)
  cfg = _config(encoder_query_heads=2, encoder_kv_heads=1, decoder_self_kv_weights='row',
                kv_weights_init='normal', decoder_cross_kv_layers=network.cla_layers(3, 2))
  record = json.loads(json.dumps({'config': cfg.to_dict()}))
  assert record['config']['decoder_cross_kv_layers'] == [0, 1]
  assert orbax.check_metadata(record, 'gqa_jax.json')['config'] == cfg
  record['config']['decoder_self_kv_weights'] = 'diag'
  with pytest.raises(Exception, match="invalid values.*decoder_self_kv_weights='diag'"):
    orbax.check_metadata(record, 'gqa_jax.json')


def test_gin_files_select_each_option():
  from gqa_jax import gin_utils
  load = lambda files, bindings=(): gin_utils.load_config(
      ['models/t5_1_1/small.gin', *files], list(bindings), check_macros=False)
  cfg = load(['attention/mqa.gin', 'attention/cla.gin'])
  assert cfg.decoder_self_kv_layers == cfg.decoder_cross_kv_layers == (0, 2, 4, 6)
  assert cfg.kv_heads('decoder_self') == 1 and cfg.encoder_kv_layers is None
  cfg = load(['attention/cla.gin'], ["KV_LAYERS = 'mlkv3'"])
  assert cfg.decoder_cross_kv_layers == (0, 2, 5)     # MLKV-3 of 8 layers
  cfg = load(['attention/wgqa.gin'], ['NUM_KV_HEADS = 2', "WGQA_WEIGHTS = 'col'"])
  assert (cfg.decoder_self_kv_weights, cfg.kv_heads('decoder_cross')) == ('col', 2)
  cfg = load(['attention/sqa.gin'], ['QUERY_HEADS = 2', 'NUM_KV_HEADS = 1'])
  assert (cfg.query_heads('encoder'), cfg.kv_heads('encoder')) == (2, 1)
  with pytest.raises(ValueError, match="'cla<s>'"):
    load(['attention/cla.gin'], ["KV_LAYERS = 'every2'"])


# == Conversion =========================================================================
def _read(path):
  source = checkpoints.open_checkpoint(path)
  params = {k: t.read() for k, t in source.params.items()}
  return source, params, {k: t.read() for k, t in (source.opt_state or {}).items()}


def _tree(flat):
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


@pytest.mark.parametrize('kind', layers.KV_WEIGHT_SHAPES)
def test_convert_to_wgqa_then_fold_back_to_plain_gqa(tmp_path, kind):
  """--method wgqa keeps the MHA kernels and adds weights at 1/group size (so the model
  is mean-pooled GQA); --fold of random weights gives plain GQA with the same outputs."""
  from test_convert import logits, tiny_source
  cfg, params, _, src = tiny_source(tmp_path)
  convert.convert(src, tmp_path / 'w', 2, method='wgqa', wgqa_weights=kind, progress=False)
  wgqa, got, slots = _read(tmp_path / 'w')
  assert wgqa.config.decoder_self_kv_weights == kind and wgqa.config.kv_heads('decoder_self') == 2
  assert wgqa.metadata['wgqa_weights'] == kind
  weights = [n for n in got if n.endswith('_weights')]
  assert len(weights) == 2 * 2 * cfg.num_decoder_layers  # key and value, self and cross
  for name in weights:
    np.testing.assert_array_equal(got[name], np.full(got[name].shape, 0.5, np.float32))
    assert {f'param_states/{name}/{s}' for s in optimizers.SLOTS} <= set(slots)
  for name, value in params.items():  # the source's tensors, unchanged
    np.testing.assert_array_equal(got[name], value)
  mean = convert.pool_params(_tree(params), cfg, cfg.with_kv_heads(2))
  f32 = lambda c: dataclasses.replace(c, dtype='float32')  # T5X sources record bfloat16
  np.testing.assert_allclose(logits(f32(wgqa.config), got),
                             logits(cfg.with_kv_heads(2), traverse_util.flatten_dict(
                                 mean, sep='/')), atol=2e-5)
  # Random weights (as training leaves them), then the exact fold.
  rng = np.random.default_rng(0)
  for name in weights:
    got[name] = rng.standard_normal(got[name].shape).astype(np.float32)
  trained = tmp_path / 'trained' / 'checkpoint_7'
  from gqa_jax.checkpoints import t5x
  t5x.write_all(trained, [(f'target/{k}', v) for k, v in got.items()]
                + [('state/step', np.int32(7))])
  (trained / 'gqa_jax.json').write_text(json.dumps({'config': wgqa.config.to_dict()}))
  convert.convert(trained.parent, tmp_path / 'f', None, fold=True, progress=False)
  folded, flat, _ = _read(tmp_path / 'f')
  assert folded.config == dataclasses.replace(wgqa.config, decoder_self_kv_weights=None,
                                              decoder_cross_kv_weights=None)
  assert not [n for n in flat if n.endswith('_weights')]
  np.testing.assert_allclose(logits(f32(folded.config), flat), logits(f32(wgqa.config), got),
                             atol=2e-5)


@pytest.mark.parametrize('method', convert.LAYER_METHODS)
def test_convert_to_cla_keeps_producer_layers_made_by_the_layer_method(tmp_path, method):
  from test_convert import tiny_source
  cfg, params, _, src = tiny_source(tmp_path)
  convert.convert(src, tmp_path / 'c', 1, kv_layers='cla2', layer_method=method,
                  progress=False)
  out, got, slots = _read(tmp_path / 'c')
  assert out.config.decoder_self_kv_layers == (0,) == out.config.decoder_cross_kv_layers
  assert out.metadata['kv_layers'] == 'cla2' and out.metadata['layer_method'] == method
  assert 'decoder/layers_1/self_attention/key/kernel' not in got
  assert not [s for s in slots if 'layers_1/self_attention/key' in s]
  mqa = lambda layer: convert.pool_kv(
      params[f'decoder/layers_{layer}/encoder_decoder_attention/value/kernel'], 4, 1, 8, 'mean')
  expected = {'first': mqa(0), 'mean': (mqa(0) + mqa(1)) / 2, 'mlkv': (mqa(0) + mqa(1)) / 2}
  np.testing.assert_allclose(got['decoder/layers_0/encoder_decoder_attention/value/kernel'],
                             expected[method], atol=1e-6)
  # Pooled to one head: a changed kernel, whose Adafactor moments restart.
  assert not np.any(slots['param_states/decoder/layers_0/self_attention/key/kernel/v_row'])
  assert np.any(slots['param_states/decoder/layers_0/self_attention/query/kernel/v_row'])
  mlkv3 = network.mlkv_layers(5, 3)
  assert mlkv3 == (0, 1, 3)


def test_mlkv_running_average_folds_in_ascending_order(tmp_path):
  """Three layers into one producer: ((W0 + W1) / 2 + W2) / 2, not their mean."""
  from test_convert import tiny_source
  _, params, _, src = tiny_source(tmp_path)
  # the tiny preset has 2 decoder layers: a 3-layer group needs a deeper source
  cfg = network.get_preset('tiny', vocab_size=64, dtype='float32', num_decoder_layers=3)
  flat = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(
      network.init_params(cfg, jax.random.PRNGKey(2))).items()}
  from gqa_jax.checkpoints import t5x
  t5x.write_all(tmp_path / 'deep' / 'checkpoint_1', [(f'target/{k}', v) for k, v in flat.items()]
                + [('state/step', np.int32(1))])
  convert.convert(tmp_path / 'deep', tmp_path / 'm', None, kv_layers='mlkv1',
                  layer_method='mlkv', progress=False)
  _, got, _ = _read(tmp_path / 'm')
  w = [flat[f'decoder/layers_{i}/self_attention/key/kernel'] for i in range(3)]
  np.testing.assert_allclose(got['decoder/layers_0/self_attention/key/kernel'],
                             ((w[0] + w[1]) / 2 + w[2]) / 2, atol=1e-6)


def test_convert_refuses_what_cannot_be_done(tmp_path):
  from test_convert import tiny_source
  _, _, _, src = tiny_source(tmp_path)
  convert.convert(src, tmp_path / 'g', 2, progress=False)
  with pytest.raises(convert.ConversionError, match='convert the MHA checkpoint'):
    convert.convert(tmp_path / 'g', tmp_path / 'x', 1, method='wgqa', progress=False)
  with pytest.raises(convert.ConversionError, match='no WGQA weights'):
    convert.convert(src, tmp_path / 'x', None, fold=True, progress=False)
  with pytest.raises(convert.ConversionError, match="'cla<s>'"):
    convert.convert(src, tmp_path / 'x', None, kv_layers='every2', progress=False)
  assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('variant', ['cla2', 'mlkv1', 'wgqa-col', 'sqa'])
def test_info_counts_the_cache_that_decoding_allocates(variant):
  from gqa_jax import info
  from gqa_jax.experiments import bench
  k = 2
  cfg = _config(decoder_self_kv_heads=k, decoder_cross_kv_heads=k, **VARIANTS[variant](k))
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  _, cache = _cached_logits(cfg, params)
  counted = info.cache_bytes(cfg, input_length=S, output_length=T, batch_size=B,
                             element_bytes=4)
  assert counted['total_per_batch'] == bench.cache_nbytes(cache)
  if variant.startswith(('cla', 'mlkv')):
    assert info.options(cfg)[0].startswith('encoder: K/V in layers') or 'K/V in layers' in \
        ' '.join(info.options(cfg))


@pytest.mark.parametrize('variant', ['cla2', 'mlkv1', 'sqa'])
def test_the_config_is_inferred_from_tensor_shapes_without_its_record(variant):
  """`gqa_jax.json` lost: SQA's query heads and CLA/MLKV's producer layers are read off the
  shapes; WGQA's KV heads are in no shape, so its loss is an error naming the fix."""
  from gqa_jax.checkpoints import base
  cfg = _config(decoder_self_kv_heads=2, decoder_cross_kv_heads=2, **VARIANTS[variant](2))
  inferred = base.infer_config(network.flat_param_shapes(cfg), dtype=cfg.dtype)
  assert network.flat_param_shapes(inferred) == network.flat_param_shapes(cfg)
  for stack in network.STACKS:
    assert inferred.query_heads(stack) == cfg.query_heads(stack)
    assert inferred.kv_heads(stack) == cfg.kv_heads(stack)
    assert [inferred.kv_producer(stack, i) for i in range(3)] == \
        [cfg.kv_producer(stack, i) for i in range(3)]
  wgqa = _config(decoder_self_kv_heads=2, decoder_self_kv_weights='row')
  with pytest.raises(Exception, match='WGQA checkpoint.*restore that file'):
    base.infer_config(network.flat_param_shapes(wgqa))
