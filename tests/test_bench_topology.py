"""`gqa-jax bench decode --topology`: the decode step compiled for a TPU slice, estimates
from the compiler's counts (never a timing).

Tests marked `tpu_compile` need libtpu's compile-only devices: skipped without it, run by
.ci/run after `pip install -e ".[tpu]"` (`pytest -m tpu_compile`).
"""

import json

import pytest

from gqa_jax import network
from gqa_jax import preflight
from gqa_jax.errors import ConfigError
from gqa_jax.experiments import bench
from conftest import assert_user_error

TINY = ['--size', 'tiny', '--gin.network.T5Config.vocab_size=128']
S, T, B = 16, 8, 8
needs_libtpu = pytest.mark.skipif(not preflight.libtpu_available(),
                                  reason='needs libtpu: pip install -e ".[tpu]"')


def test_a_topology_without_libtpu_names_the_extra(gqa, monkeypatch):
  monkeypatch.setattr(preflight, 'libtpu_available', lambda: False)
  assert_user_error(gqa('bench', 'decode', *TINY, '--topology', 'v4-8'),
                    '--topology v4-8 needs libtpu', 'pip install -e ".[tpu]"')


@pytest.mark.parametrize('argv, fragments', [
    (['--topology', 'v4-8', '--repeats', '2'], ['--repeats', 'drop --repeats']),
    (['--topology', 'v4-8', '--no-hf'], ['--hf', '--topology v4-8 runs nothing']),
    (['--mesh-model', '2'], ['--mesh-model', 'add --topology NAME']),
    (['--topology', 'v9-8'], ['--topology v9-8', 'unknown TPU slice']),
])
def test_flags_that_do_not_go_together_are_one_line(gqa, argv, fragments):
  assert_user_error(gqa('bench', 'decode', *TINY, *argv), *fragments)


@needs_libtpu
@pytest.mark.tpu_compile
def test_tiny_estimates_on_a_v4_slice(gqa, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  r = gqa('bench', 'decode', *TINY, '--input-length', S, '--output-length', T,
          '--batch-size', B, '--num-kv-heads', '4,1', '--topology', 'v4-8',
          '--output', 'estimates')
  assert r.status == 0, r.err[-3000:]
  assert 'ESTIMATES, not measurements' in r.out and 'TPU_' not in r.err
  records = json.loads((tmp_path / 'estimates' / 'decode.json').read_text())
  assert [x['name'] for x in records] == ['MHA', 'MQA']
  assert 'not a measurement' in (tmp_path / 'estimates' / 'decode.md').read_text()
  assert not (tmp_path / 'estimates' / 'decode.png').exists()  # nothing measured to plot
  config = network.get_preset('tiny', vocab_size=128)
  for x in records:
    assert set(bench.ESTIMATE_KEYS) <= set(x) and 'not a measurement' in x['estimate']
    assert all(x[key] is not None for key in bench.ESTIMATE_KEYS if key != 'kv_layers')
    # v4-8 counts TensorCores: 4 chips, the batch over all of them.
    assert (x['num_devices'], x['mesh'], x['fits']) == (4, {'data': 4, 'model': 1}, True)
    cfg = config.with_kv_heads(x['num_kv_heads'])
    assert x['model_flops_per_step'] == bench.info.decode_step_flops(cfg, S, T, B)['total']
    # By hand: float32 weights replicated; a quarter of the batch's cache per device.
    cache = bench.info.cache_bytes(cfg, S, T, B, 4)['total_per_batch']
    assert x['hand_bytes_per_device']['kv_cache'] == cache // 4
    assert x['memory_per_device_bytes']['kv_cache'] == cache // 4
    assert x['compiler_to_hand_bytes'] == pytest.approx(
        x['compiler_bytes_accessed_per_device'] / x['hand_bytes_per_device']['total'])
    terms = x['roofline']
    assert x['roofline_step_seconds'] == max(
        terms['compute_seconds'], terms['hbm_seconds'], terms['ici_seconds']) > 0
    assert terms['hbm_seconds'] == pytest.approx(
        x['compiler_bytes_accessed_per_device'] / preflight.CHIPS['v4'].hbm_bandwidth)
    assert x['roofline_time_per_sample_s'] == pytest.approx(
        T * x['roofline_step_seconds'] / B)
    hand_hbm = x['hand_bytes_per_device']['total'] / preflight.CHIPS['v4'].hbm_bandwidth
    assert x['hand_roofline_step_seconds'] == pytest.approx(
        max(terms['compute_seconds'], hand_hbm, terms['ici_seconds']))
  mha, mqa = records
  # MQA's decoder drops K/V kernel columns and 3/4 of the cache: the compiler reads less.
  assert mqa['compiler_bytes_accessed_per_device'] < mha['compiler_bytes_accessed_per_device']
  assert mqa['hand_bytes_per_device']['parameters'] < mha['hand_bytes_per_device']['parameters']
  assert mha['ratio_to_mha'] == 1 and mqa['ratio_to_mha'] == pytest.approx(
      mqa['roofline_time_per_sample_s'] / mha['roofline_time_per_sample_s'])
  assert mqa['hand_ratio_to_mha'] == pytest.approx(
      mqa['hand_roofline_time_per_sample_s'] / mha['hand_roofline_time_per_sample_s'])


@needs_libtpu
@pytest.mark.tpu_compile
def test_model_parallel_estimates_and_the_papers_numbers():
  """A v5e-8 mesh of 4 x 2: MHA's 4 K/V heads split over 'model' and its step all-reduces
  activations; the paper's Fig. 6 numbers go beside each G it has."""
  config = network.get_preset('tiny', vocab_size=128)
  paper = {4: 2.0, 1: 0.5}
  mha, mqa = bench.estimate(config, S, T, B, 'v5e-8', num_kv_heads=(4, 1), mesh_model=2,
                            paper=paper)
  assert mha['mesh'] == {'data': 4, 'model': 2}
  assert mha['collectives']['all-reduce']['count'] > 0
  assert mha['roofline']['ici_seconds'] > 0
  # MHA's cache splits over data and model, MQA's single K/V head only over data.
  cache = lambda k: bench.info.cache_bytes(config.with_kv_heads(k), S, T, B, 4)[
      'total_per_batch']
  assert mha['hand_bytes_per_device']['kv_cache'] == cache(4) // 8
  assert mqa['hand_bytes_per_device']['kv_cache'] == cache(1) // 4
  assert (mha['paper_time_per_sample_s'], mqa['paper_ratio_to_mha']) == (2.0, 0.25)
  table = bench.format_estimates([mha, mqa])
  assert 'paper Fig. 6' in table and 'ESTIMATES, not measurements' in table
  with pytest.raises(ConfigError, match='--batch-size 6 does not split over the 4 data-'):
    bench.estimate(config, S, T, 6, 'v5e-8', num_kv_heads=(1,), mesh_model=2)


@needs_libtpu
@pytest.mark.tpu_compile
def test_a_cache_larger_than_hbm_is_reported_not_raised():
  """32 GiB of cache per 16 GiB v5e chip: the compiler refuses it; the record says so."""
  config = network.get_preset('tiny', vocab_size=128)
  [record] = bench.estimate(config, 32768, T, 16384, 'v5e-8', num_kv_heads=(4,))
  assert record['fits'] is False and record['needed_bytes'] > record['available_bytes']
  assert record['roofline_step_seconds'] is None and record['ratio_to_mha'] is None
  assert 'does not fit HBM: needs' in bench.format_estimates([record])
