"""Hugging Face T5 reader: name mapping and transposes, logits tying, file checks, and
logits parity with transformers' own T5ForConditionalGeneration."""

import json
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors
from flax.traverse_util import unflatten_dict
from safetensors.numpy import save_file

from gqa_jax import network
from gqa_jax.checkpoints import base, hf

N, H, D, F, V, L = 4, 8, 32, 64, 128, 2


def read_params(source):
  return unflatten_dict({tuple(k.split('/')): t.read() for k, t in source.params.items()})


def hf_config(gated=True, **kw):
  """config.json as transformers 4 wrote it for a tiny T5.1.1 (gated) or original T5."""
  cfg = dict(model_type='t5', d_model=D, d_kv=H, d_ff=F, num_heads=N, num_layers=L,
             num_decoder_layers=L, vocab_size=V, relative_attention_num_buckets=32,
             relative_attention_max_distance=128, dropout_rate=0.1,
             feed_forward_proj='gated-gelu' if gated else 'relu', tie_word_embeddings=not gated)
  return {**cfg, **kw}


def hf_state(gated=True, lm_head=True, dtype=np.float32, seed=0):
  """Random tensors under transformers' T5 names and torch's [out, in] layout."""
  rng = np.random.default_rng(seed)
  x = lambda *shape: rng.standard_normal(shape).astype(dtype)
  s = {'shared.weight': x(V, D), 'encoder.final_layer_norm.weight': x(D),
       'decoder.final_layer_norm.weight': x(D)}
  mlp = {'wi_0': (F, D), 'wi_1': (F, D), 'wo': (D, F)} if gated else {'wi': (F, D), 'wo': (D, F)}
  for stack, blocks in (('encoder', ('SelfAttention',)),
                        ('decoder', ('SelfAttention', 'EncDecAttention'))):
    s[f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'] = x(32, N)
    for i in range(L):
      p = f'{stack}.block.{i}.layer'
      for j, block in enumerate(blocks):
        s.update({f'{p}.{j}.{block}.{w}.weight': x(N * H, D) for w in 'qkv'})
        s[f'{p}.{j}.{block}.o.weight'] = x(D, N * H)
        s[f'{p}.{j}.layer_norm.weight'] = x(D)
      s[f'{p}.{len(blocks)}.layer_norm.weight'] = x(D)
      s.update({f'{p}.{len(blocks)}.DenseReluDense.{k}.weight': x(*v) for k, v in mlp.items()})
  if lm_head:
    s['lm_head.weight'] = x(V, D)
  return s


def write(tmp_path, state, config):
  save_file(state, str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text(json.dumps(config))
  return tmp_path


# ------------------------------------------------------------------ without torch

def test_names_and_transposes_match_numpy(tmp_path):
  state = hf_state()
  src = hf.open_hf(write(tmp_path, state, hf_config()))
  assert (src.format, src.step, src.opt_state) == ('hf-safetensors', None, None)
  assert src.config == network.get_preset(
      'tiny', vocab_size=V, logits_via_embedding=False, dtype='float32')
  got = {k: t.read() for k, t in src.params.items()}
  want = {'token_embedder/embedding': state['shared.weight'],
          'decoder/logits_dense/kernel': state['lm_head.weight'].T,
          'encoder/encoder_norm/scale': state['encoder.final_layer_norm.weight'],
          'decoder/decoder_norm/scale': state['decoder.final_layer_norm.weight']}
  for stack in ('encoder', 'decoder'):
    want[f'{stack}/relpos_bias/rel_embedding'] = state[
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'].T
  attn = dict(q='query', k='key', v='value', o='out')
  for i in range(L):
    e, d = f'encoder.block.{i}.layer', f'decoder.block.{i}.layer'
    for hw, ours in attn.items():
      want[f'encoder/layers_{i}/attention/{ours}/kernel'] = state[f'{e}.0.SelfAttention.{hw}.weight'].T
      want[f'decoder/layers_{i}/self_attention/{ours}/kernel'] = state[
          f'{d}.0.SelfAttention.{hw}.weight'].T
      want[f'decoder/layers_{i}/encoder_decoder_attention/{ours}/kernel'] = state[
          f'{d}.1.EncDecAttention.{hw}.weight'].T
    for j, name in enumerate(('pre_attention_layer_norm', 'pre_mlp_layer_norm')):
      want[f'encoder/layers_{i}/{name}/scale'] = state[f'{e}.{j}.layer_norm.weight']
    for j, name in enumerate(('pre_self_attention_layer_norm', 'pre_cross_attention_layer_norm',
                              'pre_mlp_layer_norm')):
      want[f'decoder/layers_{i}/{name}/scale'] = state[f'{d}.{j}.layer_norm.weight']
    for w in ('wi_0', 'wi_1', 'wo'):
      want[f'encoder/layers_{i}/mlp/{w}/kernel'] = state[f'{e}.1.DenseReluDense.{w}.weight'].T
      want[f'decoder/layers_{i}/mlp/{w}/kernel'] = state[f'{d}.2.DenseReluDense.{w}.weight'].T
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got[k].flags.c_contiguous and src.params[k].shape == want[k].shape


def test_original_t5_is_tied_and_skips_copies(tmp_path):
  state = hf_state(gated=False)
  state['lm_head.weight'] = state['shared.weight']  # a tied copy some savers keep
  state['encoder.embed_tokens.weight'] = state['shared.weight']
  # Old hub checkpoints carry this unused table; transformers ignores it.
  state['decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight'] = np.ones(
      (32, N), np.float32)
  cfg = hf_config(gated=False)
  del cfg['tie_word_embeddings']  # absent means tied
  src = hf.open_hf(write(tmp_path, state, cfg))
  assert src.config.logits_via_embedding and src.config.mlp_activations == ('relu',)
  assert 'decoder/logits_dense/kernel' not in src.params
  np.testing.assert_array_equal(src.params['decoder/layers_1/mlp/wi/kernel'].read(),
                                state['decoder.block.1.layer.2.DenseReluDense.wi.weight'].T)


def test_transformers5_unscaled_tied_head_is_shared_transposed(tmp_path):
  state = hf_state(lm_head=False)
  cfg = hf_config(tie_word_embeddings=True, scale_decoder_outputs=False)
  src = hf.open_hf(write(tmp_path, state, cfg))
  assert not src.config.logits_via_embedding
  np.testing.assert_array_equal(src.params['decoder/logits_dense/kernel'].read(),
                                state['shared.weight'].T)


def test_untied_config_without_lm_head_is_refused(tmp_path):
  with pytest.raises(base.CheckpointError, match='lm_head'):
    hf.open_hf(write(tmp_path, hf_state(lm_head=False), hf_config()))


def test_bfloat16_is_read_lazily_and_without_numpy_support(tmp_path, monkeypatch):
  state = hf_state(dtype=ml_dtypes.bfloat16)
  src = hf.open_hf(write(tmp_path, state, hf_config()))
  assert src.config.dtype == 'bfloat16'
  t = src.params['encoder/layers_0/attention/query/kernel']
  assert t.dtype == ml_dtypes.bfloat16 and t.shape == (D, N * H)
  np.testing.assert_array_equal(t.read(), state['encoder.block.0.layer.0.SelfAttention.q.weight'].T)

  def no_bf16(*args, **kwargs):  # a safetensors release that cannot give NumPy bf16
    raise TypeError('data type bfloat16 not understood')
  monkeypatch.setattr(safetensors, 'safe_open', no_bf16)
  src = hf.open_hf(tmp_path)  # opening reads headers only, never tensor data
  emb = src.params['token_embedder/embedding'].read()
  assert emb.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(emb, state['shared.weight'])


def test_sharded_safetensors_with_index(tmp_path):
  state = hf_state()
  names = sorted(state)
  shards = {'model-00001-of-00002.safetensors': names[::2],
            'model-00002-of-00002.safetensors': names[1::2]}
  for file, keys in shards.items():
    save_file({k: state[k] for k in keys}, str(tmp_path / file))
  index = {'metadata': {}, 'weight_map': {k: f for f, keys in shards.items() for k in keys}}
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(index))
  (tmp_path / 'config.json').write_text(json.dumps(hf_config()))
  assert hf.is_hf_checkpoint(tmp_path)
  src = hf.open_hf(tmp_path)
  np.testing.assert_array_equal(src.params['decoder/layers_1/mlp/wo/kernel'].read(),
                                state['decoder.block.1.layer.2.DenseReluDense.wo.weight'].T)


def test_unmatched_key_is_listed(tmp_path):
  state = hf_state()
  state['encoder.block.0.layer.0.SelfAttention.adapter.weight'] = np.ones(3, np.float32)
  state['encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight'] = np.ones(
      (32, N), np.float32)  # per-layer bias (umT5) is another model
  with pytest.raises(base.CheckpointError, match='match no T5 parameter') as e:
    hf.open_hf(write(tmp_path, state, hf_config()))
  assert 'SelfAttention.adapter.weight' in str(e.value)
  assert 'block.1.layer.0.SelfAttention.relative_attention_bias' in str(e.value)


def test_truncated_and_corrupted_files_fail_at_open(tmp_path):
  path = write(tmp_path, hf_state(), hf_config()) / 'model.safetensors'
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  with pytest.raises(base.CheckpointError, match='truncated') as e:
    hf.open_hf(tmp_path)
  assert 'model.safetensors' in str(e.value)
  path.write_bytes(data[:8] + b'[' + data[9:])
  with pytest.raises(base.CheckpointError, match='corrupted safetensors header'):
    hf.open_hf(tmp_path)
  path.write_bytes(data[:4])
  with pytest.raises(base.CheckpointError, match='truncated'):
    hf.open_hf(tmp_path)


def test_pickle_refused_without_opt_in(tmp_path, monkeypatch):
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not even read')
  (tmp_path / 'config.json').write_text(json.dumps(hf_config()))
  assert hf.is_hf_checkpoint(tmp_path) and hf.is_hf_checkpoint(tmp_path / 'pytorch_model.bin')
  with pytest.raises(base.CheckpointError, match='pickle') as e:
    hf.open_hf(tmp_path)
  assert '--allow-pickle' in str(e.value) and 'safetensors' in str(e.value)
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(base.CheckpointError, match='needs torch'):
    hf.open_hf(tmp_path, allow_pickle=True)


@pytest.mark.parametrize('key,value', [('relative_attention_num_buckets', 64),
                                       ('relative_attention_max_distance', 256),
                                       ('feed_forward_proj', 'gated-silu'),
                                       ('d_model', 48), ('num_decoder_layers', 3)])
def test_config_json_refusals_name_the_value(tmp_path, key, value):
  with pytest.raises(base.CheckpointError, match=key) as e:
    hf.open_hf(write(tmp_path, hf_state(), hf_config(**{key: value})))
  assert str(value) in str(e.value)


def test_missing_config_and_not_a_checkpoint(tmp_path):
  save_file(hf_state(), str(tmp_path / 'model.safetensors'))
  assert hf.is_hf_checkpoint(tmp_path / 'model.safetensors')
  with pytest.raises(base.CheckpointError, match='config.json'):
    hf.open_hf(tmp_path / 'model.safetensors')
  assert not hf.is_hf_checkpoint(tmp_path / 'config.json')
  assert not hf.is_hf_checkpoint(tmp_path / 'nowhere')


# ------------------------------------------------------------------ parity with transformers

def make_model(gated, seed=0):
  torch = pytest.importorskip('torch', reason='interop extra (torch) not installed')
  transformers = pytest.importorskip('transformers', reason='interop extra not installed')
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
      vocab_size=V, d_model=D, d_kv=H, d_ff=F, num_heads=N, num_layers=L,
      num_decoder_layers=L, feed_forward_proj='gated-gelu' if gated else 'relu',
      tie_word_embeddings=not gated, dropout_rate=0.0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # layer norms start at 1: make a swapped norm visible
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
  return model


def hf_logits(model, enc, dec_in):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec_in)).logits.numpy()


