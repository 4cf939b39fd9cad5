"""Layers against NumPy references with hand-set weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import layers

B, T, S, D, N, H = 2, 5, 7, 16, 4, 8


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_attention(xq, xkv, wq, wk, wv, wo, n, k, bias=None):
  """Reference attention: K/V heads expanded to N by contiguous repeat, plain MHA."""
  h = wq.shape[1] // n
  q = (xq @ wq).reshape(xq.shape[0], xq.shape[1], n, h)
  key = np.repeat((xkv @ wk).reshape(xkv.shape[0], xkv.shape[1], k, h), n // k, axis=2)
  val = np.repeat((xkv @ wv).reshape(xkv.shape[0], xkv.shape[1], k, h), n // k, axis=2)
  logits = np.einsum('btnh,bsnh->bnts', q, key)
  if bias is not None:
    logits = logits + bias
  out = np.einsum('bnts,bsnh->btnh', np_softmax(logits), val)
  return out.reshape(xq.shape[0], xq.shape[1], n * h) @ wo


def hand_params(rng, k):
  return {'query': {'kernel': rng.randn(D, N * H).astype(np.float32) / 4},
          'key': {'kernel': rng.randn(D, k * H).astype(np.float32) / 4},
          'value': {'kernel': rng.randn(D, k * H).astype(np.float32) / 4},
          'out': {'kernel': rng.randn(N * H, D).astype(np.float32) / 4}}


@pytest.mark.parametrize('k', [1, 2, N])
def test_attention_matches_numpy_reference(k):
  rng = np.random.RandomState(k)
  xq, xkv = rng.randn(B, T, D).astype(np.float32), rng.randn(B, S, D).astype(np.float32)
  p = hand_params(rng, k)
  mask = (rng.rand(B, 1, T, S) > 0.3).astype(np.float32)
  mask[..., 0] = 1  # every query sees at least one key
  pos_bias = rng.randn(1, N, T, S).astype(np.float32)
  attn = layers.MultiHeadAttention(N, k, H)
  out = attn.apply({'params': p}, xq, xkv, mask, pos_bias, deterministic=True)
  ref = np_attention(xq, xkv, p['query']['kernel'], p['key']['kernel'],
                     p['value']['kernel'], p['out']['kernel'], N, k,
                     pos_bias + np.where(mask > 0, 0.0, -1e10))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_grouped_with_k_equal_n_is_plain_mha():
  """K = N: the grouped einsums compute plain MHA. Equal up to float32 rounding only:
  XLA may order the sums of the two einsum spellings differently (jax 0.10.2 on CPU
  differs in the last bit where earlier versions agreed bit for bit)."""
  rng = np.random.RandomState(0)
  q, key, v = (rng.randn(B, T, N, H).astype(np.float32), rng.randn(B, S, N, H).astype(np.float32),
               rng.randn(B, S, N, H).astype(np.float32))
  bias = rng.randn(B, 1, T, S).astype(np.float32)
  out = layers.grouped_dot_product_attention(q, key, v, bias)
  w = jax.nn.softmax(jnp.einsum('btnh,bsnh->bnts', q, key) + bias)
  np.testing.assert_allclose(out, jnp.einsum('bnts,bsnh->btnh', w, v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('k', [1, 2, N])
def test_gqa_equals_mha_on_repeated_kv_heads(k):
  """A K-head module equals an N-head module whose K/V kernels repeat each head G times."""
  rng = np.random.RandomState(10 + k)
  x = rng.randn(B, T, D).astype(np.float32)
  p = hand_params(rng, k)
  expand = lambda w: np.repeat(w.reshape(D, k, H), N // k, axis=1).reshape(D, N * H)
  p_mha = dict(p, key={'kernel': expand(p['key']['kernel'])},
               value={'kernel': expand(p['value']['kernel'])})
  gqa = layers.MultiHeadAttention(N, k, H).apply({'params': p}, x, x, deterministic=True)
  mha = layers.MultiHeadAttention(N, N, H).apply({'params': p_mha}, x, x, deterministic=True)
  np.testing.assert_allclose(gqa, mha, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('r', [1, 2, 4, 16])
@pytest.mark.parametrize('bias_shape', [None, (B, 1, 1, S), (1, 16, 1, S)])
def test_decode_step_attention_equals_the_numpy_reference(r, bias_shape):
  """One query position over the decode cache's layout (keys [B, K, H, S], values
  [B, K, S, H]) against plain MHA on K/V heads repeated R times."""
  n, k = 16, 16 // r
  rng = np.random.RandomState(r)
  q = rng.randn(B, 1, n, H).astype(np.float32)
  key, v = (rng.randn(B, k, S, H).astype(np.float32) for _ in range(2))
  bias = None if bias_shape is None else rng.randn(*bias_shape).astype(np.float32)
  key_cache = np.ascontiguousarray(key.transpose(0, 1, 3, 2))  # [B, K, H, S]
  out = layers.grouped_dot_product_attention(q, key_cache, v, bias, kv_layout='cache')
  rep = lambda x: np.repeat(x, r, axis=1)  # [B, N, S, H]
  logits = np.einsum('btnh,bnsh->bnts', q, rep(key)) + (0 if bias is None else bias)
  ref = np.einsum('bnts,bnsh->btnh', np_softmax(logits), rep(v))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # bfloat16 values with float32 logits, as decoding runs in bfloat16.
  low = layers.grouped_dot_product_attention(q, key_cache, v.astype(jnp.bfloat16), bias,
                                             dtype=jnp.bfloat16, kv_layout='cache')
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize('bad', [3, 0, -1, 5, 8])
def test_invalid_kv_heads_raise_at_construction(bad):
  with pytest.raises(ValueError) as err:
    layers.MultiHeadAttention(num_heads=N, num_kv_heads=bad, head_dim=H)
  assert f'num_kv_heads={bad}' in str(err.value) and f'num_heads={N}' in str(err.value)


def test_attention_dropout_is_shared_over_queries_and_off_when_deterministic():
  rng = np.random.RandomState(1)
  q, key, v = (rng.randn(1, T, N, H).astype(np.float32), rng.randn(1, S, 2, H).astype(np.float32),
               np.ones((1, S, 2, H), np.float32))
  plain = layers.grouped_dot_product_attention(q, key, v)
  same = layers.grouped_dot_product_attention(q, key, v, dropout_rng=jax.random.PRNGKey(0),
                                              dropout_rate=0.5, deterministic=True)
  np.testing.assert_array_equal(plain, same)
  # With V = 1 each output is sum_s w[t, s] * keep[s] / keep_prob: one keep mask per
  # (batch, head), drawn with the query axis of size 1 and shared by every query.
  dropped = layers.grouped_dot_product_attention(q, key, v, dropout_rng=jax.random.PRNGKey(0),
                                                 dropout_rate=0.5, deterministic=False)
  assert not np.allclose(dropped, plain)
  w = np.asarray(jax.nn.softmax(jnp.einsum('btkgh,bskh->bkgts', q.reshape(1, T, 2, 2, H), key)))
  keep = jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, (1, 2, 2, 1, S))
  expected = np.einsum('bkgts,bkgts->btkg', w, np.broadcast_to(keep, w.shape) / 0.5)
  np.testing.assert_allclose(dropped[..., 0], expected.reshape(1, T, N), rtol=1e-5)


def test_rms_norm_in_float32():
  x = np.random.RandomState(2).randn(3, 4, D).astype(np.float32)
  scale = np.linspace(0.5, 2.0, D).astype(np.float32)
  out = layers.RMSNorm(dtype=jnp.bfloat16).apply({'params': {'scale': scale}}, x)
  assert out.dtype == jnp.bfloat16
  ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2)
  out32 = layers.RMSNorm().apply({'params': {'scale': scale}}, x)
  np.testing.assert_allclose(out32, ref, rtol=1e-5)


def test_gated_gelu_mlp_matches_numpy():
  rng = np.random.RandomState(3)
  x = rng.randn(2, 3, D).astype(np.float32)
  p = {'wi_0': {'kernel': rng.randn(D, 32).astype(np.float32) / 4},
       'wi_1': {'kernel': rng.randn(D, 32).astype(np.float32) / 4},
       'wo': {'kernel': rng.randn(32, D).astype(np.float32) / 4}}
  out = layers.MlpBlock(32).apply({'params': p}, x, deterministic=True)
  a = x @ p['wi_0']['kernel']
  gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
  np.testing.assert_allclose(out, (gelu * (x @ p['wi_1']['kernel'])) @ p['wo']['kernel'],
                             rtol=1e-5, atol=1e-5)


def test_relative_position_buckets_by_hand():
  rel = np.array([0, 1, -1, 7, -7, 8, 200, -200, -40])  # key - query
  bi = layers.relative_position_bucket(rel, bidirectional=True)
  # Bidirectional: 16 buckets a side, exact below 8; keys after the query use 16..31.
  assert bi[:5].tolist() == [0, 17, 1, 23, 7]
  # Log-spaced beyond: 40 back -> 8 + floor(log(40/8) / log(128/8) * 8) = 12.
  assert bi[5] == 24 and bi[6] == 31 and bi[7] == 15 and bi[8] == 12
  causal = layers.relative_position_bucket(rel, bidirectional=False)
  # Causal: future keys all map to 0, past offsets exact below 16, capped at 31.
  assert causal[:5].tolist() == [0, 0, 1, 0, 7]
  # 40 back -> 16 + floor(log(40/16) / log(128/16) * 16) = 23.
  assert causal[7] == 31 and causal[8] == 23


def test_relative_position_biases_gather_the_table():
  table = np.arange(N * 32, dtype=np.float32).reshape(N, 32)
  out = layers.RelativePositionBiases(N).apply({'params': {'rel_embedding': table}}, 3, 4,
                                               bidirectional=False)
  assert out.shape == (1, N, 3, 4)
  buckets = layers.relative_position_bucket(np.arange(4)[None] - np.arange(3)[:, None], False)
  np.testing.assert_array_equal(out[0], table[:, buckets])


def test_embed_and_attend():
  e = np.random.RandomState(4).randn(11, D).astype(np.float32)
  tokens = np.array([[1, 5, 10]])
  emb = layers.Embed(11, D)
  np.testing.assert_array_equal(emb.apply({'params': {'embedding': e}}, tokens), e[tokens])
  q = np.ones((1, 2, D), np.float32)
  np.testing.assert_allclose(emb.apply({'params': {'embedding': e}}, q, method='attend'),
                             q @ e.T, rtol=1e-5, atol=1e-5)


def test_attend_dtype_float32_keeps_bfloat16_embedding_lookups():
  """T5X's Embed: lookups in `dtype`, attend in `attend_dtype` (float32 for the tied
  logits), so a bfloat16 query meets the float32 embedding and the product is float32."""
  rng = np.random.RandomState(5)
  e = rng.randn(11, D).astype(np.float32)
  tokens = np.array([[1, 5, 10]])
  emb = layers.Embed(11, D, dtype=jnp.bfloat16, attend_dtype=jnp.float32)
  looked_up = emb.apply({'params': {'embedding': e}}, tokens)
  assert looked_up.dtype == jnp.bfloat16
  np.testing.assert_array_equal(looked_up, e[tokens].astype(jnp.bfloat16))
  q = jnp.asarray(rng.randn(1, 2, D), jnp.bfloat16)
  out = emb.apply({'params': {'embedding': e}}, q, method='attend')
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.asarray(q, np.float32) @ e.T, rtol=1e-5, atol=1e-5)
  # Without attend_dtype, attend stays in `dtype`, as in T5X.
  assert layers.Embed(11, D, dtype=jnp.bfloat16).apply(
      {'params': {'embedding': e}}, q, method='attend').dtype == jnp.bfloat16


@pytest.mark.parametrize('k', [1, 2, N])
def test_every_parameter_has_logical_axes(k):
  x = jnp.ones((1, 3, D))
  boxed = layers.MultiHeadAttention(N, k, H).init(jax.random.PRNGKey(0), x, x)
  specs = nn.get_partition_spec(boxed)['params']
  assert tuple(specs['query']['kernel']) == ('embed', 'joined_kv')
  assert tuple(specs['key']['kernel']) == ('embed', 'kv_heads')
  assert tuple(specs['value']['kernel']) == ('embed', 'kv_heads')
  assert tuple(specs['out']['kernel']) == ('joined_kv', 'embed')
  assert nn.meta.unbox(boxed)['params']['key']['kernel'].shape == (D, k * H)
