"""Decoding-speed benchmark: time per sample against the number of KV heads.

Every variant (MHA, GQA-G, MQA; the KV-head counts of `stacks` changed) runs with the
SAME weights where shapes agree: the MHA parameters are initialised once and each
variant's K/V kernels are mean-pooled from them (`convert.pool_kv`), exactly as an
uptrained checkpoint starts. Parameters are held in the activation dtype (bfloat16
for the T5.1.1 presets), as they would be for inference.

For each variant, after compiling and warming up, with `block_until_ready` and the
median of `repeats` timed runs:

  encoder_s          one jitted `EncoderDecoderModel.encode` of the batch [B, S].
  decode_step_s      one jitted cached decode step (`EncoderDecoderModel.tokens_to_logits`,
                     batch [B, 1]) on a cache from `EncoderDecoderModel.init_cache`:
                     self-attention keys [B, K, H, T] and values [B, K, T, H],
                     cross-attention keys [B, K, H, S] and values [B, K, S, H].
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
                         default), timed in the same interleaved rounds as the decode
                         steps (or once, before them, with rounds=0).
  memory_roofline_fraction  (bytes_per_decode_step / bandwidth) / decode_step_s: 1.0
                         would be a step that only streams its bytes once at full speed.

Compute (the other side of the roofline):

  flops_per_decode_step  the matrix products of one step (`info.decode_step_flops`: query,
                         key/value, out, MLP and logits kernels; scores and values over
                         the allocated caches).
  peak_flops_per_s       median rate of a jitted [M, M] x [M, M] matmul in the benchmark's
                         dtype (M = 2048 by default), timed in the same rounds.
  compute_s, memory_s    flops / peak, bytes / bandwidth; `bound` names the larger.
  predicted_decode_step_s  max(compute_s, memory_s).
  roofline_fraction      predicted_decode_step_s / decode_step_s (1.0: at the roofline).
  attention_s            the attention part alone: one jitted call of the decode step's
                         attention (`layers.grouped_dot_product_attention`, one query
                         position) over caches of every decoding layer's shapes, without
                         the projections; attention_flops and kv_cache_bytes are its
                         work, attention_roofline_fraction its max(flops / peak, cache
                         bytes / bandwidth) / attention_s.
  kv_bytes_per_token     kv_cache_bytes / (B x (S + T)): what one sample's cache holds per
                         token of its input and output, over every layer that caches.

Cross-layer KV sharing (`kv_layers`: 'cla<s>', 'mlkv<m>'; CLA, MLKV) adds, for each KV-head
count, a variant whose stacks project K/V in the producer layers only (the others read
the last producer's): the same weights less the non-producers' K/V kernels, a cache of
the producer layers only.

For a TPU slice we do not have, `estimate` runs nothing: each variant's decode step is
compiled for the slice's compile-only devices, and its records hold the compiler's
counts (FLOPs, bytes, memory, collectives), the bytes the step should read counted by
hand, and roofline lower bounds from the chip's published figures: estimates, never
measurements (`gqa-jax bench decode --topology`).
"""

import dataclasses
import json
import os
import statistics
import time
import warnings
from typing import Callable, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from gqa_jax.experiments import bench_hf
from gqa_jax import convert
from gqa_jax import info
from gqa_jax import layers
from gqa_jax import models
from gqa_jax import network
from gqa_jax import partitioning
from gqa_jax.errors import ConfigError

RECORD_KEYS = ('name', 'num_kv_heads', 'time_per_sample_s', 'time_per_batch_s', 'encoder_s',
               'decode_step_s', 'kv_cache_bytes', 'decoder_param_bytes',
               'bytes_per_decode_step', 'bandwidth_bytes_per_s', 'roofline_fraction',
               'memory_roofline_fraction', 'flops_per_decode_step', 'peak_flops_per_s',
               'compute_s', 'memory_s', 'bound', 'predicted_decode_step_s',
               'attention_s', 'attention_flops', 'attention_roofline_fraction',
               'roofline_time_per_sample_s', 'kv_bytes_per_token', 'kv_layers',
               'input_length', 'output_length', 'batch_size', 'repeats', 'dtype', 'device')


@dataclasses.dataclass(frozen=True)
class Setup:
  config: network.T5Config
  input_length: int
  output_length: int
  batch_size: int
  rounds: int = 5  # 0: time variants one after another (caches too big to hold together)


PRESETS = {
    # The paper's regime on a CPU: the MHA cache (1.0 GB) is 2.4x the decoder weights a step
    # reads (0.42 GB; T5-XXL at batch 32 and 2048 -> 512: 2.5x), at batch 4, where the
    # weight matmuls are still bandwidth-bound on a 2-core CPU (2 FLOPs per float32 weight
    # per sample). T5.1.1 layout, emb 512, 16 heads x 32, gated-GELU mlp 1024, vocab 32128,
    # 24 decoder layers (the logits kernel is a small share of the weights, as in XXL) and a
    # real 2-layer encoder (GQA changes only the decoder; the encoder's time is the same for
    # every G, and a shallow one keeps the run in minutes). float32: XLA:CPU's bfloat16 dots
    # are not vectorised.
    'cpu-paper': Setup(network.T5Config(
        vocab_size=32128, dtype='float32', emb_dim=512, num_heads=16, head_dim=32,
        mlp_dim=1024, num_encoder_layers=2, num_decoder_layers=24,
        mlp_activations=('gelu', 'linear'), dropout_rate=0.0, logits_via_embedding=False),
        input_length=2048, output_length=512, batch_size=4),
    # T5-XXL widths with one encoder and one decoder layer: runs in minutes on a CPU.
    # T5-XXL widths (emb 4096, 64 heads x 64, mlp 10240, vocab 32128) with one encoder and
    # one decoder layer, in float32 (XLA:CPU's bfloat16 dots are not vectorised: it would
    # time the emulation, not the memory traffic); about 6 minutes on 2 cores.
    'cpu-fig6': Setup(network.get_preset('xxl', num_encoder_layers=1, num_decoder_layers=1,
                                         dtype='float32'),
                      input_length=1024, output_length=512, batch_size=4),
    # The paper's Figure 6 setting: T5-XXL, input 2048, output 512, batch 32.
    'paper-fig6': Setup(network.get_preset('xxl'), input_length=2048, output_length=512,
                        batch_size=32, rounds=0),
}


