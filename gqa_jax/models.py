"""EncoderDecoderModel: loss, scoring and prediction around a `network.Transformer`.

Batches use T5X's keys: `encoder_input_tokens` [B, S], `decoder_input_tokens`
[B, T], `decoder_target_tokens` [B, T], `decoder_loss_weights` [B, T] and
optionally `encoder_segment_ids`, `decoder_segment_ids`, `*_positions`.
"""

from typing import Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax import decoding
from gqa_jax import network

Array = jax.Array
Batch = Mapping[str, Array]
# A loss normalising factor (None, a number or a scalar) and per-token weights [B, T] or None.
Normalizing = Tuple[Union[None, float, Array], Optional[Array]]
# T5X's special loss normalising factors, by name (any case, as T5X accepts).
NORMALIZERS = ('NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS', 'AVERAGE_PER_SEQUENCE')
# The batch features the teacher-forced forward pass and its loss weights read.
MODEL_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
                  'encoder_segment_ids', 'decoder_segment_ids', 'encoder_positions',
                  'decoder_positions', 'decoder_loss_weights')
DECODE_METHODS = ('greedy', 'beam', 'sample')


def target_weights(batch: Batch) -> Array:
  """Which target tokens count: decoder_loss_weights, else every non-padding target."""
  weights = batch.get('decoder_loss_weights')
  return batch['decoder_target_tokens'] > 0 if weights is None else weights


def canonical_normalizer(factor: Union[None, float, str]) -> Union[None, float, str]:
  """A loss_normalizing_factor as T5X reads it: names in any case, upper-cased."""
  if not isinstance(factor, str):
    return factor
  if factor.upper() not in NORMALIZERS:
    raise ValueError(f'loss_normalizing_factor={factor!r} is unknown; use a number, None '
                     f'or one of {NORMALIZERS} (any case).')
  return factor.upper()


def _sum_per_segment(weights: Array, segment_ids: Array) -> Array:
  """Per token, the summed weight of its packed segment ([B, T]); 0 on padding (id 0)."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
  total = jnp.einsum('bts,bs->bt', same.astype(jnp.float32), weights.astype(jnp.float32))
  return jnp.where(segment_ids != 0, total, 0.0)


def loss_normalizing_factor_and_weights(factor: Union[None, float, str],
                                        batch: Batch) -> Tuple[Optional[Array], Optional[Array]]:
  """T5X's rule: (the number to divide the loss by, the per-token loss weights [B, T]).

  A number or None passes through with the batch's decoder_loss_weights (None there
  sums every position, padding included, as T5X does). A named factor takes its weights
  from decoder_loss_weights, else `decoder_target_tokens > 0`, and divides by their sum
  (NUM_REAL_TARGET_TOKENS), by B * T (NUM_TOTAL_TARGET_TOKENS), or first divides each
  weight by its sequence's (packed: its segment's) total and then by their sum, the
  number of sequences (AVERAGE_PER_SEQUENCE).
  """
  weights = batch.get('decoder_loss_weights')
  factor = canonical_normalizer(factor)
  if not isinstance(factor, str):
    return factor, weights
  targets = batch['decoder_target_tokens']
  weights = jnp.asarray(target_weights(batch), jnp.float32)
  if factor == 'NUM_TOTAL_TARGET_TOKENS':
    return jnp.asarray(np.prod(targets.shape), jnp.float32), weights
  if factor == 'AVERAGE_PER_SEQUENCE':
    if batch.get('decoder_segment_ids') is not None:
      per_sequence = _sum_per_segment(weights, jnp.asarray(batch['decoder_segment_ids']))
    else:
      per_sequence = jnp.sum(weights, axis=-1, keepdims=True)
    # Padding (and all-zero sequences) divide 0 or a weight by 0: weight 0, as in T5X.
    weights = jnp.nan_to_num(weights / per_sequence, nan=0.0, posinf=0.0, neginf=0.0)
  return jnp.sum(weights), weights


def cross_entropy_with_logits(logits: Array, targets: Array,
                              z_loss: float) -> Tuple[Array, Array]:
  """Per-token cross entropy against soft targets, plus z_loss * log(Z)^2.

  Args: logits [B, T, V]; targets [B, T, V] (probabilities).
  Returns: (loss [B, T] including the z-loss term, z_loss term [B, T]).
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  loss = -jnp.sum(targets * (logits - log_z[..., None]), axis=-1)
  total_z_loss = z_loss * jnp.square(log_z)
  return loss + total_z_loss, total_z_loss


