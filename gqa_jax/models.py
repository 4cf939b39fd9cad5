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

Array = jax.Array
Batch = Mapping[str, Array]
# T5X's special normalisers, by name.
NORMALIZERS = ('NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS')
# The batch features the teacher-forced forward pass and its loss weights read.
MODEL_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
                  'encoder_segment_ids', 'decoder_segment_ids', 'encoder_positions',
                  'decoder_positions', 'decoder_loss_weights')


def target_weights(batch: Batch) -> Array:
  """Which target tokens count: decoder_loss_weights, else every non-padding target."""
  weights = batch.get('decoder_loss_weights')
  return batch['decoder_target_tokens'] > 0 if weights is None else weights


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


class EncoderDecoderModel:
  """A T5X-style model: the Flax module plus what training, eval and inference need.

  Args:
    module: a `network.Transformer`.
    input_vocabulary, output_vocabulary, optimizer_def: optional, kept for the
      trainer (seqio vocabularies, an optax transformation).
    label_smoothing, z_loss: as T5X (T5.1.1 runs use z_loss=1e-4).
    loss_normalizing_factor: None (sum), a float, or 'NUM_REAL_TARGET_TOKENS' /
      'NUM_TOTAL_TARGET_TOKENS'.
    eos_id: end-of-sequence id (T5: 1); decoding starts from id 0.
  """

  def __init__(self, module: nn.Module, input_vocabulary=None, output_vocabulary=None,
               optimizer_def=None, label_smoothing: float = 0.0, z_loss: float = 0.0,
               loss_normalizing_factor: Union[None, float, str] = None, eos_id: int = 1):
    if isinstance(loss_normalizing_factor, str) and loss_normalizing_factor not in NORMALIZERS:
      raise ValueError(f'loss_normalizing_factor={loss_normalizing_factor!r} is unknown; '
                       f'use a number, None or one of {NORMALIZERS}.')
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.optimizer_def = optimizer_def
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.loss_normalizing_factor = loss_normalizing_factor
    self.eos_id = eos_id
    self._predict = jax.jit(self._predict_impl, static_argnames=(
        'method', 'num_decodes', 'alpha', 'temperature', 'topk', 'length',
        'return_all_decodes'))
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

  def loss_fn(self, params, batch: Batch,
              dropout_rng: Optional[Array]) -> Tuple[Array, Dict[str, Array]]:
    """Summed (or normalised) loss and metrics; dropout is on iff dropout_rng is given."""
    logits = self._compute_logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    factor = self.loss_normalizing_factor
    if factor == 'NUM_REAL_TARGET_TOKENS':
      factor = jnp.sum(weights if weights is not None else targets > 0)
    elif factor == 'NUM_TOTAL_TARGET_TOKENS':
      factor = np.prod(targets.shape)
    loss, z_loss, weight_sum = compute_weighted_cross_entropy(
        logits, targets, weights, self.label_smoothing, self.z_loss, factor)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    if weights is not None:
      correct = correct * weights
    metrics = {'loss': loss, 'z_loss': z_loss, 'cross_ent_loss': loss - z_loss,
               'weight_sum': weight_sum, 'accuracy': jnp.sum(correct) / weight_sum}
    return loss, metrics

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
  def _init_decoding(self, params, batch: Batch, max_decode_length: int):
    """Runs the encoder once and builds the cache: decoder self-attention K/V zeros
    [B, K, L, H] and cross-attention K/V projected from the encoder output."""
    module = self.module
    enc_tokens = batch['encoder_input_tokens']
    encoded = module.apply({'params': params}, enc_tokens, batch.get('encoder_segment_ids'),
                           enable_dropout=False, method=module.encode)
    dummy = jnp.ones((enc_tokens.shape[0], max_decode_length), jnp.int32)
    _, variables = module.apply(
        {'params': params}, encoded, enc_tokens, dummy, dummy, enable_dropout=False,
        decode=True, max_decode_length=max_decode_length, mutable=['cache'],
        method=module.decode)
    return variables['cache']

  def _tokens_to_logits(self, params, enc_tokens: Array, max_decode_length: int):
    module = self.module

    def tokens_to_logits(tokens, cache):
      logits, variables = module.apply(
          {'params': params, 'cache': cache}, None, enc_tokens, tokens, tokens,
          enable_dropout=False, decode=True, max_decode_length=max_decode_length,
          mutable=['cache'], method=module.decode)
      return logits[:, -1, :], variables['cache']
    return tokens_to_logits

  def predict_batch_with_aux(self, params, batch: Batch, rng: Optional[Array] = None, *,
                             method: str = 'greedy', num_decodes: int = 1, alpha: float = 0.6,
                             temperature: float = 1.0, topk: int = 0,
                             max_decode_length: Optional[int] = None,
                             return_all_decodes: bool = False):
    """Decodes with a KV cache. `method`: 'greedy', 'beam' (num_decodes beams, T5X's
    length penalty alpha) or 'sample' (temperature, top-k). The output length is
    `max_decode_length`, by default the batch's decoder_target_tokens length.

    Returns (decodes [B, L] or [B, num_decodes, L], {'scores': ...}).
    """
    if method not in ('greedy', 'beam', 'sample'):
      raise ValueError(f'unknown decoding method {method!r}; use greedy, beam or sample.')
    length = max_decode_length or batch['decoder_target_tokens'].shape[-1]
    arrays = {k: batch[k] for k in ('encoder_input_tokens', 'encoder_segment_ids') if k in batch}
    seqs, scores = self._predict(params, arrays, rng, method=method,
                                 num_decodes=num_decodes, alpha=alpha, temperature=temperature,
                                 topk=topk, length=length,
                                 return_all_decodes=return_all_decodes)
    return seqs, {'scores': scores}

  def _predict_impl(self, params, batch, rng, *, method, num_decodes, alpha, temperature,
                    topk, length, return_all_decodes):
    enc_tokens = batch['encoder_input_tokens']
    b = enc_tokens.shape[0]
    cache = self._init_decoding(params, batch, length)
    if method in ('greedy', 'sample'):
      temp = 0.0 if method == 'greedy' else temperature
      if num_decodes != 1:
        cache = decoding.tile_beams(cache, num_decodes)
        enc_tokens = jnp.repeat(enc_tokens, num_decodes, axis=0)
      seqs, scores = decoding.temperature_sample(
          self._tokens_to_logits(params, enc_tokens, length), cache, b * num_decodes, length,
          self.eos_id, rng, temp, topk)
      seqs = seqs.reshape(b, num_decodes, length)
      scores = scores.reshape(b, num_decodes)
      if not return_all_decodes:
        best = jnp.argmax(scores, axis=1)
        seqs = jnp.take_along_axis(seqs, best[:, None, None], 1)[:, 0]
        scores = jnp.take_along_axis(scores, best[:, None], 1)[:, 0]
    elif method == 'beam':
      seqs, scores = decoding.beam_search(
          self._tokens_to_logits(params, jnp.repeat(enc_tokens, num_decodes, axis=0), length),
          cache, b, num_decodes, length, self.eos_id, alpha)
      if not return_all_decodes:
        seqs, scores = seqs[:, 0], scores[:, 0]
    return seqs, scores

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **kwargs) -> Array:
    """Decoded token ids [B, L] (greedy unless `method` says otherwise)."""
    return self.predict_batch_with_aux(params, batch, rng, **kwargs)[0]
