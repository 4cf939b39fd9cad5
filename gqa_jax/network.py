"""T5.1.1 encoder-decoder with a KV-head count per attention stack.

With every KV-head count equal to `num_heads` the parameter tree is T5X's
T5.1.1 tree (names, shapes, 2-D kernel layout), so T5X checkpoints load as-is.
"""

import dataclasses
import functools
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from gqa_jax import layers
from gqa_jax.layers import EMBED_AXES

STACKS = ('encoder', 'decoder_self', 'decoder_cross')
# The paper converts decoder self- and cross-attention only.
PAPER_STACKS = ('decoder_self', 'decoder_cross')
# The attention module's name in the parameter tree -> the stack it belongs to.
MODULE_STACK = {'attention': 'encoder', 'self_attention': 'decoder_self',
                'encoder_decoder_attention': 'decoder_cross'}


def variant_name(num_kv_heads: int, num_heads: int) -> str:
  """The paper's name of an attention with `num_kv_heads` of `num_heads` KV heads:
  'MHA' (K = N), 'MQA' (K = 1), else 'GQA-G' with G = K groups."""
  if num_kv_heads == num_heads:
    return 'MHA'
  return 'MQA' if num_kv_heads == 1 else f'GQA-{num_kv_heads}'


def kv_kernel_stack(path: Union[str, Sequence[str]]) -> Optional[str]:
  """The stack of a K/V kernel, given its parameter path ('decoder/layers_0/
  self_attention/key/kernel' or the tuple of its parts); None for any other parameter."""
  parts = path.split('/') if isinstance(path, str) else tuple(path)
  if (len(parts) >= 4 and parts[-1] == 'kernel' and parts[-2] in ('key', 'value')
      and parts[-3] in MODULE_STACK):
    return MODULE_STACK[parts[-3]]
  return None


# Scanned layers (T5Config.scan_layers): a stack's layers_<i> subtrees become one subtree,
# named as T5X's scalable_t5 names it, with every leaf's layer axis at SCAN_AXIS.
SCANNED_SUBTREE = {'encoder': 'encoder', 'decoder': 'decoder'}
SCAN_AXIS = 1
REMAT_POLICIES = ('none', 'minimal', 'full')


