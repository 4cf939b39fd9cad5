"""Benchmark: the decode step's weight products x [M, D] @ W [D, F] at a small batch M,
against the memory bandwidth and the large-matmul FLOP rate probed in the same rounds.

    python benchmarks/decode_matmul.py [--batch 1,2,4,8] [--shapes 512x512,512x1024,...]
        [--dtype float32] [--rounds 5] [--output DIR]

A decode step multiplies a few activation rows by every weight matrix of the decoder once:
at batch M its arithmetic intensity is about M / 2 FLOPs per float32 weight byte, so the
roofline says it is memory-bound below the machine's ridge point and should stream the
weights at the bandwidth. This measures what a jitted product actually streams, per shape
(each case chains enough distinct weight matrices of that shape to read --min-mib, so
the weights come from memory, not from cache), in three forms giving the same [M, F]:

  dot         x @ W, W stored [D, F] as T5X stores kernels: what `layers.Dense` runs.
  transposed  the same product with W stored transposed, [F, D] (contracting its last axis).
  rows        M matrix-vector products x[m] @ W.

Reported: time per matrix, weight bytes / time (GB/s), that rate over the bandwidth probe
(the fraction of the roofline, since every case is memory-bound at these M), FLOP rate,
and the cores the product kept busy (process CPU time / wall time over its timed calls).

A second table (--layer-kv-heads, per batch M) chains the weight products of --layers
decoder layers of the cpu-paper preset (self-attention q, k, v, o; cross-attention q, o;
gated MLP wi_0, wi_1, wo), once as separate products (what a decode step runs) and once
with q|k|v and wi_0|wi_1 concatenated into one kernel each (fewer, larger products), at
each KV-head count: which way of issuing the products streams the weights faster.
"""

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.experiments import bench

FORMS = {
    'dot': lambda x, w: x @ w,
    'transposed': lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))),
    'rows': lambda x, w: jnp.stack([x[m] @ w for m in range(x.shape[0])]),
}


def chained(form: str):
  """A jitted product of x with every matrix of a list, each result summed into x's first
  columns (a dependency between the products, so none is skipped or reordered away)."""
  product = FORMS[form]

  @jax.jit
  def run(x, weights):
    for w in weights:
      y = product(x, w)
      width = min(x.shape[1], y.shape[1])
      x = x.at[:, :width].add(y[:, :width] * 1e-3)
    return x
  return run


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def decoder_layers(config, num_layers: int, kv_heads: int, rng, dtype):
  """Random kernels of `num_layers` decoder layers of `config`'s widths ({name: [D, F]}),
  and the same kernels with q|k|v and wi_0|wi_1 concatenated along F."""
  emb, mlp = config.emb_dim, config.mlp_dim
  kv = kv_heads * config.head_dim

  def kernel(d, f):
    return jnp.asarray(rng.standard_normal((d, f)) * 0.02, dtype)
  separate = [{'q': kernel(emb, emb), 'k': kernel(emb, kv), 'v': kernel(emb, kv),
               'o': kernel(emb, emb), 'cross_q': kernel(emb, emb), 'cross_o': kernel(emb, emb),
               'wi_0': kernel(emb, mlp), 'wi_1': kernel(emb, mlp), 'wo': kernel(mlp, emb)}
              for _ in range(num_layers)]
  fused = [{'qkv': jnp.concatenate([w['q'], w['k'], w['v']], axis=1),
            'wi': jnp.concatenate([w['wi_0'], w['wi_1']], axis=1),
            **{n: w[n] for n in ('o', 'cross_q', 'cross_o', 'wo')}} for w in separate]
  return separate, fused


