"""Decoding-speed benchmark: time per sample against the number of KV heads (issue 5).

Every variant (MHA, GQA-G, MQA; the KV-head counts of `stacks` changed) runs with the
SAME weights where shapes agree: the MHA parameters are initialised once and each
variant's K/V kernels are mean-pooled from them (`convert.pool_kv`), exactly as an
uptrained checkpoint starts. Parameters are held in the activation dtype (bfloat16
for the T5.1.1 presets), as they would be for inference.

For each variant, after compiling and warming up, with `block_until_ready` and the
median of `repeats` timed runs (DESIGN.md section 8):

  encoder_s          one jitted `Transformer.encode` of the batch [B, S].
  decode_step_s      one jitted cached decode step (`_tokens_to_logits`, batch [B, 1])
                     on a cache built like `EncoderDecoderModel._init_decoding`:
                     self-attention K/V [B, T, K, H] and cross-attention K/V [B, S, K, H].
  time_per_batch_s   encoder_s + T * decode_step_s: producing T tokens for B samples.
  time_per_sample_s  time_per_batch_s / B: the paper's "time per sample", the time to
                     produce one sample's output when decoding batches of B.

Bytes (what bounds a decode step on memory bandwidth):

  kv_cache_bytes         sum of `nbytes` of the cache arrays actually built: every
                         decoder layer's self-attention cached_key/cached_value (full
                         length T) and cross-attention cached_key/cached_value (length S);
                         the scalar cache_index is not counted.
  bytes_per_decode_step  decoder parameter bytes (every leaf under `decoder`, including
                         the logits kernel; plus the token embedding when it doubles as
                         the logits kernel; the B embedding rows looked up are ignored) +
                         kv_cache_bytes. The whole allocated self-attention cache is
                         counted, not the T/2 positions filled on average, because our
                         attention reads (and masks) all T positions at every step.
  bandwidth_bytes_per_s  median rate of a jitted sum over a float32 array (256 MiB by
                         default), measured in the same run.
  roofline_fraction      (bytes_per_decode_step / bandwidth) / decode_step_s: 1.0 would
                         be a decode step that only streams its bytes once at full speed.
"""

import dataclasses
import json
import os
import statistics
import time
import warnings
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gqa_jax import convert
from gqa_jax import info
from gqa_jax import models
from gqa_jax import network

RECORD_KEYS = ('name', 'num_kv_heads', 'time_per_sample_s', 'time_per_batch_s', 'encoder_s',
               'decode_step_s', 'kv_cache_bytes', 'decoder_param_bytes',
               'bytes_per_decode_step', 'bandwidth_bytes_per_s', 'roofline_fraction',
               'input_length', 'output_length', 'batch_size', 'repeats')


@dataclasses.dataclass(frozen=True)
class Setup:
  config: network.T5Config
  input_length: int
  output_length: int
  batch_size: int