def scanned_layer_axis(path: Union[str, Sequence[str]]) -> Optional[int]:
  """SCAN_AXIS for a leaf of a scanned stack's stacked layers ('encoder/encoder/...',
  'decoder/decoder/...', or the tuple of the parts), else None. Optimizer slots that
  keep a parameter's path under a prefix match too (the path is searched for the pair)."""
  parts = path.split('/') if isinstance(path, str) else tuple(str(p) for p in path)
  for i in range(len(parts) - 2):
    if parts[i] in SCANNED_SUBTREE and parts[i + 1] == SCANNED_SUBTREE[parts[i]]:
      return SCAN_AXIS
  return None


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5X's T5Config fields, plus per attention stack its KV heads (None = its query heads),
  and the options of the work around GQA: SQA's query heads, WGQA's KV weights, CLA/MLKV's
  producer layers (all None by default: T5X's model and tree)."""
  vocab_size: int = 32128
  dtype: Any = 'bfloat16'
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False
  encoder_kv_heads: Optional[int] = None
  decoder_self_kv_heads: Optional[int] = None
  decoder_cross_kv_heads: Optional[int] = None
  # SQA: query heads per stack (None = num_heads; head_dim unchanged).
  encoder_query_heads: Optional[int] = None
  decoder_self_query_heads: Optional[int] = None
  decoder_cross_query_heads: Optional[int] = None
  # WGQA: learned weights pooling the source K/V heads ('scalar', 'row', 'col').
  encoder_kv_weights: Optional[str] = None
  decoder_self_kv_weights: Optional[str] = None
  decoder_cross_kv_weights: Optional[str] = None
  kv_weights_init: str = 'mean'
  # CLA / MLKV: the layers that project K/V (None = every layer); each other layer
  # attends over the K/V of the last producer before it. 'cla<s>' and 'mlkv<m>' name
  # the lists of `cla_layers` and `mlkv_layers` (resolved at construction).
  encoder_kv_layers: Optional[Sequence[int]] = None
  decoder_self_kv_layers: Optional[Sequence[int]] = None
  decoder_cross_kv_layers: Optional[Sequence[int]] = None
  # Scale options (T5X scalable_t5's): each stack's layers under nn.scan with parameters
  # stacked at SCAN_AXIS, and rematerialisation ('none', 'minimal': keep the products
  # without batch dimensions, 'full': keep nothing). They change how the network runs,
  # never what it computes; the stacked tree is `stack_layers` of the unscanned one.
  scan_layers: bool = False
  remat_policy: str = 'none'

  def __post_init__(self):
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f'scan_layers={self.scan_layers!r}: True or False.')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy={self.remat_policy!r}: use one of '
                       f'{", ".join(map(repr, REMAT_POLICIES))}.')
    for stack in STACKS:
      queries = getattr(self, f'{stack}_query_heads')
      if queries is not None and (isinstance(queries, bool) or not isinstance(queries, int)
                                  or queries < 1):
        raise ValueError(f'{stack}_query_heads={queries!r}: a positive number of query '
                         'heads (SQA), or None for num_heads.')
      value = getattr(self, f'{stack}_kv_heads')
      if value is not None:
        layers.check_num_kv_heads(self.query_heads(stack), value, f'{stack}_kv_heads')
      layers.check_kv_weights(self.kv_weights(stack), self.kv_weights_init,
                              f'{stack}_kv_weights')
      produced = getattr(self, f'{stack}_kv_layers')
      if isinstance(produced, str):
        produced = kv_layers_spec(produced, self.num_layers(stack), f'{stack}_kv_layers')
      if produced is not None:
        produced = tuple(produced)
        object.__setattr__(self, f'{stack}_kv_layers', produced)
        n = self.num_layers(stack)
        if (not produced or produced[0] != 0 or list(produced) != sorted(set(produced))
            or produced[-1] >= n or any(isinstance(i, bool) or not isinstance(i, int)
                                        for i in produced)):
          raise ValueError(
              f'{stack}_kv_layers={produced}: the layers that project K/V, increasing, '
              f'from layer 0, below {n} (e.g. network.cla_layers({n}, 2) or '
              f'network.mlkv_layers({n}, m)); None for every layer.')
      if produced is not None and self.scan_layers:
        # A scan runs one layer function L times; CLA/MLKV layers differ (some project
        # K/V, the others read an earlier layer's), so they cannot share one.
        raise ValueError(f'{stack}_kv_layers={produced} (CLA/MLKV) cannot run with '
                         'scan_layers=True: set scan_layers=False for this model.')

  def num_layers(self, stack: str) -> int:
    return self.num_encoder_layers if stack == 'encoder' else self.num_decoder_layers

  def query_heads(self, stack: str) -> int:
    """Query heads of a stack: num_heads, or fewer with SQA."""
    if stack not in STACKS:
      raise ValueError(f'unknown attention stack {stack!r}; expected one of {STACKS}.')
    value = getattr(self, f'{stack}_query_heads')
    return self.num_heads if value is None else value

  def kv_weights(self, stack: str) -> Optional[str]:
    """WGQA's weight shape in a stack ('scalar', 'row', 'col'), or None."""
    return getattr(self, f'{stack}_kv_weights')

  def producer_layers(self, stack: str) -> Tuple[int, ...]:
    """The layers of `stack` that project (and, decoding, cache) K/V."""
    return tuple(i for i in range(self.num_layers(stack)) if self.kv_producer(stack, i) == i)

  def kv_producer(self, stack: str, layer: int) -> int:
    """The layer whose K/V `layer` attends over: itself, or (CLA/MLKV) the last layer
    of `{stack}_kv_layers` at or before it."""
    produced = getattr(self, f'{stack}_kv_layers')
    if produced is None:
      return layer
    return max(i for i in produced if i <= layer)

  def kv_heads(self, stack: str) -> int:
    """Resolved KV-head count of 'encoder', 'decoder_self' or 'decoder_cross'."""
    if stack not in STACKS:
      raise ValueError(f'unknown attention stack {stack!r}; expected one of {STACKS}.')
    value = getattr(self, f'{stack}_kv_heads')
    return self.query_heads(stack) if value is None else value

  def with_kv_heads(self, num_kv_heads: int,
                    stacks: Sequence[str] = PAPER_STACKS) -> 'T5Config':
    """A copy with `num_kv_heads` in the given stacks (default: the paper's)."""
    for stack in stacks:
      self.kv_heads(stack)  # validates the name
    return dataclasses.replace(self, **{f'{s}_kv_heads': num_kv_heads for s in stacks})

  def to_dict(self) -> dict:
    """JSON-ready fields. The SQA/WGQA/CLA options appear only where set, so that the
    record of a plain model is what it was before they existed. The scale options
    (RUN_FIELDS) are left out: they say how a run executes the model, and checkpoints
    always hold the unscanned tree."""
    d = dataclasses.asdict(self)
    for name in RUN_FIELDS:
      del d[name]
    d['dtype'] = str(jnp.dtype(self.dtype))
    d['mlp_activations'] = list(self.mlp_activations)
    for name in OPTION_FIELDS:
      if name not in d:
        continue
      if d[name] == _DEFAULTS[name]:
        del d[name]
      elif isinstance(d[name], tuple):
        d[name] = list(d[name])
    return d


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(T5Config)}
# The fields of the work around GQA (SQA, WGQA, CLA/MLKV), off by default.
OPTION_FIELDS = tuple(f'{s}_{o}' for o in ('query_heads', 'kv_weights', 'kv_layers')
                      for s in STACKS) + ('kv_weights_init', 'scan_layers', 'remat_policy')
