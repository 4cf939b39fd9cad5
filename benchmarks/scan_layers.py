"""Benchmark: scanned against unrolled layers on this machine, in one run.

For each preset, the real train step (gqa_jax.train.make_train_step, Adafactor) is built
twice, with `scan_layers` False and True, on the same random batch: the seconds to lower
and compile it, then its step time in interleaved rounds (one step of each per round,
medians over rounds, so that both see the same phases of the machine). A scanned step
should cost no more than a few percent over the unrolled one; its compile should take a
fraction of the time, and the more so the deeper the model.

    python benchmarks/scan_layers.py [--presets small,base] [--batch 4] [--inputs 128]
        [--targets 32] [--rounds 5] [--remat none] [--dtype float32] [--peak-tflops P]
        [--output DIR]

Each step's FLOPs are XLA's cost analysis of the compiled step (the loop body of a scan
counted once per trip is not assumed: the unrolled step's count is used for both); with
--peak-tflops (the device's published dense peak at --dtype), the MFU each step time means.
"""

import argparse
import dataclasses
import json
import platform
import sys
import statistics
import time
from pathlib import Path

import jax

from gqa_jax import network
from train_throughput import _Step  # the same step and batch as the throughput benchmark


def compare(preset: str, batch: int, inputs: int, targets: int, rounds: int,
            remat: str, dtype: str = 'float32', peak_tflops: float = None) -> dict:
  """Compile seconds and median step seconds of the preset unrolled and scanned."""
  config = network.get_preset(preset, dtype=dtype, remat_policy=remat)
  steps = {}
  for scan in (False, True):
    steps[scan] = _Step(dataclasses.replace(config, scan_layers=scan), batch, inputs, targets)
    steps[scan].time_one()  # warm-up: the first call pays for allocation
  times = {False: [], True: []}
  for _ in range(rounds):
    for scan in (False, True):
      times[scan].append(steps[scan].time_one())
  out = {'preset': preset, 'batch': batch, 'inputs': inputs, 'targets': targets,
         'remat_policy': remat, 'dtype': dtype, 'rounds': rounds, 'device':
         jax.devices()[0].device_kind,
         # XLA counts a scan's body once: the unrolled step's count is the step's work.
         'step_flops': steps[False].flops}
  for scan, name in ((False, 'unrolled'), (True, 'scanned')):
    out[f'{name}_compile_s'] = round(steps[scan].compile_seconds, 2)
    out[f'{name}_step_s'] = round(statistics.median(times[scan]), 4)
  out['compile_ratio'] = round(out['scanned_compile_s'] / out['unrolled_compile_s'], 3)
  out['step_ratio'] = round(out['scanned_step_s'] / out['unrolled_step_s'], 3)
  if peak_tflops:
    for name in ('unrolled', 'scanned'):
      out[f'{name}_mfu'] = round(out['step_flops'] / out[f'{name}_step_s'] / (peak_tflops * 1e12), 4)
  return out


def markdown(records, command: str) -> str:
  lines = [f'Command: `{command}`', '',
           f'Machine: {platform.machine()}, {jax.device_count()} {jax.default_backend()} '
           f'device(s) ({jax.devices()[0].device_kind}), jax {jax.__version__}; '
           f'{time.strftime("%Y-%m-%d")}. Activations {records[0]["dtype"]}.', '',
           '| preset | batch x (in, out) | remat | compile unrolled s | compile scanned s | '
           'ratio | step unrolled s | step scanned s | ratio | MFU unrolled / scanned |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in records:
    lines.append(f"| {r['preset']} | {r['batch']} x ({r['inputs']}, {r['targets']}) | "
                 f"{r['remat_policy']} | {r['unrolled_compile_s']} | {r['scanned_compile_s']} "
                 f"| {r['compile_ratio']} | {r['unrolled_step_s']} | {r['scanned_step_s']} | "
                 f"{r['step_ratio']} | {r.get('unrolled_mfu', '-')} / {r.get('scanned_mfu', '-')} |")
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--presets', default='small,base')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--inputs', type=int, default=128)
  parser.add_argument('--targets', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--remat', default='none', choices=network.REMAT_POLICIES)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='activations (parameters stay float32); bfloat16 on GPU/TPU')
  parser.add_argument('--peak-tflops', type=float, default=None,
                      help="the device's dense peak at --dtype, for MFU (H100 SXM bf16: 989)")
  parser.add_argument('--output', type=Path, default=None)
  args = parser.parse_args()
  records = []
  for preset in args.presets.split(','):
    records.append(compare(preset, args.batch, args.inputs, args.targets, args.rounds,
                           args.remat, args.dtype, args.peak_tflops))
    print(json.dumps(records[-1]), flush=True)
  command = 'python benchmarks/scan_layers.py ' + ' '.join(sys.argv[1:])
  text = markdown(records, command.strip())
  print(text)
  if args.output:
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / 'scan_layers.json').write_text(json.dumps(records, indent=1) + '\n')
    (args.output / 'scan_layers.md').write_text(text)


if __name__ == '__main__':
  main()
