"""Cached decoding against the full forward pass, naive loops, exhaustive search, a NumPy
re-implementation of T5X's beam search and the cases of T5X's own decoding tests."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import decoding, models, network

VOCAB, B, S, L = 40, 3, 7, 6
NEG_INF = decoding.NEG_INF


@functools.lru_cache(maxsize=None)
def _tiny_params(k, seed):
  cfg = network.get_preset('tiny', vocab_size=VOCAB).with_kv_heads(k)
  return cfg, network.init_params(cfg, jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=None)
def tiny_model(k):
  """One model per KV-head count, shared by the tests so that its compiled decoding
  (and the oracles' forward pass) is reused; parameters are passed per call."""
  return models.EncoderDecoderModel(network.Transformer(tiny(k)[0]))


def tiny(k, seed=None):
  """A tiny config and a fresh NumPy copy of its parameters (tests edit them in place)."""
  cfg, params = _tiny_params(k, k if seed is None else seed)
  return cfg, jax.tree.map(np.array, params)


def encoder_tokens(seed=0, rows=B):
  enc = np.random.RandomState(seed).randint(2, VOCAB, (rows, S))
  enc[1, -2:] = 0  # padding that cross-attention must ignore
  return enc


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


_FORWARD = {}


def teacher_forced_logits(model, params, enc, seqs):
  """Full-forward logits [R, L, V] of output sequences seqs [R, L] (no cache). Targets
  are all ones so that no position is masked: decoding may emit id 0 before EOS."""
  if model not in _FORWARD:  # one compiled forward per model: oracles call it per step
    _FORWARD[model] = jax.jit(lambda p, e, d: model.module.apply(
        {'params': p}, e, d, jnp.ones_like(d), enable_dropout=False))
  dec_in = np.concatenate([np.zeros((seqs.shape[0], 1), np.int32), seqs[:, :-1]], axis=1)
  return np.asarray(_FORWARD[model](params, enc, dec_in.astype(np.int32)), np.float64)


def generated_mask(seqs, prompt_len=0, eos_id=1):
  """[R, L]: the positions a decoder chose, after the prompt and up to the first EOS."""
  mask = np.zeros(seqs.shape, bool)
  for r, row in enumerate(seqs):
    ends = np.flatnonzero(row[prompt_len:] == eos_id)
    end = prompt_len + ends[0] + 1 if len(ends) else len(row)
    mask[r, prompt_len:end] = True
  return mask


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
  # The cache holds K heads, not N: keys [B, K, H, length], values [B, K, length, H].
  assert layer['self_attention']['cached_key'].shape == (B, k, cfg.head_dim, L)
  assert layer['self_attention']['cached_value'].shape == (B, k, L, cfg.head_dim)
  assert layer['encoder_decoder_attention']['cached_key'].shape == (B, k, cfg.head_dim, S)
  assert layer['encoder_decoder_attention']['cached_value'].shape == (B, k, S, cfg.head_dim)

  step = jax.jit(lambda c, tok: module.apply(
      {'params': params, 'cache': c}, None, enc, tok, tok, enable_dropout=False, decode=True,
      max_decode_length=L, mutable=['cache'], method=module.decode))
  for i in range(L):
    logits, variables = step(cache, dec_in[:, i:i + 1])
    cache = variables['cache']
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5, rtol=0)


def naive_greedy(model, params, enc, length, eos_id=1, forced=None, limit=None):
  """Re-runs the whole forward pass for every new token: no cache at all. forced [B, L]
  (output-aligned, 0 = free) tokens are written instead of the argmax; a row stops at
  EOS (not a forced one) or after `limit` [B] positions."""
  forced = np.zeros((enc.shape[0], length), np.int32) if forced is None else forced
  limit = np.full(enc.shape[0], length) if limit is None else limit
  out = np.zeros((enc.shape[0], length), np.int32)
  ended = np.zeros(enc.shape[0], bool)
  for i in range(length):
    logits = teacher_forced_logits(model, params, enc, out)  # [B, L, V]
    nxt = np.where(forced[:, i] != 0, forced[:, i], logits[:, i].argmax(-1))
    out[:, i] = np.where(ended, 0, nxt)
    ended |= ((out[:, i] == eos_id) & (forced[:, i] == 0)) | (i >= limit - 1)
  return out


@pytest.mark.parametrize('k', [1, 2, 4])
def test_greedy_predict_batch_equals_naive_loop(k):
  _, params = tiny(k)
  # Make EOS likely enough that some rows end early and must be padded.
  params['decoder']['logits_dense']['kernel'][:, 1] = (
      params['decoder']['logits_dense']['kernel'][:, 1] * 3.0)
  model = tiny_model(k)
  enc = encoder_tokens(10 + k)
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': np.ones((B, L), np.int32)}
  got = np.asarray(model.predict_batch(params, batch))
  np.testing.assert_array_equal(got, naive_greedy(model, params, enc, L))