# How a model runs, not what it is: a checkpoint of one loads into the other.
RUN_FIELDS = ('scan_layers', 'remat_policy')


def cla_layers(num_layers: int, share: int) -> Tuple[int, ...]:
  """CLA-s (Brandon et al. 2024): producers of groups of `share` adjacent layers; when
  `share` does not divide the layer count, the short group comes first."""
  if not 1 <= share <= num_layers:
    raise ValueError(f'CLA share={share}: between 1 and the {num_layers} layers.')
  first = num_layers % share
  return ((0,) if first else ()) + tuple(range(first, num_layers, share))


def kv_layers_spec(spec: str, num_layers: int, what: str = 'kv_layers') -> Tuple[int, ...]:
  """'cla2' -> cla_layers(num_layers, 2); 'mlkv3' -> mlkv_layers(num_layers, 3)."""
  match = re.fullmatch(r'(cla|mlkv)(\d+)', spec)
  if not match:
    raise ValueError(f"{what}={spec!r}: use 'cla<s>' (CLA-s: s adjacent layers share K/V), "
                     "'mlkv<m>' (MLKV: m KV layers) or a tuple of producer layers.")
  make = cla_layers if match.group(1) == 'cla' else mlkv_layers
  return make(num_layers, int(match.group(2)))


def mlkv_layers(num_layers: int, producers: int) -> Tuple[int, ...]:
  """MLKV-m (Zuhri et al. 2024): layer 0 and int((i + 1) * L / m) for i < m - 1."""
  if not 1 <= producers <= num_layers:
    raise ValueError(f'MLKV with {producers} KV layers: between 1 and the {num_layers} '
                     'layers.')
  return (0,) + tuple(int((i + 1) * num_layers / producers) for i in range(producers - 1))


def _t5_1_1(emb_dim, num_heads, mlp_dim, num_layers, **kw) -> T5Config:
  return T5Config(vocab_size=32128, dtype='bfloat16', emb_dim=emb_dim, num_heads=num_heads,
                  num_encoder_layers=num_layers, num_decoder_layers=num_layers, head_dim=64,
                  mlp_dim=mlp_dim, mlp_activations=('gelu', 'linear'), dropout_rate=0.0,
                  logits_via_embedding=False, **kw)


# T5.1.1 sizes as published with T5X; `tiny` is ours, for tests and CPU runs.
PRESETS = {
    'tiny': T5Config(vocab_size=32128, dtype='float32', emb_dim=32, num_heads=4,
                     num_encoder_layers=2, num_decoder_layers=2, head_dim=8, mlp_dim=64),
    'small': _t5_1_1(512, 6, 1024, 8),
    'base': _t5_1_1(768, 12, 2048, 12),
    'large': _t5_1_1(1024, 16, 2816, 24),
    'xl': _t5_1_1(2048, 32, 5120, 24),
    'xxl': _t5_1_1(4096, 64, 10240, 24),
}


def get_preset(name: str, **overrides) -> T5Config:
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose one of {sorted(PRESETS)}.')
  return dataclasses.replace(PRESETS[name], **overrides)


