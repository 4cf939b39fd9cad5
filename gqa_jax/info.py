"""Parameter counts and decode-time KV-cache sizes of the MHA, GQA-G and MQA variants.

At decoding time every decoder layer keeps, for K and for V,
  self-attention:  [B, L_out, K_self, H]  (grows by one position per output token)
  cross-attention: [B, L_in, K_cross, H]  (projected once from the encoder output)
The encoder runs once per sample and keeps no cache. Parameter counts come from
the real parameter tree (`network.param_shapes`), so they are exact.
"""

import functools
from typing import List, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from gqa_jax import network

NO_ENCODER_CACHE = ('the encoder self-attention keeps no KV cache: the encoder runs once per '
                    'sample, before decoding')


def variants(config: network.T5Config,
             stacks: Sequence[str] = network.PAPER_STACKS) -> List[tuple]:
  """[(name, num_kv_heads, config)] for MHA, GQA-G (1 < G < N, G | N) and MQA.

  Each variant sets the KV-head count of `stacks` only; other stacks keep the
  counts of `config`.
  """
  if not stacks:
    raise ValueError(f'no attention stack selected; choose from {network.STACKS}.')
  n = config.num_heads
  groups = [g for g in range(n - 1, 1, -1) if n % g == 0]
  heads = [n] + groups + ([1] if n > 1 else [])
  return [(network.variant_name(k, n), k, config.with_kv_heads(k, stacks)) for k in heads]


def bytes_per_element(config: network.T5Config, cache_dtype: Optional[str] = None) -> int:
  """Bytes of one cached element: `cache_dtype` if given, else the activation dtype."""
  dtype = config.dtype if cache_dtype is None else cache_dtype
  try:
    return jnp.dtype(dtype).itemsize
  except TypeError as e:
    raise ValueError(
        f'unknown cache dtype {dtype!r}: use e.g. bfloat16, float16, float32.') from e


def count_params(config: network.T5Config) -> dict:
  """{'total': int, 'kv_<stack>': int per stack} from the real parameter tree."""
  return dict(_count_params(config))


@functools.lru_cache(maxsize=64)  # tracing xxl's init takes about a second
def _count_params(config: network.T5Config) -> dict:
  counts = {'total': 0, **{f'kv_{s}': 0 for s in network.STACKS}}
  for name, shape in network.flat_param_shapes(config).items():
    size = int(np.prod(shape))
    counts['total'] += size
    stack = network.kv_kernel_stack(name)
    if stack is not None:
      counts[f'kv_{stack}'] += size
  return counts


def cache_bytes(config: network.T5Config, input_length: int, output_length: int,
                batch_size: int, element_bytes: int) -> dict:
  """Decode-time KV-cache bytes; every K/V cache is [B, K, length, H] per decoder layer
  that projects K/V (all of them, or CLA/MLKV's producer layers)."""
  per_kv_head = 2 * config.head_dim * element_bytes  # K and V, one layer
  cached = lambda stack: config.kv_heads(stack) * len(config.producer_layers(stack))
  self_token = per_kv_head * cached('decoder_self')
  self_sample = self_token * output_length
  cross_sample = per_kv_head * cached('decoder_cross') * input_length
  return {'self_per_token': self_token, 'self_per_sample': self_sample,
          'cross_per_sample': cross_sample, 'encoder_per_sample': 0,
          'total_per_sample': self_sample + cross_sample,
          'total_per_batch': (self_sample + cross_sample) * batch_size}


def decode_step_flops(config: network.T5Config, input_length: int, output_length: int,
                      batch_size: int) -> dict:
  """FLOPs (2 per multiply-add) of the matrix products of one cached decode step of a batch.

  Per decoder layer, with D = emb_dim, H = head_dim, Q query heads and K KV heads of
  the stack, F = mlp_dim, S = input_length, T = output_length:
    self-attention   query 2BDQH, key and value 2 * 2BDKH (producer layers only: the
                     others read an earlier layer's K/V), out 2BQHD; scores and values
                     2 * 2BQHT: our attention reads the whole allocated cache (T
                     positions, masked), as `bench` counts its bytes;
    cross-attention  query and out as above; scores and values 2 * 2BQHS (its K/V were
                     projected once, by `init_cache`, not per step);
    WGQA             pooling a kernel with its weights, 2DNH per pooled kernel per step
                     (self-attention K and V of the producer layers);
    MLP              2BDF per input kernel (2 gated) + 2BFD;
  plus the logits, 2BDV. Softmax, norms, masks and the position bias are not counted
  (O(B Q (S + T)) elementwise work, small next to these).
  Returns {'projections', 'attention', 'kv_pooling', 'mlp', 'logits', 'total'}, where
  'attention' is the scores and values part alone (the part the KV heads' cache feeds).
  """
  b, d, h = batch_size, config.emb_dim, config.head_dim
  out = dict.fromkeys(('projections', 'attention', 'kv_pooling', 'mlp', 'logits'), 0)
  for stack, length in (('decoder_self', output_length), ('decoder_cross', input_length)):
    q, k = config.query_heads(stack), config.kv_heads(stack)
    producers = len(config.producer_layers(stack))
    out['projections'] += config.num_decoder_layers * (2 * b * d * q * h) * 2  # query, out
    out['attention'] += config.num_decoder_layers * 2 * (2 * b * q * h * length)
    if stack == 'decoder_self':
      out['projections'] += producers * 2 * (2 * b * d * k * h)
      if config.kv_weights(stack):
        out['kv_pooling'] += producers * 2 * (2 * d * config.num_heads * h)
  mlp_in = len(config.mlp_activations)
  out['mlp'] = config.num_decoder_layers * (mlp_in + 1) * 2 * b * d * config.mlp_dim
  out['logits'] = 2 * b * d * config.vocab_size
  out['total'] = sum(out.values())
  return out