def compute_weighted_cross_entropy(logits: Array, targets: Array,
                                   weights: Optional[Array] = None,
                                   label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   loss_normalizing_factor: Optional[float] = None):
  """T5X's loss: label-smoothed CE whose minimum is 0; returns (loss, z_loss, weight_sum)."""
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = (1.0 - confidence) / (vocab - 1)
  # Entropy of the smoothed targets, subtracted so that a perfect model scores 0.
  normalizing_constant = -(confidence * np.log(confidence)
                           + (vocab - 1) * low * np.log(low + 1e-20))
  soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low  # [B, T, V]
  loss, zl = cross_entropy_with_logits(logits.astype(jnp.float32), soft, z_loss)
  loss = loss - normalizing_constant
  weight_sum = jnp.asarray(np.prod(targets.shape), jnp.float32)
  if weights is not None:
    loss, zl, weight_sum = loss * weights, zl * weights, jnp.sum(weights)
  if loss_normalizing_factor is not None:
    loss, zl = loss / loss_normalizing_factor, zl / loss_normalizing_factor
  return jnp.sum(loss), jnp.sum(zl), weight_sum


def metrics_from_sums(sums: Mapping[str, Array]) -> Dict[str, Array]:
  """`loss_fn`'s metrics from `EncoderDecoderModel.loss_sums`'s sums (of a batch, or
  added up over its microbatches)."""
  return {'loss': sums['loss'], 'z_loss': sums['z_loss'],
          'cross_ent_loss': sums['loss'] - sums['z_loss'], 'weight_sum': sums['weight_sum'],
          'accuracy': sums['correct'] / sums['weight_sum']}