class EncoderLayer(nn.Module):
  """One pre-norm T5.1.1 encoder block: self-attention (the `encoder` stack's KV heads)
  then the gated-GELU MLP, each with a residual connection."""
  config: T5Config
  relative_embedding: Optional[nn.Module] = None
  layer: int = 0
  scanned: bool = False

  @nn.compact
  def __call__(self, inputs, encoder_mask=None, deterministic=False, shared_kv=None,
               bias=None):
    """Args:
      inputs: [B, S, D].
      encoder_mask: [B, 1, S, S], 1 where attention is allowed.
      deterministic: no dropout.
      shared_kv: the K/V of the producer layer (CLA/MLKV), for a layer that has none.
      bias: the position bias [1, N, S, S]; None: from `relative_embedding`.

    Returns ([B, S, D], the (key, value) its attention used), or ([B, S, D], None) as a
    scan's body (`scanned`).
    """
    cfg = self.config
    if bias is None:
      bias = self.relative_embedding(inputs.shape[-2], inputs.shape[-2], True)
    x = layers.RMSNorm(dtype=cfg.dtype, name='pre_attention_layer_norm')(inputs)
    x, kv = attention(cfg, 'encoder', self.layer, name='attention')(
        x, x, encoder_mask, bias, deterministic=deterministic, shared_kv=shared_kv,
        return_kv=True)
    x = _dropout(cfg, x, deterministic) + inputs
    y = layers.RMSNorm(dtype=cfg.dtype, name='pre_mlp_layer_norm')(x)
    y = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype,
                        name='mlp')(y, deterministic=deterministic)
    out = nn.with_logical_constraint(_dropout(cfg, y, deterministic) + x, EMBED_AXES)
    return (out, None) if self.scanned else (out, kv)


def attention(cfg: T5Config, stack: str, layer: int, name: str) -> layers.MultiHeadAttention:
  """The attention of `stack` in layer `layer`, with the stack's options."""
  return layers.MultiHeadAttention(
      cfg.query_heads(stack), cfg.kv_heads(stack), cfg.head_dim, cfg.dtype, cfg.dropout_rate,
      cfg.float32_attention_logits, cross_attention=stack == 'decoder_cross',
      kv_weights=cfg.kv_weights(stack), kv_weights_init=cfg.kv_weights_init,
      project_kv=cfg.kv_producer(stack, layer) == layer, name=name)


class DecoderLayer(nn.Module):
  """One pre-norm T5.1.1 decoder block: causal self-attention (`decoder_self` KV heads),
  cross-attention to the encoder output (`decoder_cross` KV heads), the MLP."""
  config: T5Config
  relative_embedding: Optional[nn.Module] = None
  layer: int = 0
  scanned: bool = False

  @nn.compact
  def __call__(self, inputs, encoded, decoder_mask=None, encoder_decoder_mask=None,
               deterministic=False, decode=False, max_decode_length=None, shared_kv=None,
               bias=None):
    """Args:
      inputs: [B, T, D] ([B, 1, D] per step when decoding).
      encoded: the encoder output [B, S, D]; None on decode steps after the first
        (cross-attention then reads its cached K/V).
      decoder_mask: [B, 1, T, T] or None (decoding: causality from the cache index).
      encoder_decoder_mask: [B, 1, T, S].
      deterministic: no dropout.
      decode: read and update the 'cache' collection.
      max_decode_length: unused here; the cache's length is fixed when it is created.
      shared_kv: (self, cross) K/V of the producer layers (CLA/MLKV), each None where
        this layer projects its own.
      bias: the causal position bias [1, N, T, T] (not decoding); None: from
        `relative_embedding`.

    Returns ([B, T, D], (self, cross) K/V its attentions used), or ([B, T, D], None) as
    a scan's body (`scanned`).
    """
    cfg = self.config
    del max_decode_length  # the cache's length is set when the cache is created
    shared_self, shared_cross = shared_kv or (None, None)
    if bias is None:
      # Attention evaluates the causal position bias for its query positions only.
      bias = functools.partial(self.relative_embedding, bidirectional=False)
    x = layers.RMSNorm(dtype=cfg.dtype, name='pre_self_attention_layer_norm')(inputs)
    x, self_kv = attention(cfg, 'decoder_self', self.layer, 'self_attention')(
        x, x, decoder_mask, bias, deterministic=deterministic, decode=decode,
        shared_kv=shared_self, return_kv=True)
    x = _dropout(cfg, x, deterministic) + inputs
    y = layers.RMSNorm(dtype=cfg.dtype, name='pre_cross_attention_layer_norm')(x)
    y, cross_kv = attention(cfg, 'decoder_cross', self.layer, 'encoder_decoder_attention')(
        y, encoded, encoder_decoder_mask, deterministic=deterministic, decode=decode,
        shared_kv=shared_cross, return_kv=True)
    y = _dropout(cfg, y, deterministic) + x
    z = layers.RMSNorm(dtype=cfg.dtype, name='pre_mlp_layer_norm')(y)
    z = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype,
                        name='mlp')(z, deterministic=deterministic)
    out = nn.with_logical_constraint(_dropout(cfg, z, deterministic) + y, EMBED_AXES)
    return (out, None) if self.scanned else (out, (self_kv, cross_kv))