# --- beam search --------------------------------------------------------------------
def markov_logits(seed, rows, vocab, length, eos_bias=None, eos=1):
  """A fake decoder: logits depend on the row, the previous token, a running sum of the
  history (kept in the cache, so beam reordering must carry it) and the step. Its
  tables travel in the cache, so one compiled search serves every seed."""
  rng = np.random.RandomState(seed)
  table = rng.randn(rows, vocab, 3, vocab).astype(np.float32) * 2
  step_bias = rng.randn(rows, length, vocab).astype(np.float32)
  if eos_bias is not None:
    table[..., eos] += np.asarray(eos_bias, np.float32).reshape(rows, 1, 1)

  def step_log_probs(seqs, i):  # seqs [R, W, L] (filled before i) -> [R, W, V], float64
    out = np.zeros(seqs.shape[:2] + (vocab,))
    for r, w in np.ndindex(*seqs.shape[:2]):
      hist = seqs[r, w, :i]
      last = hist[-1] if i else 0
      out[r, w] = np_log_softmax(table[r, last, hist.sum() % 3] + step_bias[r, i])
    return out

  def tokens_to_logits(tokens, cache):
    tok, step = tokens[:, 0], cache['step']
    hsum = cache['sum'] + tok  # sum of the history including the token just fed
    rows_ = jnp.arange(tok.shape[0])
    z = cache['table'][rows_, tok, hsum % 3] + cache['step_bias'][rows_, step]
    return z, {**cache, 'sum': hsum, 'step': step + 1}

  zeros = np.zeros((rows,), np.int32)
  cache = {'table': table, 'step_bias': step_bias, 'sum': zeros, 'step': zeros}
  return step_log_probs, tokens_to_logits, cache


