"""The MHA -> GQA converter: pooling against NumPy, lossless and identity conversions,
T5X parity through the CLI, optimizer state, and bad inputs that must write nothing."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from gqa_jax import calibration, checkpoints, cli, convert, network, optimizers
from gqa_jax.checkpoints import t5x

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny'
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')
H = 8  # head dim of the tiny preset
KV = ('key', 'value')


def tiny_source(tmp_path, identical_groups_of=None, step=7):
  """A legacy T5X checkpoint of the tiny preset with Adafactor-shaped state.

  identical_groups_of=g makes decoder K/V heads identical within contiguous groups of g.
  """
  cfg = network.get_preset('tiny', vocab_size=64, dtype='float32')
  params = {'/'.join(k): np.array(v) for k, v in flatten_dict(
      network.init_params(cfg, jax.random.PRNGKey(1))).items()}
  if identical_groups_of:
    for name in params:
      if name.startswith('decoder/') and name.split('/')[-2] in KV:
        heads = params[name].reshape(32, -1, identical_groups_of, H)[:, :, :1]
        params[name] = np.repeat(heads, identical_groups_of, axis=2).reshape(32, 32)
  rng = np.random.default_rng(0)
  opt = {}
  for name, value in params.items():  # every kernel factored; placeholders are zeros
    for slot, shape in optimizers.t5x_slot_shapes(value.shape, min_dim_size_to_factor=4).items():
      opt[f'param_states/{name}/{slot}'] = (np.zeros(1, np.float32) if shape == (1,)
                                             else rng.random(shape, np.float32))
  leaves = [(f'target/{k}', v) for k, v in params.items()] + [('state/step', np.int32(step))]
  t5x.write_all(tmp_path / 'src' / f'checkpoint_{step}',
                leaves + [(f'state/{k}', v) for k, v in opt.items()])
  return cfg, params, opt, tmp_path / 'src'


def read_all(path):
  source = checkpoints.open_checkpoint(path)
  return (source, {k: t.read() for k, t in source.params.items()},
          {k: t.read() for k, t in (source.opt_state or {}).items()})


def logits(cfg, params, seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, 64, (2, 7))
  enc[1, -2:] = 0
  dec = rng.randint(2, 64, (2, 5))
  tree = {}
  for name, value in params.items():
    node = tree
    for part in name.split('/')[:-1]:
      node = node.setdefault(part, {})
    node[name.split('/')[-1]] = value
  return np.asarray(network.Transformer(cfg).apply({'params': tree}, enc, dec, dec,
                                                   enable_dropout=False))


@pytest.mark.parametrize('k,fmt', [(1, 'orbax'), (2, 'orbax'), (2, 't5x')])
def test_mean_pooling_matches_numpy_and_the_rest_is_bit_identical(tmp_path, k, fmt):
  _, params, opt, src = tiny_source(tmp_path)
  convert.convert(src, tmp_path / 'dst', k, output_format=fmt, progress=False)
  out, got, got_opt = read_all(tmp_path / 'dst')
  assert out.step == 7 and out.config.kv_heads('decoder_self') == k
  assert out.config.kv_heads('encoder') == 4
  for name, value in params.items():
    if name.startswith('decoder/') and name.split('/')[-2] in KV:
      expected = np.stack([value[:, g * H:(g + 1) * H] for g in range(4)])  # [N, D, H]
      expected = expected.reshape(k, 4 // k, 32, H).mean(1)  # contiguous groups
      np.testing.assert_allclose(got[name], np.concatenate(list(expected), 1), rtol=1e-6)
    else:
      np.testing.assert_array_equal(got[name], value)
  for name, value in opt.items():
    param = name[len('param_states/'):].rsplit('/', 1)[0]
    if param.startswith('decoder/') and param.split('/')[-2] in KV:
      assert not got_opt[name].any()  # moments of converted tensors start from zero
      # Factored by the pooled kernel's own shape, at the source's threshold (4):
      # [32, 8] has v_row over its 8 columns, v_col over its 32 rows.
      assert got_opt[name].shape == optimizers.t5x_slot_shapes(
          (32, k * H), min_dim_size_to_factor=4)[name.rsplit('/', 1)[1]]
    else:
      np.testing.assert_array_equal(got_opt[name], value)
  record = json.loads((tmp_path / 'dst' / 'checkpoint_7' / 'gqa_jax.json').read_text())
  assert record['min_dim_size_to_factor'] == 4  # read off the source's slots


@pytest.mark.parametrize('k', [1, 2])
def test_identical_heads_within_groups_convert_losslessly(tmp_path, k):
  cfg, params, _, src = tiny_source(tmp_path, identical_groups_of=4 // k)
  convert.convert(src, tmp_path / 'dst', k, progress=False)
  out, got, _ = read_all(tmp_path / 'dst')
  gqa_cfg = dataclasses.replace(out.config, dtype='float32')
  assert gqa_cfg.kv_heads('decoder_cross') == k
  np.testing.assert_allclose(logits(gqa_cfg, got), logits(cfg, params), atol=1e-5)


def test_identity_conversion_is_exact(tmp_path):
  cfg, params, opt, src = tiny_source(tmp_path)
  convert.convert(src, tmp_path / 'dst', 4, progress=False)
  out, got, got_opt = read_all(tmp_path / 'dst')
  assert all(np.array_equal(got[n], params[n]) for n in params)
  assert all(np.array_equal(got_opt[n], opt[n]) for n in opt)
  np.testing.assert_array_equal(logits(dataclasses.replace(out.config, dtype='float32'), got),
                                logits(cfg, params))


def test_first_and_random_methods(tmp_path):
  _, params, _, src = tiny_source(tmp_path)
  name = 'decoder/layers_0/encoder_decoder_attention/value/kernel'
  for method in ('first', 'random', 'random'):
    dst = tmp_path / f'dst-{method}'
    convert.convert(src, dst, 2, method=method, overwrite=True, progress=False,
                    seed=3 if method == 'random' else None)
    got = read_all(dst)[1][name]
    if method == 'first':  # heads 0 and 2: the first of each contiguous pair
      np.testing.assert_array_equal(got, np.concatenate(
          [params[name][:, 0:H], params[name][:, 2 * H:3 * H]], 1))
    else:
      assert got.shape == (32, 2 * H) and 0.1 < got.std() < 0.3  # ~ 1/sqrt(32)
  # The same seed gives the same random init.
  np.testing.assert_array_equal(read_all(tmp_path / 'dst-random')[1][name], got)


def test_step_and_optimizer_state_options(tmp_path):
  _, _, _, src = tiny_source(tmp_path, step=1000)
  convert.convert(src, tmp_path / 'a', 2, reset_step=True, opt_state='drop', progress=False)
  out = checkpoints.open_checkpoint(tmp_path / 'a')
  assert out.step == 0 and out.opt_state is None
  assert (tmp_path / 'a' / 'checkpoint_0').is_dir()
  convert.convert(src, tmp_path / 'b', 2, progress=False)
  out = checkpoints.open_checkpoint(tmp_path / 'b')
  assert out.step == 1000 and out.metadata['source']['step'] == 1000
  assert out.metadata['method'] == 'mean' and out.metadata['num_kv_heads'] == 2


def test_slots_follow_one_factoring_or_the_conversion_is_refused(tmp_path, capsys):
  """Pooled kernels' slots use the threshold that wrote the source's: a source that no
  threshold explains, or an explicit threshold it contradicts, writes nothing."""
  _, params, opt, src = tiny_source(tmp_path)  # every kernel factored: threshold <= 4
  with pytest.raises(convert.ConversionError, match='contradicts .* fit 4'):
    convert.convert(src, tmp_path / 'dst', 2, min_dim_size_to_factor=16, progress=False)
  convert.convert(src, tmp_path / 'dst', 2, min_dim_size_to_factor=4, progress=False)
  name = 'decoder/layers_0/self_attention/key/kernel'
  mixed = dict(opt, **{f'param_states/{name}/{s}': np.zeros(shape, np.float32)
                       for s, shape in optimizers.t5x_slot_shapes(
                           (32, 32), factored=False).items()})
  leaves = [(f'target/{k}', v) for k, v in params.items()] + [('state/step', np.int32(7))]
  t5x.write_all(tmp_path / 'mixed' / 'checkpoint_7',
                leaves + [(f'state/{k}', v) for k, v in mixed.items()])
  assert_fails_writing_nothing(capsys, tmp_path, [tmp_path / 'mixed', tmp_path / 'out',
                                                  '--num-kv-heads', '2'], '--opt-state drop')
  assert cli.main(['convert', str(tmp_path / 'mixed'), str(tmp_path / 'out'), '--quiet',
                   '--num-kv-heads', '2', '--opt-state', 'drop']) == 0


@needs_fixture
@pytest.mark.parametrize('src', ['legacy', 'orbax/checkpoint_3'])
def test_t5x_fixture_through_the_cli_reproduces_reference_logits(tmp_path, src):
  assert cli.main(['convert', str(FIXTURE / src), str(tmp_path / 'out'),
                   '--num-kv-heads', '4', '--quiet']) == 0
  config, params = checkpoints.load_model(tmp_path / 'out')
  ref = np.load(FIXTURE / 'reference_logits.npz')
  out = network.Transformer(dataclasses.replace(config, dtype='float32')).apply(
      {'params': params}, ref['encoder_input_tokens'], ref['decoder_input_tokens'],
      ref['decoder_target_tokens'], enable_dropout=False)
  np.testing.assert_allclose(out, ref['logits'], atol=1e-4)


def assert_fails_writing_nothing(capsys, tmp_path, args, message):
  before = set(tmp_path.iterdir())
  code = cli.main(['convert', *map(str, args), '--quiet'])
  err = capsys.readouterr().err.strip()
  assert code != 0
  assert len(err.splitlines()) == 1 and message in err, err
  assert set(tmp_path.iterdir()) == before  # no output, no temporary folder


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, capsys):
  _, params, _, src = tiny_source(tmp_path)
  dst = tmp_path / 'dst'
  fail = lambda args, msg: assert_fails_writing_nothing(capsys, tmp_path, args, msg)
  fail([tmp_path / 'missing', dst, '--num-kv-heads', '2'], 'does not exist')
  (tmp_path / 'junk').mkdir()
  (tmp_path / 'junk' / 'weights.npz').write_bytes(b'x')
  fail([tmp_path / 'junk', dst, '--num-kv-heads', '2'], 'not a checkpoint')
  fail([src, dst, '--num-kv-heads', '3'], 'num_heads=4')

  # A key no rule knows.
  leaves = [(f'target/{k}', v) for k, v in params.items()]
  t5x.write_all(tmp_path / 'extra' / 'checkpoint_1',
                leaves + [('target/encoder/adapter/kernel', np.ones((32, 4), np.float32))])
  fail([tmp_path / 'extra', dst, '--num-kv-heads', '2'], 'encoder/adapter/kernel')

  # A tensor of the wrong shape.
  bad = dict(params, **{'decoder/layers_1/mlp/wo/kernel': np.ones((64, 30), np.float32)})
  t5x.write_all(tmp_path / 'shape' / 'checkpoint_1', [(f'target/{k}', v) for k, v in bad.items()])
  fail([tmp_path / 'shape', dst, '--num-kv-heads', '2'], 'decoder/layers_1/mlp/wo/kernel')

  # Corrupted tensor data, found midway through writing.
  chunk = next((src / 'checkpoint_7' / 'target.decoder.layers_1.mlp.wo.kernel').glob('0*'))
  good = chunk.read_bytes()
  chunk.write_bytes(good[:40])
  fail([src, dst, '--num-kv-heads', '2'], 'truncated or corrupted')
  chunk.write_bytes(good)

  # pytorch_model.bin is a pickle: refused without --allow-pickle.
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'pytorch_model.bin').write_bytes(b'not really a pickle')
  (tmp_path / 'hf' / 'config.json').write_text('{"model_type": "t5"}')
  fail([tmp_path / 'hf', dst, '--num-kv-heads', '2'], '--allow-pickle')

  # An existing destination is kept unless --overwrite.
  dst.mkdir()
  (dst / 'keep.txt').write_text('mine')
  fail([src, dst, '--num-kv-heads', '2'], '--overwrite')
  assert (dst / 'keep.txt').read_text() == 'mine'
  # --overwrite deletes DST: only a folder of checkpoints, never someone's other files.
  fail([src, dst, '--num-kv-heads', '2', '--overwrite'], 'keep.txt')
  assert (dst / 'keep.txt').read_text() == 'mine'
  (dst / 'keep.txt').unlink()
  (dst / 'checkpoint_1').mkdir()
  assert cli.main(['convert', str(src), str(dst), '--num-kv-heads', '2', '--overwrite',
                   '--quiet']) == 0
  assert not (dst / 'checkpoint_1').exists()
  assert checkpoints.open_checkpoint(dst).config.kv_heads('decoder_self') == 2


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
  _, _, _, src = tiny_source(tmp_path)
  calls = []

  def interrupt(*args):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return np.zeros((32, 16), np.float32)
  monkeypatch.setattr(convert, 'pool_kv', interrupt)
  before = set(tmp_path.iterdir())
  with pytest.raises(KeyboardInterrupt):
    convert.convert(src, tmp_path / 'dst', 2, progress=False)
  assert set(tmp_path.iterdir()) == before


def test_every_key_must_match_exactly_one_rule():
  names = ['encoder/layers_0/attention/key/kernel', 'step', 'decoder/logits_dense/kernel',
           'param_states/encoder/layers_0/mlp/wo/kernel/v_row']
  assert set(convert.match_rules(names)) == set(names)
  with pytest.raises(convert.ConversionError, match='lm_head'):
    convert.match_rules(names + ['lm_head/kernel'])


def test_inspect_reports_format_step_config_and_tensors(tmp_path, capsys):
  _, params, _, src = tiny_source(tmp_path, step=12)
  assert cli.main(['convert', str(src), str(tmp_path / 'dst'), '--num-kv-heads', '1',
                   '--quiet']) == 0
  capsys.readouterr()
  assert cli.main(['inspect', str(tmp_path / 'dst')]) == 0
  out = capsys.readouterr().out
  assert 'gqa-jax, step 12' in out and 'decoder_self 1 (MQA)' in out and 'encoder 4 (MHA)' in out
  assert 'decoder/layers_0/self_attention/key/kernel' in out and '(32, 8)' in out
  assert cli.main(['inspect', str(src), '--json', '--opt-state']) == 0
  report = json.loads(capsys.readouterr().out)
  assert report['format'] == 't5x-legacy' and report['step'] == 12
  assert report['kv_heads'] == {'encoder': 4, 'decoder_self': 4, 'decoder_cross': 4}
  assert report['num_params'] == sum(v.size for v in params.values())
  assert report['opt_state_tensors'] == 4 * len(params) == len(report['opt_state'])
  assert cli.main(['inspect', str(tmp_path / 'nothing')]) == 2
  assert 'does not exist' in capsys.readouterr().err


@pytest.mark.parametrize('k', [1, 2])
def test_svd_converts_heads_made_by_invertible_maps_back_exactly(tmp_path, k):
  """An MHA whose decoder K (V) heads are one shared head per group times an invertible
  map per head (K_n = K_g R_n, V_n = V_g P_n) has group rank = head_dim: `svd` converts it
  to GQA-k with the same outputs (maps folded into query and out kernels), `mean` does
  not; the rewritten query/out kernels' Adafactor slots restart at zero."""
  cfg, params, opt, _ = tiny_source(tmp_path)
  rng = np.random.default_rng(k)
  r = 4 // k
  for name in list(params):
    if name.startswith('decoder/') and name.split('/')[-2] in KV:
      shared = rng.standard_normal((32, k, 1, H)) / 6
      maps = rng.standard_normal((1, k, r, H, H)) / 3 + np.eye(H)
      params[name] = np.einsum('dgxh,xgrhk->dgrk', shared, maps).reshape(32, 4 * H).astype(
          np.float32)
  leaves = [(f'target/{n}', v) for n, v in params.items()] + [('state/step', np.int32(7))]
  t5x.write_all(tmp_path / 'made' / 'checkpoint_7',
                leaves + [(f'state/{n}', v) for n, v in opt.items()])
  reference = logits(cfg, params)
  for method in ('svd', 'mean'):
    convert.convert(tmp_path / 'made', tmp_path / method, k, method=method, progress=False)
    out, got, got_opt = read_all(tmp_path / method)
    gqa = logits(dataclasses.replace(out.config, dtype='float32'), got)
    if method == 'svd':
      np.testing.assert_allclose(gqa, reference, atol=2e-4)
      for name in params:
        if name.split('/')[-2] in KV and name.startswith('decoder/'):
          continue  # pooled: [32, k * H]
        folded = name.startswith('decoder/') and name.split('/')[-2] in ('query', 'out')
        assert np.array_equal(got[name], params[name]) != folded, name
        if folded:
          assert not any(got_opt[f'param_states/{name}/{s}'].any() for s in ('v_row', 'v_col'))
    else:
      assert np.abs(gqa - reference).max() > 1e-2


