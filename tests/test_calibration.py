"""`gqa-jax calibrate` (gqa_jax.calibration): K/V input second moments, checked against
activations computed another way (NumPy from the embedding, flax's capture_intermediates,
the model's encode), on builtin:t5_mini and the built-in span corruption task."""

import re

import jax
import numpy as np
import pytest

from conftest import assert_user_error
from gqa_jax import calibration, checkpoints, network

CKPT = 'builtin:t5_mini'
TASK = 'gqa_builtin_span_corruption'
LENGTHS = dict(input_length=64, target_length=16)  # the gap eval's (gap.gin)
ALL = network.STACKS


def _collect(output, num_examples, **kwargs):
  kwargs = {'batch_size': 4, 'progress': False, 'stacks': ALL, **LENGTHS, **kwargs}
  return calibration.collect(CKPT, TASK, num_examples, output, **kwargs)


def _examples(n):
  """The split's first n examples through gqa_jax.data's own pipeline (not calibrate's)."""
  from gqa_jax import data  # TensorFlow
  it = data.get_dataset(TASK, 'train', {'inputs': 64, 'targets': 16}, n, shuffle=False,
                        seed=calibration.DATA_SEED, pack=False, num_epochs=1,
                        drop_remainder=False)
  return next(it)


def _moment(x, valid):
  x = np.asarray(x, np.float64)[np.asarray(valid)]  # [tokens, D]
  return x.T @ x / len(x)


@pytest.fixture(scope='module')
def model():
  return checkpoints.load_model(CKPT)


@pytest.fixture(scope='module')
def stats(tmp_path_factory):
  """Every stack of t5_mini over the first 8 examples (the other tests calibrate every
  stack too, in batches of 4 rows: one compile of the forward for the whole file)."""
  path = tmp_path_factory.mktemp('calibration') / 'all.npz'
  summary = _collect(path, 8)
  return path, summary


def test_moments_equal_the_activations_computed_another_way(stats, model):
  config, params = model
  path, summary = stats
  batch = _examples(8)
  enc, dec_in, dec_tgt = (batch[k] for k in ('encoder_input_tokens', 'decoder_input_tokens',
                                             'decoder_target_tokens'))
  enc_valid, dec_valid = enc > 0, dec_tgt > 0
  cal = calibration.load(path)
  assert cal.emb_dim == config.emb_dim == 128 and cal.num_examples == 8
  assert summary['tokens'] == {'encoder': int(enc_valid.sum()), 'decoder': int(dec_valid.sum())}

  # Layer 0's inputs in NumPy: RMSNorm(x) = x / sqrt(mean(x^2) + 1e-6) * scale.
  def rms_norm(x, scale):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale
  embedding = np.asarray(params['token_embedder']['embedding'], np.float64)
  for module, tokens, valid in (('decoder/layers_0/self_attention', dec_in, dec_valid),
                                ('encoder/layers_0/attention', enc, enc_valid)):
    norm = 'pre_self_attention_layer_norm' if 'decoder' in module else 'pre_attention_layer_norm'
    scale = params[module.split('/')[0]]['layers_0'][norm]['scale']
    expected = _moment(rms_norm(embedding[tokens], scale), valid)
    np.testing.assert_allclose(cal.moment(module), expected, rtol=1e-4, atol=1e-6)

  # Every layer's: the norms' outputs as flax captures them in a plain forward pass.
  model_ = network.Transformer(config)
  norms = ('pre_attention_layer_norm', 'pre_self_attention_layer_norm')
  captured = jax.jit(lambda p: model_.apply(
      {'params': p}, enc, dec_in, dec_tgt, enable_dropout=False,
      capture_intermediates=lambda m, _: m.name in norms,
      mutable=['intermediates'])[1]['intermediates'])(params)
  for side, norm, name, valid in (('encoder', norms[0], 'attention', enc_valid),
                                  ('decoder', norms[1], 'self_attention', dec_valid)):
    for i in range(2):
      x = captured[side][f'layers_{i}'][norm]['__call__'][0]
      np.testing.assert_allclose(cal.moment(f'{side}/layers_{i}/{name}'), _moment(x, valid),
                                 rtol=1e-4, atol=1e-6)

  # Cross-attention: the encoder output, stored once and read by every layer.
  encoded = jax.jit(lambda p: model_.apply({'params': p}, enc, enable_dropout=False,
                                           method=network.Transformer.encode))(params)
  expected = _moment(encoded, enc_valid)
  for i in range(2):
    np.testing.assert_allclose(cal.moment(f'decoder/layers_{i}/encoder_decoder_attention'),
                               expected, rtol=1e-4, atol=1e-6)
  with np.load(path) as npz:
    stored = sorted(k for k in npz.files if k.startswith('moment/'))
  assert stored == sorted(['moment/' + calibration.ENCODER_OUTPUT] + [
      f'moment/{s}/layers_{i}/{n}' for s, n in (('encoder', 'attention'),
                                                ('decoder', 'self_attention'))
      for i in range(2)])
  metadata = cal.metadata
  assert (metadata['task'], metadata['split'], metadata['step']) == (TASK, 'train', 5000)
  assert metadata['config'] == config.to_dict()


