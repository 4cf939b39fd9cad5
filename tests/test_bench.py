"""The decoding benchmark's bookkeeping (bytes, shared weights, records, CLI); speed is
never asserted."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_jax.experiments import bench
from gqa_jax.experiments import bench_hf
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
  return bench.benchmark(CONFIG, S, T, B, num_kv_heads=KS, repeats=1, step_repeats=2,
                         rounds=2, bandwidth_bytes=1 << 20, matmul_size=64)


def _cache_bytes_built_here(k):
  cfg = CONFIG.with_kv_heads(k)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  params = network.init_params(cfg, jax.random.PRNGKey(1))
  tokens = jnp.ones((B, S), jnp.int32)
  cache = model.init_cache(params, model.encode(params, tokens), tokens, T)
  flat = traverse_util.flatten_dict(cache)
  return sum(v.nbytes for p, v in flat.items() if p[-1] in ('cached_key', 'cached_value'))


def test_records_have_all_keys_and_positive_times(records):
  assert [r['num_kv_heads'] for r in records] == list(KS)
  assert [r['name'] for r in records] == ['MHA', 'GQA-2', 'MQA']
  for r in records:
    assert set(bench.RECORD_KEYS) <= set(r)
    for key in ('time_per_sample_s', 'time_per_batch_s', 'encoder_s', 'decode_step_s',
                'bandwidth_bytes_per_s', 'roofline_fraction', 'roofline_time_per_sample_s'):
      assert r[key] > 0, key
    # Variants share the encoder, timed once.
    assert r['encoder_s'] == records[0]['encoder_s']
    # The compute-aware roofline: max(FLOPs / matmul rate, bytes / bandwidth).
    cfg = CONFIG.with_kv_heads(r['num_kv_heads'])
    flops = info.decode_step_flops(cfg, S, T, B)
    assert r['flops_per_decode_step'] == flops['total']
    assert r['attention_flops'] == flops['attention']
    compute = flops['total'] / r['peak_flops_per_s']
    memory = r['bytes_per_decode_step'] / r['bandwidth_bytes_per_s']
    assert (r['compute_s'], r['memory_s']) == pytest.approx((compute, memory))
    assert r['bound'] == ('compute' if compute > memory else 'memory')
    assert r['predicted_decode_step_s'] == pytest.approx(max(compute, memory))
    assert r['roofline_time_per_sample_s'] == pytest.approx(
        (r['encoder_s'] + T * max(compute, memory)) / B)
    assert r['time_per_batch_s'] == pytest.approx(r['encoder_s'] + T * r['decode_step_s'])
    assert r['time_per_sample_s'] == pytest.approx(r['time_per_batch_s'] / B)
    assert r['roofline_fraction'] == pytest.approx(max(compute, memory) / r['decode_step_s'])
    assert r['memory_roofline_fraction'] == pytest.approx(memory / r['decode_step_s'])
    assert r['attention_s'] > 0 and r['attention_roofline_fraction'] == pytest.approx(
        max(flops['attention'] / r['peak_flops_per_s'], r['kv_cache_bytes']
            / r['bandwidth_bytes_per_s']) / r['attention_s'])


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
    flat = traverse_util.flatten_dict(convert.pool_params(base, mha, cfg))
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


def test_one_variant_at_a_time_gives_the_same_bytes(records):
  alone = bench.benchmark(CONFIG, S, T, B, num_kv_heads=(4, 1), repeats=1, step_repeats=1,
                          rounds=0, bandwidth_bytes=1 << 20)
  for r in alone:
    same = next(x for x in records if x['num_kv_heads'] == r['num_kv_heads'])
    assert r['kv_cache_bytes'] == same['kv_cache_bytes']
    assert r['bytes_per_decode_step'] == same['bytes_per_decode_step']
    assert r['decode_step_s'] > 0


def test_decode_steps_are_the_models_own(records):
  """The timed step is the model's cached decode: greedy tokens from repeated steps
  equal EncoderDecoderModel.predict_batch's."""
  cfg = CONFIG.with_kv_heads(2)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  params = network.init_params(cfg, jax.random.PRNGKey(3))
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, 128, (B, S)), jnp.int32)
  cache = model.init_cache(params, jax.jit(model.encode)(params, tokens), tokens, T)
  step = jax.jit(lambda p, e, x, c: model.tokens_to_logits(p, e, T)(x, c))
  token, ours = jnp.zeros((B, 1), jnp.int32), []
  for _ in range(T):
    logits, cache = step(params, tokens, token, cache)
    token = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
    ours.append(token[:, 0])
  expected = model.predict_batch(params, {'encoder_input_tokens': tokens},
                                 max_decode_length=T)
  ours = np.stack(ours, 1)
  # predict_batch pads with 0 after EOS (id 1); compare up to each row's first EOS.
  for row, exp in zip(ours, np.asarray(expected)):
    n = int(np.argmax(row == 1)) + 1 if (row == 1).any() else T
    np.testing.assert_array_equal(row[:n], exp[:n])


