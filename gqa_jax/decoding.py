"""Cached autoregressive decoding with T5X's semantics: greedy, temperature sampling
(top-k or top-p) and beam search.

Every decoder here is a `lax.while_loop` around `tokens_to_logits(tokens [B, 1],
cache) -> (logits [B, V], cache)`. Sequences start from token 0 (T5's decoder
start), stop at `eos_id` and are padded with 0 after it. The cache is any pytree
whose non-scalar leaves have the batch as their leading axis (the KV cache at
KV-head granularity, keys [B, K, H, S] and values [B, K, S, H], and the cached
cross-attention K/V).

Decoder prompts are T5X's `inputs` [B, L]: the decoder input, shifted right, so
inputs[:, 0] (the start token) is ignored and a non-zero inputs[:, i + 1] is forced as
output token i. Forced tokens add nothing to the score and an EOS among them ends
nothing; decoding continues after them. They are fed one per step through the cache
(T5X's path without prefill): the outputs are those of a prefilled cache, and the
cache index stays one scalar for the batch. `max_decode_steps` counts the tokens
decoded after each row's prompt, as in T5X.
"""

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], Tuple[Array, Cache]]
NEG_INF = -1.0e7
# T5X decodes greedily at or below this temperature: dividing by it would overflow.
MIN_TEMPERATURE = 1e-4


def forced_tokens(inputs: Optional[Array], batch_size: int, length: int) -> Array:
  """Output-aligned prompt [B, L] from T5X-style decoder inputs; 0 where decoding is free."""
  if inputs is None:
    return jnp.zeros((batch_size, length), jnp.int32)
  if tuple(inputs.shape) != (batch_size, length):
    raise ValueError(f'inputs has shape {tuple(inputs.shape)}; the decoder prompt must be '
                     f'[batch, max_decode_len] = {(batch_size, length)}.')
  return jnp.pad(jnp.asarray(inputs, jnp.int32)[:, 1:], ((0, 0), (0, 1)))


def length_limits(forced: Array, length: int, max_decode_steps: Optional[int]) -> Array:
  """How many output positions each row may fill: [B]."""
  if max_decode_steps is None:
    return jnp.full(forced.shape[:1], length, jnp.int32)
  if not 1 <= max_decode_steps <= length:
    raise ValueError(f'max_decode_steps={max_decode_steps} must be in [1, {length}] '
                     '(the decoded length), or None.')
  prompt_len = jnp.sum(forced != 0, axis=1)
  return jnp.minimum(length, prompt_len + max_decode_steps).astype(jnp.int32)


def topk_mask(logits: Array, k: int) -> Array:
  """Logits [..., V] with all but the k largest set to NEG_INF (ties at the k-th kept)."""
  kth = lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, NEG_INF, logits)