def report(config: network.T5Config, *, input_length: int = 2048, output_length: int = 512,
           batch_size: int = 32, stacks: Sequence[str] = network.PAPER_STACKS,
           cache_dtype: Optional[str] = None) -> List[dict]:
  """One flat record per variant (MHA first, MQA last): KV heads, params, cache bytes."""
  for name, value in (('input length', input_length), ('output length', output_length),
                      ('batch size', batch_size)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  element_bytes = bytes_per_element(config, cache_dtype)
  configured = tuple(config.kv_heads(s) for s in network.STACKS)
  records = []
  for name, k, cfg in variants(config, tuple(stacks)):
    kv_heads = tuple(cfg.kv_heads(s) for s in network.STACKS)
    record = {'variant': name, 'num_kv_heads': k, 'stacks': list(stacks),
              'configured': kv_heads == configured}
    record.update({f'kv_heads_{s}': v for s, v in zip(network.STACKS, kv_heads)})
    record.update({f'params_{key}': v for key, v in count_params(cfg).items()})
    record.update({f'cache_bytes_{key}': v for key, v in cache_bytes(
        cfg, input_length, output_length, batch_size, element_bytes).items()})
    record.update(input_length=input_length, output_length=output_length,
                  batch_size=batch_size, cache_bytes_per_element=element_bytes)
    records.append(record)
  mha = records[0]['cache_bytes_total_per_sample']
  for record in records:
    record['cache_ratio_vs_mha'] = record['cache_bytes_total_per_sample'] / mha
  return records


def format_bytes(n: float) -> str:
  """1536 -> '1.50 KiB' (binary units)."""
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024:
      return f'{n} B' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  return f'{n:.2f} TiB'


def options(config: network.T5Config) -> List[str]:
  """One phrase per stack with SQA, WGQA or CLA/MLKV set, e.g. 'decoder_self: WGQA (col
  weights, mean init), K/V in layers 0, 2 of 4'."""
  out = []
  for stack in network.STACKS:
    parts = []
    if config.query_heads(stack) != config.num_heads:
      parts.append(f'SQA ({config.query_heads(stack)} query heads)')
    kind = config.kv_weights(stack)
    if kind:
      parts.append(f'WGQA ({kind} weights, {config.kv_weights_init} init)')
    produced = config.producer_layers(stack)
    if len(produced) < config.num_layers(stack):
      parts.append(f'K/V in layers {", ".join(map(str, produced))} of '
                   f'{config.num_layers(stack)}')
    if parts:
      out.append(f'{stack}: {", ".join(parts)}')
  return out


def describe(config: network.T5Config) -> str:
  """One line naming the model's size."""
  return (f'emb {config.emb_dim}, {config.num_heads} heads x head_dim {config.head_dim}, '
          f'{config.num_encoder_layers}+{config.num_decoder_layers} layers, '
          f'mlp {config.mlp_dim}, vocab {config.vocab_size}, {jnp.dtype(config.dtype)}')


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
  # First column left-aligned (names), the rest right-aligned (numbers).
  widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
  fmt = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths))).rstrip()
  return [fmt(headers)] + [fmt(r) for r in rows]


def format_report(records: List[dict], model: str, config: network.T5Config) -> str:
  """Human-readable tables of `report(config)` records."""
  r0 = records[0]
  kv = lambda r: '/'.join(str(r[f'kv_heads_{s}']) for s in network.STACKS)
  name = lambda r: ('* ' if r['configured'] else '  ') + r['variant']
  lines = [f'model: {model}: {describe(config)}',
           f'decoding: input length {r0["input_length"]}, output length '
           f'{r0["output_length"]}, batch {r0["batch_size"]}, KV cache '
           f'{r0["cache_bytes_per_element"]} bytes/element',
           f'variants set the KV heads of: {", ".join(r0["stacks"])}',
           *[f'options: {line}' for line in options(config)], '',
           'Parameters (K/V = key + value projection kernels of a stack, all layers)']
  lines += _table(
      ['  variant', 'KV heads enc/self/cross', 'total', 'K/V encoder', 'K/V dec self',
       'K/V dec cross'],
      [[name(r), kv(r), f'{r["params_total"]:,}', f'{r["params_kv_encoder"]:,}',
        f'{r["params_kv_decoder_self"]:,}', f'{r["params_kv_decoder_cross"]:,}']
       for r in records])
  lines += ['', f'KV cache at decoding ({NO_ENCODER_CACHE})']
  lines += _table(
      ['  variant', 'self/token', 'self/sample', 'cross/sample', 'total/sample',
       f'total/batch of {r0["batch_size"]}', 'vs MHA'],
      [[name(r)] + [format_bytes(r[f'cache_bytes_{k}']) for k in (
          'self_per_token', 'self_per_sample', 'cross_per_sample', 'total_per_sample',
          'total_per_batch')] + [f'{r["cache_ratio_vs_mha"]:.4f}'] for r in records])
  if any(r['configured'] for r in records):
    lines += ['', '* the configured model']
  return '\n'.join(lines)
