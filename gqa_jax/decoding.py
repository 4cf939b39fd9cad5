"""Cached autoregressive decoding: greedy, temperature sampling and beam search.

Every decoder here is a `lax.while_loop` around `tokens_to_logits(tokens [B, 1],
cache) -> (logits [B, V], cache)`. Sequences start from token 0 (T5's decoder
start), stop at `eos_id` and are padded with 0 after it. The cache is any pytree
whose non-scalar leaves have the batch as their leading axis (the KV cache at
KV-head granularity, [B, K, S, H], and the cached cross-attention K/V).
"""

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], Tuple[Array, Cache]]
NEG_INF = -1.0e7


def temperature_sample(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                       max_decode_len: int, eos_id: int = 1, rng: Array = None,
                       temperature: float = 1.0, topk: int = 0) -> Tuple[Array, Array]:
  """Samples from softmax(logits / temperature), restricted to the top-k if topk > 0.

  temperature=0 is greedy decoding (argmax; no rng needed).

  Returns:
    sequences [B, L] (0 after EOS) and their log-probabilities [B] under the model.
  """
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 means greedy).')
  if temperature > 0 and rng is None:
    raise ValueError('temperature sampling needs an rng; pass rng or use temperature=0.')
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def cond(state):
    i, _, _, ended, _, _, _ = state
    return (i < max_decode_len) & ~jnp.all(ended)

  def body(state):
    i, token, seqs, ended, log_prob, cache, rng = state
    logits, cache = tokens_to_logits(token[:, None], cache)  # [B, V]
    logits = logits.astype(jnp.float32)
    if temperature == 0:
      nxt = jnp.argmax(logits, axis=-1)
    else:
      rng, step_rng = jax.random.split(rng)
      scaled = logits / temperature
      if topk:
        kth = lax.top_k(scaled, topk)[0][:, -1:]  # [B, 1]
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
      nxt = jax.random.categorical(step_rng, scaled, axis=-1)
    nxt = jnp.where(ended, 0, nxt).astype(jnp.int32)  # [B]
    token_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), nxt[:, None], -1)[:, 0]
    log_prob = log_prob + jnp.where(ended, 0.0, token_lp)
    seqs = lax.dynamic_update_slice(seqs, nxt[:, None], (0, i))
    return i + 1, nxt, seqs, ended | (nxt == eos_id), log_prob, cache, rng

  state = (jnp.array(0), jnp.zeros((batch_size,), jnp.int32),
           jnp.zeros((batch_size, max_decode_len), jnp.int32),
           jnp.zeros((batch_size,), bool), jnp.zeros((batch_size,), jnp.float32), cache, rng)
  _, _, seqs, _, log_prob, _, _ = lax.while_loop(cond, body, state)
  return seqs, log_prob


def brevity_penalty(alpha: float, length) -> Array:
  """T5X's length penalty ((5 + length) / 6) ** alpha."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def tile_beams(tree: Cache, beam_size: int) -> Cache:
  """Repeats every batched leaf beam_size times along axis 0: [B, ...] -> [B*W, ...]."""
  return jax.tree.map(
      lambda x: jnp.repeat(x, beam_size, axis=0) if jnp.ndim(x) else x, tree)


def _gather_beams(tree: Cache, beam_idx: Array, batch_size: int, beam_size: int) -> Cache:
  """Selects beams per batch element: leaves [B*W, ...] indexed by beam_idx [B, W]."""
  def gather(x):
    if not jnp.ndim(x):
      return x
    x = x.reshape(batch_size, beam_size, *x.shape[1:])  # [B, W, ...]
    idx = beam_idx.reshape(batch_size, beam_size, *([1] * (x.ndim - 2)))
    x = jnp.take_along_axis(x, idx, axis=1)
    return x.reshape(batch_size * beam_size, *x.shape[2:])  # [B*W, ...]
  return jax.tree.map(gather, tree)


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                beam_size: int, max_decode_len: int, eos_id: int = 1,
                alpha: float = 0.6) -> Tuple[Array, Array]:
  """Beam search with T5X's brevity penalty; the cache is tiled over beams here.

  A finished hypothesis of length l scores log_prob / brevity_penalty(alpha, l);
  beams still live at max_decode_len compete likewise, with l = max_decode_len.
  Search stops early once no live beam can beat the worst kept finished one.

  Returns:
    sequences [B, W, L] best first, and their scores [B, W].
  """
  b, w, n = batch_size, beam_size, max_decode_len
  cache = tile_beams(cache, w)
  max_penalty = brevity_penalty(alpha, n)

  def cond(state):
    i, _, _, live_lp, _, fin_scores, fin_flags, _ = state
    best_live = live_lp[:, 0] / max_penalty
    worst_fin = jnp.min(jnp.where(fin_flags, fin_scores, NEG_INF), axis=1)
    done = jnp.all(fin_flags, axis=1) & (best_live < worst_fin)
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, token, live_seqs, live_lp, fin_seqs, fin_scores, fin_flags, cache = state
    logits, cache = tokens_to_logits(token.reshape(b * w, 1), cache)  # [B*W, V]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, w, -1)
    vocab = log_probs.shape[-1]
    cand = (live_lp[:, :, None] + log_probs).reshape(b, w * vocab)  # [B, W*V]
    # 2W candidates always hold at least W that do not end here (one EOS per beam).
    top_lp, top_idx = lax.top_k(cand, 2 * w)  # [B, 2W]
    top_beam, top_tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(live_seqs, top_beam[:, :, None], axis=1)  # [B, 2W, L]
    top_seqs = lax.dynamic_update_slice(top_seqs, top_tok[:, :, None], (0, 0, i))
    is_eos = top_tok == eos_id

    # Finished: keep the best W of the old finished and the new EOS candidates.
    new_scores = jnp.where(is_eos, top_lp / brevity_penalty(alpha, i + 1), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)  # [B, 3W]
    all_flags = jnp.concatenate([fin_flags, is_eos], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)  # [B, 3W, L]
    fin_scores, keep = lax.top_k(all_scores, w)
    fin_flags = jnp.take_along_axis(all_flags, keep, axis=1)
    fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)

    # Live: the best W candidates that did not emit EOS.
    live_lp, keep = lax.top_k(jnp.where(is_eos, NEG_INF, top_lp), w)  # [B, W]
    live_seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
    token = jnp.take_along_axis(top_tok, keep, axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(top_beam, keep, axis=1), b, w)
    return i + 1, token, live_seqs, live_lp, fin_seqs, fin_scores, fin_flags, cache

  live_lp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (w - 1), jnp.float32), (b, 1))
  state = (jnp.array(0), jnp.zeros((b, w), jnp.int32), jnp.zeros((b, w, n), jnp.int32),
           live_lp, jnp.zeros((b, w, n), jnp.int32), jnp.full((b, w), NEG_INF, jnp.float32),
           jnp.zeros((b, w), bool), cache)
  i, _, live_seqs, live_lp, fin_seqs, fin_scores, fin_flags, _ = lax.while_loop(
      cond, body, state)
  # Live beams still running at the end compete as hypotheses cut at the current
  # length, so slots that no finished hypothesis filled are never returned empty.
  live_scores = live_lp / brevity_penalty(alpha, i)
  all_scores = jnp.concatenate([jnp.where(fin_flags, fin_scores, NEG_INF), live_scores], 1)
  scores, keep = lax.top_k(all_scores, w)  # [B, W], best first
  seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, live_seqs], 1), keep[:, :, None], 1)
  return seqs, scores