def _median_time(fn: Callable[[], object], repeats: int) -> float:
  """Median of `repeats` timed calls after one warm-up call."""
  return _time_interleaved([fn], repeats, rounds=1)[0]


def _bandwidth_probe(nbytes: int):
  """(bytes read, a zero-argument jitted sum over an `nbytes` float32 array)."""
  x = jnp.ones((max(nbytes // 4, 1),), jnp.float32)
  total = jax.jit(jnp.sum)
  return x.nbytes, lambda: total(x)


def _matmul_probe(size: int, dtype):
  """(FLOPs of one call, a zero-argument jitted [size, size] x [size, size] matmul)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
  product = jax.jit(lambda a: a @ a)
  return 2 * size ** 3, lambda: product(x)


def _attention_stepper(cfg: network.T5Config, cache, dtype) -> Callable[[], object]:
  """A zero-argument jitted call of the decode step's attention alone: one query position
  of every decoding layer's self- and cross-attention over zero-filled arrays shaped as
  its cached K/V (its own arrays: the decode stepper donates its cache)."""
  flat = traverse_util.flatten_dict(cache)
  pairs = []
  for path, key in flat.items():
    if path[-1] == 'cached_key':
      stack = 'decoder_cross' if path[-2] == 'encoder_decoder_attention' else 'decoder_self'
      kv = (jnp.zeros_like(key), jnp.zeros_like(flat[path[:-1] + ('cached_value',)]))
      query = jnp.zeros((key.shape[0], 1, cfg.query_heads(stack), cfg.head_dim), key.dtype)
      pairs.append((query, *kv))

  @jax.jit
  def attend(pairs):
    return [layers.grouped_dot_product_attention(q, k, v, dtype=dtype, kv_layout='cache')
            for q, k, v in pairs]
  return lambda: attend(pairs)


def default_bandwidth_bytes(platform: Optional[str] = None) -> int:
  """The bandwidth probe's array size: 256 MiB on a CPU; 4 GiB on an accelerator, where a
  256 MiB sum takes tens of microseconds and the dispatch around it dominates (on an H200
  it read 0.71 TB/s)."""
  platform = platform or jax.devices()[0].platform
  return (256 << 20) if platform == 'cpu' else (4 << 30)


def default_matmul_size(platform: Optional[str] = None) -> int:
  """The matmul probe's size M: 2048 on a CPU, 8192 on an accelerator (a 2048^3 product
  takes microseconds there)."""
  platform = platform or jax.devices()[0].platform
  return 2048 if platform == 'cpu' else 8192


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
  """Bytes per second of a jitted sum over an `nbytes` float32 array (median)."""
  size, probe = _bandwidth_probe(nbytes)
  return size / _median_time(probe, repeats)


def measure_matmul(size: int = 2048, dtype='float32', repeats: int = 5) -> float:
  """FLOPs per second of a jitted [size, size] x [size, size] matmul in `dtype` (median)."""
  flops, probe = _matmul_probe(size, jnp.dtype(dtype))
  return flops / _median_time(probe, repeats)


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


def init_params_in_dtype(config: network.T5Config, seed: int = 0):
  """Parameters initialised and cast to `config.dtype` inside one jitted program, so
  that the float32 originals are temporaries, never all alive at once (T5-XXL: 44 GB in
  float32, 22 GB in bfloat16)."""
  dtype = jnp.dtype(config.dtype)
  init = jax.jit(lambda rng: jax.tree_util.tree_map(
      lambda x: x.astype(dtype), network.init_params(config, rng, 1, 8, 8)))
  return init(jax.random.PRNGKey(seed))


def _decode_stepper(model, params, cache, tokens, length: int) -> Callable[[], object]:
  """A zero-argument function running one jitted cached decode step (batch [B, 1])."""
  # Parameters are arguments, not closed-over constants that XLA would fold into the program.
  step = jax.jit(lambda p, enc, x, c: model.tokens_to_logits(p, enc, length)(x, c),
                 donate_argnums=3)
  step_tokens = jnp.ones((tokens.shape[0], 1), jnp.int32)
  state = {'cache': cache, 'i': 0}

  def one_step():
    if state['i'] and state['i'] % length == 0:  # rewind so that no step writes past the end
      flat = traverse_util.flatten_dict(state['cache'])
      flat = {p: (jnp.zeros_like(v) if p[-1] == 'cache_index' else v) for p, v in flat.items()}
      state['cache'] = traverse_util.unflatten_dict(flat)
    logits, state['cache'] = step(params, tokens, step_tokens, state['cache'])
    state['i'] += 1
    return logits
  return one_step


def _time_interleaved(steppers: List[Callable[[], object]], repeats: int,
                      rounds: int) -> List[float]:
  """Median step time of each stepper, timed in `rounds` rounds that visit every
  stepper in turn, so that a slow phase of the machine hits all variants alike."""
  per_round = max(1, -(-repeats // rounds))
  times = [[] for _ in steppers]
  with warnings.catch_warnings():  # backends that cannot donate say so once
    warnings.filterwarnings('ignore', message='.*donated buffers.*')
    for fn in steppers:
      jax.block_until_ready(fn())  # compile and warm up
    for _ in range(rounds):
      for fn, out in zip(steppers, times):
        for _ in range(per_round):
          start = time.perf_counter()
          jax.block_until_ready(fn())
          out.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def select_variants(config: network.T5Config, num_kv_heads: Optional[Sequence[int]] = None,
                    stacks: Sequence[str] = network.PAPER_STACKS,
                    kv_layers: Sequence[str] = ()):
  """(variant keys to run, MHA first; {key: (name, config)}) for `benchmark`. A key is
  (KV heads, kv_layers spec or None): every KV-head count plain, then once more per
  `kv_layers` spec (named e.g. 'MQA-CLA2', its `stacks` sharing K/V across layers).

  Raises ValueError naming the counts that do not divide num_heads, or a spec that does
  not fit the layers (checked before anything is built or timed).
  """
  all_variants = info.variants(config.with_kv_heads(config.num_heads, stacks), stacks)
  by_k = {(k, None): (name, cfg) for name, k, cfg in all_variants}
  wanted = sorted(set(num_kv_heads), reverse=True) if num_kv_heads else [k for k, _ in by_k]
  bad = [k for k in wanted if (k, None) not in by_k]
  if bad:
    raise ValueError(f'--num-kv-heads {bad} do not divide num_heads={config.num_heads}; '
                     f'choose from {sorted(k for k, _ in by_k)}.')
  keys = [(k, None) for k in wanted]
  for spec in dict.fromkeys(kv_layers):
    for k in wanted:
      name, cfg = by_k[(k, None)]
      try:
        shared = dataclasses.replace(cfg, **{f'{s}_kv_layers': spec for s in stacks})
      except ValueError as e:
        raise ValueError(f'--kv-layers {spec}: {e}') from e
      by_k[(k, spec)] = (f'{name}-{spec.upper()}', shared)
      keys.append((k, spec))
  return keys, by_k


def variant_params(base, source: network.T5Config, target: network.T5Config):
  """`target`'s parameters from `source`'s (`base`): K/V kernels mean-pooled to its head
  counts, and only the leaves `target` has (a layer that reads another's K/V has none)."""
  pooled = traverse_util.flatten_dict(convert.pool_params(base, source, target), sep='/')
  shapes = network.flat_param_shapes(target)
  return traverse_util.unflatten_dict({k: pooled[k] for k in shapes}, sep='/')


def benchmark(config: network.T5Config, input_length: int, output_length: int,
              batch_size: int, num_kv_heads: Optional[Sequence[int]] = None,
              stacks: Sequence[str] = network.PAPER_STACKS, repeats: int = 3,
              step_repeats: int = 20, rounds: int = 5, seed: int = 0,
              bandwidth_bytes: Optional[int] = None, matmul_size: Optional[int] = None,
              hf: bool = False, hf_repeats: int = 3, kv_layers: Sequence[str] = (),
              log: Optional[Callable[[str], None]] = None) -> List[dict]:
  """One record per variant, MHA first (see the module docstring for the fields).

  num_kv_heads: the KV-head counts to run (default: every divisor of num_heads).
  repeats / step_repeats: timed runs of the encoder / of a decode step (medians).
  rounds: decode steps are timed in this many rounds over all variants (interleaved;
    every variant's cache is alive at once); 0 times each variant alone, one after
    another, holding one cache at a time (for models whose caches do not fit together).
  kv_layers: CLA / MLKV specs ('cla2', 'mlkv1'); each adds a variant per KV-head count.
  bandwidth_bytes / matmul_size: the memory-bandwidth and peak-FLOP-rate probes (default:
    `default_bandwidth_bytes`, `default_matmul_size` for the platform).
  hf: also time Hugging Face transformers' `generate` (MHA, same shapes; `bench_hf`)
    and add `hf_time_per_sample_s` and `hf_ratio` (HF time / this variant's) to every
    record. With rounds > 0 its `hf_repeats` generates alternate with gqa_jax's MHA
    (encoder + output length x a median decode step, timed again after each), and MHA's
    `hf_ratio` is the median of the per-round ratios, `hf_ratio_min`/`_max` their spread.
  The encoder is timed once per distinct encoder (once in all, unless `stacks` includes
  'encoder'), since variants that share it run the identical computation.
  """
  log = log or (lambda _: None)
  bandwidth_bytes = bandwidth_bytes or default_bandwidth_bytes()
  matmul_size = matmul_size or default_matmul_size()
  wanted, by_k = select_variants(config, num_kv_heads, stacks, kv_layers)
  mha_config = by_k[(config.num_heads, None)][1]
  log(f'initialising {info.describe(mha_config)} in {jnp.dtype(config.dtype).name} ...')
  base = init_params_in_dtype(mha_config, seed)
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(2, config.vocab_size, (batch_size, input_length)),
                       jnp.int32)
  dtype = jnp.dtype(config.dtype)
  if not rounds:
    bandwidth = measure_bandwidth(bandwidth_bytes, repeats)
    peak = measure_matmul(matmul_size, dtype, repeats)
    log(f'memory bandwidth: {bandwidth / 1e9:.2f} GB/s; {dtype.name} matmul '
        f'{peak / 1e9:.1f} GFLOP/s')

  encoders = {}  # encoder KV heads -> (encoder output, median encoder time, encode call)
  built, step_times = [], []
  for k, spec in wanted:
    name, cfg = by_k[(k, spec)]
    params = variant_params(base, mha_config, cfg)
    model = models.EncoderDecoderModel(network.Transformer(cfg))
    if cfg.kv_heads('encoder') not in encoders:
      encode = jax.jit(model.encode)
      encoder_s = _median_time(lambda p=params: encode(p, tokens), repeats)
      encoders[cfg.kv_heads('encoder')] = (encode(params, tokens), encoder_s,
                                           lambda p=params, e=encode: e(p, tokens))
      log(f'encoder: {encoder_s * 1e3:.1f} ms per batch')
    # Jitted: run op by op, the cache's initialisation compiles each of its operations.
    cache = jax.jit(model.init_cache, static_argnums=3)(
        params, encoders[cfg.kv_heads('encoder')][0], tokens, output_length)
    steppers = (_decode_stepper(model, params, cache, tokens, output_length),
                _attention_stepper(cfg, cache, dtype))
    built.append((name, (k, spec), cfg, cache_nbytes(cache), decoder_param_bytes(params, cfg),
                  encoders[cfg.kv_heads('encoder')][1], steppers))
    del cache, params
    if not rounds:  # time now, then let this variant's caches go
      step_times.append(tuple(_median_time(f, step_repeats) for f in steppers))
      built[-1] = built[-1][:-1] + (None,)
      log(f'{name}: decode step {step_times[-1][0] * 1e3:.2f} ms')
  if rounds:
    log(f'timing decode steps of {len(built)} variants in {rounds} interleaved rounds ...')
    # The bandwidth and matmul probes run in the same rounds: the same phases of the
    # machine.
    probe_bytes, probe = _bandwidth_probe(bandwidth_bytes)
    matmul_flops, matmul = _matmul_probe(matmul_size, dtype)
    *times, probe_s, matmul_s = _time_interleaved(
        [f for b in built for f in b[-1]] + [probe, matmul], step_repeats, rounds)
    step_times = list(zip(times[::2], times[1::2]))
    bandwidth, peak = probe_bytes / probe_s, matmul_flops / matmul_s
    log(f'memory bandwidth: {bandwidth / 1e9:.2f} GB/s; {dtype.name} matmul '
        f'{peak / 1e9:.1f} GFLOP/s')

  records = []
  for (name, (k, spec), cfg, kv_bytes, param_bytes, encoder_s, _), (
      decode_step_s, attention_s) in zip(built, step_times):
    step_bytes = param_bytes + kv_bytes
    flops = info.decode_step_flops(cfg, input_length, output_length, batch_size)
    compute_s, memory_s = flops['total'] / peak, step_bytes / bandwidth
    predicted = max(compute_s, memory_s)
    per_batch = encoder_s + output_length * decode_step_s
    roofline_batch = encoder_s + output_length * predicted
    records.append({
        'name': name, 'num_kv_heads': k, 'time_per_sample_s': per_batch / batch_size,
        'time_per_batch_s': per_batch, 'encoder_s': encoder_s, 'decode_step_s': decode_step_s,
        'kv_cache_bytes': kv_bytes, 'decoder_param_bytes': param_bytes,
        'bytes_per_decode_step': step_bytes, 'bandwidth_bytes_per_s': bandwidth,
        'flops_per_decode_step': flops['total'], 'peak_flops_per_s': peak,
        'compute_s': compute_s, 'memory_s': memory_s,
        'bound': 'compute' if compute_s > memory_s else 'memory',
        'predicted_decode_step_s': predicted,
        'roofline_fraction': predicted / decode_step_s,
        'memory_roofline_fraction': memory_s / decode_step_s,
        'attention_s': attention_s, 'attention_flops': flops['attention'],
        'attention_roofline_fraction': max(flops['attention'] / peak,
                                           kv_bytes / bandwidth) / attention_s,
        'roofline_time_per_sample_s': roofline_batch / batch_size,
        'kv_bytes_per_token': kv_bytes / (batch_size * (input_length + output_length)),
        'kv_layers': spec, 'input_length': input_length, 'output_length': output_length,
        'batch_size': batch_size, 'repeats': repeats, 'step_repeats': step_repeats,
        'rounds': rounds, 'matmul_size': matmul_size, 'dtype': dtype.name,
        'device': describe_device()})
    log(f'{name}: {per_batch / batch_size * 1e3:.1f} ms per sample, '
        f'decode step {decode_step_s * 1e3:.2f} ms, {records[-1]["bound"]}-bound '
        f'(roofline fraction {records[-1]["roofline_fraction"]:.3f}), attention '
        f'{attention_s * 1e3:.2f} ms')
  if hf:
    platform = jax.devices()[0].platform
    why_not = bench_hf.available(platform)
    if why_not:
      raise ValueError(f'--hf: {why_not}.')
    between = None
    if rounds:  # MHA's encoder and decode step, timed again after each peer generate
      mha_step = built[0][-1][0]
      encode_mha = encoders[mha_config.kv_heads('encoder')][2]

      def mha_time_per_batch():
        encoder_s = _median_time(encode_mha, 1)
        return encoder_s + output_length * _median_time(mha_step, min(step_repeats, 5))
      between = mha_time_per_batch
    else:  # variants were timed one at a time and their caches are gone
      del base, encoders
    del built
    log(f'transformers generate, {output_length} tokens, {hf_repeats} round(s)'
        + (' alternating with gqa_jax MHA' if between else '') + ' ...')
    peer = bench_hf.time_generate(config.with_kv_heads(config.num_heads, stacks),
                                  np.asarray(tokens), output_length, platform, hf_repeats,
                                  seed, between=between)
    log(f'transformers: {peer["hf_time_per_sample_s"] * 1e3:.1f} ms per sample')
    for r in records:
      r.update(peer, hf_ratio=peer['hf_time_per_sample_s'] / r['time_per_sample_s'])
    if between:  # MHA's ratio from the same rounds: the median and the spread
      ratios = peer['hf_round_ratios']
      mha = records[0]
      mha.update(hf_ratio=statistics.median(ratios), hf_ratio_min=min(ratios),
                 hf_ratio_max=max(ratios))
  return records


def describe_device() -> str:
  """The first JAX device in words, e.g. 'cpu (2 cores)' or 'gpu NVIDIA H100 80GB HBM3'."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return f'cpu ({os.cpu_count()} cores)'
  return f'{device.platform} {getattr(device, "device_kind", "")}'.strip()


def format_table(records: List[dict]) -> str:
  """A markdown table; ratios are to the MHA record when there is one, else the first."""
  ref = next((r for r in records if r['name'] == 'MHA'), records[0])
  has_hf = 'hf_time_per_sample_s' in ref
  head = ['variant', 'G (KV heads)', 'time per sample (ms)', f'ratio to {ref["name"]}',
          f'speedup over {ref["name"]}', 'decode step (ms)', 'encoder (ms)', 'KV cache (MiB)',
          'bytes per step (MiB)', 'KV bytes per token', 'GFLOP per step', 'bound',
          'predicted step (ms)', 'roofline fraction', 'attention (ms)',
          'attention roofline fraction'] + (
              ['HF time / this'] if has_hf else [])
  lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
  for r in records:
    ratio = r['time_per_sample_s'] / ref['time_per_sample_s']
    cells = [r['name'], str(r['num_kv_heads']), f'{r["time_per_sample_s"] * 1e3:.1f}',
             f'{ratio:.3f}', f'{1 / ratio:.2f}x', f'{r["decode_step_s"] * 1e3:.2f}',
             f'{r["encoder_s"] * 1e3:.1f}', f'{r["kv_cache_bytes"] / 2**20:.2f}',
             f'{r["bytes_per_decode_step"] / 2**20:.1f}',
             f'{r["kv_bytes_per_token"]:,.0f}' if 'kv_bytes_per_token' in r else '']
    if 'bound' in r:  # records written before the compute-aware roofline lack these
      cells += [f'{r["flops_per_decode_step"] / 1e9:.3f}', r['bound'],
                f'{r["predicted_decode_step_s"] * 1e3:.2f}', f'{r["roofline_fraction"]:.3f}',
                f'{r["attention_s"] * 1e3:.2f}', f'{r["attention_roofline_fraction"]:.3f}']
    else:
      cells += ['', '', '', f'{r["roofline_fraction"]:.3f}', '', '']
    if has_hf:
      cells.append(f'{r["hf_ratio"]:.2f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  r = records[0]
  lines.append('')
  lines.append(f'{r.get("device", "")}, {r.get("dtype", "")}: input {r["input_length"]}, '
               f'output {r["output_length"]}, batch {r["batch_size"]}; medians of '
               f'{r["repeats"]} encoder and {r.get("step_repeats", r["repeats"])} decode-step '
               f'runs; memory bandwidth {r["bandwidth_bytes_per_s"] / 1e9:.2f} GB/s'
               + (f' and a {r.get("matmul_size", 2048)}^3 {r.get("dtype", "")} matmul at '
                  f'{r["peak_flops_per_s"] / 1e9:.1f} GFLOP/s' if 'peak_flops_per_s' in r
                  else '') +
               ' measured in the same rounds. time per sample = (encoder + output length x '
               'decode step) / batch; predicted step = max(FLOPs / matmul rate, bytes / '
               'bandwidth), bound = the larger; roofline fraction = predicted / measured '
               'step; attention: the step\'s attention alone (scores and values over every '
               'layer\'s cache, no projections), its fraction max(attention FLOPs / matmul '
               'rate, KV cache / bandwidth) / its time; KV bytes per token = KV cache / '
               '(batch x (input + output length)).')
  if has_hf:
    lines.append(f'HF: transformers {r["hf_version"]} (torch {r["torch_version"]}, '
                 f'{r["hf_device"]}) T5 `generate`, MHA, greedy, exactly '
                 f'{r["output_length"]} new tokens: {r["hf_time_per_sample_s"] * 1e3:.1f} ms '
                 'per sample; "HF time / this" above 1 means gqa_jax is faster'
                 + (f'; against MHA in {len(r["hf_round_ratios"])} alternating rounds: '
                    f'median {r["hf_ratio"]:.2f}, range {r["hf_ratio_min"]:.2f}-'
                    f'{r["hf_ratio_max"]:.2f}' if 'hf_ratio_min' in r else '') + '.')
  return '\n'.join(lines)


def write(records: List[dict], directory: str, title: str = '') -> List[str]:
  """Writes DIRECTORY/decode.json (a list, one record per G), decode.md (the table) and
  decode.png (time per sample vs G beside the roofline prediction); returns the paths.
  `estimate`'s records (nothing measured) get decode.json and decode.md only."""
  estimated = 'estimate' in records[0]
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, f'decode.{ext}')
           for ext in (('json', 'md') if estimated else ('json', 'md', 'png'))]
  table = format_estimates(records) if estimated else format_table(records)
  for path, text in ((paths[0], json.dumps(records, indent=2, default=str)),
                     (paths[1], (f'{title}\n\n' if title else '') + table + '\n')):
    with open(path + '.tmp', 'w') as f:  # a kill while writing leaves the old file or the new
      f.write(text)
    os.replace(path + '.tmp', path)
  if not estimated:
    from gqa_jax.experiments import plots  # matplotlib, only when a figure is written
    plots.decode_time_vs_kv_heads(records, paths[2], title)
  return paths


