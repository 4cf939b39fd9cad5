"""Benchmark: what each conversion method costs on one K/V kernel of a given shape (default
T5-XXL's: D 4096, 64 heads x 64), per number of KV heads G, on the CPU (the converter runs
its math in NumPy float64).

    python benchmarks/convert_methods.py [--emb 4096] [--heads 64] [--head-dim 64]
        [--kv-heads 8,1] [--calibrated] [--output DIR]

For each G: mean pooling (the reference), svd and procrustes over the G groups of one kernel
(`lowrank.svd_group`, `lowrank.procrustes_group`, each group's maps folded into its query
kernels: `lowrank.fold_query`), and for G > 1 the similarity grouping's affinity and search
(`lowrank.affinity`, `lowrank.search_groups`). --calibrated adds a random [D, D] second
moment (the cost of whitening). A kernel of a checkpoint is converted once per K and V of
every attention module: multiply by 2 x layers x attention modules for a whole model.
Weights are random normal: the costs do not depend on the values.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from gqa_jax import lowrank


def timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--emb', type=int, default=4096)
  parser.add_argument('--heads', type=int, default=64)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--kv-heads', default='8,1')
  parser.add_argument('--calibrated', action='store_true')
  parser.add_argument('--output', default=None)
  args = parser.parse_args()
  d, n, h = args.emb, args.heads, args.head_dim
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((n, d, h)) * 0.02  # [N, D, H] per head
  query = rng.standard_normal((n, d, h)) * 0.02
  calibration = None
  if args.calibrated:
    x = rng.standard_normal((2 * d, d))
    calibration = x.T @ x / (2 * d)
  records = []
  for g in (int(v) for v in args.kv_heads.split(',')):
    r = n // g
    groups = kernel.reshape(g, r, d, h)
    queries = query.reshape(g, r, d, h)

    def mean():
      groups.mean(axis=1)

    def factored(method):
      def run():  # as convert.factor_pool: the calibration's factor once per kernel
        lower = lowrank.calibration_factor(calibration, d)
        for heads, q in zip(groups, queries):
          _, maps = method(heads, lower=lower)
          lowrank.fold_query(q, maps)
      return run

    cases = {'mean': mean, 'svd': factored(lowrank.svd_group),
             'procrustes': factored(lowrank.procrustes_group)}
    if g > 1:
      for kind in ('inner', 'subspace', 'aligned'):
        cases[f'similarity ({kind})'] = (
            lambda kind=kind: lowrank.search_groups(
                lowrank.affinity(kernel, calibration, kind), g))
    for name, fn in cases.items():
      seconds = timed(fn)
      records.append({'kv_heads': g, 'method': name, 'seconds': seconds})
      print(f'G {g}: {name}: {seconds:.2f} s', flush=True)
  lines = ['| G | method | seconds per kernel |', '|---:|---|---:|']
  lines += [f"| {r['kv_heads']} | {r['method']} | {r['seconds']:.2f} |" for r in records]
  lines += ['', f'one [{d}, {n} x {h}] kernel, {"calibrated" if calibration is not None else "weights only"}'
            '; NumPy float64 on the CPU, one timed call each.']
  table = '\n'.join(lines) + '\n'
  print(table)
  if args.output:
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / 'convert_methods.json').write_text(json.dumps(records, indent=2))
    (out / 'convert_methods.md').write_text(table)


if __name__ == '__main__':
  main()