def test_cross_layer_sharing_caches_and_reads_the_producer_layers_only():
  records = bench.benchmark(CONFIG, S, T, B, num_kv_heads=(4, 1), kv_layers=('cla2',),
                            repeats=1, step_repeats=1, rounds=1, bandwidth_bytes=1 << 20)
  assert [(r['name'], r['kv_layers']) for r in records] == [
      ('MHA', None), ('MQA', None), ('MHA-CLA2', 'cla2'), ('MQA-CLA2', 'cla2')]
  plain = {r['num_kv_heads']: r for r in records if r['kv_layers'] is None}
  for r in records:
    assert r['kv_bytes_per_token'] == r['kv_cache_bytes'] / (B * (S + T))
    if r['kv_layers'] is None:
      continue
    k = r['num_kv_heads']
    cla = dataclasses.replace(CONFIG.with_kv_heads(k), decoder_self_kv_layers=(0,),
                              decoder_cross_kv_layers=(0,))
    assert r['kv_cache_bytes'] == info.cache_bytes(cla, S, T, B, 4)['total_per_batch']
    # Two decoder layers, one producer: half the cache, and the second layer's self- and
    # cross-attention K/V kernels [D, K*H] are gone from the bytes of a step.
    assert 2 * r['kv_cache_bytes'] == plain[k]['kv_cache_bytes']
    assert (plain[k]['decoder_param_bytes'] - r['decoder_param_bytes']
            == 4 * 2 * 2 * CONFIG.emb_dim * k * CONFIG.head_dim)
  table = bench.format_table(records)
  assert '| MQA-CLA2 | 1 |' in table and 'KV bytes per token' in table