def test_padding_tokens_count_for_nothing(model):
  """The same examples with extra padding positions and padding rows: the same sums and
  counts."""
  config, params = model
  batch = _examples(4)
  fn = calibration.moment_sums_fn(config, ALL)
  keys = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens')
  plain = jax.device_get(fn(params, *(batch[k] for k in keys)))
  padded = jax.device_get(fn(params, *(np.pad(batch[k], [(0, 2), (0, 9)]) for k in keys)))
  assert plain[1] == padded[1]
  assert plain[1]['decoder'] == (batch['decoder_target_tokens'] > 0).sum()
  assert plain[1]['decoder'] < batch['decoder_target_tokens'].size  # there was padding
  for entry, value in plain[0].items():
    np.testing.assert_allclose(padded[0][entry], value, rtol=1e-5, atol=1e-5)


def test_a_resumed_run_equals_one_run(tmp_path, capsys):
  resumed, once = tmp_path / 'resumed.npz', tmp_path / 'once.npz'
  first = _collect(resumed, 5)  # batches 0-3, 4; then 5-8, 9 (once: 0-3, 4-7, 8-9)
  notes = []
  second = _collect(resumed, 10, notify=notes.append)
  assert (first['new_examples'], second['new_examples'], second['resumed_from']) == (5, 5, 5)
  assert 'continuing with example 6 of 10' in notes[0]
  single = _collect(once, 10)
  assert second['tokens'] == single['tokens']
  a, b = calibration.load(resumed), calibration.load(once)
  assert a.tokens == b.tokens and a.num_examples == b.num_examples == 10
  for module in a.modules:
    # float32 sums per batch, batches cut elsewhere: equal up to float32 rounding
    scale = np.abs(b.moment(module)).max()
    np.testing.assert_allclose(a.moment(module), b.moment(module), rtol=1e-5, atol=1e-6 * scale)
  # Enough already: no work, the file unchanged.
  before = resumed.read_bytes()
  again = _collect(resumed, 6)
  assert again['new_examples'] == 0 and resumed.read_bytes() == before
  with pytest.raises(calibration.CalibrationError, match='emb_dim=128.*emb_dim=32'):
    a.check_matches(network.get_preset('tiny'))
  a.check_matches(checkpoints.open_checkpoint(CKPT).config)


@pytest.mark.parametrize('change, named', [
    (dict(target_length=20), 'target_length 16 there, 20 now'),
    (dict(stacks=network.PAPER_STACKS), "stacks ['encoder', 'decoder_self', 'decoder_cross'] "
                                        "there, ['decoder_self', 'decoder_cross'] now"),
    (dict(split='validation'), "split 'train' there, 'validation' now"),
])
def test_a_different_calibration_is_not_continued(stats, tmp_path, change, named):
  path = tmp_path / 'stats.npz'
  path.write_bytes(stats[0].read_bytes())
  with pytest.raises(calibration.CalibrationError, match=re.escape(named)):
    _collect(path, 20, **change)
  assert path.read_bytes() == stats[0].read_bytes()


def test_a_file_that_is_not_a_calibration_is_refused(tmp_path):
  path = tmp_path / 'other.npz'
  np.savez(path, x=np.zeros(3))
  with pytest.raises(calibration.CalibrationError, match='not a gqa-jax calibrate file'):
    calibration.load(path)
  with pytest.raises(calibration.CalibrationError, match='not a gqa-jax calibrate file'):
    _collect(path, 2)
  with pytest.raises(calibration.CalibrationError, match='does not exist.*calibrate'):
    calibration.load(tmp_path / 'missing.npz')