def test_svd_pool_with_one_head_per_group_is_lossless(tmp_path):
  """G = N: each head is its own group, and U_g A_g reproduces its kernel."""
  _, params, _, _ = tiny_source(tmp_path)
  kernel = params['decoder/layers_0/self_attention/key/kernel']
  shared, maps = convert.factor_pool(kernel, 4, 4, H)
  np.testing.assert_allclose(
      np.einsum('dgk,gkh->dgh', shared.reshape(32, 4, H), maps).reshape(32, 4 * H), kernel,
      atol=1e-5)


def test_svd_refuses_cross_layer_sharing(tmp_path, capsys):
  _, _, _, src = tiny_source(tmp_path)
  with pytest.raises(convert.ConversionError, match='does not combine with --kv-layers'):
    convert.convert(src, tmp_path / 'dst', 1, method='svd', kv_layers='cla2', progress=False)
  assert not (tmp_path / 'dst').exists()


def write_made(tmp_path, name, params, opt, step=7):
  """A legacy T5X checkpoint of `params` (with the source's optimizer state)."""
  leaves = [(f'target/{n}', v) for n, v in params.items()] + [('state/step', np.int32(step))]
  t5x.write_all(tmp_path / name / f'checkpoint_{step}',
                leaves + [(f'state/{n}', v) for n, v in opt.items()])
  return tmp_path / name