# == Estimates for a TPU slice we do not have (compile-only) =======================
# The paper's Fig. 6 (T5-XXL, input 2048, output 512, TPUv4; read off the figure, so
# "about"): seconds per sample by G. Its MHA is G = 64.
PAPER_FIG6 = {1: 0.48, 4: 0.47, 8: 0.50, 16: 0.58, 32: 0.80, 64: 2.5}
ESTIMATE_LABEL = 'compiler-count lower-bound estimate, not a measurement'
TIME_PER_SAMPLE_FORMULA = ('output_length x roofline_step_seconds / batch_size: the decode '
                           'steps only (the encoder, the same for every G, is not counted)')
ESTIMATE_KEYS = ('name', 'num_kv_heads', 'kv_layers', 'estimate', 'topology', 'tpu_topology',
                 'device_kind', 'num_devices', 'mesh', 'input_length', 'output_length',
                 'batch_size', 'dtype', 'fits', 'compile_seconds', 'memory_per_device_bytes',
                 'hbm_per_device_bytes', 'model_flops_per_step', 'compiler_flops_per_device',
                 'compiler_bytes_accessed_per_device', 'hand_bytes_per_device',
                 'compiler_to_hand_bytes', 'collectives', 'roofline', 'roofline_step_seconds',
                 'roofline_time_per_sample_s', 'hand_roofline_step_seconds',
                 'hand_roofline_time_per_sample_s', 'time_per_sample_formula',
                 'ratio_to_mha', 'hand_ratio_to_mha', 'chip', 'note')