def assert_parity(model, path, allow_pickle=False):
  rng = np.random.default_rng(1)
  enc = rng.integers(1, V, (2, 7))
  enc[1, 4:] = 0  # padding in the encoder input
  target = rng.integers(1, V, (2, 5))
  dec_in = np.concatenate([np.zeros((2, 1), target.dtype), target[:, :-1]], 1)
  src = hf.open_hf(path, allow_pickle=allow_pickle)
  assert src.config.dtype == 'float32'
  ours = network.Transformer(src.config).apply(
      {'params': read_params(src)}, enc, dec_in, target, enable_dropout=False)
  np.testing.assert_allclose(np.asarray(ours), hf_logits(model, enc, dec_in), atol=1e-4)
  return src


@pytest.mark.interop
def test_parity_t5_1_1_as_saved_by_installed_transformers(tmp_path):
  model = make_model(gated=True)
  model.save_pretrained(tmp_path, safe_serialization=True)
  saved = json.loads((tmp_path / 'config.json').read_text())
  src = assert_parity(model, tmp_path)
  assert not src.config.logits_via_embedding
  if hasattr(model.config, 'scale_decoder_outputs'):
    # transformers 5 always ties T5's lm_head to shared and records the missing scaling.
    assert saved['tie_word_embeddings'] is True and saved['scale_decoder_outputs'] is False
    assert src.metadata['logits'] == 'tied, unscaled'
  else:
    assert saved['tie_word_embeddings'] is False and src.metadata['logits'] == 'lm_head'