def _remat(layer_cls, cfg: T5Config, static_argnums):
  """The layer class under `cfg.remat_policy` (flaxformer's names): 'none' keeps every
  activation for the backward pass, 'minimal' keeps the products without batch
  dimensions (the projections) and recomputes the rest, 'full' recomputes the layer."""
  if cfg.remat_policy == 'none':
    return layer_cls
  policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
            if cfg.remat_policy == 'minimal' else None)
  # Inside a scan, XLA cannot merge the recomputation with the forward pass anyway;
  # prevent_cse is needed (and costs) only in unrolled layers.
  return nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers,
                  static_argnums=static_argnums)


def _scan(layer_cls, length: int, num_broadcast: int):
  """`layer_cls` run `length` times under nn.scan: the carry is the hidden state, the
  other `num_broadcast` arguments are the same for every layer, parameters are stacked
  at SCAN_AXIS (logical axis 'layers') and every layer draws its own init and dropout
  keys."""
  return nn.scan(layer_cls, variable_axes={'params': SCAN_AXIS},
                 split_rngs={'params': True, 'dropout': True},
                 in_axes=(nn.broadcast,) * num_broadcast, length=length,
                 metadata_params={nn.PARTITION_NAME: 'layers'})


def _dropout(cfg: T5Config, x, deterministic: bool, broadcast_dims=(-2,)):
  # T5X shares one [B, 1, D] mask over the length axis everywhere except the encoder's
  # output dropout, which draws a full mask; callers pass broadcast_dims=() there.
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=broadcast_dims)(
      x, deterministic=deterministic)


