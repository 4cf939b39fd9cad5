"""Layers of the T5.1.1 encoder-decoder, with one attention for MHA, GQA and MQA.

Einsum letters, used throughout gqa_jax:
  B batch, T query length, S key/value length, N query heads, K KV heads,
  R = N // K query heads per KV head, H head dim, D model dim, F mlp dim,
  V vocabulary size.
The paper's GQA-G has G groups, one per KV head: G = K, each group R query heads.
(G is the paper's letter and the one user-facing text uses; no einsum here uses it.)

Grouping is contiguous: query head n reads KV head n // R. Grouped attention
reshapes the queries to [B, T, K, R, H] and never materialises repeated K/V.

Every parameter carries logical axis names (flax `LogicallyPartitioned` boxes,
removed by `flax.linen.meta.unbox`); the mesh mapping lives in gin, not here.
"""

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Initializer = Callable[..., Array]

# Logical axis names of activations and of the KV cache.
KV_AXES = ('batch', 'length', 'kv_heads', 'kv')
# The decode cache is KV-head major (the same bytes as [B, L, K, H]), so that each (batch,
# KV head) reads contiguous blocks per step: values [B, K, L, H]; keys length-minor,
# [B, K, H, L] (T5X caches both so), which makes the step's scores one [R, H] x [H, L]
# product per (batch, KV head) that streams the keys once for all R query heads of the
# group. Measured on a 2-core CPU (benchmarks/decode_attention.py: 24 layers of float32
# caches of 2048 and 512 positions, 16 heads x 32, batch 4; benchmarks/results/
# decode-attention): at G = 8, 4, 2 the attention took 0.58-0.69x the time of the best form
# on [B, K, L, H] keys (R matrix-vector products, or one [L, H] x [H, R] product per KV
# head), streaming at 0.94 / 0.74 / 0.49 of the bandwidth probe; MHA at 1.01 (R = 1: a
# matrix-vector product either way); MQA 1.24x slower than [L, H] x [H, R] (a small part of
# its step, whose weight products dominate).
CACHE_AXES = ('batch', 'kv_heads', 'length', 'kv')
KEY_CACHE_AXES = ('batch', 'kv_heads', 'kv', 'length')
# kv_layout of grouped_dot_product_attention -> the einsum layouts of (key, value).
KV_LAYOUTS = {'BSKH': ('BSKH', 'BSKH'), 'cache': ('BKHS', 'BKSH')}
Q_AXES = ('batch', 'length', 'heads', 'kv')
EMBED_AXES = ('batch', 'length', 'embed')

default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
mlp_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


def check_num_kv_heads(num_heads: int, num_kv_heads: int, what: str = 'num_kv_heads'):
  """Raises ValueError unless 1 <= num_kv_heads <= num_heads and it divides num_heads."""
  if not isinstance(num_kv_heads, (int, np.integer)) or isinstance(num_kv_heads, bool):
    raise ValueError(f'{what}={num_kv_heads!r} must be an int (num_heads={num_heads}).')
  if num_kv_heads < 1 or num_kv_heads > num_heads or num_heads % num_kv_heads:
    raise ValueError(
        f'{what}={num_kv_heads} is invalid for num_heads={num_heads}: it must divide '
        f'num_heads and lie in [1, {num_heads}] (MQA: 1, GQA-G: G, MHA: {num_heads}).')