def np_t5x_beam_search(step_log_probs, rows, beams, length, eos, alpha, inputs=None):
  """T5X's beam search (t5x/decoding.py `beam_search`, no prefill) re-implemented in
  NumPy: per step the 2W best candidates, the W best non-EOS of them live (EOS ones get
  + NEG_INF), finished scored log_prob / ((5 + l) / 6) ** alpha and the W best kept
  with empty slots at NEG_INF; a forced prompt token resets the candidates to
  [0, NEG_INF, ...]. Its early stop is left out: it never changes the result.

  Returns per row T5X's answer, best first: the flagged finished hypotheses if any,
  else all live beams with raw log-probs; and the top of the rule gqa_jax used before
  (live beams cut at the limit ranked with finished ones, penalised at the length).
  """
  bp = lambda n: ((5.0 + n) / 6.0) ** alpha
  live_lp = np.tile([0.0] + [NEG_INF] * (beams - 1), (rows, 1))
  live = np.zeros((rows, beams, length), np.int64)
  fin_scores = np.full((rows, beams), NEG_INF)
  fin_flags = np.zeros((rows, beams), bool)
  fin = np.zeros((rows, beams, length), np.int64)
  for i in range(length):
    lp = step_log_probs(live, i)  # [R, W, V]
    vocab = lp.shape[-1]
    for r in range(rows):
      cand = (live_lp[r][:, None] + lp[r]).ravel()
      top = np.argsort(-cand, kind='stable')[:2 * beams]
      top_lp, tok = cand[top], top % vocab
      forced = inputs[r, i + 1] if inputs is not None and i + 1 < length else 0
      if forced:
        top_lp = np.array([0.0] + [NEG_INF] * (2 * beams - 1))
        tok = np.full(2 * beams, forced)
      seqs = live[r, top // vocab].copy()
      seqs[:, i] = tok
      done = tok == eos
      alive_lp = top_lp + done * NEG_INF
      keep = np.argsort(-alive_lp, kind='stable')[:beams]
      live[r], live_lp[r] = seqs[keep], alive_lp[keep]
      scores = np.concatenate([fin_scores[r], top_lp / bp(i + 1) + (~done) * NEG_INF])
      flags = np.concatenate([fin_flags[r], done])
      keep = np.argsort(-scores, kind='stable')[:beams]
      fin[r] = np.concatenate([fin[r], seqs])[keep]
      fin_scores[r], fin_flags[r] = scores[keep], flags[keep]
  results = []
  for r in range(rows):
    finished = [(s, q) for s, q, f in zip(fin_scores[r], fin[r], fin_flags[r]) if f]
    alive = list(zip(live_lp[r], live[r]))
    answer = finished if finished else alive
    old_top = max(finished + [(s / bp(length), q) for s, q in alive], key=lambda x: x[0])
    results.append((sorted(answer, key=lambda x: -x[0]), old_top))
  return results


def assert_same_top(seqs, scores, answer, tol=1e-5):
  """Our best hypothesis is T5X's, unless the two score the same (a tie)."""
  np.testing.assert_allclose(scores[0], answer[0][0], rtol=tol, atol=tol)
  if not np.array_equal(seqs[0], answer[0][1]):
    assert abs(scores[0] - answer[0][0]) < tol, (seqs[0], answer[0][1])


def test_beam_search_equals_exhaustive_search():
  """W exceeds every hypothesis count, so beam search is exhaustive and T5X's rule is
  checkable by enumeration: every finished sequence of any length, best first, when one
  finished (row 0); the best W of all sequences cut at L, by raw log-probability, when
  none did (row 1: EOS far below NEG_INF, so its hypotheses never count)."""
  rows, vocab, length, eos, alpha, beams = 2, 4, 4, 1, 0.6, 64
  step_log_probs, tokens_to_logits, cache = markov_logits(0, rows, vocab, length,
                                                          eos_bias=[0.0, -1e9])
  seqs, scores = jax.jit(lambda c: decoding.beam_search(
      tokens_to_logits, c, rows, beams, length, eos, alpha))(cache)
  seqs, scores = np.asarray(seqs), np.asarray(scores)

  # Row 0: 40 finished sequences (a free prefix of 0-3 tokens from {0, 2, 3}, then EOS).
  tokens = [0, 2, 3]
  finished = []
  for n in range(length):
    for p in itertools.product(tokens, repeat=n):
      toks = list(p) + [eos]
      lp = sum_lp(step_log_probs, 0, toks, length)
      finished.append((lp / ((5.0 + len(toks)) / 6.0) ** alpha, toks + [0] * (length - n - 1)))
  finished.sort(key=lambda x: -x[0])
  assert len(finished) == 40
  np.testing.assert_allclose(scores[0, :40], [s for s, _ in finished], rtol=1e-5)
  np.testing.assert_array_equal(seqs[0, :40], [q for _, q in finished])
  # The other slots are empty, as in T5X: score NEG_INF, all zeros. The old rule filled
  # them with live beams cut at L and could rank those first.
  np.testing.assert_array_equal(scores[0, 40:], NEG_INF)
  np.testing.assert_array_equal(seqs[0, 40:], 0)

  # Row 1: no hypothesis finished: the 64 best of the 81 EOS-free sequences, raw scores.
  alive = sorted(((sum_lp(step_log_probs, 1, list(p), length), list(p))
                  for p in itertools.product(tokens, repeat=length)), key=lambda x: -x[0])
  np.testing.assert_allclose(scores[1], [s for s, _ in alive[:beams]], rtol=1e-5)
  np.testing.assert_array_equal(seqs[1], [q for _, q in alive[:beams]])


def sum_lp(step_log_probs, row, toks, length):
  """Log-probability of the token list toks on row `row` of a markov_logits decoder."""
  rows = row + 1
  hist = np.zeros((rows, 1, length), np.int64)
  total = 0.0
  for i, tok in enumerate(toks):
    total += step_log_probs(hist, i)[row, 0][tok]
    hist[row, 0, i] = tok
  return total


def test_beam_search_top_hypothesis_is_t5xs_on_random_markov_models():
  """240 rows of random decoders (EOS likely, unlikely or impossible per row) against
  the NumPy T5X beam search. The cases include many where the old rule (live beams cut
  at the limit ranked with finished ones) picked another hypothesis."""
  rows, vocab, length, eos = 3, 9, 5, 1
  searches = {}
  old_rule_differs = none_finished = 0
  for seed in range(80):
    rng = np.random.RandomState(1000 + seed)
    beams = (2, 3, 4)[seed % 3]
    alpha = (0.0, 0.6, 1.2)[seed % 4 % 3]
    eos_bias = rng.choice([1.0, 0.0, -1.5, -3.0, -1e9], size=rows)
    step_log_probs, tokens_to_logits, cache = markov_logits(seed, rows, vocab, length,
                                                            eos_bias)
    if (beams, alpha) not in searches:
      searches[beams, alpha] = jax.jit(lambda c, w=beams, a=alpha: decoding.beam_search(
          tokens_to_logits, c, rows, w, length, eos, a))
    seqs, scores = map(np.asarray, searches[beams, alpha](cache))
    expected = np_t5x_beam_search(step_log_probs, rows, beams, length, eos, alpha)
    for r, (answer, old_top) in enumerate(expected):
      assert_same_top(seqs[r], scores[r], answer)
      # Every real hypothesis T5X returns, in its order; the rest are empty slots.
      n = len(answer)
      np.testing.assert_allclose(scores[r, :n], [s for s, _ in answer], rtol=1e-5)
      np.testing.assert_array_equal(scores[r, n:], NEG_INF)
      old_rule_differs += not np.array_equal(old_top[1], answer[0][1])
      none_finished += not (answer[0][1] == eos).any()
  assert old_rule_differs >= 20 and none_finished >= 20, (old_rule_differs, none_finished)


@pytest.mark.parametrize('k,eos_scale', [(1, 3.0), (2, 1.5), (4, 0.0)])
def test_model_beam_search_top_hypothesis_is_t5xs(k, eos_scale):
  """Random tiny models (EOS made more or less likely) against the NumPy T5X beam
  search fed by the full forward pass: the cached search returns T5X's choice."""
  _, params = tiny(k, seed=20 + k)
  params['decoder']['logits_dense']['kernel'][:, 1] *= eos_scale
  model = tiny_model(k)
  rows, beams = 8, 3
  enc = encoder_tokens(30 + k, rows)
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': np.ones((rows, L), np.int32)}
  seqs, aux = model.predict_batch_with_aux(params, batch, method='beam', num_decodes=beams,
                                           return_all_decodes=True)
  seqs, scores = np.asarray(seqs), np.asarray(aux['scores'])

  def step_log_probs(live, i):  # [R, W, L] -> [R, W, V]
    flat = live.reshape(rows * beams, L)
    logits = teacher_forced_logits(model, params, np.repeat(enc, beams, 0), flat)
    return np_log_softmax(logits[:, i]).reshape(rows, beams, -1)

  expected = np_t5x_beam_search(step_log_probs, rows, beams, L, 1, 0.6)
  for r, (answer, _) in enumerate(expected):
    assert_same_top(seqs[r], scores[r], answer, tol=1e-4)


def test_t5x_beam_search_markov_chain_case():
  """t5x decoding_test `test_beam_search`: a first-order Markov chain over PAD, A, B,
  START, END whose two best paths tie: START-AABBA-END and START-BBAAB-END."""
  states = ['PAD', 'A', 'B', 'START-', '-END']
  ab = np.asarray([[[1, -1], [-1, 1]], [[-1, 1], [1, -1]], [[1, -1], [-1, 1]],
                   [[-1, 1], [1, -1]]])
  edges = np.full([6, 5, 5], NEG_INF)
  edges[1:5, 1:3, 1:3] = ab
  edges[0, 3, 1:3] = 0  # START -> A or B
  edges[5, 1:3, 4] = 0  # A or B -> END
  edges[:, 0, :] = 0
  first = np.array([NEG_INF, NEG_INF, NEG_INF, 0, NEG_INF])

  def tokens_to_logits(tokens, cache):
    it = cache['it']
    cur = jnp.asarray(edges)[jnp.maximum(it - 1, 0), tokens[:, 0]]  # [B*W, 5]
    return jnp.where((it == 0)[:, None], jnp.asarray(first), cur), {'it': it + 1}

  seqs, _ = decoding.beam_search(tokens_to_logits, {'it': jnp.zeros(2, jnp.int32)}, 2, 2, 7,
                                 eos_id=4, alpha=0.0)
  for row in np.asarray(seqs):
    assert {''.join(states[t] for t in beam) for beam in row} == {
        'START-AABBA-END', 'START-BBAAB-END'}


def constant_logits(rows):
  """tokens_to_logits returning the same logits [R, V] on every step, for every beam."""
  rows = jnp.asarray(rows, jnp.float32)

  def tokens_to_logits(tokens, cache):
    return jnp.repeat(rows, tokens.shape[0] // rows.shape[0], axis=0), cache
  return tokens_to_logits


T5X_BEAM_LOGITS = [[-1e7, -1e10, -0.1, -0.9], [-1e7, -1e10, -0.9, -0.1]]


def test_t5x_beam_search_prefix_cases():
  """t5x decoding_test `test_beam_search_force_decode_prefix` / `_no_prefix`: EOS is
  never chosen, so the live beams come back with their raw log-probabilities (the
  prompt's tokens not counted). T5X lists beams worst first; we list them best first."""
  pad = [[-1e4] * 4] * 2
  logits = np.concatenate([T5X_BEAM_LOGITS, pad], axis=1)
  inputs = np.array([[0, 7, 0, 0, 0], [0, 4, 5, 0, 0]])
  seqs, scores = decoding.beam_search(constant_logits(logits), {}, 2, 2, 5, eos_id=1,
                                      alpha=0.0, inputs=inputs)
  expected = [[[7, 2, 2, 2, 2], [7, 3, 2, 2, 2]], [[4, 5, 3, 3, 3], [4, 5, 2, 3, 3]]]
  assert_t5x_beams(seqs, expected, prompt_len=[1, 2])
  log_p = np_log_softmax(logits)
  prompt_len = [1, 2]
  expected_scores = [[sum(log_p[r, t] for t in beam[prompt_len[r]:]) for beam in row]
                     for r, row in enumerate(expected)]
  np.testing.assert_allclose(scores, expected_scores, atol=1e-5)

  seqs, _ = decoding.beam_search(constant_logits(T5X_BEAM_LOGITS), {}, 2, 2, 5, eos_id=1)
  assert_t5x_beams(seqs, [[[2, 2, 2, 2, 2], [3, 2, 2, 2, 2]], [[3, 3, 3, 3, 3], [2, 3, 3, 3, 3]]])


def assert_t5x_beams(seqs, expected, prompt_len=(0, 0)):
  """The best beam is T5X's; the second ties with every placement of its one other
  token after the prompt (constant logits), so T5X's pick among them is its tie-break:
  check the prompt and the tokens, not their order."""
  seqs = np.asarray(seqs)
  np.testing.assert_array_equal(seqs[:, 0], np.asarray(expected)[:, 0])
  for row, exp, n in zip(seqs[:, 1], np.asarray(expected)[:, 1], prompt_len):
    np.testing.assert_array_equal(row[:n], exp[:n])
    np.testing.assert_array_equal(np.sort(row[n:]), np.sort(exp[n:]))


def test_t5x_beam_search_max_decode_steps_case():
  """t5x decoding_test `test_beam_search_max_decode_step` (max_decode_step=2): the
  search stops after 2 tokens and returns the live beams, zero-padded."""
  seqs, _ = decoding.beam_search(constant_logits(T5X_BEAM_LOGITS), {}, 2, 2, 5, eos_id=1,
                                 max_decode_steps=2)
  assert_t5x_beams(seqs, [[[2, 2, 0, 0, 0], [3, 2, 0, 0, 0]], [[3, 3, 0, 0, 0], [2, 3, 0, 0, 0]]])


def test_model_beam_search_with_prefix_and_step_limit_is_t5xs():
  """A prompt of a different length per row (one holding an EOS that T5X strips) and a
  step limit: the cached search equals the NumPy T5X search fed by the full forward."""
  _, params = tiny(2, seed=7)
  params['decoder']['logits_dense']['kernel'][:, 1] *= 2.0
  model = tiny_model(2)
  rows, beams = 4, 3
  enc = encoder_tokens(8, rows)
  dec_in = np.array([[0, 5, 9, 0, 0, 0], [0, 7, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                     [0, 3, 4, 6, 0, 0]], np.int32)
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
           'decoder_target_tokens': np.ones((rows, L), np.int32)}
  prompt = np.where(dec_in == 1, 0, dec_in)
  for steps in (None, 2):
    seqs, aux = model.predict_batch_with_aux(
        params, batch, method='beam', num_decodes=beams, return_all_decodes=True,
        prompt_with_targets=True, max_decode_steps=steps)
    seqs, scores = np.asarray(seqs), np.asarray(aux['scores'])
    length = L
    if steps is not None:  # T5X's per-row limit, checked on the outputs below
      limit = np.minimum(L, (prompt[:, 1:] != 0).sum(1) + steps)
      for r in range(rows):
        assert (seqs[r, :, limit[r]:] == 0).all()

    def step_log_probs(live, i):
      flat = live.reshape(rows * beams, length)
      logits = teacher_forced_logits(model, params, np.repeat(enc, beams, 0), flat)
      return np_log_softmax(logits[:, i]).reshape(rows, beams, -1)

    if steps is None:
      expected = np_t5x_beam_search(step_log_probs, rows, beams, L, 1, 0.6, inputs=prompt)
      for r, (answer, _) in enumerate(expected):
        assert_same_top(seqs[r], scores[r], answer, tol=1e-4)
    for r in range(rows):  # the prompt is kept in every real hypothesis, EOS removed
      p = prompt[r, 1:][prompt[r, 1:] != 0]
      real = seqs[r][scores[r] > NEG_INF]
      assert len(real)
      np.testing.assert_array_equal(real[:, :len(p)], np.broadcast_to(p, (len(real), len(p))))


def test_model_beam_scores_equal_rescored_sequences():
  """Beam scores from the cached search equal the teacher-forced log-likelihood of the
  returned sequences divided by the length penalty: checks beam-reordered caches."""
  _, params = tiny(2)
  params['decoder']['logits_dense']['kernel'][:, 1] *= 3.0
  model = tiny_model(2)
  enc = encoder_tokens(3)
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': np.ones((B, L), np.int32)}
  seqs, aux = model.predict_batch_with_aux(params, batch, method='beam', num_decodes=3,
                                           return_all_decodes=True)
  seqs, scores = np.asarray(seqs), np.asarray(aux['scores'])
  assert seqs.shape == (B, 3, L)
  finished = 0
  for w in range(3):
    tgt = seqs[:, w]
    log_p = np_log_softmax(teacher_forced_logits(model, params, enc, tgt))
    token_lp = np.take_along_axis(log_p, tgt[..., None], -1)[..., 0]
    lp = (token_lp * generated_mask(tgt)).sum(-1)
    ends = np.array([list(r).index(1) + 1 if 1 in r else L for r in tgt])
    has_eos = (tgt == 1).any(-1)
    # Finished hypotheses carry the penalty; only rows where none finished return live
    # beams, with raw log-probabilities; empty slots score NEG_INF.
    expected = np.where(has_eos, lp / decoding.brevity_penalty(0.6, ends), lp)
    real = scores[:, w] > NEG_INF
    np.testing.assert_allclose(scores[real, w], expected[real], rtol=1e-4, atol=1e-4)
    finished += has_eos[real].sum()
  assert finished > 0
  assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


# --- greedy and temperature sampling -------------------------------------------------
def step_table_logits(table, vocab=10):
  """tokens_to_logits that makes row r choose table[r][step] (one-hot, margin 50)."""
  table = jnp.asarray(table)

  def tokens_to_logits(tokens, cache):
    nxt = table[jnp.arange(table.shape[0]), jnp.minimum(cache['step'], table.shape[1] - 1)]
    return jax.nn.one_hot(nxt, vocab) * 50.0, {'step': cache['step'] + 1}
  return tokens_to_logits, {'step': jnp.zeros(table.shape[0], jnp.int32)}


def test_sampling_stops_at_eos_and_pads():
  fn, cache = step_table_logits([[5, 6, 1, 7, 8], [3, 3, 3, 3, 3], [1, 9, 9, 9, 9]])
  seqs, _ = decoding.temperature_sample(fn, cache, 3, 5, eos_id=1, temperature=0.0)
  np.testing.assert_array_equal(seqs, [[5, 6, 1, 0, 0], [3, 3, 3, 3, 3], [1, 0, 0, 0, 0]])


# t5x decoding_test: row 0 always samples id 2, row 1 id 3.
T5X_SAMPLE_LOGITS = [[-1e7, -1e7, 0, -1e7], [-1e7, -1e7, -1e7, 0]]


@pytest.mark.parametrize('inputs,topk,expected', [
    # test_temperature_sample_no_prefix
    ([[0, 0, 0], [0, 0, 0]], 0, [[2, 2, 2], [3, 3, 3]]),
    # test_temperature_sample_prefix
    ([[0, 5, 6, 7, 0], [0, 8, 9, 0, 0]], 0, [[5, 6, 7, 2, 2], [8, 9, 3, 3, 3]]),
    # test_temperature_sample_prefix_ending_with_eos: a forced EOS ends nothing
    ([[0, 5, 6, 1, 0], [0, 8, 1, 0, 0]], 1, [[5, 6, 1, 2, 2], [8, 1, 3, 3, 3]]),
    # test_temperature_sample_uneven_prefix (there with initial_index; same outputs)
    ([[0, 5, 7, 1, 0, 0], [0, 6, 1, 0, 0, 0]], 0, [[5, 7, 1, 2, 2, 2], [6, 1, 3, 3, 3, 3]]),
])
def test_t5x_sampling_prefix_cases(inputs, topk, expected):
  inputs = np.array(inputs, np.int32)
  seqs, scores = decoding.temperature_sample(
      constant_logits(T5X_SAMPLE_LOGITS), {}, 2, inputs.shape[1], eos_id=1,
      rng=jax.random.PRNGKey(0), topk=topk, inputs=inputs)
  np.testing.assert_array_equal(seqs, expected)
  np.testing.assert_allclose(scores, 0.0, atol=1e-6)  # rescaled: probability-1 tokens


def test_t5x_zero_temperature_case():
  """t5x `test_temperature_sample_with_zero_temperature`: large close logits, argmax."""
  logits = [[1700.47, 1700.48, 1700.51, 1700.45], [3.2, 4.8, -5.3, 5.6]]
  seqs, scores = decoding.temperature_sample(constant_logits(logits), {}, 2, 3, eos_id=1,
                                             topk=4, temperature=0.0)
  np.testing.assert_array_equal(seqs, [[2, 2, 2], [3, 3, 3]])
  np.testing.assert_array_equal(scores, [0.0, 0.0])


def test_t5x_prefix_then_eos_early_stop_and_log_prob_cases():
  """t5x `test_temperature_sample_prefix_ending_with_eos_early_stop` and `_log_prob`:
  row 0 has prompt [5, 1] and then emits 2, 2, EOS; row 1 has prompt [8] and emits 3,
  3, EOS. The score sums the model's log-probabilities of the emitted tokens only."""
  inputs = np.array([[0, 5, 1, 0, 0, 0, 0], [0, 8, 0, 0, 0, 0, 0]], np.int32)
  choices = np.array([[2, 3]] * 7)
  choices[3], choices[4] = [2, 1], [1, 3]
  logits = np.random.RandomState(0).randn(7, 2, 4).astype(np.float32)
  # Make the step's choice the argmax, keeping the other logits random.
  for i, (a, b) in enumerate(choices):
    logits[i, 0, a], logits[i, 1, b] = 5.0, 5.0

  def tokens_to_logits(tokens, cache):
    return jnp.asarray(logits)[cache['step'][0]], {'step': cache['step'] + 1}

  for rescale in (True, False):
    seqs, scores = decoding.temperature_sample(
        tokens_to_logits, {'step': jnp.zeros(2, jnp.int32)}, 2, 7, eos_id=1, temperature=0.0,
        inputs=inputs, rescale_log_probs=rescale)
    np.testing.assert_array_equal(seqs, [[5, 1, 2, 2, 1, 0, 0], [8, 3, 3, 1, 0, 0, 0]])
    log_p = np_log_softmax(logits)
    expected = [log_p[2, 0, 2] + log_p[3, 0, 2] + log_p[4, 0, 1],
                log_p[1, 1, 3] + log_p[2, 1, 3] + log_p[3, 1, 1]]
    np.testing.assert_allclose(scores, [0.0, 0.0] if rescale else expected, atol=1e-5)


def test_t5x_greedy_topk_log_prob_case():
  """t5x `test_greedy_decoding_topk_sample_log_probs`: top-1 sampling of p = (.6, .4)
  scores 0 rescaled; unrescaled, the two emitted 2s after the prompt [2, 2, 3] score
  2 log 0.6."""
  logits = [[-1e7, -1e7, -0.510825624, -0.916290732]]
  seqs, scores = decoding.temperature_sample(
      constant_logits(logits), {}, 1, 5, eos_id=1, rng=jax.random.PRNGKey(0), topk=1,
      inputs=np.array([[0, 2, 2, 2, 0]]))
  np.testing.assert_array_equal(seqs, [[2, 2, 2, 2, 2]])
  np.testing.assert_allclose(scores, [0.0], atol=1e-6)
  seqs, scores = decoding.temperature_sample(
      constant_logits(logits), {}, 1, 5, eos_id=1, rng=jax.random.PRNGKey(0), topk=1,
      inputs=np.array([[0, 2, 2, 3, 0]]), rescale_log_probs=False)
  np.testing.assert_array_equal(seqs, [[2, 2, 3, 2, 2]])
  np.testing.assert_allclose(scores, [-1.02165125], rtol=1e-6)


def counted(tokens_to_logits):
  """tokens_to_logits that counts its calls (under jax.disable_jit, once per step)."""
  calls = []

  def fn(tokens, cache):
    calls.append(1)
    return tokens_to_logits(tokens, cache)
  return fn, calls


@pytest.mark.parametrize('inputs,steps,logits,expected,calls', [
    # t5x test_temperature_sample_max_decode_steps_with_initial_index (no_initial_index)
    ([[0, 2, 0, 0, 0, 0, 0, 0], [0, 2, 2, 0, 0, 0, 0, 0]], 4, [[-1e7, -1e7, -1e7, 0]] * 2,
     [[2, 3, 3, 3, 3, 0, 0, 0], [2, 2, 3, 3, 3, 3, 0, 0]], 6),
    # t5x test_temperature_sample_max_decode_steps_endpad (there with initial_index)
    ([[0, 2, 0, 0, 0, 0, 0, 0], [0, 2, 2, 2, 2, 2, 2, 0], [0, 2, 2, 2, 0, 0, 0, 0]], 4,
     [[-1e7, -1e7, -1e7, 0]] * 3,
     [[2, 3, 3, 3, 3, 0, 0, 0], [2, 2, 2, 2, 2, 2, 3, 3], [2, 2, 2, 3, 3, 3, 3, 0]], 8),
    # t5x test_temperature_sample_max_decode_steps_docstring_ex4
    ([[0, 2, 0, 0, 0, 0, 0, 0], [0, 3, 4, 0, 0, 0, 0, 0]], 2, T5X_SAMPLE_LOGITS,
     [[2, 2, 2, 0, 0, 0, 0, 0], [3, 4, 3, 3, 0, 0, 0, 0]], 4),
])
def test_t5x_max_decode_steps_cases(inputs, steps, logits, expected, calls):
  """max_decode_steps counts after each row's prompt; decoding stops when every row is
  done, well before the length (the calls to tokens_to_logits)."""
  inputs = np.array(inputs, np.int32)
  fn, made = counted(constant_logits(logits))
  with jax.disable_jit():
    seqs, scores = decoding.temperature_sample(
        fn, {}, inputs.shape[0], inputs.shape[1], eos_id=1, rng=jax.random.PRNGKey(0), topk=4,
        inputs=inputs, max_decode_steps=steps)
  np.testing.assert_array_equal(seqs, expected)
  np.testing.assert_allclose(scores, 0.0, atol=1e-6)
  assert len(made) == calls
  with pytest.raises(ValueError, match='max_decode_steps'):
    decoding.temperature_sample(fn, {}, inputs.shape[0], inputs.shape[1],
                                max_decode_steps=inputs.shape[1] + 1, temperature=0.0)


def test_t5x_topp_cases():
  """t5x `test_temperature_sample_topp` and `test_topp_log_probs`, on p = (.3, 0, .1, .6)."""
  logits = [[-1.2, -1e7, -2.3, -0.51]]
  for temperature, topp in ((1.0, 0.55), (0.8, 0.63)):  # nucleus = {3}: deterministic
    seqs, scores = decoding.temperature_sample(
        constant_logits(logits), {}, 1, 20, eos_id=1, rng=jax.random.PRNGKey(0),
        temperature=temperature, topp=topp)
    np.testing.assert_array_equal(seqs, [[3] * 20])
    np.testing.assert_allclose(scores, [0.0], atol=1e-6)
  # Temperature first, then the nucleus: the logits that are sampled from.
  masked = decoding.topp_mask(jnp.asarray(logits) / 1.4, 0.7)
  np.testing.assert_allclose(masked, [[-0.85714293, NEG_INF, NEG_INF, -0.36428571]],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='at most one'):
    decoding.temperature_sample(constant_logits(logits), {}, 1, 3, rng=jax.random.PRNGKey(0),
                                topk=2, topp=0.5)


def np_nucleus(probs, p):
  """T5X's nucleus by sorting: the smallest most-probable prefix with mass >= p, plus
  ties with its last member."""
  desc = np.sort(probs)[::-1]
  n = min(int(np.sum(np.cumsum(desc) < p)), len(probs) - 1)
  return probs >= desc[n]


@pytest.mark.parametrize('p', [0.3, 0.5, 0.8, 0.95, 1.0])
def test_topp_mask_keeps_exactly_the_nucleus(p):
  rng = np.random.RandomState(int(p * 100))
  logits = rng.randn(16, 11).astype(np.float32) * 2
  logits[0, :4] = 1.5  # a tie across the cutoff keeps all its members
  masked = np.asarray(decoding.topp_mask(jnp.asarray(logits), p))
  for row, out in zip(logits, masked):
    probs = np.exp(np_log_softmax(row))
    keep = np_nucleus(probs, p)
    np.testing.assert_array_equal(out == NEG_INF, ~keep)
    np.testing.assert_array_equal(out[keep], row[keep])
    assert probs[keep].sum() >= p - 1e-6


def test_temperature_sampling_follows_the_tempered_distribution():
  logits = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5])
  n = 20000

  def tokens_to_logits(tokens, cache):
    return jnp.broadcast_to(logits, (tokens.shape[0], 5)), cache

  def first_tokens(temperature, **cut):
    seqs, _ = decoding.temperature_sample(tokens_to_logits, {}, n, 1, eos_id=99,
                                          rng=jax.random.PRNGKey(0), temperature=temperature,
                                          **cut)
    return np.bincount(np.asarray(seqs[:, 0]), minlength=5) / n

  tol = 4 * np.sqrt(0.25 / n)
  for temperature in (0.5, 2.0):
    p = np.asarray(jax.nn.softmax(logits / temperature))
    np.testing.assert_allclose(first_tokens(temperature), p, atol=tol)
  top2 = first_tokens(1.0, topk=2)
  assert top2[2:].sum() == 0
  np.testing.assert_allclose(top2[:2], jax.nn.softmax(logits[:2]), atol=tol)
  # Nucleus at temperature 1.5: the renormalised most probable tokens reaching 0.7.
  p = np.asarray(jax.nn.softmax(logits / 1.5), np.float64)
  keep = np_nucleus(p, 0.7)
  assert 1 < keep.sum() < 5
  np.testing.assert_allclose(first_tokens(1.5, topp=0.7), np.where(keep, p, 0) / p[keep].sum(),
                             atol=tol)


