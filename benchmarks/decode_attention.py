"""Benchmark: formulations of one decode step's attention (one query position over a
KV cache) per KV-head count G, timed in interleaved rounds.

    python benchmarks/decode_attention.py [--batch 4] [--heads 16] [--head-dim 32]
        [--lengths 2048,512] [--layers 24] [--kv-heads 16,8,4,2,1] [--rounds 7]
        [--output DIR]

Each call attends over `--layers` caches of each length (a decode step's self- and
cross-attention of every decoder layer: the defaults are the cpu-paper preset's), so that
the caches come from memory, not from the processor's caches.

Forms (all give the same [B, 1, N, H], checked against the first before timing; R = N / G
query heads per KV head):
  layers      layers.grouped_dot_product_attention, kv_layout='cache': what decoding runs,
              on the decode cache's layout, keys [B, K, H, S] (length-minor) and values
              [B, K, S, H]: one [R, H] x [H, S] product per (batch, KV head) for the scores.
  one-einsum  the general path on keys [B, K, S, H]: one einsum 'BTKRH,BKSH->BKRTS', an
              [R, H] x [S, H]^T product per (batch, KV head), and its transpose for the values.
  matvec      R matrix-vector products per (batch, KV head), each streaming the cache.
  matmul      one [S, H] x [H, R] product per (batch, KV head) (batch and KV heads
              flattened), then [R, S] x [S, H] for the values.
  sdpa        jax.nn.dot_product_attention (implementation='xla') on the cache transposed to
              [B, S, K, H] (the transpose is part of the timed call).
All forms but `layers` read keys [B, K, S, H], the layout decoding used before.
Bytes: the K/V cache read once (B x K x S x H x 2 x 4 bytes per length and layer); the
table also reports those bytes over the time of a jitted float32 sum of --probe-mib MiB
timed in the same rounds (the bandwidth probe of `gqa-jax bench decode`: the fraction of
the memory roofline), and each form's time over one-einsum's at the same G.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax import layers
from gqa_jax.experiments import bench


def forms(n: int):
  def split(q, k):
    b, _, _, h = q.shape
    return q.reshape(b, k.shape[1], n // k.shape[1], h)  # [B, K, R, H]

  def one_einsum(q, k, v):
    b, t, _, h = q.shape
    q = q.reshape(b, t, k.shape[1], n // k.shape[1], h)
    weights = jax.nn.softmax(jnp.einsum('BTKRH,BKSH->BKRTS', q, k))
    return jnp.einsum('BKRTS,BKSH->BTKRH', weights, v).reshape(b, t, n, h)

  def matvec(q, k, v):
    q = split(q, k)
    logits = jnp.stack([jnp.einsum('BKH,BKSH->BKS', q[:, :, i], k)
                        for i in range(q.shape[2])], 2)
    weights = jax.nn.softmax(logits)
    out = jnp.stack([jnp.einsum('BKS,BKSH->BKH', weights[:, :, i], v)
                     for i in range(q.shape[2])], 2)
    return out.reshape(q.shape[0], 1, n, q.shape[-1])

  def matmul(q, k, v):
    q = split(q, k)
    b, g, r, h = q.shape
    s = k.shape[2]
    logits = jnp.matmul(k.reshape(b * g, s, h), q.reshape(b * g, r, h).transpose(0, 2, 1))
    weights = jax.nn.softmax(logits, axis=1).transpose(0, 2, 1)  # [BK, R, S]
    return jnp.matmul(weights, v.reshape(b * g, s, h)).reshape(b, 1, n, h)

  def sdpa(q, k, v):
    return jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                        scale=1.0, implementation='xla')
  return {'layers': lambda q, k, v: layers.grouped_dot_product_attention(
      q, k, v, kv_layout='cache'), 'one-einsum': one_einsum, 'matvec': matvec,
          'matmul': matmul, 'sdpa': sdpa}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--head-dim', type=int, default=32)
  parser.add_argument('--lengths', default='2048,512', help='cache lengths (cross, self)')
  parser.add_argument('--layers', type=int, default=24, help='caches of each length')
  parser.add_argument('--kv-heads', default='16,8,4,2,1')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--calls', type=int, default=3, help='timed calls per round')
  parser.add_argument('--probe-mib', type=int, default=256, help='bandwidth probe size')
  parser.add_argument('--output', default=None)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  n, h, b = args.heads, args.head_dim, args.batch
  lengths = [int(x) for x in args.lengths.split(',')] * args.layers
  cases = []
  for g in [int(x) for x in args.kv_heads.split(',')]:
    q = jnp.asarray(rng.standard_normal((b, 1, n, h)), jnp.float32)
    caches = [(jnp.asarray(rng.standard_normal((b, g, s, h)), jnp.float32),
               jnp.asarray(rng.standard_normal((b, g, s, h)), jnp.float32)) for s in lengths]
    # The decode cache's layout: the same keys, length-minor.
    cache_layout = [(jnp.swapaxes(k, 2, 3).copy(), v) for k, v in caches]
    reference = None
    for name, fn in forms(n).items():
      step = jax.jit(lambda q, caches, fn=fn: [fn(q, k, v) for k, v in caches])
      arrays = cache_layout if name == 'layers' else caches
      out = step(q, arrays)
      if reference is None:
        reference = out
      for a, r in zip(out, reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-4, atol=2e-5)
      nbytes = sum(k.nbytes + v.nbytes for k, v in caches)
      cases.append({'kv_heads': g, 'form': name, 'cache_bytes': nbytes,
                    'call': (lambda step=step, q=q, arrays=arrays: step(q, arrays)),
                    'times': []})
    del caches, cache_layout
  probe_bytes, probe = bench._bandwidth_probe(args.probe_mib << 20)
  probe_times = []
  for _ in range(args.rounds):
    for case in cases + [{'call': probe, 'times': probe_times}]:
      for _ in range(args.calls):
        start = time.perf_counter()
        jax.block_until_ready(case['call']())
        case['times'].append(time.perf_counter() - start)
  bandwidth = probe_bytes / statistics.median(probe_times)
  records = []
  for case in cases:
    seconds = statistics.median(case['times'])
    records.append({k: v for k, v in case.items() if k not in ('call', 'times')} |
                   {'seconds': seconds, 'bytes_per_second': case['cache_bytes'] / seconds,
                    'bandwidth_bytes_per_s': bandwidth})
  base = {r['kv_heads']: r['seconds'] for r in records if r['form'] == 'one-einsum'}
  lines = ['| G | form | time (ms) | cache (MiB) | GB/s | of bandwidth | time / one-einsum |',
           '|---:|---|---:|---:|---:|---:|---:|']
  for r in records:
    lines.append(f"| {r['kv_heads']} | {r['form']} | {r['seconds'] * 1e3:.3f} | "
                 f"{r['cache_bytes'] / 2**20:.1f} | {r['bytes_per_second'] / 1e9:.1f} | "
                 f"{r['bytes_per_second'] / bandwidth:.2f} | "
                 f"{r['seconds'] / base[r['kv_heads']]:.2f} |")
  lines += ['', f'{jax.devices()[0].platform}, float32, batch {b}, {n} query heads x {h}, '
            f'{args.layers} caches of each length {args.lengths}; medians of {args.rounds} '
            f'interleaved rounds x {args.calls} calls; memory bandwidth '
            f'{bandwidth / 1e9:.2f} GB/s (a jitted sum of {args.probe_mib} MiB, the same '
            'rounds).']
  table = '\n'.join(lines) + '\n'
  print(table)
  if args.output:
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / 'decode_attention.json').write_text(json.dumps(records, indent=2))
    (out / 'decode_attention.md').write_text(table)


if __name__ == '__main__':
  main()
