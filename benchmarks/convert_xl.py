"""Benchmark: convert a synthetic T5.1.1-XL-shaped T5X checkpoint (~3B parameters).

Writes a T5X legacy checkpoint with XL's exact tree (random float32 weights,
factored Adafactor state as T5X keeps it, step 1,000,000) unless it exists, then
runs `gqa-jax convert` on it in a child process and reports wall time and the
child's peak resident memory next to the checkpoint's size and largest tensor.

    python benchmarks/convert_xl.py --workdir /tmp/gqa_bench [--size xl] [--num-kv-heads 8]

Prints one JSON record (also written to WORKDIR/convert_<size>.json).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict

from gqa_jax import network
from gqa_jax.checkpoints import t5x


def write_synthetic(ckpt_dir: Path, config: network.T5Config, step: int = 1_000_000):
  """Random weights with T5's fan-in scale; Adafactor v_row/v_col for kernels (inline
  in the msgpack, as T5X stores them) and a full v for vectors."""
  rng = np.random.default_rng(0)
  shapes = {'/'.join(k): tuple(v.shape)
            for k, v in flatten_dict(network.param_shapes(config)).items()}
  writer = t5x.LegacyWriter(ckpt_dir)
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    # float32 like the published checkpoints (a float64 scalar would promote the array).
    value = rng.standard_normal(shape, np.float32) * np.float32(1 / np.sqrt(shape[0]))
    writer.add(f'target/{name}', value)
    slots = ({'v_row': np.full(shape[0], 1e-4, np.float32),
              'v_col': np.full(shape[1], 1e-4, np.float32), 'v': np.zeros(1, np.float32)}
             if len(shape) == 2 else
             {'v': np.full(shape, 1e-4, np.float32), 'v_row': np.zeros(1, np.float32),
              'v_col': np.zeros(1, np.float32)})
    slots['m'] = np.zeros(1, np.float32)
    for slot, v in slots.items():
      writer.add(f'state/param_states/{name}/{slot}', v)
    print(f'\rwriting synthetic checkpoint: {i + 1}/{len(shapes)} tensors', end='',
          file=sys.stderr, flush=True)
  writer.add('state/step', np.int32(step))
  writer.close()
  print(file=sys.stderr)
  return shapes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='/tmp/gqa_bench', help='where checkpoints go.')
  parser.add_argument('--size', default='xl', choices=list(network.PRESETS))
  parser.add_argument('--num-kv-heads', type=int, default=8)
  parser.add_argument('--output-format', default='orbax', choices=['orbax', 't5x'])
  parser.add_argument('--keep', action='store_true', help='keep the converted output.')
  args = parser.parse_args()

  config = network.get_preset(args.size)
  work = Path(args.workdir)
  src = work / f'{args.size}_mha' / 'checkpoint_1000000'
  shapes = {'/'.join(k): tuple(v.shape)
            for k, v in flatten_dict(network.param_shapes(config)).items()}
  if not (src / 'checkpoint').exists() or '"<f4"' not in (
      src / 'target.token_embedder.embedding' / '.zarray').read_text():
    shutil.rmtree(src, ignore_errors=True)
    start = time.time()
    write_synthetic(src, config)
    print(f'wrote {src} in {time.time() - start:.0f} s', file=sys.stderr)
  dst = work / f'{args.size}_gqa{args.num_kv_heads}_{args.output_format}'
  shutil.rmtree(dst, ignore_errors=True)

  cmd = [sys.executable, '-m', 'gqa_jax.cli', 'convert', str(src), str(dst),
         '--num-kv-heads', str(args.num_kv_heads), '--output-format', args.output_format]
  start = time.time()
  subprocess.run(cmd, check=True)
  seconds = time.time() - start
  peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
  du = lambda p: sum(f.stat().st_size for f in Path(p).rglob('*') if f.is_file())
  num_params = sum(int(np.prod(s)) for s in shapes.values())
  largest = max(int(np.prod(s)) * 4 for s in shapes.values())
  record = {
      'size': args.size, 'num_kv_heads': args.num_kv_heads,
      'output_format': args.output_format, 'num_params': num_params,
      'source_bytes_on_disk': du(src), 'output_bytes_on_disk': du(dst),
      'float32_param_bytes': num_params * 4, 'largest_tensor_bytes': largest,
      'wall_seconds': round(seconds, 1), 'peak_rss_bytes': peak_rss,
      'peak_rss_over_largest_tensor': round(peak_rss / largest, 2),
      'cpu_count': os.cpu_count(), 'command': ' '.join(cmd)}
  if not args.keep:
    shutil.rmtree(dst, ignore_errors=True)
  (work / f'convert_{args.size}.json').write_text(json.dumps(record, indent=2))
  print(json.dumps(record, indent=2))


if __name__ == '__main__':
  main()