def np_rescaled_log_probs(logits, temperature, topk=0, topp=0.0):
  """log_softmax of T5X's sampling distribution: tempered, then top-k or top-p masked."""
  z = np.asarray(logits, np.float64) / temperature
  if topk:
    z = np.where(z < np.sort(z, -1)[..., -topk:-topk + 1], NEG_INF, z)
  if topp:
    probs = np.exp(np_log_softmax(z))
    keep = np.stack([np_nucleus(q, topp) for q in probs.reshape(-1, z.shape[-1])])
    z = np.where(keep.reshape(z.shape), z, NEG_INF)
  return np_log_softmax(z)


@pytest.mark.parametrize('cut', [dict(temperature=0.7, topk=5), dict(temperature=1.3, topp=0.8),
                                 dict(temperature=1.0)])
def test_model_sample_scores_are_t5xs_rescaled_log_probs(cut):
  """Each sample's score is the log-probability of its tokens under the distribution it
  was drawn from (T5X's default), or under the model with rescale_log_probs=False;
  samples come best first and the best of n is the first."""
  _, params = tiny(2)
  model = tiny_model(2)
  enc = encoder_tokens(4)
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': np.ones((B, L), np.int32)}
  n = 4
  # The cut does not change unrescaled scores: check those (and best-of-n) once.
  for rescale in (True, False) if 'topk' in cut else (True,):
    kwargs = dict(method='sample', num_decodes=n, rescale_log_probs=rescale, **cut)
    seqs, aux = model.predict_batch_with_aux(params, batch, jax.random.PRNGKey(1),
                                             return_all_decodes=True, **kwargs)
    seqs, scores = np.asarray(seqs), np.asarray(aux['scores'])
    flat = seqs.reshape(B * n, L)
    logits = teacher_forced_logits(model, params, np.repeat(enc, n, 0), flat)
    log_p = np_rescaled_log_probs(logits, **cut) if rescale else np_log_softmax(logits)
    token_lp = np.take_along_axis(log_p, flat[..., None], -1)[..., 0]
    expected = (token_lp * generated_mask(flat)).sum(-1).reshape(B, n)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0)
  if 'topk' in cut:  # best of n: ranked by the rescaled scores
    best, best_aux = model.predict_batch_with_aux(params, batch, jax.random.PRNGKey(1),
                                                  **dict(kwargs, rescale_log_probs=True))
    seqs, aux = model.predict_batch_with_aux(params, batch, jax.random.PRNGKey(1),
                                             return_all_decodes=True,
                                             **dict(kwargs, rescale_log_probs=True))
    np.testing.assert_array_equal(best, np.asarray(seqs)[:, 0])
    np.testing.assert_allclose(best_aux['scores'], np.asarray(aux['scores'])[:, 0])