def test_cli_writes_json_markdown_and_plot(tmp_path, capsys):
  out = tmp_path / 'bench'
  status = cli.main(['bench', 'decode', '--size', 'tiny', '--gin.network.T5Config.vocab_size=128',
                     '--input-length', str(S), '--output-length', str(T), '--batch-size',
                     str(B), '--num-kv-heads', '1,4', '--repeats', '1', '--step-repeats', '2',
                     '--no-hf', '--output', str(out)])
  captured = capsys.readouterr()
  assert status == 0, captured.err
  assert '| MHA | 4 |' in captured.out and '| MQA | 1 |' in captured.out
  data = json.loads((out / 'decode.json').read_text())
  assert isinstance(data, list) and [r['num_kv_heads'] for r in data] == [4, 1]
  for r in data:
    assert {'num_kv_heads', 'time_per_sample_s', 'decode_step_s', 'kv_cache_bytes',
            'bytes_per_decode_step', 'roofline_fraction'} <= set(r)
  assert '| MQA | 1 |' in (out / 'decode.md').read_text()
  assert (out / 'decode.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.interop
def test_hf_peer_is_timed_with_the_same_shapes(tmp_path):
  pytest.importorskip('transformers', reason='interop extra not installed')
  cfg = CONFIG.with_kv_heads(CONFIG.num_heads)
  hf_cfg = bench_hf.hf_config(cfg)
  assert (hf_cfg.d_model, hf_cfg.num_heads, hf_cfg.d_kv, hf_cfg.d_ff) == (
      cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim)
  assert (hf_cfg.num_layers, hf_cfg.num_decoder_layers) == (
      cfg.num_encoder_layers, cfg.num_decoder_layers)
  # (transformers 5 always ties T5's lm_head to `shared`: still one [V, D] matrix read
  # per step, as with T5.1.1's separate logits kernel.)
  assert hf_cfg.feed_forward_proj == 'gated-gelu'
  records = bench.benchmark(CONFIG, S, T, B, num_kv_heads=(4, 1), repeats=1, step_repeats=1,
                            rounds=1, bandwidth_bytes=1 << 20, hf=True, hf_repeats=3)
  mha, mqa = records
  assert mha['name'] == 'MHA' and mha['hf_time_per_sample_s'] > 0
  # MHA's ratio comes from rounds alternating with the peer: their median and range.
  ratios = mha['hf_round_ratios']
  assert len(ratios) == 3 and all(x > 0 for x in ratios)
  assert mha['hf_ratio'] == sorted(ratios)[1]
  assert (mha['hf_ratio_min'], mha['hf_ratio_max']) == (min(ratios), max(ratios))
  assert mqa['hf_ratio'] == pytest.approx(mqa['hf_time_per_sample_s'] / mqa['time_per_sample_s'])
  table = bench.format_table(records)
  assert 'HF time / this' in table and '3 alternating rounds' in table
  paths = bench.write(records, str(tmp_path))
  assert [p.rsplit('.', 1)[1] for p in paths] == ['json', 'md', 'png']


@pytest.mark.interop
def test_hf_peer_generates_with_more_decoder_than_encoder_layers():
  """cpu-paper has 2 encoder and 24 decoder layers: transformers 5.25 sized T5's default
  generate cache by the encoder and failed with an IndexError on decoder layer 2."""
  pytest.importorskip('transformers', reason='interop extra not installed')
  cfg = dataclasses.replace(CONFIG.with_kv_heads(CONFIG.num_heads), num_encoder_layers=1,
                            num_decoder_layers=3)
  tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 8)).astype(np.int32)
  peer = bench_hf.time_generate(cfg, tokens, 3)
  assert peer['hf_time_per_sample_s'] > 0


@pytest.mark.parametrize('argv, fragment', [
    (['--num-kv-heads', '3'], 'do not divide'),
    (['--num-kv-heads', 'x'], 'comma-separated list'),
    (['--preset', 'nope'], 'invalid choice'),
    (['--kv-layers', 'cla9'], '--kv-layers cla9'),
])
def test_cli_errors(capsys, argv, fragment):
  status = cli.main(['bench', 'decode', '--size', 'tiny', '--repeats', '1', *argv])
  assert status == 2
  err = capsys.readouterr().err
  assert fragment in err and len(err.strip().splitlines()) == 1


def test_cpu_paper_preset_is_in_the_papers_regime():
  """The default preset's MHA cache is the paper's multiple of the decoder weights a step
  reads (T5-XXL, batch 32, 2048 -> 512: 2.5x, counted the same way), at a batch where the
  weight matmuls stay under this CPU's ridge point (about 2 FLOPs per byte)."""
  setup = bench.PRESETS['cpu-paper']
  cfg = setup.config
  flat = network.flat_param_shapes(cfg)
  weights = 4 * sum(int(np.prod(s)) for k, s in flat.items() if k.startswith('decoder/'))
  cache = info.cache_bytes(cfg, setup.input_length, setup.output_length, setup.batch_size,
                           4)['total_per_batch']
  assert 2.2 <= cache / weights <= 2.8
  xxl = bench.PRESETS['paper-fig6']
  xxl_flat = network.flat_param_shapes(xxl.config)
  xxl_weights = 2 * sum(int(np.prod(s)) for k, s in xxl_flat.items()
                        if k.startswith('decoder/'))
  xxl_cache = info.cache_bytes(xxl.config, xxl.input_length, xxl.output_length,
                               xxl.batch_size, 2)['total_per_batch']
  assert abs(cache / weights - xxl_cache / xxl_weights) < 0.3
  assert setup.batch_size <= 4  # 2 FLOPs per float32 weight per sample: <= 2 FLOP/byte
  assert cfg.num_heads % 8 == 0  # GQA-8 is a proper grouping, not MHA
  assert 'cpu-fig6' in bench.PRESETS and bench.PRESETS['cpu-fig6'].config.num_heads == 64