def _preflight():
  """gqa_jax.preflight, imported only to estimate: it loads the training layer, seconds
  that every other `gqa-jax` command would pay at start-up."""
  from gqa_jax import preflight  # pylint: disable=import-outside-toplevel
  return preflight


def _params_read(params, config: network.T5Config) -> list:
  """The parameters a cached decode step reads: every leaf under `decoder` except the
  cross-attention K/V kernels (`init_cache` projected the encoder output with them once;
  a step reads the cached K/V), plus the token embedding when it is also the logits
  kernel (otherwise only the B rows looked up, ignored here)."""
  read = [v for k, v in traverse_util.flatten_dict(params).items() if k[0] == 'decoder'
          and not ('encoder_decoder_attention' in k and k[-2] in ('key', 'value'))]
  if config.logits_via_embedding:
    read.append(params['token_embedder']['embedding'])
  return read


def decode_step_read_bytes(params, cache, config: network.T5Config) -> dict:
  """Bytes one device should read in one cached decode step, counted by hand from the
  shards of `params` and `cache` (ShapeDtypeStructs with shardings):

    parameters  `_params_read`: the decoder (its logits kernel included) without the
                cross-attention K/V kernels;
    kv_cache    every cached_key / cached_value (self-attention at its full allocated
                length: our attention reads and masks all T positions).
  """
  shard_bytes = _preflight().shard_bytes
  kv = [v for k, v in traverse_util.flatten_dict(cache).items()
        if k[-1] in ('cached_key', 'cached_value')]
  out = {'parameters': shard_bytes(_params_read(params, config)), 'kv_cache': shard_bytes(kv)}
  out['total'] = out['parameters'] + out['kv_cache']
  return out