def test_model_greedy_scores_zero_by_default_and_model_log_probs_on_request():
  _, params = tiny(1)
  model = tiny_model(1)
  enc = encoder_tokens(6)
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': np.ones((B, L), np.int32)}
  seqs, aux = model.predict_batch_with_aux(params, batch)
  np.testing.assert_array_equal(aux['scores'], np.zeros(B))  # T5X: greedy scores are 0
  raw_seqs, raw = model.predict_batch_with_aux(params, batch, rescale_log_probs=False)
  np.testing.assert_array_equal(raw_seqs, seqs)
  seqs = np.asarray(seqs)
  log_p = np_log_softmax(teacher_forced_logits(model, params, enc, seqs))
  token_lp = np.take_along_axis(log_p, seqs[..., None], -1)[..., 0]
  np.testing.assert_allclose(raw['scores'], (token_lp * generated_mask(seqs)).sum(-1),
                             rtol=1e-4)
  assert np.all(np.asarray(raw['scores']) < 0)


def test_model_decoder_prefix_is_kept_and_continued():
  """prompt_with_targets: decoder_input_tokens (EOS removed, as T5X does) are kept, and
  the continuation is what decoding gives with those tokens forced (a naive loop, no
  cache); max_decode_steps cuts each row that many tokens after its prompt."""
  _, params = tiny(2)
  model = tiny_model(2)
  enc = encoder_tokens(9)
  dec_in = np.array([[0, 5, 9, 0, 0, 0], [0, 7, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
           'decoder_target_tokens': np.ones((B, L), np.int32)}
  forced = np.pad(np.where(dec_in == 1, 0, dec_in)[:, 1:], ((0, 0), (0, 1)))
  got = np.asarray(model.predict_batch(params, batch, prompt_with_targets=True))
  np.testing.assert_array_equal(got[0, :2], [5, 9])
  np.testing.assert_array_equal(got[1, :1], [7])
  np.testing.assert_array_equal(got, naive_greedy(model, params, enc, L, forced=forced))
  free = np.asarray(model.predict_batch(params, batch))
  np.testing.assert_array_equal(got[2], free[2])  # no prompt: plain greedy

  cut = np.asarray(model.predict_batch(params, batch, prompt_with_targets=True,
                                       max_decode_steps=2))
  limit = np.array([4, 3, 2])
  np.testing.assert_array_equal(
      cut, naive_greedy(model, params, enc, L, forced=forced, limit=limit))
  for r in range(B):
    assert (cut[r, limit[r]:] == 0).all()
    np.testing.assert_array_equal(cut[r, :limit[r]], got[r, :limit[r]])


def test_sampling_with_top1_equals_greedy():
  _, params = tiny(4)
  model = tiny_model(4)
  batch = {'encoder_input_tokens': encoder_tokens(5),
           'decoder_target_tokens': np.ones((B, L), np.int32)}
  greedy = model.predict_batch(params, batch)
  sampled = model.predict_batch(params, batch, jax.random.PRNGKey(3), method='sample',
                                temperature=0.7, topk=1)
  np.testing.assert_array_equal(greedy, sampled)
  with pytest.raises(ValueError, match='unknown decoding method'):
    model.predict_batch(params, batch, method='nucleus')