def test_quality_vs_kv_bytes_places_each_cell_at_its_own_cache(tmp_path):
  from gqa_jax.experiments import plots
  records = [{'name': 'MHA', 'kv_bytes_per_token': 4096.0, 'kv_layers': None},
             {'name': 'MQA', 'kv_bytes_per_token': 512.0, 'kv_layers': None},
             {'name': 'MQA-CLA2', 'kv_bytes_per_token': 256.0, 'kv_layers': 'cla2'}]
  cell = lambda variant, method: {'variant': variant, 'method': method, 'alpha': 0.0,
                                  'metric': 'rougeL', 'mean': 10.0, 'std': 1.0,
                                  'gap_mean': 4.0, 'gap_std': 0.1}
  assert plots.record_for_cell(cell('MQA', 'cla2'), records)['kv_bytes_per_token'] == 256
  assert plots.record_for_cell(cell('MQA', 'mean'), records)['kv_bytes_per_token'] == 512
  assert plots.record_for_cell(cell('MHA', 'none'), records)['kv_bytes_per_token'] == 4096
  assert plots.record_for_cell(cell('GQA-2', 'mean'), records) is None
  path = plots.quality_vs_kv_bytes(
      [cell('MHA', 'none'), cell('MQA', 'mean'), cell('MQA', 'cla2')], records,
      str(tmp_path / 'q.png'))
  assert open(path, 'rb').read(4) == b'\x89PNG'


def test_decode_matmul_benchmark_runs_and_its_fused_chain_matches(tmp_path):
  """benchmarks/decode_matmul.py as its docs call it, at small sizes: every table written,
  the fused q|k|v, wi_0|wi_1 chain checked against the separate products by the script."""
  import subprocess
  import sys
  from pathlib import Path
  script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'decode_matmul.py'
  subprocess.run([sys.executable, str(script), '--batch', '1,2', '--shapes', '64x128',
                  '--min-mib', '1', '--rounds', '1', '--calls', '1', '--layers', '2',
                  '--layer-kv-heads', '16,1', '--layer-batch', '1',
                  '--output', str(tmp_path)], check=True, cwd=tmp_path, capture_output=True)
  result = json.loads((tmp_path / 'decode_matmul.json').read_text())
  assert {(r['batch'], r['form']) for r in result['records']} == {
      (m, f) for m in (1, 2) for f in ('dot', 'transposed', 'rows')}
  chains = result['layer_chains']
  assert [(c['kv_heads'], c['form'], c['products']) for c in chains] == [
      (16, 'separate', 18), (16, 'fused qkv, wi', 12),
      (1, 'separate', 18), (1, 'fused qkv, wi', 12)]
  # 2 layers: q, o, cross q, cross o 512x512; k, v 512 x 32K; wi_0, wi_1 512x1024; wo.
  for c in chains:
    kv = c['kv_heads'] * 32
    assert c['weight_bytes'] == 2 * 4 * (4 * 512 * 512 + 2 * 512 * kv + 3 * 512 * 1024)
    assert c['seconds'] > 0 and c['cores_busy'] > 0
  assert '| M | KV heads |' in (tmp_path / 'decode_matmul.md').read_text()


def test_scan_layers_benchmark_runs_as_documented(tmp_path):
  """benchmarks/scan_layers.py at the smallest size: both layouts compiled and timed, the
  ratios and MFU from the recorded numbers, the table written."""
  import subprocess
  import sys
  from pathlib import Path
  script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'scan_layers.py'
  subprocess.run([sys.executable, str(script), '--presets', 'tiny', '--batch', '2',
                  '--inputs', '16', '--targets', '8', '--rounds', '1', '--remat', 'minimal',
                  '--peak-tflops', '1', '--output', str(tmp_path)], check=True, cwd=tmp_path,
                 capture_output=True)
  [record] = json.loads((tmp_path / 'scan_layers.json').read_text())
  assert record['preset'] == 'tiny' and record['remat_policy'] == 'minimal'
  assert record['step_ratio'] == round(record['scanned_step_s'] / record['unrolled_step_s'], 3)
  assert record['step_flops'] > 0
  assert record['scanned_mfu'] == round(record['step_flops'] / record['scanned_step_s'] / 1e12, 4)
  assert '| tiny | 2 x (16, 8) | minimal |' in (tmp_path / 'scan_layers.md').read_text()