def _abstract_decode_step(cfg: network.T5Config, mesh, rules, input_length: int,
                          output_length: int, batch_size: int):
  """(jitted decode step, its abstract arguments): the step `benchmark` times, on
  parameters in the activation dtype and a cache from `init_cache`, sharded by `rules`
  (the batch over 'data'; K/V heads over 'model' where they divide it)."""
  dtype = jnp.dtype(cfg.dtype)
  shardings = partitioning.param_shardings(cfg, mesh, rules)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                        network.param_shapes(cfg), shardings)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  rows = partitioning.data_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((batch_size, input_length), jnp.int32, sharding=rows)
  encoded = jax.ShapeDtypeStruct((batch_size, input_length, cfg.emb_dim), dtype)
  shapes = jax.eval_shape(lambda p, e, t: model.init_cache(p, e, t, output_length),
                          params, encoded, tokens)
  axes = {'cached_key': layers.KEY_CACHE_AXES, 'cached_value': layers.CACHE_AXES}

  def place(path, leaf):  # the layers' own logical axes; cache_index is replicated
    spec = PartitionSpec(*axes.get(path[-1].key, ()))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=nn.logical_to_mesh_sharding(spec, mesh, rules))
  cache = jax.tree_util.tree_map_with_path(place, shapes)
  step_tokens = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32, sharding=rows)
  # jit drops unused arguments (keep_unused=False): the encoder's weights and the
  # cross-attention K/V kernels reach the compiled step only if it reads them.
  step = jax.jit(lambda p, enc, x, c: model.tokens_to_logits(p, enc, output_length)(x, c),
                 donate_argnums=3)
  return step, (params, tokens, step_tokens, cache)


