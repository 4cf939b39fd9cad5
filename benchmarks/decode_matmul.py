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
(the fraction of the roofline, since every case is memory-bound at these M), FLOP rate.
"""

import argparse
import json
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', default='1,2,4,8', help='rows M of x')
  parser.add_argument('--shapes', default='512x512,512x1024,1024x512,512x32128',
                      help='DxF weight shapes (defaults: the cpu-paper preset\'s attention, '
                           'MLP in, MLP out and logits kernels)')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--min-mib', type=int, default=64,
                      help='weights read per timed call, at least (MiB)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--calls', type=int, default=2, help='timed calls per round')
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
                      'times': []})
  probe_bytes, probe = bench._bandwidth_probe(bench.default_bandwidth_bytes())
  matmul_flops, matmul = bench._matmul_probe(bench.default_matmul_size(), dtype)
  probes = {'bandwidth': [], 'matmul': []}
  for _ in range(args.rounds):
    for case in cases:
      for _ in range(args.calls):
        start = time.perf_counter()
        jax.block_until_ready(case['call']())
        case['times'].append(time.perf_counter() - start)
    for name, fn in (('bandwidth', probe), ('matmul', matmul)):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      probes[name].append(time.perf_counter() - start)
  bandwidth = probe_bytes / statistics.median(probes['bandwidth'])
  peak = matmul_flops / statistics.median(probes['matmul'])
  records = []
  for case in cases:
    seconds = statistics.median(case['times'])
    rate = case['weight_bytes'] / seconds
    flops = 2 * case['batch'] * case['d'] * case['f'] * case['matrices']
    records.append({k: v for k, v in case.items() if k not in ('call', 'times')} | {
        'seconds_per_matrix': seconds / case['matrices'], 'bytes_per_second': rate,
        'bandwidth_fraction': rate / bandwidth, 'flops_per_second': flops / seconds})
  lines = ['| M | D x F | form | time per matrix (us) | GB/s | of bandwidth | GFLOP/s |',
           '|---:|---|---|---:|---:|---:|---:|']
  for r in records:
    lines.append(f"| {r['batch']} | {r['d']} x {r['f']} | {r['form']} | "
                 f"{r['seconds_per_matrix'] * 1e6:.0f} | {r['bytes_per_second'] / 1e9:.1f} | "
                 f"{r['bandwidth_fraction']:.2f} | {r['flops_per_second'] / 1e9:.1f} |")
  lines += ['', f'{bench.describe_device()}, {dtype.name}; medians of {args.rounds} '
            f'interleaved rounds x {args.calls} calls; memory bandwidth '
            f'{bandwidth / 1e9:.2f} GB/s and a {bench.default_matmul_size()}^3 matmul at '
            f'{peak / 1e9:.1f} GFLOP/s measured in the same rounds.']
  table = '\n'.join(lines) + '\n'
  print(table)
  if args.output:
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / 'decode_matmul.json').write_text(json.dumps(
        {'bandwidth_bytes_per_second': bandwidth, 'peak_flops_per_second': peak,
         'records': records}, indent=2))
    (out / 'decode_matmul.md').write_text(table)


if __name__ == '__main__':
  main()