def orthogonal(rng, n):
  return np.linalg.qr(rng.standard_normal((n, n)))[0]


@pytest.mark.parametrize('k', [1, 2])
def test_procrustes_converts_rotated_copies_back_exactly(tmp_path, k):
  """An MHA whose decoder K (V) heads are rotated copies of one kernel per group
  (K_n = K_g Q_n, Q_n orthogonal) is converted to GQA-k with the same outputs by
  `procrustes` (rotations folded into query and out kernels); `mean` is off."""
  cfg, params, opt, _ = tiny_source(tmp_path)
  rng = np.random.default_rng(10 + k)
  for name in list(params):
    if name.startswith('decoder/') and name.split('/')[-2] in KV:
      shared = rng.standard_normal((32, k, H)) / 4
      rots = np.stack([orthogonal(rng, H) for _ in range(4)]).reshape(k, 4 // k, H, H)
      params[name] = np.einsum('dgh,grhk->dgrk', shared, rots).reshape(32, 4 * H).astype(
          np.float32)
  src = write_made(tmp_path, 'made', params, opt)
  reference = logits(cfg, params)
  for method in ('procrustes', 'mean'):
    convert.convert(src, tmp_path / method, k, method=method, progress=False)
    out, got, got_opt = read_all(tmp_path / method)
    gqa = logits(dataclasses.replace(out.config, dtype='float32'), got)
    if method == 'procrustes':
      np.testing.assert_allclose(gqa, reference, atol=2e-4)
      query = 'decoder/layers_0/self_attention/query/kernel'
      assert not np.array_equal(got[query], params[query])
      assert not any(got_opt[f'param_states/{query}/{s}'].any() for s in ('v_row', 'v_col'))
    else:
      assert np.abs(gqa - reference).max() > 1e-2


def shuffled_pairs(params, pairs_of):
  """Decoder K/V heads made identical in the pairs `pairs_of(module)` gives (e.g. heads 0
  and 2, 1 and 3), so that mean pooling is lossless only for that grouping."""
  for name in list(params):
    if name.startswith('decoder/') and name.split('/')[-2] in KV:
      heads = params[name].reshape(32, 4, H).copy()
      for a, b in pairs_of(name.rsplit('/', 2)[0]):
        heads[:, b] = heads[:, a]
      params[name] = heads.reshape(32, 4 * H)


def test_similarity_grouping_finds_shuffled_identical_heads_and_keeps_the_function(tmp_path):
  """Identical heads that are not contiguous: the searched grouping pools each with its
  twin (lossless) and permutes query columns, out rows and the decoder's relative-bias
  rows to match, so the GQA-2 model's outputs are the source's; contiguous mean pooling
  is off. Self-attention layers share one order (one bias table); cross-attention layers
  get their own."""
  cfg, params, opt, _ = tiny_source(tmp_path)
  cross = {'decoder/layers_0/encoder_decoder_attention': [(0, 3), (1, 2)],
           'decoder/layers_1/encoder_decoder_attention': [(0, 2), (1, 3)]}
  shuffled_pairs(params, lambda module: cross.get(module, [(0, 2), (1, 3)]))
  src = write_made(tmp_path, 'made', params, opt)
  reference = logits(cfg, params)
  for grouping in ('similarity', 'contiguous'):
    summary = convert.convert(src, tmp_path / grouping, 2, grouping=grouping, progress=False)
    out, got, got_opt = read_all(tmp_path / grouping)
    gqa = logits(dataclasses.replace(out.config, dtype='float32'), got)
    if grouping == 'contiguous':
      assert np.abs(gqa - reference).max() > 1e-2
      continue
    np.testing.assert_allclose(gqa, reference, atol=2e-5)
    groups = summary['groups']
    assert groups['decoder/layers_0/self_attention'] == [0, 2, 1, 3]
    assert groups['decoder/layers_1/self_attention'] == [0, 2, 1, 3]
    assert groups['decoder/layers_0/encoder_decoder_attention'] == [0, 3, 1, 2]
    assert 'decoder/layers_1/encoder_decoder_attention' in groups
    assert out.metadata['groups'] == groups
    bias = 'decoder/relpos_bias/rel_embedding'
    np.testing.assert_array_equal(got[bias], params[bias][[0, 2, 1, 3]])
    assert not got_opt[f'param_states/{bias}/v'].any()
    enc = 'encoder/relpos_bias/rel_embedding'  # the encoder is not converted
    np.testing.assert_array_equal(got[enc], params[enc])
    np.testing.assert_array_equal(got_opt[f'param_states/{enc}/v'], opt[f'param_states/{enc}/v'])


def test_any_consistent_permutation_of_heads_leaves_the_outputs_unchanged(tmp_path):
  """Random orders per stack (self-attention, with its bias rows) and per cross-attention
  layer, applied through the converter's own mapping (Plan.permuted + permute_heads) to
  every tensor: the outputs do not change. Leaving out the bias rows or the out rows
  changes them (the test can fail)."""
  cfg, params, _, _ = tiny_source(tmp_path)
  rng = np.random.default_rng(0)

  def order():  # any order but the identity
    while True:
      perm = rng.permutation(4)
      if (perm != np.arange(4)).any():
        return perm

  perms = {}
  for stack in network.STACKS:
    shared = order()
    for module in calibration.module_names(cfg, stack):
      perms[module] = shared if stack != 'decoder_cross' else order()
  plan = convert.Plan(cfg, cfg, 'mean', 0, perms=perms)

  def permuted(skip=()):
    out = {}
    for name, value in params.items():
      order = None if name.endswith(skip) else plan.permuted(name)
      out[name] = convert.permute_heads(
          value, order, 1 if name.endswith('rel_embedding') else H,
          axis=0 if name.endswith(('/out/kernel', 'rel_embedding')) else 1)
    return out

  reference = logits(cfg, params)
  assert sum(not np.array_equal(permuted()[n], params[n]) for n in params) == 26
  np.testing.assert_allclose(logits(cfg, permuted()), reference, atol=2e-5)
  for skip in ('rel_embedding', '/out/kernel'):
    assert np.abs(logits(cfg, permuted((skip,))) - reference).max() > 1e-3, skip


def test_grouping_and_procrustes_from_the_cli_and_their_refusals(tmp_path, monkeypatch,
                                                                 capsys):
  _, params, opt, _ = tiny_source(tmp_path)
  shuffled_pairs(params, lambda module: [(0, 2), (1, 3)])
  write_made(tmp_path, 'made', params, opt)
  monkeypatch.chdir(tmp_path)
  assert cli.main(['convert', 'made', 'out/gqa2', '--num-kv-heads', '2', '--method',
                   'procrustes', '--grouping', 'similarity', '--quiet']) == 0
  assert 'Procrustes' in capsys.readouterr().out
  assert cli.main(['inspect', 'out/gqa2']) == 0
  assert 'similarity grouping (4 modules reordered)' in capsys.readouterr().out
  for flags, message in (
      (['--method', 'wgqa', '--grouping', 'similarity'], 'does not combine with --method wgqa'),
      (['--calibration', 'stats.npz'], 'does not use it'),
      (['--method', 'procrustes', '--kv-layers', 'cla2'], 'does not combine with --kv-layers')):
    assert cli.main(['convert', 'made', 'refused', '--num-kv-heads', '1', *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'refused').exists()


def test_every_stack_with_the_encoder_converts_by_procrustes_with_searched_groups(tmp_path):
  """--stacks with the encoder: twin heads of encoder and decoder, rotated copies within
  each twin pair, out of contiguous order; procrustes with similarity grouping (the
  encoder's bias rows permuted with its heads) keeps every output of the source."""
  cfg, params, opt, _ = tiny_source(tmp_path)
  rng = np.random.default_rng(5)
  for name in list(params):
    if name.split('/')[-2] in KV:
      heads = params[name].reshape(32, 4, H).copy()
      for a, b in ((0, 3), (1, 2)):
        heads[:, b] = heads[:, a] @ orthogonal(rng, H)
      params[name] = heads.reshape(32, 4 * H)
  src = write_made(tmp_path, 'made', params, opt)
  summary = convert.convert(src, tmp_path / 'dst', 2, method='procrustes',
                            grouping='similarity', stacks=network.STACKS, progress=False)
  out, got, _ = read_all(tmp_path / 'dst')
  assert out.config.kv_heads('encoder') == 2
  assert summary['groups']['encoder/layers_0/attention'] == [0, 3, 1, 2]
  bias = 'encoder/relpos_bias/rel_embedding'
  np.testing.assert_array_equal(got[bias], params[bias][[0, 3, 1, 2]])
  np.testing.assert_allclose(logits(dataclasses.replace(out.config, dtype='float32'), got),
                             logits(cfg, params), atol=2e-4)