def _estimate_variant(name: str, k: int, spec: Optional[str], cfg: network.T5Config,
                      topology, mesh, input_length: int, output_length: int,
                      batch_size: int) -> dict:
  """One record of `estimate` (see its docstring); `fits` False, and no figures, when the
  compiler runs out of HBM."""
  preflight = _preflight()
  rules = partitioning.standard_logical_axis_rules(cfg, mesh)
  fn, args = _abstract_decode_step(cfg, mesh, rules, input_length, output_length,
                                   batch_size)
  params, tokens, step_tokens, cache = args
  hand = decode_step_read_bytes(params, cache, cfg)
  record = dict.fromkeys(ESTIMATE_KEYS)
  record.update(
      name=name, num_kv_heads=k, kv_layers=spec, estimate=ESTIMATE_LABEL,
      topology=topology.name, tpu_topology=topology.tpu_topology,
      device_kind=topology.devices[0].device_kind, num_devices=len(topology.devices),
      mesh={a: int(n) for a, n in mesh.shape.items()}, input_length=input_length,
      output_length=output_length, batch_size=batch_size, dtype=jnp.dtype(cfg.dtype).name,
      hbm_per_device_bytes=topology.hbm_bytes,
      model_flops_per_step=info.decode_step_flops(cfg, input_length, output_length,
                                                  batch_size)['total'],
      hand_bytes_per_device=hand, time_per_sample_formula=TIME_PER_SAMPLE_FORMULA,
      chip=None if topology.chip is None else dataclasses.asdict(topology.chip),
      note=f'Every figure is a {ESTIMATE_LABEL}: the compiler\'s counts for '
           f'{topology.name}\'s devices over the chip\'s published peak figures '
           '(preflight.CHIPS); nothing ran.')
  with partitioning.mesh_context(mesh, rules), warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='.*donated buffers.*')
    lowered = fn.lower(*args)
    start = time.perf_counter()
    try:
      with preflight.no_cache_writes(bool(topology.tpu_topology)):
        compiled = lowered.compile()
    except Exception as e:  # XLA's JaxRuntimeError; only running out of memory is ours
      if not preflight.is_out_of_memory(e):
        raise
      needed, available = preflight.parse_out_of_memory(str(e))
      record.update(fits=False, compile_seconds=time.perf_counter() - start,
                    error=str(e).strip().splitlines()[0], needed_bytes=needed,
                    available_bytes=available)
      return record
  record['compile_seconds'] = time.perf_counter() - start
  memory = preflight.memory_per_device(compiled, {
      'parameters': _params_read(params, cfg), 'batch': (tokens, step_tokens)})
  memory.pop('optimizer_state')
  memory['kv_cache'] = hand['kv_cache']
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  hlo = compiled.as_text() or ''
  record.update(
      fits=True if topology.tpu_topology else None, memory_per_device_bytes=memory,
      compiler_flops_per_device=float(cost.get('flops', 0.0)),
      compiler_bytes_accessed_per_device=float(cost.get('bytes accessed', 0.0)),
      collectives=preflight.parse_collectives(hlo),
      hlo_while_loops=preflight.while_trip_counts(hlo))
  record['compiler_to_hand_bytes'] = record['compiler_bytes_accessed_per_device'] / hand['total']
  record.update(preflight.roofline(record, topology.chip))
  # The same bound with the hand-counted bytes as the HBM term: what a step that read
  # each byte it needs once would take (the compiler's count adds layout copies,
  # prefetches into on-chip memory and whole-operand charges for gathers).
  hand_record = dict(record, compiler_bytes_accessed_per_device=hand['total'])
  record['hand_roofline_step_seconds'] = preflight.roofline(
      hand_record, topology.chip)['roofline_step_seconds']
  per_sample = lambda step_s: None if step_s is None else output_length * step_s / batch_size
  record['roofline_time_per_sample_s'] = per_sample(record['roofline_step_seconds'])
  record['hand_roofline_time_per_sample_s'] = per_sample(record['hand_roofline_step_seconds'])
  return record