class Encoder(nn.Module):
  """Token embedding, `num_encoder_layers` EncoderLayers sharing one relative position
  bias, the final RMSNorm."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_mask=None, deterministic=False):
    """[B, S] tokens -> [B, S, D]."""
    cfg = self.config
    rel_emb = layers.RelativePositionBiases(cfg.query_heads('encoder'), dtype=cfg.dtype,
                                            name='relpos_bias')
    x = _dropout(cfg, self.shared_embedding(encoder_input_tokens), deterministic)
    x = x.astype(cfg.dtype)
    # deterministic decides the graph: static under remat (flax counts the module as 0).
    layer = _remat(EncoderLayer, cfg, static_argnums=(3,))
    if cfg.scan_layers:
      # One position-bias table per stack (T5.1.1), evaluated once outside the scan.
      bias = rel_emb(x.shape[-2], x.shape[-2], True)  # [1, N, S, S]
      x, _ = _scan(layer, cfg.num_encoder_layers, num_broadcast=4)(
          cfg, scanned=True, name=SCANNED_SUBTREE['encoder'])(
              x, encoder_mask, deterministic, None, bias)
    kv = None
    for i in range(0 if cfg.scan_layers else cfg.num_encoder_layers):
      shared = kv if cfg.kv_producer('encoder', i) != i else None
      x, kv = layer(cfg, rel_emb, i, name=f'layers_{i}')(x, encoder_mask, deterministic, shared)
    x = layers.RMSNorm(dtype=cfg.dtype, name='encoder_norm')(x)
    return _dropout(cfg, x, deterministic, broadcast_dims=())  # T5X: not broadcast


class Decoder(nn.Module):
  """Token embedding, `num_decoder_layers` DecoderLayers sharing one causal relative
  position bias, the final RMSNorm and the logits (tied to the embedding or not)."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, decoder_mask=None,
               encoder_decoder_mask=None, deterministic=False, decode=False,
               max_decode_length=None):
    """[B, T] tokens and encoder output [B, S, D] -> logits [B, T, V] (float32)."""
    cfg = self.config
    rel_emb = layers.RelativePositionBiases(cfg.query_heads('decoder_self'), dtype=cfg.dtype,
                                            name='relpos_bias')
    y = _dropout(cfg, self.shared_embedding(decoder_input_tokens), deterministic)
    y = y.astype(cfg.dtype)
    # deterministic, decode, max_decode_length are static under remat (flax counts the
    # module as argument 0); a decode step keeps nothing for a backward pass: no remat.
    layer = DecoderLayer if decode else _remat(DecoderLayer, cfg, static_argnums=(5, 6, 7))
    if cfg.scan_layers:
      if decode:
        raise ValueError('a scanned decoder does not decode with a cache: '
                         'EncoderDecoderModel decodes with the unscanned twin '
                         '(network.unstack_layers of the parameters).')
      bias = rel_emb(y.shape[-2], y.shape[-2], False)  # [1, N, T, T]
      y, _ = _scan(layer, cfg.num_decoder_layers, num_broadcast=8)(
          cfg, scanned=True, name=SCANNED_SUBTREE['decoder'])(
              y, encoded, decoder_mask, encoder_decoder_mask, deterministic, decode,
              max_decode_length, None, bias)
    kv = (None, None)
    for i in range(0 if cfg.scan_layers else cfg.num_decoder_layers):
      shared = tuple(kv[j] if cfg.kv_producer(stack, i) != i else None
                     for j, stack in enumerate(('decoder_self', 'decoder_cross')))
      y, kv = layer(cfg, rel_emb, i, name=f'layers_{i}')(
          y, encoded, decoder_mask, encoder_decoder_mask, deterministic, decode,
          max_decode_length, shared)
    y = layers.RMSNorm(dtype=cfg.dtype, name='decoder_norm')(y)
    y = _dropout(cfg, y, deterministic)
    if cfg.logits_via_embedding:
      # Tied logits are float32 (the embedding's attend_dtype) and scaled by 1/sqrt(D),
      # as in the original T5 and T5X.
      logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1])
    else:
      logits = layers.Dense(cfg.vocab_size, ('embed', 'vocab'), layers.mlp_kernel_init,
                            jnp.float32, name='logits_dense')(y)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


def make_attention_mask(query_input, key_input, pairwise_fn=jnp.multiply, dtype=jnp.float32):
  """[B, T], [B, S] -> [B, 1, T, S]."""
  mask = pairwise_fn(query_input[..., :, None], key_input[..., None, :])
  return mask[..., None, :, :].astype(dtype)


def make_decoder_mask(decoder_target_tokens, decoder_segment_ids=None, dtype=jnp.float32):
  """Causal, non-padding (and same-segment) mask [B, 1, T, T]."""
  t = decoder_target_tokens.shape[-1]
  mask = jnp.tril(jnp.ones((t, t), dtype))[None, None]
  valid = decoder_target_tokens > 0
  mask = mask * make_attention_mask(valid, valid, dtype=dtype)
  if decoder_segment_ids is not None:
    mask = mask * make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal, dtype)
  return mask


class Transformer(nn.Module):
  """The encoder-decoder, with T5X's `Transformer` call signature."""
  config: T5Config

  def setup(self):
    cfg = self.config
    # T5X attends in float32 for the stability of tied logits; lookups stay in cfg.dtype.
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype,
                                       attend_dtype=jnp.float32)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=True):
    """[B, S] -> [B, S, D]."""
    valid = encoder_input_tokens > 0
    mask = make_attention_mask(valid, valid)
    if encoder_segment_ids is not None:
      mask = mask * make_attention_mask(encoder_segment_ids, encoder_segment_ids, jnp.equal)
    return self.encoder(encoder_input_tokens, mask, deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
             enable_dropout=True, decode=False, max_decode_length=None):
    """Logits [B, T, V].

    decode=True runs with a cache (mutable collection 'cache'). The first such call
    creates it: self-attention caches of length T (pass T = max_decode_length tokens)
    and cross-attention K/V projected from `encoded`; its logits are not causal and are
    discarded. Later calls feed the next token(s), [B, 1], with `encoded` None.
    """
    del decoder_positions  # T5 uses relative positions only.
    enc_valid = encoder_input_tokens > 0
    if decode:
      decoder_mask = None  # causality comes from the cache index
      encoder_decoder_mask = make_attention_mask(
          jnp.ones_like(decoder_input_tokens, bool), enc_valid)
    else:
      decoder_mask = make_decoder_mask(decoder_target_tokens, decoder_segment_ids)
      encoder_decoder_mask = make_attention_mask(decoder_target_tokens > 0, enc_valid)
      if encoder_segment_ids is not None:
        encoder_decoder_mask = encoder_decoder_mask * make_attention_mask(
            decoder_segment_ids, encoder_segment_ids, jnp.equal)
    return self.decoder(encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout=True, decode=False,
               max_decode_length=None):
    """Teacher-forced logits [B, T, V]."""
    del encoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout, decode, max_decode_length)


