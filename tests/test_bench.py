"""The decoding benchmark's bookkeeping (bytes, shared weights, records, CLI); speed is
never asserted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_jax import bench
from gqa_jax import cli
from gqa_jax import convert
from gqa_jax import info
from gqa_jax import models
from gqa_jax import network

CONFIG = network.get_preset('tiny', vocab_size=128, dtype='float32')
S, T, B = 6, 4, 2
KS = (4, 2, 1)


@pytest.fixture(scope='module')
def records():
  return bench.benchmark(CONFIG, S, T, B, num_kv_heads=KS, repeats=1,
                         bandwidth_bytes=1 << 20)


def _cache_bytes_built_here(k):
  cfg = CONFIG.with_kv_heads(k)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  params = network.init_params(cfg, jax.random.PRNGKey(1))
  tokens = jnp.ones((B, S), jnp.int32)
  cache = model._init_decoding(params, {'encoder_input_tokens': tokens}, T)
  flat = traverse_util.flatten_dict(cache)
  return sum(v.nbytes for p, v in flat.items() if p[-1] in ('cached_key', 'cached_value'))


def test_records_have_all_keys_and_positive_times(records):
  assert [r['num_kv_heads'] for r in records] == list(KS)
  assert [r['name'] for r in records] == ['MHA', 'GQA-2', 'MQA']
  for r in records:
    assert set(bench.RECORD_KEYS) <= set(r)
    for key in ('time_per_sample_s', 'time_per_batch_s', 'encoder_s', 'decode_step_s',
                'bandwidth_bytes_per_s', 'roofline_fraction'):
      assert r[key] > 0, key
    assert r['time_per_batch_s'] == pytest.approx(r['encoder_s'] + T * r['decode_step_s'])
    assert r['time_per_sample_s'] == pytest.approx(r['time_per_batch_s'] / B)
    assert r['roofline_fraction'] == pytest.approx(
        r['bytes_per_decode_step'] / r['bandwidth_bytes_per_s'] / r['decode_step_s'])


@pytest.mark.parametrize('k', [1, 2, 4])
def test_kv_cache_bytes_are_the_built_cache_arrays(records, k):
  record = next(r for r in records if r['num_kv_heads'] == k)
  assert record['kv_cache_bytes'] == _cache_bytes_built_here(k)
  expected = info.cache_bytes(CONFIG.with_kv_heads(k), S, T, B, 4)['total_per_batch']
  assert record['kv_cache_bytes'] == expected


def test_byte_ratios_follow_kv_heads(records):
  mha = records[0]
  for r in records[1:]:
    assert r['kv_cache_bytes'] * mha['num_kv_heads'] == mha['kv_cache_bytes'] * r['num_kv_heads']
    # Decoder parameters shrink by exactly the K/V kernels removed.
    kv_params = lambda k: 2 * 2 * CONFIG.num_decoder_layers * CONFIG.emb_dim * k * CONFIG.head_dim
    assert (mha['decoder_param_bytes'] - r['decoder_param_bytes']
            == 4 * (kv_params(mha['num_kv_heads']) - kv_params(r['num_kv_heads'])))
    assert r['bytes_per_decode_step'] == r['decoder_param_bytes'] + r['kv_cache_bytes']


def test_variants_share_identical_non_kv_weights():
  mha = CONFIG.with_kv_heads(CONFIG.num_heads)
  base = network.init_params(mha, jax.random.PRNGKey(0))
  flat_base = traverse_util.flatten_dict(base)
  for k in (2, 1):
    cfg = CONFIG.with_kv_heads(k)
    flat = traverse_util.flatten_dict(bench.variant_params(base, mha, cfg))
    assert set(flat) == set(flat_base)
    shapes = traverse_util.flatten_dict(network.param_shapes(cfg))
    for path, leaf in flat.items():
      assert leaf.shape == shapes[path].shape, path
      is_pooled = (path[-2] in ('key', 'value')
                   and path[-3] in ('self_attention', 'encoder_decoder_attention'))
      if is_pooled:
        expected = convert.pool_kv(np.asarray(flat_base[path]), CONFIG.num_heads, k,
                                   CONFIG.head_dim, 'mean')
        np.testing.assert_allclose(np.asarray(leaf), expected, rtol=1e-6)
      else:
        assert leaf is flat_base[path], path


def test_cli_writes_json_and_markdown(tmp_path, capsys):
  out = tmp_path / 'bench'
  status = cli.main(['bench', 'decode', '--size', 'tiny', '--gin.network.T5Config.vocab_size=128',
                     '--input-length', str(S), '--output-length', str(T), '--batch-size',
                     str(B), '--num-kv-heads', '1,4', '--repeats', '1', '--output', str(out)])
  captured = capsys.readouterr()
  assert status == 0, captured.err
  assert '| MHA | 4 |' in captured.out and '| MQA | 1 |' in captured.out
  data = json.loads((out / 'decode.json').read_text())
  assert [r['num_kv_heads'] for r in data['records']] == [4, 1]
  assert '| MQA | 1 |' in (out / 'decode.md').read_text()


@pytest.mark.parametrize('argv, fragment', [
    (['--num-kv-heads', '3'], 'do not divide'),
    (['--num-kv-heads', 'x'], 'comma-separated list'),
    (['--preset', 'nope'], 'invalid choice'),
])
def test_cli_errors(capsys, argv, fragment):
  status = cli.main(['bench', 'decode', '--size', 'tiny', '--repeats', '1', *argv])
  assert status == 2
  err = capsys.readouterr().err
  assert fragment in err and len(err.strip().splitlines()) == 1