@pytest.mark.interop
def test_parity_t5_1_1_transformers4_layout(tmp_path):
  """A separate lm_head and `tie_word_embeddings: false`, as transformers 4 saved T5.1.1."""
  model = make_model(gated=True)  # skips without torch
  import torch
  from safetensors.torch import save_file as torch_save_file
  model.lm_head.weight = torch.nn.Parameter(torch.randn(V, D) * D ** -0.5)
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  torch_save_file(state, str(tmp_path / 'model.safetensors'))
  cfg = model.config.to_dict()
  cfg.pop('scale_decoder_outputs', None)
  cfg['tie_word_embeddings'] = False
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  assert assert_parity(model, tmp_path).metadata['logits'] == 'lm_head'


@pytest.mark.parametrize('drop_scale_key', [False, True])
@pytest.mark.interop
def test_parity_original_t5_tied_and_scaled(tmp_path, drop_scale_key):
  model = make_model(gated=False)
  model.save_pretrained(tmp_path, safe_serialization=True)
  if drop_scale_key:  # a config.json from transformers 4: scaling implied by tying
    cfg = json.loads((tmp_path / 'config.json').read_text())
    cfg.pop('scale_decoder_outputs', None)
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
  assert assert_parity(model, tmp_path).config.logits_via_embedding


@pytest.mark.interop
def test_parity_sharded_save(tmp_path):
  model = make_model(gated=True, seed=3)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size='40KB')
  assert (tmp_path / 'model.safetensors.index.json').is_file()
  assert len(list(tmp_path.glob('model-*.safetensors'))) > 1
  assert_parity(model, tmp_path)


@pytest.mark.interop
def test_parity_pytorch_bin_with_allow_pickle(tmp_path):
  model = make_model(gated=True, seed=4)  # skips without torch
  import torch
  model.config.to_json_file(tmp_path / 'config.json')
  torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
  with pytest.raises(base.CheckpointError, match='allow-pickle'):
    hf.open_hf(tmp_path)
  assert assert_parity(model, tmp_path, allow_pickle=True).format == 'hf-pytorch'
  torch.save({k: v.bfloat16() for k, v in model.state_dict().items()},
             tmp_path / 'pytorch_model.bin')
  src = hf.open_hf(tmp_path / 'pytorch_model.bin', allow_pickle=True)
  assert src.config.dtype == 'bfloat16'
  np.testing.assert_array_equal(
      src.params['token_embedder/embedding'].read(),
      model.shared.weight.detach().bfloat16().float().numpy().astype(ml_dtypes.bfloat16))