def init_params(config: T5Config, rng, batch_size: int = 1, input_len: int = 8,
                target_len: int = 8):
  """Unboxed float32 parameters of a freshly initialised Transformer."""
  enc = jnp.ones((batch_size, input_len), jnp.int32)
  dec = jnp.ones((batch_size, target_len), jnp.int32)
  variables = Transformer(config).init(rng, enc, dec, dec, enable_dropout=False)
  return nn.meta.unbox(variables['params'])


def param_shapes(config: T5Config):
  """Parameter shapes (a tree of ShapeDtypeStruct) without allocating any weights."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def flat_param_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """{'encoder/layers_0/attention/key/kernel': shape, ...}: the parameter tree of
  `config` flattened with '/', the names checkpoints store (unscanned, whatever
  `config.scan_layers` says)."""
  return {'/'.join(path): tuple(leaf.shape) for path, leaf in
          traverse_util.flatten_dict(param_shapes(unscanned(config))).items()}


def param_logical_axes(config: T5Config):
  """Tree of PartitionSpecs of logical axis names, matching the parameter tree."""
  enc = jnp.ones((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: Transformer(config).init(
      jax.random.PRNGKey(0), enc, enc, enc, enable_dropout=False))
  return nn.get_partition_spec(boxed)['params']


# --- scanned and unscanned parameter trees ------------------------------------------------
def _stack_sizes(config: T5Config) -> Dict[str, int]:
  return {'encoder': config.num_encoder_layers, 'decoder': config.num_decoder_layers}


def _is_numpy(leaf) -> bool:
  return isinstance(leaf, (np.ndarray, np.generic))


def stack_layers(tree, config: T5Config):
  """An unscanned tree (parameters, gradients, or anything with their structure) ->
  the scanned one: each stack's `layers_<i>` subtrees become one subtree
  (`SCANNED_SUBTREE`), every leaf stacked at SCAN_AXIS in layer order. NumPy leaves stay
  NumPy (a checkpoint on the host), jax arrays are stacked by jax (under jit: on device).
  A tree without layers_<i> is returned as it is."""
  out = dict(tree)
  for stack, n in _stack_sizes(config).items():
    if stack not in out or 'layers_0' not in out[stack]:
      continue
    sub = dict(out[stack])
    missing = [f'layers_{i}' for i in range(n) if f'layers_{i}' not in sub]
    if missing:
      raise ValueError(f'{stack} has no {missing[0]}: the tree does not hold the '
                       f'{n} layers of this config.')
    per_layer = [sub.pop(f'layers_{i}') for i in range(n)]
    sub[SCANNED_SUBTREE[stack]] = jax.tree.map(
        lambda *xs: (np.stack if all(map(_is_numpy, xs)) else jnp.stack)(xs, axis=SCAN_AXIS),
        *per_layer)
    out[stack] = sub
  return out


def unstack_layers(tree, config: T5Config):
  """The inverse of `stack_layers`: a scanned tree -> `layers_<i>` subtrees (slices at
  SCAN_AXIS). A tree without scanned subtrees is returned as it is."""
  out = dict(tree)
  for stack, n in _stack_sizes(config).items():
    name = SCANNED_SUBTREE[stack]
    if stack not in out or name not in out[stack]:
      continue
    sub = dict(out[stack])
    stacked = sub.pop(name)
    index = lambda i: (slice(None),) * SCAN_AXIS + (i,)
    for i in range(n):
      sub[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[index(i)], stacked)
    out[stack] = sub
  return out


def unscanned(config: T5Config) -> T5Config:
  """The same model with its layers unrolled (the layout checkpoints hold)."""
  return dataclasses.replace(config, scan_layers=False) if config.scan_layers else config