@jax.jit
def layer_chain(x, layers):
  """The products of a decode step's decoder layers in order (attention itself replaced by
  a sum of q with the group-broadcast k and v, so that every product feeds the next)."""
  emb = x.shape[1]
  for w in layers:
    if 'qkv' in w:
      qkv = x @ w['qkv']
      kv = (qkv.shape[1] - emb) // 2
      q, k, v = qkv[:, :emb], qkv[:, emb:emb + kv], qkv[:, emb + kv:]
    else:
      q, k, v = x @ w['q'], x @ w['k'], x @ w['v']
    x = x + (q + jnp.tile(k + v, (1, emb // k.shape[1]))) @ w['o']
    x = x + (x @ w['cross_q']) @ w['cross_o']
    if 'wi' in w:
      hidden = x @ w['wi']
      gate, linear = jnp.split(hidden, 2, axis=1)
    else:
      gate, linear = x @ w['wi_0'], x @ w['wi_1']
    x = x + (jax.nn.gelu(gate) * linear) @ w['wo']
  return x


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', default='1,2,4,8', help='rows M of x')
  parser.add_argument('--shapes',
                      default='512x512,512x1024,1024x512,512x1536,512x2048,512x32128',
                      help='DxF weight shapes (defaults: the cpu-paper preset\'s attention, MLP in, '
                           'MLP out kernels, MHA\'s q|k|v and wi_0|wi_1 fused, logits)')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--min-mib', type=int, default=64,
                      help='weights read per timed call, at least (MiB)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--calls', type=int, default=2, help='timed calls per round')
  parser.add_argument('--layers', type=int, default=24,
                      help='decoder layers in the layer-chain table (0: skip it)')
  parser.add_argument('--layer-kv-heads', default='16,8,1',
                      help='KV-head counts of the layer-chain table')
  parser.add_argument('--layer-batch', default='1,4', help='rows M of the layer-chain table')
  parser.add_argument('--output', default=None)
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  cases = []
  for shape in args.shapes.split(','):
    d, f = (int(v) for v in shape.split('x'))
    copies = max(1, -(-(args.min_mib << 20) // (d * f * dtype.itemsize)))
    stored = [rng.standard_normal((d, f)).astype(np.float32) * 0.02 for _ in range(copies)]
    weights = {'dot': [jnp.asarray(w, dtype) for w in stored]}
    weights['rows'] = weights['dot']
    weights['transposed'] = [jnp.asarray(w.T.copy(), dtype) for w in stored]
    for m in (int(v) for v in args.batch.split(',')):
      x = jnp.asarray(rng.standard_normal((m, d)), dtype)
      reference = None
      for form in FORMS:
        run = chained(form)
        out = np.asarray(run(x, weights[form]), np.float32)
        if reference is None:
          reference = out
        np.testing.assert_allclose(out, reference, rtol=1e-2, atol=1e-3)
        cases.append({'batch': m, 'd': d, 'f': f, 'form': form, 'matrices': copies,
                      'weight_bytes': copies * d * f * dtype.itemsize,
                      'call': (lambda run=run, x=x, w=weights[form]: run(x, w)),
                      'times': [], 'cpu': []})
  chains = []
  layer_config = bench.PRESETS['cpu-paper'].config
  for k in (int(v) for v in args.layer_kv_heads.split(',')) if args.layers else ():
    separate, fused = decoder_layers(layer_config, args.layers, k, rng, dtype)
    for m in (int(v) for v in args.layer_batch.split(',')):
      x = jnp.asarray(rng.standard_normal((m, layer_config.emb_dim)), dtype)
      outs = [np.asarray(layer_chain(x, layers), np.float32) for layers in (separate, fused)]
      np.testing.assert_allclose(outs[1], outs[0], rtol=1e-2, atol=1e-3)
      for form, layers in (('separate', separate), ('fused qkv, wi', fused)):
        chains.append({'batch': m, 'kv_heads': k, 'form': form, 'layers': args.layers,
                       'weight_bytes': sum(int(v.nbytes) for w in layers for v in w.values()),
                       'products': sum(len(w) for w in layers),
                       'call': (lambda x=x, layers=layers: layer_chain(x, layers)),
                       'times': [], 'cpu': []})
  probe_bytes, probe = bench._bandwidth_probe(bench.default_bandwidth_bytes())
  matmul_flops, matmul = bench._matmul_probe(bench.default_matmul_size(), dtype)
  probes = {'bandwidth': [], 'matmul': []}
  for _ in range(args.rounds):
    for case in cases + chains:
      for _ in range(args.calls):
        cpu, start = _cpu_seconds(), time.perf_counter()
        jax.block_until_ready(case['call']())
        case['times'].append(time.perf_counter() - start)
        case['cpu'].append(_cpu_seconds() - cpu)
    for name, fn in (('bandwidth', probe), ('matmul', matmul)):
      jax.block_until_ready(fn())  # untimed: the first call after other work runs slow
      for _ in range(args.calls):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        probes[name].append(time.perf_counter() - start)
  bandwidth = probe_bytes / statistics.median(probes['bandwidth'])
  peak = matmul_flops / statistics.median(probes['matmul'])
  def measured(case):
    seconds = statistics.median(case['times'])
    rate = case['weight_bytes'] / seconds
    return {k: v for k, v in case.items() if k not in ('call', 'times', 'cpu')} | {
        'seconds': seconds, 'bytes_per_second': rate, 'bandwidth_fraction': rate / bandwidth,
        'cores_busy': sum(case['cpu']) / sum(case['times'])}
  records = []
  for case in cases:
    r = measured(case)
    flops = 2 * case['batch'] * case['d'] * case['f'] * case['matrices']
    records.append(r | {'seconds_per_matrix': r['seconds'] / case['matrices'],
                        'flops_per_second': flops / r['seconds']})
  chain_records = [measured(case) for case in chains]
  lines = ['| M | D x F | form | time per matrix (us) | GB/s | of bandwidth | GFLOP/s | cores '
           'busy |', '|---:|---|---|---:|---:|---:|---:|---:|']
  for r in records:
    lines.append(f"| {r['batch']} | {r['d']} x {r['f']} | {r['form']} | "
                 f"{r['seconds_per_matrix'] * 1e6:.0f} | {r['bytes_per_second'] / 1e9:.1f} | "
                 f"{r['bandwidth_fraction']:.2f} | {r['flops_per_second'] / 1e9:.1f} | "
                 f"{r['cores_busy']:.2f} |")
  if chain_records:
    lines += ['', f'{args.layers} decoder layers of cpu-paper kernels (emb '
              f'{layer_config.emb_dim}, {layer_config.num_heads} heads x '
              f'{layer_config.head_dim}, mlp {layer_config.mlp_dim}), their products chained '
              'as in a decode step:', '',
              '| M | KV heads | products | weights (MiB) | time (ms) | GB/s | of bandwidth | '
              'cores busy |', '|---:|---:|---|---:|---:|---:|---:|---:|']
    for r in chain_records:
      lines.append(f"| {r['batch']} | {r['kv_heads']} | {r['products']} {r['form']} | "
                   f"{r['weight_bytes'] / 2**20:.1f} | {r['seconds'] * 1e3:.2f} | "
                   f"{r['bytes_per_second'] / 1e9:.1f} | {r['bandwidth_fraction']:.2f} | "
                   f"{r['cores_busy']:.2f} |")
  lines += ['', f'{bench.describe_device()}, {dtype.name}; medians of {args.rounds} '
            f'interleaved rounds x {args.calls} calls; memory bandwidth '
            f'{bandwidth / 1e9:.2f} GB/s and a {bench.default_matmul_size()}^3 matmul at '
            f'{peak / 1e9:.1f} GFLOP/s measured in the same rounds; cores busy = process '
            'CPU time / wall time over the timed calls.']
  table = '\n'.join(lines) + '\n'
  print(table)
  if args.output:
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / 'decode_matmul.json').write_text(json.dumps(
        {'bandwidth_bytes_per_second': bandwidth, 'peak_flops_per_second': peak,
         'records': records, 'layer_chains': chain_records}, indent=2))
    (out / 'decode_matmul.md').write_text(table)


if __name__ == '__main__':
  main()
