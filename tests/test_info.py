"""gqa_jax.info against real arrays: caches built by decoding, parameters from init."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from gqa_jax import info
from gqa_jax import network

B, S_IN, L_OUT = 2, 5, 3  # distinct, so that a swapped length shows up


def _real_cache_nbytes(config):
  """(self, cross) bytes of the cached_key/cached_value arrays of a real decode call."""
  # Cache sizes do not depend on parameter values: constant weights skip a slow init.
  params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype),
                                  network.param_shapes(config))
  model = network.Transformer(config)
  enc_tokens = jnp.ones((B, S_IN), jnp.int32)
  dec_tokens = jnp.ones((B, L_OUT), jnp.int32)

  @jax.jit
  def init_cache(params):
    encoded = model.apply({'params': params}, enc_tokens, enable_dropout=False,
                          method='encode')
    return model.apply({'params': params}, encoded, enc_tokens, dec_tokens, dec_tokens,
                       enable_dropout=False, decode=True, max_decode_length=L_OUT,
                       mutable=['cache'], method='decode')[1]

  state = init_cache(params)
  nbytes = {'self_attention': 0, 'encoder_decoder_attention': 0}
  for path, leaf in traverse_util.flatten_dict(state['cache']).items():
    if path[-1] in ('cached_key', 'cached_value'):
      assert leaf.dtype == jnp.dtype(config.dtype)
      nbytes[path[-2]] += leaf.nbytes
  assert set(nbytes) == {'self_attention', 'encoder_decoder_attention'}
  return nbytes['self_attention'], nbytes['encoder_decoder_attention']


def _tiny(**kw):
  # A small vocabulary keeps init fast; neither the cache nor the K/V kernels depend on it.
  return network.get_preset('tiny', vocab_size=128, **kw)


def test_report_cache_bytes_equal_real_cache_arrays():
  records = info.report(_tiny(), input_length=S_IN, output_length=L_OUT, batch_size=B)
  assert [r['variant'] for r in records] == ['MHA', 'GQA-2', 'MQA']
  for r in records:
    self_bytes, cross_bytes = _real_cache_nbytes(_tiny().with_kv_heads(r['num_kv_heads']))
    assert r['cache_bytes_self_per_sample'] * B == self_bytes
    assert r['cache_bytes_self_per_token'] * L_OUT * B == self_bytes
    assert r['cache_bytes_cross_per_sample'] * B == cross_bytes
    assert r['cache_bytes_total_per_batch'] == self_bytes + cross_bytes
    assert r['cache_bytes_encoder_per_sample'] == 0


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_cache_bytes_per_stack_and_dtype(dtype):
  # Different K per stack catches a self/cross mix-up; bfloat16 checks the element size.
  config = _tiny(dtype=dtype, decoder_self_kv_heads=2, decoder_cross_kv_heads=1)
  element_bytes = info.bytes_per_element(config)
  assert element_bytes == {'float32': 4, 'bfloat16': 2}[dtype]
  got = info.cache_bytes(config, S_IN, L_OUT, B, element_bytes)
  self_bytes, cross_bytes = _real_cache_nbytes(config)
  assert got['self_per_sample'] * B == self_bytes
  assert got['cross_per_sample'] * B == cross_bytes


def test_param_counts_equal_initialised_tree():
  tiny = _tiny()
  d, h, layers = tiny.emb_dim, tiny.head_dim, tiny.num_decoder_layers
  for r in info.report(tiny, stacks=network.STACKS):
    params = network.init_params(tiny.with_kv_heads(r['num_kv_heads'], network.STACKS),
                                 jax.random.PRNGKey(0))
    assert r['params_total'] == sum(x.size for x in jax.tree_util.tree_leaves(params))
    for stack in network.STACKS:  # key + value kernels [D, K*H] in every layer
      assert r[f'params_kv_{stack}'] == layers * 2 * d * r['num_kv_heads'] * h


def test_small_mha_is_t5_1_1_small():
  v, d, n, h, f, layers = 32128, 512, 6, 64, 1024, 8
  attention, mlp = 4 * d * n * h, 3 * d * f  # q, k, v, out; gated wi_0, wi_1, wo
  expected = (2 * v * d  # token embedding and untied logits
              + layers * (attention + mlp + 2 * d) + layers * (2 * attention + mlp + 3 * d)
              + 2 * n * 32 + 2 * d)  # relpos tables, final norms
  assert expected == 76_961_152  # T5.1.1 small, "77M"
  small = network.get_preset('small')
  assert [v[0] for v in info.variants(small)] == ['MHA', 'GQA-3', 'GQA-2', 'MQA']
  assert info.count_params(small)['total'] == expected


def test_xxl_variants_and_cache_ratios():
  # The full report traces xxl's init once per variant; the parts are cheaper to test.
  variants = {name: (k, cfg) for name, k, cfg in info.variants(network.get_preset('xxl'))}
  assert list(variants) == ['MHA', 'GQA-32', 'GQA-16', 'GQA-8', 'GQA-4', 'GQA-2', 'MQA']
  total = lambda cfg: info.cache_bytes(cfg, 2048, 512, 32, 2)['total_per_sample']
  mha = total(variants['MHA'][1])
  assert mha == 960 * 2**20  # 2 * 64 * 64 * 2 bytes * 24 layers * (512 + 2048)
  for k, cfg in variants.values():  # both decoder stacks shrink by K/N, the encoder not
    assert total(cfg) * 64 == mha * k
    assert (cfg.kv_heads('encoder'), cfg.kv_heads('decoder_self')) == (64, k)


def test_xxl_gqa8_params():
  xxl = network.get_preset('xxl')
  mha, gqa8 = info.count_params(xxl), info.count_params(xxl.with_kv_heads(8))
  assert mha['total'] == 11_135_332_352
  # 2 stacks x 24 layers x (key + value) x [4096, (64 - 8) * 64] fewer parameters.
  assert mha['total'] - gqa8['total'] == 2 * 24 * 2 * 4096 * 56 * 64
  assert gqa8['kv_encoder'] == mha['kv_encoder'] == 24 * 2 * 4096 * 64 * 64


def test_ratio_with_decoder_self_only():
  records = {r['variant']: r for r in info.report(
      _tiny(), input_length=100, output_length=30, stacks=('decoder_self',))}
  mqa = records['MQA']
  assert mqa['kv_heads_decoder_cross'] == 4 and mqa['kv_heads_decoder_self'] == 1
  assert mqa['params_kv_decoder_cross'] == records['MHA']['params_kv_decoder_cross']
  # Per layer and head: self 30 positions, cross 100; only self shrinks 4 -> 1.
  assert mqa['cache_ratio_vs_mha'] == pytest.approx((30 * 1 + 100 * 4) / (30 * 4 + 100 * 4))


def test_cache_dtype_override_and_configured_flag():
  config = _tiny(decoder_self_kv_heads=1, decoder_cross_kv_heads=1)
  records = info.report(config, input_length=7, output_length=3, batch_size=1,
                        cache_dtype='bfloat16')
  assert [r['configured'] for r in records] == [False, False, True]
  mha = records[0]  # 2 (K, V) * 4 heads * 8 head_dim * 2 bytes * 2 layers
  assert mha['cache_bytes_self_per_token'] == 2 * 4 * 8 * 2 * 2
  assert mha['cache_bytes_cross_per_sample'] == 2 * 4 * 8 * 2 * 2 * 7


def test_invalid_values_raise():
  with pytest.raises(ValueError, match='cache dtype'):
    info.report(_tiny(), cache_dtype='nope')
  with pytest.raises(ValueError, match='output length'):
    info.report(_tiny(), output_length=0)
  with pytest.raises(ValueError, match='stack'):
    info.report(_tiny(), stacks=('decoder',))


def test_format_bytes_and_report_text():
  assert info.format_bytes(512) == '512 B'
  assert info.format_bytes(1536) == '1.50 KiB'
  assert info.format_bytes(960 * 2**20) == '960.00 MiB'
  assert info.format_bytes(30 * 2**30) == '30.00 GiB'
  config = _tiny()
  text = info.format_report(info.report(config), 'preset tiny', config)
  assert 'emb 32, 4 heads x head_dim 8, 2+2 layers' in text
  assert 'keeps no KV cache' in text
  assert all(v in text for v in ("MHA", "GQA-2", "MQA"))


# --- decode-step FLOPs (the compute side of the roofline) ---------------------------------
def test_decode_step_flops_hand_count():
  # tiny: D 32, 4 query heads of H 8, F 64 (gated: 2 input kernels), 2 decoder layers,
  # vocabulary 128; batch 3, input 5, output 7; self-attention 2 KV heads, cross 1.
  cfg = dataclasses.replace(_tiny(), decoder_self_kv_heads=2, decoder_cross_kv_heads=1)
  flops = info.decode_step_flops(cfg, input_length=5, output_length=7, batch_size=3)
  q_or_out = 2 * 3 * 32 * (4 * 8)          # 6144: query or out projection
  kv = 2 * (2 * 3 * 32 * (2 * 8))          # 6144: key and value, 2 KV heads
  self_attn = 2 * (2 * 3 * 4 * 8 * 7)      # 2688: scores and values over 7 positions
  cross_attn = 2 * (2 * 3 * 4 * 8 * 5)     # 1920: over the 5 input positions
  mlp = 3 * (2 * 3 * 32 * 64)              # 36864: wi_0, wi_1, wo
  logits = 2 * 3 * 32 * 128                # 24576
  assert flops == {'projections': 2 * (4 * q_or_out + kv),
                   'attention': 2 * (self_attn + cross_attn),
                   'kv_pooling': 0, 'mlp': 2 * mlp, 'logits': logits,
                   'total': 2 * (4 * q_or_out + kv + self_attn + cross_attn + mlp) + logits}
  assert flops['total'] == 168960

  # CLA-2 (layer 1 reads layer 0's K/V): one layer's key and value projections go; SQA
  # (2 query heads in self-attention) halves its query, out and attention products;
  # WGQA pools 2 kernels [D, N*H] per producer layer and step.
  cla = dataclasses.replace(cfg, decoder_self_kv_layers='cla2', decoder_cross_kv_layers='cla2')
  assert info.decode_step_flops(cla, 5, 7, 3)['projections'] == 2 * 4 * q_or_out + kv
  sqa = dataclasses.replace(cfg, decoder_self_query_heads=2)
  assert info.decode_step_flops(sqa, 5, 7, 3)['attention'] == 2 * (self_attn // 2 + cross_attn)
  wgqa = dataclasses.replace(cfg, decoder_self_kv_weights='scalar')
  assert info.decode_step_flops(wgqa, 5, 7, 3)['kv_pooling'] == 2 * 2 * (2 * 32 * 4 * 8)


def test_decode_step_flops_agree_with_xla_cost_analysis():
  """XLA's count of the real compiled decode step adds only elementwise work (softmax,
  norms, masks), nearly the same for every variant: the matmul FLOPs of two variants
  differ by what XLA's differ by."""
  from gqa_jax import models
  base = _tiny(emb_dim=128, num_heads=8, head_dim=16, mlp_dim=512, dtype='float32')
  s, t, b = 64, 32, 4

  def xla_flops(cfg):
    params = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.01, x.dtype),
                                    network.param_shapes(cfg))
    model = models.EncoderDecoderModel(network.Transformer(cfg))
    tokens = jnp.ones((b, s), jnp.int32)
    cache = model.init_cache(params, model.encode(params, tokens), tokens, t)
    step = jax.jit(lambda p, e, x, c: model.tokens_to_logits(p, e, t)(x, c))
    cost = step.lower(params, tokens, jnp.ones((b, 1), jnp.int32), cache).compile()
    cost = cost.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']

  variants = [base, base.with_kv_heads(2), dataclasses.replace(
      base.with_kv_heads(1), decoder_self_kv_layers='cla2', decoder_cross_kv_layers='cla2')]
  ours = [info.decode_step_flops(c, s, t, b)['total'] for c in variants]
  theirs = [xla_flops(c) for c in variants]
  for o, x in zip(ours, theirs):
    assert 0.95 * x <= o <= x
  # XLA counts a few elementwise ops per attention score (softmax, bias) that the hand count
  # leaves out; a matmul term counted wrong would differ by >= 2 x head_dim per score.
  scores = b * base.num_heads * (s + t) * base.num_decoder_layers
  for o, x in zip(ours[1:], theirs[1:]):
    assert abs((o - ours[0]) - (x - theirs[0])) <= 8 * scores
