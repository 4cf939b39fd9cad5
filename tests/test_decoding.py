"""Cached decoding against the full forward pass, naive loops and exhaustive search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import decoding, models, network

VOCAB, B, S, L = 40, 3, 7, 6


def tiny(k):
  cfg = network.get_preset('tiny', vocab_size=VOCAB).with_kv_heads(k)
  return cfg, jax.tree.map(np.array, network.init_params(cfg, jax.random.PRNGKey(k)))


def encoder_tokens(seed=0):
  enc = np.random.RandomState(seed).randint(2, VOCAB, (B, S))
  enc[1, -2:] = 0  # padding that cross-attention must ignore
  return enc


@pytest.mark.parametrize('k', [1, 2, 4])
def test_cached_steps_reproduce_teacher_forced_logits(k):
  cfg, params = tiny(k)
  module = network.Transformer(cfg)
  enc = encoder_tokens(k)
  dec_in = np.random.RandomState(k).randint(2, VOCAB, (B, L))
  dec_in[:, 0] = 0
  full = module.apply({'params': params}, enc, dec_in, np.ones_like(dec_in),
                      enable_dropout=False)

  encoded = module.apply({'params': params}, enc, enable_dropout=False, method=module.encode)
  _, variables = module.apply({'params': params}, encoded, enc, dec_in, dec_in,
                              enable_dropout=False, decode=True, max_decode_length=L,
                              mutable=['cache'], method=module.decode)
  cache = variables['cache']
  layer = cache['decoder']['layers_0']
  # The cache holds K heads, not N: self [B, L, K, H], cross [B, S, K, H].
  assert layer['self_attention']['cached_key'].shape == (B, k, L, cfg.head_dim)
  assert layer['encoder_decoder_attention']['cached_value'].shape == (B, k, S, cfg.head_dim)

  step = jax.jit(lambda c, tok: module.apply(
      {'params': params, 'cache': c}, None, enc, tok, tok, enable_dropout=False, decode=True,
      max_decode_length=L, mutable=['cache'], method=module.decode))
  for i in range(L):
    logits, variables = step(cache, dec_in[:, i:i + 1])
    cache = variables['cache']
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5, rtol=0)


def naive_greedy(module, params, enc, length, eos_id=1):
  """Re-runs the whole forward pass for every new token: no cache at all."""
  forward = jax.jit(lambda dec: module.apply({'params': params}, enc, dec, jnp.ones_like(dec),
                                             enable_dropout=False))
  out = np.zeros((enc.shape[0], length), np.int32)
  ended = np.zeros(enc.shape[0], bool)
  for i in range(length):
    dec_in = np.concatenate([np.zeros((enc.shape[0], 1), np.int32), out[:, :-1]], axis=1)
    nxt = np.asarray(forward(dec_in))[:, i].argmax(-1)
    out[:, i] = np.where(ended, 0, nxt)
    ended |= out[:, i] == eos_id
  return out


@pytest.mark.parametrize('k', [1, 2, 4])
def test_greedy_predict_batch_equals_naive_loop(k):
  cfg, params = tiny(k)
  # Make EOS likely enough that some rows end early and must be padded.
  params['decoder']['logits_dense']['kernel'][:, 1] = (
      params['decoder']['logits_dense']['kernel'][:, 1] * 3.0)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  enc = encoder_tokens(10 + k)
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': np.ones((B, L), np.int32)}
  got = np.asarray(model.predict_batch(params, batch))
  np.testing.assert_array_equal(got, naive_greedy(model.module, params, enc, L))


def markov_logits(seed, rows, vocab, length):
  """A fake decoder: logits depend on the row, the previous token, a running sum of the
  history (kept in the cache, so beam reordering must carry it) and the step."""
  rng = np.random.RandomState(seed)
  table = rng.randn(rows, vocab, 3, vocab).astype(np.float32) * 2
  step_bias = rng.randn(rows, length, vocab).astype(np.float32)

  def log_probs(row, history):
    last = history[-1] if history else 0
    z = table[row, last, sum(history) % 3] + step_bias[row, len(history)]
    return z - np.log(np.exp(z - z.max()).sum()) - z.max()

  def tokens_to_logits(tokens, cache):
    tok, step = tokens[:, 0], cache['step']
    hsum = cache['sum'] + tok  # sum of the history including the token just fed
    z = jnp.asarray(table)[cache['row'], tok, hsum % 3] + jnp.asarray(step_bias)[cache['row'], step]
    return z, {'row': cache['row'], 'sum': hsum, 'step': step + 1}

  def init_cache():
    zeros = jnp.zeros((rows,), jnp.int32)
    return {'row': jnp.arange(rows, dtype=jnp.int32), 'sum': zeros, 'step': zeros}
  return log_probs, tokens_to_logits, init_cache


def test_beam_search_equals_exhaustive_search():
  rows, vocab, length, eos, alpha = 2, 4, 4, 1, 0.6
  log_probs, tokens_to_logits, init_cache = markov_logits(0, rows, vocab, length)
  # The 2W candidates of the last step cover all 27 live prefixes x 4 tokens and W
  # exceeds the 40 possible finished sequences, so nothing that ranks is pruned.
  beams = 64
  seqs, scores = jax.jit(lambda c: decoding.beam_search(
      tokens_to_logits, c, rows, beams, length, eos, alpha))(init_cache())
  for row in range(rows):
    pool = []  # every finished sequence, and every EOS-free one cut at max length
    tokens = [0, 2, 3]
    finished = [list(p) + [eos] for n in range(length)
                for p in itertools.product(tokens, repeat=n)]
    for toks in finished + [list(p) for p in itertools.product(tokens, repeat=length)]:
      hist, lp = [], 0.0
      for tok in toks:
        lp += log_probs(row, hist)[tok]
        hist.append(tok)
      n = len(toks)
      pool.append((lp / ((5.0 + n) / 6.0) ** alpha, hist + [0] * (length - n)))
    pool.sort(key=lambda x: -x[0])
    # Of the 121 hypotheses, the top 64 are exactly what the search keeps: the 17 live
    # beams dropped at the last step score below the 64 kept.
    assert len(pool) == 40 + 81
    np.testing.assert_allclose(scores[row], [s for s, _ in pool[:beams]], rtol=1e-5)
    np.testing.assert_array_equal(seqs[row], [q for _, q in pool[:beams]])


def test_sampling_stops_at_eos_and_pads():
  table = jnp.array([[5, 6, 1, 7, 8], [3, 3, 3, 3, 3], [1, 9, 9, 9, 9]])

  def tokens_to_logits(tokens, cache):
    nxt = table[jnp.arange(3), cache['step']]
    return jax.nn.one_hot(nxt, 10) * 50.0, {'step': cache['step'] + 1}

  seqs, _ = decoding.temperature_sample(tokens_to_logits, {'step': jnp.zeros(3, jnp.int32)},
                                        3, 5, eos_id=1, temperature=0.0)
  np.testing.assert_array_equal(seqs, [[5, 6, 1, 0, 0], [3, 3, 3, 3, 3], [1, 0, 0, 0, 0]])


def test_temperature_sampling_follows_the_tempered_distribution():
  logits = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5])
  n = 20000

  def tokens_to_logits(tokens, cache):
    return jnp.broadcast_to(logits, (tokens.shape[0], 5)), cache

  def first_tokens(temperature, topk=0):
    seqs, _ = decoding.temperature_sample(tokens_to_logits, {}, n, 1, eos_id=99,
                                          rng=jax.random.PRNGKey(0), temperature=temperature,
                                          topk=topk)
    return np.bincount(np.asarray(seqs[:, 0]), minlength=5) / n

  for temperature in (0.5, 2.0):
    p = np.asarray(jax.nn.softmax(logits / temperature))
    np.testing.assert_allclose(first_tokens(temperature), p, atol=4 * np.sqrt(0.25 / n))
  top2 = first_tokens(1.0, topk=2)
  assert top2[2:].sum() == 0
  np.testing.assert_allclose(top2[:2], jax.nn.softmax(logits[:2]), atol=4 * np.sqrt(0.25 / n))


def test_model_beam_scores_equal_rescored_sequences():
  """Beam scores from the cached search equal the teacher-forced log-likelihood of the
  returned sequences divided by the length penalty: checks beam-reordered caches."""
  cfg, params = tiny(2)
  params['decoder']['logits_dense']['kernel'][:, 1] *= 3.0
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  enc = encoder_tokens(3)
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': np.ones((B, L), np.int32)}
  seqs, aux = model.predict_batch_with_aux(params, batch, method='beam', num_decodes=3,
                                           return_all_decodes=True)
  seqs, scores = np.asarray(seqs), np.asarray(aux['scores'])
  assert seqs.shape == (B, 3, L)
  for w in range(3):
    tgt = seqs[:, w]
    ends = [list(r).index(1) + 1 if 1 in r else L for r in tgt]
    weights = (np.arange(L)[None] < np.array(ends)[:, None]).astype(np.float32)
    dec_in = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], axis=1)
    # Unmasked forward (target ones): the model may emit id 0 before EOS.
    logits = model.module.apply({'params': params}, enc, dec_in, np.ones_like(dec_in),
                                enable_dropout=False)
    token_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tgt[..., None], -1)
    lp = (token_lp[..., 0] * weights).sum(-1)
    np.testing.assert_allclose(scores[:, w], lp / decoding.brevity_penalty(0.6, ends),
                               rtol=1e-4, atol=1e-4)
  assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_sampling_with_top1_equals_greedy():
  cfg, params = tiny(4)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  batch = {'encoder_input_tokens': encoder_tokens(5),
           'decoder_target_tokens': np.ones((B, L), np.int32)}
  greedy = model.predict_batch(params, batch)
  sampled = model.predict_batch(params, batch, jax.random.PRNGKey(3), method='sample',
                                temperature=0.7, topk=1)
  np.testing.assert_array_equal(greedy, sampled)
  with pytest.raises(ValueError, match='unknown decoding method'):
    model.predict_batch(params, batch, method='nucleus')