def test_cli_from_a_working_folder_with_a_relative_output(gqa, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = ['calibrate', CKPT, '--task', TASK, '--num-examples', '4', '--input-length', '64',
          '--target-length', '16', '--batch-size', '4', '-o', 'out/stats.npz', '--quiet',
          '--stacks', 'decoder_self,encoder,decoder_cross']
  result = gqa(*argv)
  assert result.status == 0, result.err
  path = tmp_path / 'out' / 'stats.npz'
  assert f'-> {path}: 6 modules (5 [D, D] moments, D = 128), 4 examples' in result.out
  assert not list((tmp_path / 'out').glob('.*'))  # no lock or partial file left
  metadata = calibration.load('out/stats.npz').metadata
  assert metadata['stacks'] == list(ALL) and metadata['num_examples'] == 4
  again = gqa(*argv)
  assert again.status == 0 and 'already holds 4 examples' in again.out
  more = gqa(*argv[:5], '5', *argv[6:])
  assert more.status == 0 and '5 examples (1 new)' in more.out
  assert 'continuing with example 5 of 5' in more.err
  changed = gqa(*argv[:-2])  # the default stacks
  assert_user_error(changed, "stacks ['encoder', 'decoder_self', 'decoder_cross'] there, "
                    "['decoder_self', 'decoder_cross'] now", 'choose another -o')
  # Statistics without a stack: asking for one of its modules names the flag that adds it.
  modules = {m: e for m, e in metadata['modules'].items() if not m.startswith('encoder/')}
  partial = calibration.Calibration(path, dict(metadata, modules=modules,
                                               stacks=list(network.PAPER_STACKS)))
  with pytest.raises(calibration.CalibrationError,
                     match='rerun gqa-jax calibrate with --stacks encoder,decoder_self,'):
    partial.moment('encoder/layers_0/attention')
  assert partial.moment('decoder/layers_0/encoder_decoder_attention').shape == (128, 128)


@pytest.mark.parametrize('argv, fragments', [
    (['--task', 'gqa_builtin_span'], ['did you mean gqa_builtin_span_corruption']),
    (['--split', 'test'], ["--split 'test'", 'its splits are train, validation']),
    (['--num-examples', '0'], ['--num-examples', 'must be a positive integer']),
    (['-o', '.'], ['is a folder', 'stats.npz']),
    (['-o', 'a_file/stats.npz'], ['is a file, not a folder']),
    (['missing_ckpt'], ['missing_ckpt', 'does not exist']),
    (['--stacks', 'decoder'], ['--stacks', 'decoder_self']),
])
def test_cli_bad_input_is_one_line(gqa, tmp_path, monkeypatch, argv, fragments):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'a_file').write_text('x')
  flags = {'--task': TASK, '--num-examples': '2', '-o': 'stats.npz'}
  ckpt = CKPT
  for i in range(0, len(argv) - 1, 2):
    flags[argv[i]] = argv[i + 1]
  if argv == ['missing_ckpt']:
    ckpt = 'missing_ckpt'
  line = [x for k, v in flags.items() for x in (k, v)]
  assert_user_error(gqa('calibrate', ckpt, *line, '--quiet'), *fragments)
  assert not (tmp_path / 'stats.npz').exists()


def test_convert_reads_the_statistics(stats, tmp_path):
  """`convert --method svd --calibration` weights each module by its moment: a
  cross-attention layer's K kernel is the SVD weighted by the encoder output's."""
  from gqa_jax import convert
  path = stats[0]
  summary = convert.convert(CKPT, tmp_path / 'svd', 2, method='svd', calibration=path,
                            progress=False, notify=lambda m: None)
  assert summary['calibration'] == str(path)
  kernel = 'decoder/layers_1/encoder_decoder_attention/key/kernel'
  source = checkpoints.open_checkpoint(CKPT).params[kernel].read()
  moment = calibration.load(path).moment('decoder/layers_1/encoder_decoder_attention')
  expected = convert.factor_pool(source, 8, 2, 16, 'svd', moment)[0]
  weighted = checkpoints.open_checkpoint(tmp_path / 'svd').params[kernel].read()
  np.testing.assert_allclose(weighted, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(weighted, convert.factor_pool(source, 8, 2, 16, 'svd')[0], atol=1e-3)