def estimate(config: network.T5Config, input_length: int, output_length: int,
             batch_size: int, topology, num_kv_heads: Optional[Sequence[int]] = None,
             stacks: Sequence[str] = network.PAPER_STACKS, kv_layers: Sequence[str] = (),
             mesh_model: int = 1, paper: Optional[dict] = None,
             log: Optional[Callable[[str], None]] = None) -> List[dict]:
  """Compiler-count lower-bound ESTIMATES of `benchmark`'s decode step on a TPU slice
  (nothing runs, nothing is allocated): one record per variant, MHA first.

  Each variant's cached decode step (`tokens_to_logits`, batch [B, 1], on a cache from
  `init_cache`: the step `benchmark` times) is lowered from abstract parameters and cache
  and compiled for `topology`'s compile-only devices (a name for
  `preflight.get_topology`, or a Topology), on a mesh of data = devices / mesh_model x
  model = mesh_model with the standard partitioning rules (the cache's batch axis over
  'data'). Per device, from the compiler: `compiler_flops_per_device` and
  `compiler_bytes_accessed_per_device` (cost_analysis), `memory_per_device_bytes`
  (arguments, temporaries ...; `kv_cache` and `parameters` are the hand-counted shards),
  `collectives`. Then:

    hand_bytes_per_device   what the step should read, counted by hand
                            (`decode_step_read_bytes`); compiler_to_hand_bytes is the
                            compiler's bytes over it (1.0: it reads each byte once).
    roofline_step_seconds   max(FLOPs / peak, bytes / HBM bandwidth, collective bytes /
                            ICI bandwidth) from the chip's published figures
                            (`preflight.roofline`; FLOPs: the larger of the compiler's and
                            the model's per device), each term in `roofline`.
    roofline_time_per_sample_s  output_length x roofline_step_seconds / batch_size.
    hand_roofline_step_seconds, hand_roofline_time_per_sample_s  the same with the
                            hand-counted bytes as the HBM term.
    ratio_to_mha, hand_ratio_to_mha  roofline_time_per_sample_s (hand_...) over MHA's
                            (else the first record's).

  `paper` ({G: seconds per sample}, e.g. PAPER_FIG6) adds the paper's measured numbers,
  `paper_time_per_sample_s` and `paper_ratio_to_mha` (its G = num_heads over MHA's),
  beside them. A variant that does not fit HBM gets `fits` False, the compiler's
  `needed_bytes`, and no figures.

  Raises:
    ConfigError: no libtpu, an unknown topology, or a mesh the batch or the model does
      not split over.
  """
  preflight = _preflight()
  log = log or (lambda _: None)
  wanted, by_k = select_variants(config, num_kv_heads, stacks, kv_layers)
  if not isinstance(topology, preflight.Topology):
    topology = preflight.get_topology(topology)
  devices = len(topology.devices)
  if isinstance(mesh_model, bool) or not isinstance(mesh_model, int) or (
      mesh_model < 1 or devices % mesh_model):
    raise ConfigError(f'--mesh-model {mesh_model}: must divide the {devices} devices of '
                      f'{topology.name}; use one of '
                      f'{[d for d in range(1, devices + 1) if devices % d == 0]}.')
  mesh = preflight.make_mesh(topology, -1, mesh_model)
  data = mesh.shape['data']
  if batch_size % data:
    raise ConfigError(f'--batch-size {batch_size} does not split over the {data} data-'
                      f'parallel devices of {topology.name} (--mesh-model {mesh_model}): '
                      f'use a multiple of {data}.')
  records = []
  for k, spec in wanted:
    name, cfg = by_k[(k, spec)]
    log(f'{name}: compiling the decode step for {topology.name} (mesh data {data} x model '
        f'{mesh_model}) ...')
    records.append(_estimate_variant(name, k, spec, cfg, topology, mesh, input_length,
                                     output_length, batch_size))
    r = records[-1]
    bound = r['roofline']['bound'] if r['roofline'] else None
    log(f'{name}: ' + ('does not fit HBM' if r['fits'] is False else
                       f'roofline step {_ms(r["roofline_step_seconds"])} '
                       f'({bound or "no chip figures"}), compiled in '
                       f'{r["compile_seconds"]:.1f} s') + ' (estimate)')
  ref = next((r for r in records if r['name'] == 'MHA'), records[0])
  for r in records:
    for ratio, time_key in (('ratio_to_mha', 'roofline_time_per_sample_s'),
                            ('hand_ratio_to_mha', 'hand_roofline_time_per_sample_s')):
      both = r[time_key], ref[time_key]
      r[ratio] = both[0] / both[1] if None not in both else None
  if paper:
    mha = paper.get(config.num_heads)
    for r in records:
      seconds = paper.get(r['num_kv_heads']) if not r['kv_layers'] else None
      r['paper_time_per_sample_s'] = seconds
      r['paper_ratio_to_mha'] = seconds / mha if seconds and mha else None
  return records