PRESETS = {
    # T5-XXL widths with one encoder and one decoder layer: runs in minutes on a CPU.
    'cpu-fig6': Setup(network.get_preset('xxl', num_encoder_layers=1, num_decoder_layers=1),
                      input_length=256, output_length=32, batch_size=4),
    # The paper's Figure 6 setting: T5-XXL, input 2048, output 512, batch 32.
    'paper-fig6': Setup(network.get_preset('xxl'), input_length=2048, output_length=512,
                        batch_size=32),
}


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
  """Bytes per second of a jitted sum over an `nbytes` float32 array (median)."""
  x = jnp.ones((max(nbytes // 4, 1),), jnp.float32)
  total = jax.jit(jnp.sum)
  return x.nbytes / _median_time(lambda: total(x), repeats)


def _stack_of(path) -> Optional[str]:
  """The attention stack of a K/V kernel path, else None."""
  if len(path) >= 3 and path[-2] in ('key', 'value') and path[-3] in info._MODULE_STACK:
    return info._MODULE_STACK[path[-3]]
  return None


def variant_params(base_params, base_config: network.T5Config, config: network.T5Config,
                   method: str = 'mean'):
  """Parameters of `config` from those of `base_config`: leaves shared (the same
  objects) except K/V kernels whose head count differs, which are pooled."""
  flat = traverse_util.flatten_dict(base_params)
  out = {}
  for path, leaf in flat.items():
    stack = _stack_of(path)
    if stack is not None and base_config.kv_heads(stack) != config.kv_heads(stack):
      pooled = convert.pool_kv(np.asarray(leaf, np.float32), base_config.kv_heads(stack),
                               config.kv_heads(stack), config.head_dim, method)
      leaf = jnp.asarray(pooled, leaf.dtype)
    out[path] = leaf
  return traverse_util.unflatten_dict(out)


def cache_nbytes(cache) -> int:
  """Bytes of every cached_key / cached_value array in a decoding cache."""
  flat = traverse_util.flatten_dict(cache)
  return sum(int(v.nbytes) for k, v in flat.items() if k[-1] in ('cached_key', 'cached_value'))


def decoder_param_bytes(params, config: network.T5Config) -> int:
  """Bytes of the parameters one decode step reads: the decoder (with its logits
  kernel), plus the token embedding when it is also the logits kernel."""
  flat = traverse_util.flatten_dict(params)
  total = sum(int(v.nbytes) for k, v in flat.items() if k[0] == 'decoder')
  if config.logits_via_embedding:
    total += int(params['token_embedder']['embedding'].nbytes)
  return total


def benchmark(config: network.T5Config, input_length: int, output_length: int,
              batch_size: int, num_kv_heads: Optional[Sequence[int]] = None,
              stacks: Sequence[str] = network.PAPER_STACKS, repeats: int = 5,
              seed: int = 0, bandwidth_bytes: int = 256 << 20,
              log: Optional[Callable[[str], None]] = None) -> List[dict]:
  """One record per variant, MHA first (see the module docstring for the fields).

  num_kv_heads: the KV-head counts to run (default: every divisor of num_heads).
  """
  log = log or (lambda _: None)
  all_variants = info.variants(config.with_kv_heads(config.num_heads, stacks), stacks)
  by_k = {k: (name, cfg) for name, k, cfg in all_variants}
  wanted = sorted(set(num_kv_heads), reverse=True) if num_kv_heads else list(by_k)
  bad = [k for k in wanted if k not in by_k]
  if bad:
    raise ValueError(f'--num-kv-heads {bad} do not divide num_heads={config.num_heads}; '
                     f'choose from {sorted(by_k)}.')
  mha_config = by_k[config.num_heads][1]
  log(f'initialising {info.describe(mha_config)} ...')
  base = network.init_params(mha_config, jax.random.PRNGKey(seed), 1, 8, 8)
  base = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(config.dtype)), base)
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(2, config.vocab_size, (batch_size, input_length)),
                       jnp.int32)
  step_tokens = jnp.ones((batch_size, 1), jnp.int32)
  bandwidth = measure_bandwidth(bandwidth_bytes, repeats)
  log(f'memory bandwidth: {bandwidth / 1e9:.2f} GB/s')

  records = []
  for k in wanted:
    name, cfg = by_k[k]
    params = variant_params(base, mha_config, cfg)
    model = models.EncoderDecoderModel(network.Transformer(cfg))
    module = model.module
    encode = jax.jit(lambda p, t: module.apply({'params': p}, t, enable_dropout=False,
                                               method=module.encode))
    encoder_s = _median_time(lambda: encode(params, tokens), repeats)
    cache = model._init_decoding(params, {'encoder_input_tokens': tokens}, output_length)
    kv_bytes = cache_nbytes(cache)
    step = jax.jit(model._tokens_to_logits(params, tokens, output_length), donate_argnums=1)
    state = {'cache': cache, 'i': 0}

    def one_step():
      # Restart at position 0 after T steps so that no step writes past the cache.
      index = np.int32(state['i'] % output_length)
      c = traverse_util.flatten_dict(state['cache'])  # one fresh index array per layer
      c = {p: (jnp.asarray(index) if p[-1] == 'cache_index' else v) for p, v in c.items()}
      logits, state['cache'] = step(step_tokens, traverse_util.unflatten_dict(c))
      state['i'] += 1
      return logits

    with warnings.catch_warnings():  # backends that cannot donate say so once
      warnings.filterwarnings('ignore', message='.*donated buffers.*')
      decode_step_s = _median_time(one_step, repeats)
    param_bytes = decoder_param_bytes(params, cfg)
    step_bytes = param_bytes + kv_bytes
    per_batch = encoder_s + output_length * decode_step_s
    records.append({
        'name': name, 'num_kv_heads': k, 'time_per_sample_s': per_batch / batch_size,
        'time_per_batch_s': per_batch, 'encoder_s': encoder_s, 'decode_step_s': decode_step_s,
        'kv_cache_bytes': kv_bytes, 'decoder_param_bytes': param_bytes,
        'bytes_per_decode_step': step_bytes, 'bandwidth_bytes_per_s': bandwidth,
        'roofline_fraction': step_bytes / bandwidth / decode_step_s,
        'input_length': input_length, 'output_length': output_length,
        'batch_size': batch_size, 'repeats': repeats})
    log(f'{name}: {per_batch / batch_size * 1e3:.1f} ms per sample, '
        f'decode step {decode_step_s * 1e3:.2f} ms, encoder {encoder_s * 1e3:.1f} ms')
    del state, cache, params
  return records


def format_table(records: List[dict]) -> str:
  """A markdown table; ratios are to the MHA record when there is one, else the first."""
  ref = next((r for r in records if r['name'] == 'MHA'), records[0])
  lines = ['| variant | G (KV heads) | time per sample (ms) | ratio to '
           f'{ref["name"]} | decode step (ms) | encoder (ms) | KV cache (MiB) | '
           'bytes per step (MiB) | roofline fraction |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in records:
    lines.append(
        f'| {r["name"]} | {r["num_kv_heads"]} | {r["time_per_sample_s"] * 1e3:.2f} | '
        f'{r["time_per_sample_s"] / ref["time_per_sample_s"]:.3f} | '
        f'{r["decode_step_s"] * 1e3:.3f} | {r["encoder_s"] * 1e3:.2f} | '
        f'{r["kv_cache_bytes"] / 2**20:.2f} | {r["bytes_per_decode_step"] / 2**20:.1f} | '
        f'{r["roofline_fraction"]:.3f} |')
  r = records[0]
  lines.append('')
  lines.append(f'input {r["input_length"]}, output {r["output_length"]}, batch '
               f'{r["batch_size"]}, median of {r["repeats"]}; memory bandwidth '
               f'{r["bandwidth_bytes_per_s"] / 1e9:.2f} GB/s. time per sample = '
               '(encoder + output length x decode step) / batch.')
  return '\n'.join(lines)


def write(records: List[dict], directory: str, meta: Optional[dict] = None) -> List[str]:
  """Writes DIRECTORY/decode.json and DIRECTORY/decode.md; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, 'decode.json'), os.path.join(directory, 'decode.md')]
  with open(paths[0], 'w') as f:
    json.dump({'meta': meta or {}, 'records': records}, f, indent=2, default=str)
  with open(paths[1], 'w') as f:
    f.write(format_table(records) + '\n')
  return paths