def param(module: nn.Module, name: str, init: Initializer, shape: Tuple[int, ...],
          axes: Tuple[str, ...]) -> Array:
  """A float32 parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def grouped_dot_product_attention(query: Array, key: Array, value: Array,
                                  bias: Optional[Array] = None, *,
                                  dropout_rng: Optional[Array] = None,
                                  dropout_rate: float = 0.0,
                                  deterministic: bool = True,
                                  dtype: Any = jnp.float32,
                                  float32_logits: bool = False,
                                  kv_layout: str = 'BSKH') -> Array:
  """Attention of N query heads over K <= N key/value heads.

  Args:
    query: [B, T, N, H]. The 1/sqrt(H) scaling is expected to be in the weights.
    key: [B, S, K, H] with N % K == 0, or [B, K, H, S] with kv_layout='cache' (the
      decode cache's layout).
    value: [B, S, K, H], or [B, K, S, H] with kv_layout='cache'.
    bias: additive, broadcastable to [B, N, T, S] (mask and position bias).
    dropout_rng, dropout_rate, deterministic: attention-weight dropout, broadcast
      over the query axis as in T5X.
    dtype: dtype of the returned values and of the attention weights.
    float32_logits: compute logits and softmax in float32.

  Returns:
    [B, T, N, H].
  """
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f"kv_layout={kv_layout!r}: use 'BSKH' or 'cache'.")
  key_layout, value_layout = KV_LAYOUTS[kv_layout]
  b, t, n, h = query.shape
  k = key.shape[key_layout.index('K')]
  if n % k:
    raise ValueError(f'num_kv_heads={k} does not divide num_heads={n}.')
  r = n // k
  if float32_logits:
    query, key = query.astype(jnp.float32), key.astype(jnp.float32)
  if kv_layout == 'cache' and t == 1 and (deterministic or dropout_rate == 0.0):
    return _decode_attention(query, key, value, bias, dtype)
  query = query.reshape(b, t, k, r, h)  # [B, T, K, R, H]
  logits = jnp.einsum(f'BTKRH,{key_layout}->BKRTS', query, key)  # [B, K, R, T, S]
  if bias is not None:
    bias = jnp.asarray(bias)
    bias = jnp.broadcast_to(bias, bias.shape[:1] + (n,) + bias.shape[2:])  # [b, N, t, s]
    bias = bias.reshape(bias.shape[0], k, r, *bias.shape[2:])  # [b, K, R, t, s]
    logits = logits + bias.astype(logits.dtype)
  weights = jax.nn.softmax(logits).astype(dtype)  # [B, K, R, T, S]
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = list(weights.shape)
    shape[-2] = 1  # the same mask for every query position, as T5X
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))
  out = jnp.einsum(f'BKRTS,{value_layout}->BTKRH', weights,
                   value.astype(dtype))  # [B, T, K, R, H]
  return out.reshape(b, t, n, h)  # [B, T, N, H]


def _decode_attention(query: Array, key: Array, value: Array, bias: Optional[Array],
                      dtype: Any) -> Array:
  """One query position ([B, 1, N, H]) over the decode cache (keys [B, K, H, S], values
  [B, K, S, H]): the general path's arithmetic without the query-length axis, whose
  einsums XLA:CPU lowered to products 5-7x slower at R > 1 (the attention alone in
  `gqa-jax bench decode`, cpu-paper preset, G = 8, 4, 2)."""
  b, _, n, h = query.shape
  k = key.shape[1]
  query = query.reshape(b, k, n // k, h)  # [B, K, R, H]
  logits = jnp.einsum('BKRH,BKHS->BKRS', query, key)  # [B, K, R, S]
  if bias is not None:
    bias = jnp.asarray(bias)
    bias = jnp.broadcast_to(bias, bias.shape[:1] + (n,) + bias.shape[2:])  # [b, N, 1, S]
    logits = logits + bias.reshape(bias.shape[0], k, n // k, bias.shape[-1]).astype(
        logits.dtype)
  weights = jax.nn.softmax(logits).astype(dtype)
  out = jnp.einsum('BKRS,BKSH->BKRH', weights, value.astype(dtype))  # [B, K, R, H]
  return out.reshape(b, 1, n, h)


class Dense(nn.Module):
  """x @ kernel with a 2-D float32 kernel [in, out], as T5X stores DenseGeneral kernels.

  kernel_fn: maps the stored kernel to the one applied (WGQA pools a [D, N*H] kernel
  into [D, K*H] with learned weights), in float32 before the cast to `dtype`."""
  features: int
  kernel_axes: Tuple[str, str]
  kernel_init: Initializer = default_kernel_init
  dtype: Any = jnp.float32
  kernel_fn: Optional[Callable[[Array], Array]] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = param(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                   self.kernel_axes)
    if self.kernel_fn is not None:
      kernel = self.kernel_fn(kernel)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


# WGQA (Chinnakonduru & Mohapatra 2024): the shape of the learned weights of the N source
# K/V heads, per kernel, and the einsum that pools the kernel [D, K, R, H] with them.
KV_WEIGHT_SHAPES = ('scalar', 'row', 'col')
KV_WEIGHT_INITS = ('mean', 'normal')  # 1 / group size (exactly mean pooling), N(0, 1)
_KV_POOL = {'scalar': 'DKRH,KR->DKH', 'row': 'DKRH,KRD->DKH', 'col': 'DKRH,KRH->DKH'}


def kv_weight_shape(kind: str, num_heads: int, emb_dim: int, head_dim: int) -> Tuple[int, ...]:
  """[N] ('scalar'), [N, D] ('row': scales the input axis) or [N, H] ('col': the head
  axis)."""
  return {'scalar': (num_heads,), 'row': (num_heads, emb_dim),
          'col': (num_heads, head_dim)}[kind]


def pool_kv_kernel(kernel: Array, weights: Array, kind: str, num_kv_heads: int) -> Array:
  """WGQA's kernel of each group, K_g = sum over the group's source heads n of w_n * W[n]:
  kernel [D, N*H], weights as `kv_weight_shape` -> [D, K*H]. Contiguous groups of
  R = N // K source heads. Linear in the kernel: folding it into a plain GQA kernel is
  exact."""
  d = kernel.shape[0]
  n = weights.shape[0]
  k, h = num_kv_heads, kernel.shape[1] // n
  w = weights.reshape(k, n // k, *weights.shape[1:])
  return jnp.einsum(_KV_POOL[kind], kernel.reshape(d, k, n // k, h), w).reshape(d, k * h)


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention with `num_heads` query and `num_kv_heads` KV heads.

  MHA: num_kv_heads = num_heads; MQA: 1; GQA-G: G (groups of R = N // K query heads
  sharing one KV head). Kernels are 2-D as in T5X:
  query [D, N*H], key/value [D, K*H], out [N*H, D].

  Decoding (`decode=True`) keeps a cache at KV-head granularity, keys [B, K, H, S] and
  values [B, K, S, H] (see KEY_CACHE_AXES):
  self-attention appends one position per call; cross-attention
  (`cross_attention=True`) projects the encoder output once, on the call that
  creates the cache, and reads it back on every later step.

  Options of the same module (all off by default, giving T5X's tree):
    kv_weights: WGQA. key/value kernels keep all N source heads, [D, N*H], and
      `key_weights`/`value_weights` (`kv_weight_shape`) pool each group of R into one
      KV head before projecting (`pool_kv_kernel`), so decoding caches K heads.
      kv_weights_init: 'mean' (1/R: exactly mean pooling) or 'normal'.
    project_kv=False: CLA/MLKV. The module has no key/value kernels and attends over
      the K/V (and, decoding, the cache) of an earlier layer, passed as `shared_kv`;
      only a cache index of its own is kept.
  SQA (fewer query heads) is `num_heads` below the model's.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = False
  cross_attention: bool = False
  kernel_init: Initializer = default_kernel_init
  kv_weights: Optional[str] = None
  kv_weights_init: str = 'mean'
  project_kv: bool = True

  def __post_init__(self):
    check_num_kv_heads(self.num_heads, self.num_kv_heads)
    check_kv_weights(self.kv_weights, self.kv_weights_init)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array],
               mask: Optional[Array] = None, bias: Optional[Array] = None, *,
               deterministic: bool = False, decode: bool = False,
               shared_kv: Optional[Tuple[Array, Array]] = None, return_kv: bool = False):
    """Attends from `inputs_q` to `inputs_kv` (to `inputs_q` itself when None).

    Args:
      inputs_q: [B, T, D].
      inputs_kv: [B, S, D]; None for self-attention, and for cross-attention on the
        decode steps after the one that filled the cache.
      mask: broadcastable to [B, N, T, S], 1 where attention is allowed.
      bias: [1 or B, N, T, S], or a function (qlen, klen, q_offset) -> bias called
        with the query positions (the cache index when decoding).
      deterministic: no attention dropout.
      decode: use and update the 'cache' collection (keys [B, K, H, L], values
        [B, K, L, H]).
      shared_kv: (key, value) of the layer this one reads (project_kv=False), as that
        layer returned them with return_kv.
      return_kv: also return the (key, value) attended over: [B, S, K, H], or the
        whole cache (keys [B, K, H, L], values [B, K, L, H]) when decoding.

    Returns:
      [B, T, D], or ([B, T, D], (key, value)) with return_kv.
    """
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    b, t = inputs_q.shape[:2]
    # T5 folds 1/sqrt(H) into the query init, so pretrained weights already carry it.
    query_init = lambda *a: self.kernel_init(*a) / np.sqrt(h).astype(np.float32)
    dense = functools.partial(Dense, kernel_init=self.kernel_init, dtype=self.dtype)
    query = dense(n * h, ('embed', 'joined_kv'), kernel_init=query_init, name='query')(inputs_q)
    query = nn.with_logical_constraint(query.reshape(b, t, n, h), Q_AXES)  # [B, T, N, H]

    def kv_dense(name):
      if self.kv_weights is None:
        return dense(k * h, ('embed', 'kv_heads'), name=name)
      # WGQA: N source heads stored, pooled to K with learned weights.
      init = (nn.initializers.constant(k / n) if self.kv_weights_init == 'mean'
              else nn.initializers.normal(stddev=1.0))
      axes = {'scalar': ('heads',), 'row': ('heads', 'embed'), 'col': ('heads', 'kv')}
      weights = param(self, f'{name}_weights', init,
                      kv_weight_shape(self.kv_weights, n, inputs_q.shape[-1], h),
                      axes[self.kv_weights])
      pool = lambda kernel: pool_kv_kernel(kernel, weights, self.kv_weights, k)
      return dense(n * h, ('embed', 'joined_kv'), name=name, kernel_fn=pool)

    def project_kv(x):
      s = x.shape[1]
      key = kv_dense('key')(x).reshape(b, s, k, h)
      value = kv_dense('value')(x).reshape(b, s, k, h)
      return (nn.with_logical_constraint(key, KV_AXES),  # [B, S, K, H]
              nn.with_logical_constraint(value, KV_AXES))

    def key_cache_layout(x):  # [B, S, K, H] -> [B, K, H, S]
      return nn.with_logical_constraint(jnp.transpose(x, (0, 2, 3, 1)), KEY_CACHE_AXES)

    def value_cache_layout(x):  # [B, S, K, H] -> [B, K, S, H]
      return nn.with_logical_constraint(jnp.swapaxes(x, 1, 2), CACHE_AXES)

    def advance(cache_index, max_len, mask, bias):
      """A decode step's t query positions: moves the cache index past them; returns
      where they start and the mask and bias with causality on absolute positions."""
      cur = cache_index.value
      cache_index.value = cur + t
      q_pos = cur + jnp.arange(t)[:, None]
      causal = (jnp.arange(max_len)[None, :] <= q_pos)[None, None]  # [1, 1, T, L]
      mask = causal if mask is None else jnp.logical_and(mask, causal)
      if callable(bias):
        bias = bias(qlen=t, klen=max_len, q_offset=cur)  # [1, N, T, L]
      return cur, mask, bias

    kv_layout = 'cache' if decode else 'BSKH'
    if not self.project_kv:
      if shared_kv is None:
        raise ValueError('this attention reads the K/V of an earlier layer (CLA/MLKV, '
                         'project_kv=False): pass them as shared_kv.')
      key, value = shared_kv
      if decode and not self.cross_attention:  # the causal mask needs its own position
        initialized = self.has_variable('cache', 'cache_index')
        cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
        if initialized:
          _, mask, bias = advance(cache_index, value.shape[2], mask, bias)
    elif decode and self.cross_attention:
      if not self.has_variable('cache', 'cached_key') and inputs_kv is None:
        raise ValueError('cross-attention cache is empty: pass the encoder output on the '
                         'first decode call so that its K/V can be projected and cached.')
      kv = project_kv(inputs_kv) if not self.has_variable('cache', 'cached_key') else None
      key = self.variable('cache', 'cached_key', lambda: key_cache_layout(kv[0])).value
      value = self.variable('cache', 'cached_value', lambda: value_cache_layout(kv[1])).value
    elif decode:
      key, value = project_kv(inputs_q)
      key, value = key_cache_layout(key), value_cache_layout(value)  # [B,K,H,t], [B,K,t,H]
      initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
      if initialized:
        # Write the t new positions at cache_index, then attend to the whole cache
        # with a causal mask on absolute positions.
        cur, mask, bias = advance(cache_index, cached_value.value.shape[2], mask, bias)
        key = lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                       (0, 0, 0, cur))  # [B, K, H, L]
        value = lax.dynamic_update_slice(cached_value.value,
                                         value.astype(cached_value.value.dtype), (0, 0, cur, 0))
        cached_key.value = nn.with_logical_constraint(key, KEY_CACHE_AXES)
        cached_value.value = nn.with_logical_constraint(value, CACHE_AXES)
    else:
      key, value = project_kv(inputs_q if inputs_kv is None else inputs_kv)

    if callable(bias):
      bias = bias(qlen=t, klen=value.shape[KV_LAYOUTS[kv_layout][1].index('S')], q_offset=0)
    if mask is not None:
      mask_bias = jnp.where(mask > 0, 0.0, -1e10).astype(self.dtype)
      bias = mask_bias if bias is None else bias + mask_bias
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    x = grouped_dot_product_attention(
        query, key, value, bias, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
        deterministic=deterministic, dtype=self.dtype, float32_logits=self.float32_logits,
        kv_layout=kv_layout)
    x = x.reshape(b, t, n * h)  # [B, T, N*H]
    out = dense(inputs_q.shape[-1], ('joined_kv', 'embed'), name='out')(x)
    return (out, (key, value)) if return_kv else out


def check_kv_weights(kind: Optional[str], init: str, what: str = 'kv_weights'):
  """Raises ValueError for a WGQA weight shape or initialisation we do not have."""
  if kind is not None and kind not in KV_WEIGHT_SHAPES:
    raise ValueError(f'{what}={kind!r}: use None (mean-pooled GQA) or one of '
                     f'{", ".join(map(repr, KV_WEIGHT_SHAPES))} (WGQA).')
  if init not in KV_WEIGHT_INITS:
    raise ValueError(f"kv_weights_init={init!r}: use 'mean' (1/group size: exactly mean "
                     "pooling) or 'normal'.")


class RMSNorm(nn.Module):
  """T5's LayerNorm: no mean, no bias, statistics in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    scale = param(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',))
    y = x * lax.rsqrt(jnp.mean(lax.square(x), axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def _activation(name: str) -> Callable[[Array], Array]:
  if name == 'linear':
    return lambda x: x
  if not hasattr(nn, name):
    raise ValueError(f'unknown activation {name!r}: use a flax.linen function name or "linear".')
  return getattr(nn, name)


class MlpBlock(nn.Module):
  """Gated MLP: prod_i act_i(x @ wi_i) @ wo; one activation gives plain `wi`."""
  intermediate_dim: int
  activations: Sequence[str] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool = False) -> Array:
    """[B, T, D] -> [B, T, D]."""
    dense = functools.partial(Dense, kernel_init=mlp_kernel_init, dtype=self.dtype)
    hidden = None
    for i, act in enumerate(self.activations):
      name = 'wi' if len(self.activations) == 1 else f'wi_{i}'
      y = _activation(act)(dense(self.intermediate_dim, ('embed', 'mlp'), name=name)(inputs))
      hidden = y if hidden is None else hidden * y  # [B, T, F]
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    return dense(inputs.shape[-1], ('mlp', 'embed'), name='wo')(hidden)


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` gives tied logits x @ embedding.T.

  Lookups are in `dtype`; `attend` casts the embedding to `attend_dtype` (default
  `dtype`), as T5X's Embed, and leaves the query as it is, so a bfloat16 query against
  a float32 embedding is promoted to a float32 product.
  """
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  attend_dtype: Optional[Any] = None

  def setup(self):
    self.embedding = param(self, 'embedding', nn.initializers.normal(stddev=1.0),
                           (self.num_embeddings, self.features), ('vocab', 'embed'))

  def __call__(self, tokens: Array) -> Array:
    """[B, T] int -> [B, T, D]."""
    return jnp.take(self.embedding, tokens.astype(jnp.int32), axis=0).astype(self.dtype)

  def attend(self, query: Array) -> Array:
    """[B, T, D] -> [B, T, V]."""
    dtype = self.dtype if self.attend_dtype is None else self.attend_dtype
    return jnp.dot(query, self.embedding.T.astype(dtype))


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """T5's bucketing of (key - query) offsets: exact for small, log-spaced for large."""
  n = -relative_position
  ret = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  large = max_exact + (np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
                       / np.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(np.int32)
  large = np.minimum(large, num_buckets - 1)
  return ret + np.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
  """One [N, buckets] table per stack, shared by its layers."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True,
               q_offset: Any = 0) -> Array:
    """Bias [1, N, qlen, klen] for queries at q_offset + [0, qlen) (q_offset may be
    traced: a decode step builds its own row, not the whole [L, L] table)."""
    table = param(self, 'rel_embedding',
                  nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
                  (self.num_heads, self.num_buckets), ('heads', 'relpos_buckets'))
    # Buckets of every possible offset key - query in [-(klen + qlen), klen], computed
    # in NumPy exactly as T5X does, then looked up with the (possibly traced) offsets.
    lo = klen + qlen
    bucket_of = relative_position_bucket(np.arange(-lo, klen + 1), bidirectional,
                                         self.num_buckets, self.max_distance)
    rel = jnp.arange(klen)[None, :] - (q_offset + jnp.arange(qlen))[:, None]  # [T, S]
    buckets = jnp.take(jnp.asarray(bucket_of, jnp.int32), rel + lo)  # [T, S]
    return jnp.take(table.astype(self.dtype), buckets, axis=1)[None]  # [1, N, T, S]