def _ms(seconds: Optional[float]) -> str:
  return '-' if seconds is None else f'{seconds * 1e3:.3g} ms'


def format_estimates(records: List[dict]) -> str:
  """A markdown table of `estimate`'s records, every figure labelled as an estimate."""
  r0 = records[0]
  ref = next((r for r in records if r['name'] == 'MHA'), r0)
  has_paper = 'paper_time_per_sample_s' in r0
  gib = lambda n: '-' if n is None else f'{n / 2**30:.4g}'
  head = ['variant', 'G (KV heads)', 'compiler GFLOP / device', 'compiler GiB / device',
          'hand-counted GiB / device', 'compiler / hand bytes', 'arguments GiB / device',
          'temporaries GiB / device', 'collective GiB / device', 'compute ms', 'HBM ms',
          'ICI ms', 'roofline step ms', 'bound', 'time per sample s (estimate)',
          f'ratio to {ref["name"]} (estimate)', 'time per sample s, hand-counted bytes '
          '(estimate)', f'ratio to {ref["name"]}, hand-counted bytes (estimate)']
  figures = len(head) - 2
  if has_paper:
    head += ['paper Fig. 6 s per sample (measured)', 'paper ratio to MHA']
  lines = [f'**ESTIMATES, not measurements**: compiler counts (XLA cost_analysis, '
           f'memory_analysis, optimised HLO) of the decode step compiled for '
           f'{r0["topology"]}\'s compile-only devices ({r0["num_devices"]} x '
           f'{r0["device_kind"]}, mesh data {r0["mesh"]["data"]} x model '
           f'{r0["mesh"]["model"]}) over the chip\'s published peak figures: lower bounds on '
           'time.', '', '| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
  num = lambda v, f: '-' if v is None else format(v, f)
  for r in records:
    cells = [r['name'], str(r['num_kv_heads'])]
    if r['fits'] is False:
      needs = info.format_bytes(r['needed_bytes']) if r.get('needed_bytes') else 'more'
      cells += [f'does not fit HBM: needs {needs} per device'] + [''] * (figures - 1)
    else:
      t = r['roofline']
      cells += [num(r['compiler_flops_per_device'] / 1e9, '.4g'),
                gib(r['compiler_bytes_accessed_per_device']),
                gib(r['hand_bytes_per_device']['total']),
                num(r['compiler_to_hand_bytes'], '.3f'),
                gib(r['memory_per_device_bytes']['arguments']),
                gib(r['memory_per_device_bytes']['temporaries']),
                gib(sum(c['bytes'] for c in r['collectives'].values())),
                *(num(None if t[f'{p}_seconds'] is None else t[f'{p}_seconds'] * 1e3, '.4g')
                  for p in ('compute', 'hbm', 'ici')),
                num(None if r['roofline_step_seconds'] is None
                    else r['roofline_step_seconds'] * 1e3, '.4g'), t['bound'] or '-',
                num(r['roofline_time_per_sample_s'], '.4g'), num(r['ratio_to_mha'], '.3f'),
                num(r['hand_roofline_time_per_sample_s'], '.4g'),
                num(r['hand_ratio_to_mha'], '.3f')]
    if has_paper:
      cells += [num(r['paper_time_per_sample_s'], '.2f'), num(r['paper_ratio_to_mha'], '.3f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  chip = r0['chip'] or {}
  lines += ['', f'{r0["dtype"]}: input {r0["input_length"]}, output {r0["output_length"]}, '
            f'batch {r0["batch_size"]}. Per device: compiler bytes = XLA\'s bytes accessed; '
            'hand-counted = the decoder\'s weights without the cross-attention K/V kernels '
            '(the step reads the cached K/V) + its shard of the KV cache. roofline step = '
            'max(compute = FLOPs / peak, HBM = compiler bytes / HBM bandwidth, ICI = '
            'collective bytes / ICI bandwidth)' + (
                f' with {chip["name"]}\'s {chip["peak_flops"] / 1e12:.0f} TFLOP/s, '
                f'{chip["hbm_bandwidth"] / 1e9:.0f} GB/s HBM, {chip["ici_bandwidth"] / 1e9:.0f} '
                f'GB/s ICI ({chip["source"]})' if chip else '') +
            '; time per sample = output length x roofline step / batch (decode steps only, '
            'no encoder): a lower bound, not a measurement; with hand-counted bytes: the '
            'same with the hand count as the HBM term.']
  if has_paper:
    lines.append('Paper: Ainslie et al. 2023, Fig. 6 (T5-XXL on TPUv4, input 2048, output '
                 '512; values read off the figure, about), measured end to end; its MHA is '
                 'G = 64. Compare ratios, not seconds.')
  return '\n'.join(lines)