class EncoderDecoderModel:
  """A T5X-style model: the Flax module plus what training, eval and inference need.

  Args:
    module: a `network.Transformer`.
    input_vocabulary, output_vocabulary, optimizer_def: optional, kept for the
      trainer (seqio vocabularies, an optax transformation).
    label_smoothing, z_loss: as T5X (T5.1.1 runs use z_loss=1e-4).
    loss_normalizing_factor: None (sum), a number, or one of NORMALIZERS in any case
      (`loss_normalizing_factor_and_weights`).
    eos_id: end-of-sequence id (T5: 1); decoding starts from id 0.
  """

  def __init__(self, module: nn.Module, input_vocabulary=None, output_vocabulary=None,
               optimizer_def=None, label_smoothing: float = 0.0, z_loss: float = 0.0,
               loss_normalizing_factor: Union[None, float, str] = None, eos_id: int = 1):
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.optimizer_def = optimizer_def
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.loss_normalizing_factor = canonical_normalizer(loss_normalizing_factor)
    self.eos_id = eos_id
    self._predict = jax.jit(self._predict_impl, static_argnames=(
        'method', 'num_decodes', 'alpha', 'temperature', 'topk', 'topp', 'length',
        'max_decode_steps', 'rescale_log_probs', 'return_all_decodes'))
    self._score = jax.jit(self._score_impl)

  # --- parameters ------------------------------------------------------------------
  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Tuple[int, ...]]):
    """{'params': float32 parameters (unboxed), 'params_axes': logical PartitionSpecs}."""
    enc = jnp.ones(input_shapes['encoder_input_tokens'], jnp.int32)
    dec = jnp.ones(input_shapes['decoder_input_tokens'], jnp.int32)
    boxed = self.module.init(rng, enc, dec, dec, enable_dropout=False)
    return {'params': nn.meta.unbox(boxed['params']),
            'params_axes': nn.get_partition_spec(boxed)['params']}

  # --- loss and scores ---------------------------------------------------------------
  def _compute_logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None):
    rngs = {'dropout': dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], batch.get('encoder_segment_ids'),
        batch.get('decoder_segment_ids'), batch.get('encoder_positions'),
        batch.get('decoder_positions'), enable_dropout=rngs is not None, rngs=rngs)

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array],
              normalizing: Optional[Normalizing] = None) -> Tuple[Array, Dict[str, Array]]:
    """Summed (or normalised) loss and metrics; dropout is on iff dropout_rng is given.

    Args:
      batch: the features of [B] sequences (the module docstring).
      normalizing: (factor, per-token weights [B, T] or None) to use instead of this
        batch's own (`loss_normalizing_factor_and_weights`): a microbatch's slice of its
        whole batch's weights and the whole batch's factor (`microbatches`).
    Returns: (loss, {'loss', 'z_loss', 'cross_ent_loss', 'weight_sum', 'accuracy'}).
    """
    loss, sums = self.loss_sums(params, batch, dropout_rng, normalizing)
    return loss, metrics_from_sums(sums)

  def loss_sums(self, params, batch: Batch, dropout_rng: Optional[Array],
                normalizing: Optional[Normalizing] = None) -> Tuple[Array, Dict[str, Array]]:
    """`loss_fn`'s loss with its metrics as sums over the batch's tokens
    ({'loss', 'z_loss', 'weight_sum', 'correct'}): with the whole batch's `normalizing`,
    the sums of its microbatches add up to the whole batch's (a ratio such as accuracy
    would not), and `metrics_from_sums` turns them into `loss_fn`'s metrics."""
    logits = self._compute_logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    if normalizing is None:
      normalizing = loss_normalizing_factor_and_weights(self.loss_normalizing_factor, batch)
    factor, weights = normalizing
    loss, z_loss, weight_sum = compute_weighted_cross_entropy(
        logits, targets, weights, self.label_smoothing, self.z_loss, factor)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    if weights is not None:
      correct = correct * weights
    return loss, {'loss': loss, 'z_loss': z_loss, 'weight_sum': weight_sum,
                  'correct': jnp.sum(correct)}

  def score_batch(self, params, batch: Batch) -> Array:
    """Log-likelihood of each target sequence, summed over its `target_weights`: [B].
    Compiled once per batch shape."""
    return self._score(params, {k: batch[k] for k in MODEL_FEATURES if k in batch})

  def _score_impl(self, params, batch: Batch) -> Array:
    logits = self._compute_logits(params, batch).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    token_lp = jnp.take_along_axis(log_probs, batch['decoder_target_tokens'][..., None], -1)
    return jnp.sum(token_lp[..., 0] * target_weights(batch), axis=-1)

  # --- decoding ----------------------------------------------------------------------
  # The cached-decoding API, used by predict_batch here and by the decoding benchmark:
  # encode once, init_cache from the encoder output, then one tokens_to_logits call per
  # generated token. Each is a pure function of its arguments, to be jitted by the caller.
  def encode(self, params, encoder_input_tokens: Array,
             encoder_segment_ids: Optional[Array] = None) -> Array:
    """The encoder output [B, S, E] of tokens [B, S] (no dropout)."""
    module = self.module
    return module.apply({'params': params}, encoder_input_tokens, encoder_segment_ids,
                        enable_dropout=False, method=module.encode)

  def init_cache(self, params, encoded: Array, encoder_input_tokens: Array,
                 max_decode_length: int):
    """The decoding cache for up to `max_decode_length` [= L] tokens: per decoder layer,
    self-attention cached_key zeros [B, K, H, L] and cached_value zeros [B, K, L, H] and
    a cache_index, and cross-attention K/V ([B, K, H, S], [B, K, S, H]) projected once from
    `encoded` [B, S, E]
    (K = that stack's KV heads)."""
    module, params = self._decoding(params)
    dummy = jnp.ones((encoder_input_tokens.shape[0], max_decode_length), jnp.int32)
    _, variables = module.apply(
        {'params': params}, encoded, encoder_input_tokens, dummy, dummy, enable_dropout=False,
        decode=True, max_decode_length=max_decode_length, mutable=['cache'],
        method=module.decode)
    return variables['cache']

  def _decoding(self, params):
    """(module, params) that decode with a cache. A scanned network decodes with its
    layers unrolled: a decode step is small, and an unrolled decoder keeps the cache one
    tree per layer (batch leading, as `decoding` expects). The parameters are unstacked
    inside the caller's jit, slices of the stacked arrays."""
    config = getattr(self.module, 'config', None)
    if config is None or not getattr(config, 'scan_layers', False):
      return self.module, params
    return (network.Transformer(network.unscanned(config)),
            network.unstack_layers(params, config))

  def tokens_to_logits(self, params, encoder_input_tokens: Array, max_decode_length: int):
    """The one-step function of `decoding`: (tokens [B, 1], cache) -> (logits [B, V] of
    the next token, the cache advanced by one position). `encoder_input_tokens` [B, S]
    give the cross-attention padding mask; the encoder output itself is in the cache."""
    module, params = self._decoding(params)

    def step(tokens, cache):
      logits, variables = module.apply(
          {'params': params, 'cache': cache}, None, encoder_input_tokens, tokens, tokens,
          enable_dropout=False, decode=True, max_decode_length=max_decode_length,
          mutable=['cache'], method=module.decode)
      return logits[:, -1, :], variables['cache']
    return step

  def predict_batch_with_aux(self, params, batch: Batch, rng: Optional[Array] = None, *,
                             method: str = 'greedy', num_decodes: int = 1, alpha: float = 0.6,
                             temperature: float = 1.0, topk: int = 0, topp: float = 0.0,
                             max_decode_steps: Optional[int] = None,
                             rescale_log_probs: bool = True, prompt_with_targets: bool = False,
                             max_decode_length: Optional[int] = None,
                             return_all_decodes: bool = False):
    """Decodes with a KV cache, with T5X's semantics (`decoding`).

    Args:
      method: 'greedy', 'beam' (num_decodes beams, T5X's length penalty alpha) or
        'sample' (temperature, cut to the topk or to the topp nucleus; num_decodes
        samples per example, the best by score returned first).
      max_decode_steps: decode at most this many tokens after the prompt.
      rescale_log_probs: greedy/sample scores under the distribution sampled from
        (T5X's default: greedy scores 0), or with False under the model itself.
      prompt_with_targets: as T5X: decoder_input_tokens (EOS removed) are a prompt,
        kept in the output, and decoding continues after it.
      max_decode_length: the output length, by default the batch's
        decoder_target_tokens (else decoder_input_tokens) length.

    Returns (decodes [B, L] or [B, num_decodes, L] best first, {'scores': [B] or
    [B, num_decodes]}).
    """
    if method not in DECODE_METHODS:
      raise ValueError(f'unknown decoding method {method!r}; use one of {DECODE_METHODS}.')
    targets = batch.get('decoder_target_tokens', batch.get('decoder_input_tokens'))
    length = max_decode_length or (targets.shape[-1] if targets is not None else None)
    if length is None:
      raise ValueError('pass max_decode_length or a batch with decoder_target_tokens.')
    arrays = {k: batch[k] for k in ('encoder_input_tokens', 'encoder_segment_ids') if k in batch}
    if prompt_with_targets:
      # T5X drops EOS from the prompt so that decoding does not stop right after it.
      prompt = jnp.asarray(batch['decoder_input_tokens'], jnp.int32)[:, :length]
      prompt = jnp.where(prompt == self.eos_id, 0, prompt)
      arrays['prompt'] = jnp.pad(prompt, ((0, 0), (0, length - prompt.shape[1])))
    seqs, scores = self._predict(params, arrays, rng, method=method, num_decodes=num_decodes,
                                 alpha=alpha, temperature=temperature, topk=topk, topp=topp,
                                 length=length, max_decode_steps=max_decode_steps,
                                 rescale_log_probs=rescale_log_probs,
                                 return_all_decodes=return_all_decodes)
    return seqs, {'scores': scores}

  def _predict_impl(self, params, batch, rng, *, method, num_decodes, alpha, temperature,
                    topk, topp, length, max_decode_steps, rescale_log_probs,
                    return_all_decodes):
    enc_tokens = batch['encoder_input_tokens']
    prompt = batch.get('prompt')
    b = enc_tokens.shape[0]
    encoded = self.encode(params, enc_tokens, batch.get('encoder_segment_ids'))
    cache = self.init_cache(params, encoded, enc_tokens, length)
    enc_tokens = jnp.repeat(enc_tokens, num_decodes, axis=0)  # [B*W, S]
    tokens_to_logits = self.tokens_to_logits(params, enc_tokens, length)
    if method in ('greedy', 'sample'):
      if num_decodes != 1:
        cache = decoding.tile_beams(cache, num_decodes)
        prompt = None if prompt is None else jnp.repeat(prompt, num_decodes, axis=0)
      seqs, scores = decoding.temperature_sample(
          tokens_to_logits, cache, b * num_decodes, length, self.eos_id, rng,
          0.0 if method == 'greedy' else temperature, topk, topp, inputs=prompt,
          max_decode_steps=max_decode_steps, rescale_log_probs=rescale_log_probs)
      seqs = seqs.reshape(b, num_decodes, length)
      scores = scores.reshape(b, num_decodes)
      # Best first, as beam search returns them (T5X ranks samples by the same scores).
      order = jnp.argsort(-scores, axis=1, stable=True)
      seqs = jnp.take_along_axis(seqs, order[:, :, None], 1)
      scores = jnp.take_along_axis(scores, order, 1)
    else:
      seqs, scores = decoding.beam_search(
          tokens_to_logits, cache, b, num_decodes, length, self.eos_id, alpha, inputs=prompt,
          max_decode_steps=max_decode_steps)
    if not return_all_decodes:
      seqs, scores = seqs[:, 0], scores[:, 0]
    return seqs, scores

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **kwargs) -> Array:
    """Decoded token ids [B, L] (greedy unless `method` says otherwise)."""
    return self.predict_batch_with_aux(params, batch, rng, **kwargs)[0]