def topp_mask(logits: Array, p: float) -> Array:
  """Logits [..., V] outside the nucleus set to NEG_INF. The nucleus is T5X's: the
  smallest set of most probable tokens whose probability adds up to at least p, plus
  every token as probable as its least probable member."""
  probs = jax.nn.softmax(logits, axis=-1)
  desc = -jnp.sort(-probs, axis=-1)  # [..., V], most probable first
  # Tokens needed before the running mass reaches p; rounding can leave the total
  # mass just under p = 1, and then every token stays.
  n_before = jnp.sum(jnp.cumsum(desc, axis=-1) < p, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(desc, jnp.minimum(n_before, desc.shape[-1] - 1), axis=-1)
  return jnp.where(probs >= cutoff, logits, NEG_INF)


def temperature_sample(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                       max_decode_len: int, eos_id: int = 1, rng: Optional[Array] = None,
                       temperature: float = 1.0, topk: int = 0, topp: float = 0.0,
                       inputs: Optional[Array] = None, max_decode_steps: Optional[int] = None,
                       rescale_log_probs: bool = True) -> Tuple[Array, Array]:
  """Samples from softmax(logits / temperature), cut to the top-k or to the top-p nucleus.

  temperature <= 1e-4 is greedy decoding (argmax; top-k/top-p ignored; no rng needed).
  At most one of topk, topp may be non-zero (0 means no cut).

  Args:
    inputs: optional decoder prompt [B, L] (module docstring).
    max_decode_steps: optional limit on the tokens decoded after each row's prompt.
    rescale_log_probs: T5X's default True scores each token under the distribution it
      was drawn from (tempered, cut to top-k/top-p): greedy scores are then 0. False
      scores it under the model itself, softmax(logits).

  Returns:
    sequences [B, L] (0 after EOS) and their log-probabilities [B], prompt excluded.
  """
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 means greedy).')
  if topk and topp:
    raise ValueError(f'topk={topk} and topp={topp}: at most one of them may be non-zero.')
  if not 0.0 <= topp <= 1.0:
    raise ValueError(f'topp={topp} must be in [0, 1] (0 means no nucleus cut).')
  greedy = temperature <= MIN_TEMPERATURE
  if not greedy and rng is None:
    raise ValueError('temperature sampling needs an rng; pass rng or use temperature=0.')
  rng = jax.random.PRNGKey(0) if rng is None else rng
  prompt = forced_tokens(inputs, batch_size, max_decode_len)  # [B, L]
  limit = length_limits(prompt, max_decode_len, max_decode_steps)  # [B]

  def choose(logits, step_rng):  # [B, V] -> next tokens [B], their log-probs [B]
    if greedy:
      nxt = jnp.argmax(logits, axis=-1)
      if rescale_log_probs:  # the argmax has probability 1 under greedy decoding
        return nxt, jnp.zeros(nxt.shape, jnp.float32)
      scored = logits
    else:
      scaled = logits / temperature
      if topk:
        scaled = topk_mask(scaled, topk)
      if topp:
        scaled = topp_mask(scaled, topp)
      nxt = jax.random.categorical(step_rng, scaled, axis=-1)
      scored = scaled if rescale_log_probs else logits
    token_lp = jnp.take_along_axis(jax.nn.log_softmax(scored), nxt[:, None], -1)[:, 0]
    return nxt, token_lp

  def cond(state):
    i, _, _, ended, _, _, _ = state
    return (i < max_decode_len) & ~jnp.all(ended)

  def body(state):
    i, token, seqs, ended, log_prob, cache, rng = state
    logits, cache = tokens_to_logits(token[:, None], cache)  # [B, V]
    rng, step_rng = jax.random.split(rng)
    nxt, token_lp = choose(logits.astype(jnp.float32), step_rng)
    forced = lax.dynamic_index_in_dim(prompt, i, axis=1, keepdims=False)  # [B]
    in_prompt = forced != 0
    nxt = jnp.where(in_prompt, forced, nxt)
    log_prob = log_prob + jnp.where(ended | in_prompt, 0.0, token_lp)
    nxt = jnp.where(ended, 0, nxt).astype(jnp.int32)  # [B]
    seqs = lax.dynamic_update_slice(seqs, nxt[:, None], (0, i))
    ended = ended | ((nxt == eos_id) & ~in_prompt) | (i >= limit - 1)
    return i + 1, nxt, seqs, ended, log_prob, cache, rng

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
                alpha: float = 0.6, inputs: Optional[Array] = None,
                max_decode_steps: Optional[int] = None) -> Tuple[Array, Array]:
  """T5X's beam search; the cache is tiled over beams here.

  Each step extends the W live beams, keeps the 2W best candidates, and from those the
  W best that do not end in EOS stay live; a candidate ending in EOS at length l is a
  finished hypothesis scoring log_prob / brevity_penalty(alpha, l) (counted, as in
  T5X, only when above NEG_INF), and the W best finished ones are kept. The result per
  batch element is T5X's: its finished
  hypotheses whenever at least one finished (slots left empty score NEG_INF and hold
  zeros), and only when none did, its live beams scored by their raw log-probability.
  Search stops early once no live beam can beat the worst kept finished one.

  Args:
    inputs: optional decoder prompt [B, L] (module docstring).
    max_decode_steps: optional limit on the tokens decoded after each row's prompt.

  Returns:
    sequences [B, W, L] best first, and their scores [B, W].
  """
  b, w, n = batch_size, beam_size, max_decode_len
  prompt = forced_tokens(inputs, b, n)  # [B, L]
  limit = length_limits(prompt, n, max_decode_steps)  # [B]
  cache = tile_beams(cache, w)
  max_penalty = brevity_penalty(alpha, limit)  # [B]
  # Beams and finished slots that hold nothing score -inf, not NEG_INF, so that their
  # extensions can never pass for real hypotheses (with a finite stand-in T5X can
  # count an EOS appended to an empty beam as finished when W is large).
  empty = -jnp.inf

  def cond(state):
    i, _, _, live_lp, _, fin_scores, _ = state
    best_live = live_lp[:, 0] / max_penalty
    full = jnp.all(jnp.isfinite(fin_scores), axis=1)
    done = (full & (best_live < jnp.min(fin_scores, axis=1))) | (i >= limit)
    return ~jnp.all(done)

  def body(state):
    i, token, live_seqs, live_lp, fin_seqs, fin_scores, cache = state
    logits, cache = tokens_to_logits(token.reshape(b * w, 1), cache)  # [B*W, V]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, w, -1)
    vocab = log_probs.shape[-1]
    forced = lax.dynamic_index_in_dim(prompt, i, axis=1, keepdims=False)  # [B]
    in_prompt = forced != 0
    # Inside the prompt every live beam is extended by the forced token, at no cost.
    forced_lp = jnp.where(jnp.arange(vocab) == forced[:, None], 0.0, empty)  # [B, V]
    log_probs = jnp.where(in_prompt[:, None, None], forced_lp[:, None], log_probs)
    cand = (live_lp[:, :, None] + log_probs).reshape(b, w * vocab)  # [B, W*V]
    # 2W candidates always hold at least W that do not end here (one EOS per beam).
    top_lp, top_idx = lax.top_k(cand, 2 * w)  # [B, 2W]
    top_beam, top_tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(live_seqs, top_beam[:, :, None], axis=1)  # [B, 2W, L]
    top_seqs = lax.dynamic_update_slice(top_seqs, top_tok[:, :, None], (0, 0, i))
    ends = (top_tok == eos_id) & ~in_prompt[:, None]  # [B, 2W]

    # Finished: the best W of the old finished and the new EOS candidates. As in T5X,
    # where empty slots hold NEG_INF, a hypothesis scoring below NEG_INF never counts.
    new_scores = top_lp / brevity_penalty(alpha, i + 1)
    new_scores = jnp.where(ends & (new_scores > NEG_INF), new_scores, empty)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)  # [B, 3W]
    all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)  # [B, 3W, L]
    new_fin_scores, keep = lax.top_k(all_scores, w)
    new_fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)

    # Live: the best W candidates that did not emit EOS.
    new_live_lp, keep = lax.top_k(jnp.where(ends, empty, top_lp), w)  # [B, W]
    new_live_seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
    new_token = jnp.take_along_axis(top_tok, keep, axis=1)
    beam_idx = jnp.take_along_axis(top_beam, keep, axis=1)

    # A row past its length limit keeps its state while longer rows go on.
    active = i < limit  # [B]
    pick = lambda new, old: jnp.where(active.reshape(b, *([1] * (new.ndim - 1))), new, old)
    beam_idx = pick(beam_idx, jnp.broadcast_to(jnp.arange(w), (b, w)))
    cache = _gather_beams(cache, beam_idx, b, w)
    return (i + 1, pick(new_token, token), pick(new_live_seqs, live_seqs),
            pick(new_live_lp, live_lp), pick(new_fin_seqs, fin_seqs),
            pick(new_fin_scores, fin_scores), cache)

  live_lp = jnp.tile(jnp.array([0.0] + [empty] * (w - 1), jnp.float32), (b, 1))
  state = (jnp.array(0), jnp.zeros((b, w), jnp.int32), jnp.zeros((b, w, n), jnp.int32),
           live_lp, jnp.zeros((b, w, n), jnp.int32), jnp.full((b, w), empty, jnp.float32),
           cache)
  _, _, live_seqs, live_lp, fin_seqs, fin_scores, _ = lax.while_loop(cond, body, state)
  # T5X's final choice, per batch element: finished hypotheses of any length whenever
  # one exists; live beams (cut at the length limit, raw log-probabilities, no brevity
  # penalty) only when none finished.
  any_finished = jnp.any(jnp.isfinite(fin_scores), axis=1)  # [B]
  seqs = jnp.where(any_finished[:, None, None], fin_seqs, live_seqs)
  scores = jnp.where(any_finished[:, None], fin_scores, live_lp)  # [B, W], best first
  filled = jnp.isfinite(scores)
  return jnp.where(filled[..., None], seqs, 0), jnp.where(filled, scores, NEG_INF)
