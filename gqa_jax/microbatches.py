"""Gradient accumulation over microbatches (T5X's `num_microbatches`).

A global batch [B, ...] is cut into n microbatches of B / n rows; each runs the forward
and backward pass alone (activation memory of B / n rows), their losses, metrics and
gradients are added up in float32 under `jax.lax.scan`, and the step applies one
optimizer update. Microbatch j's dropout key is the step's key with j folded in, so no
two microbatches of a step share a dropout mask.

Where this differs from T5X's `accumulate_grads_microbatched`:
- Strided, not contiguous, microbatches: microbatch j holds rows j, j + n, j + 2n, ...
  (see `split`).
- Token-weighted normalisation: the loss normalising factor and the per-token weights
  are computed once on the whole batch (`models.loss_normalizing_factor_and_weights`),
  and each microbatch's loss is its slice of those weights divided by the whole batch's
  factor. The microbatches' losses and gradients then add up to the whole batch's for
  every normaliser. T5X runs the model's loss on each microbatch, which divides it by
  that microbatch's own factor (e.g. its NUM_REAL_TARGET_TOKENS): a token then weighs
  more when fewer real tokens happen to share its microbatch.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_jax import models, train_utils
from gqa_jax.errors import ConfigError

Array = jax.Array


def check_num_microbatches(num_microbatches: Optional[int], batch_size: int, data_size: int):
  """Raises ConfigError unless `num_microbatches` (None or a positive int) divides
  `batch_size` into microbatches that each split over the `data_size` data-parallel
  devices."""
  train_utils.check_int('NUM_MICROBATCHES', num_microbatches, optional=True,
                        fix='None or 1: no gradient accumulation')
  if num_microbatches is None:
    return
  if batch_size % num_microbatches:
    raise ConfigError(f'--gin.NUM_MICROBATCHES={num_microbatches} does not divide '
                      f'--gin.BATCH_SIZE={batch_size}: use a divisor of {batch_size}, or a '
                      f'BATCH_SIZE that is a multiple of {num_microbatches}.')
  micro = batch_size // num_microbatches
  if micro % data_size:
    raise ConfigError(f'--gin.NUM_MICROBATCHES={num_microbatches} leaves microbatches of '
                      f'{micro} rows (BATCH_SIZE={batch_size} / {num_microbatches}), which do '
                      f'not split over the {data_size} data-parallel devices (MESH_DATA): '
                      f'BATCH_SIZE / NUM_MICROBATCHES must be a multiple of {data_size}, '
                      f'e.g. NUM_MICROBATCHES={_largest_fitting(batch_size, data_size)}.')


def _largest_fitting(batch_size: int, data_size: int) -> int:
  """The most microbatches that still give every data-parallel device a row of each."""
  return max((n for n in range(1, batch_size + 1)
              if batch_size % n == 0 and (batch_size // n) % data_size == 0), default=1)


def split(x: Array, num_microbatches: int) -> Array:
  """[B, ...] -> [n, B / n, ...]: microbatch j holds rows j, j + n, j + 2n, ... of `x`.

  Strided, because the batch arrives sharded over the 'data' mesh axis in contiguous
  blocks of rows (device d holds rows d * B / D to (d + 1) * B / D - 1). Row r = i * n + j
  lands in microbatch j at position i, so each device's block holds B / (n * D) rows of
  every microbatch, at its own positions: every microbatch stays spread over all the data
  shards without moving a byte, and each scan step keeps every device busy. Contiguous
  microbatches (T5X's) would put microbatch j on the devices holding rows j * B / n to
  (j + 1) * B / n - 1 only: idle devices, or a reshuffle of the batch before the scan.
  """
  b = x.shape[0]
  x = x.reshape(b // num_microbatches, num_microbatches, *x.shape[1:])  # [B / n, n, ...]
  x = jnp.swapaxes(x, 0, 1)  # [n, B / n, ...]
  # The rows of each microbatch stay split over 'data' (the rules map 'batch' to it).
  return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))


def microbatch_rng(rng: Array, index: Array) -> Array:
  """Microbatch `index`'s dropout key: the step's key with the index folded in."""
  return jax.random.fold_in(rng, index)


def value_and_grad(model: models.EncoderDecoderModel, num_microbatches: int) -> Callable:
  """`jax.value_and_grad(model.loss_fn, has_aux=True)`, accumulated over microbatches.

  Returns a function (params, batch, dropout_rng, normalizing=None) ->
  ((loss, metrics), grads) whose loss, metrics and gradients equal the whole batch's
  (up to float round-off) for every loss normaliser:

    params: the model's parameters.
    batch: the global batch, features [B, ...] with B divisible by `num_microbatches`.
    dropout_rng: the step's dropout key, or None for no dropout.
    normalizing: (factor, weights [B, T]) of the whole batch; None computes them from
      `batch` with the model's loss_normalizing_factor.
  """
  n = num_microbatches
  grad_fn = jax.value_and_grad(model.loss_sums, has_aux=True)

  def accumulated(params, batch, dropout_rng: Optional[Array],
                  normalizing: Optional[models.Normalizing] = None):
    b = batch['decoder_target_tokens'].shape[0]
    if b % n:
      raise ValueError(f'num_microbatches={n} does not divide the batch of {b} rows.')
    if normalizing is None:
      normalizing = models.loss_normalizing_factor_and_weights(
          model.loss_normalizing_factor, batch)
    factor, weights = normalizing
    # Only the features the loss reads: others need not have B rows.
    micro = {k: split(jnp.asarray(v), n) for k, v in batch.items()
             if k in models.MODEL_FEATURES}  # [n, B / n, ...] each
    micro_weights = None if weights is None else split(jnp.asarray(weights), n)  # [n, B / n, T]

    def body(carry, xs):
      grads_sum, sums_sum = carry
      microbatch, microbatch_weights, index = xs
      rng = None if dropout_rng is None else microbatch_rng(dropout_rng, index)
      (_, sums), grads = grad_fn(params, microbatch, rng, (factor, microbatch_weights))
      # float32 sums: bfloat16 would lose the small microbatches' share of a large sum.
      grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
      sums_sum = jax.tree.map(lambda a, s: a + s.astype(jnp.float32), sums_sum, sums)
      return (grads_sum, sums_sum), None

    zero_grads = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    zero_sums = {k: jnp.zeros((), jnp.float32)
                 for k in ('loss', 'z_loss', 'weight_sum', 'correct')}
    (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums),
                                    (micro, micro_weights, jnp.arange(n)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return (sums['loss'], models.metrics_from_sums(sums)), grads

  return accumulated
