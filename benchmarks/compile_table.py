"""Benchmark: `gqa-jax compile` of the paper's uptraining step at its sizes, as a table.

Each cell is one `gqa-jax compile` run (a subprocess with a time limit) of the paper's
uptraining setup (experiments/paper/uptrain_c4.gin: batch 2048 x 512/114, Adafactor) for a
model size, an attention and a layout column, on a TPU topology's compile-only devices:

  unrolled      SCAN_LAYERS=False, REMAT_POLICY='none'      (today's default network)
  scan          SCAN_LAYERS=True,  REMAT_POLICY='none'
  scan+minimal  SCAN_LAYERS=True,  REMAT_POLICY='minimal'
  +microbatches SCAN_LAYERS=True,  REMAT_POLICY='minimal', NUM_MICROBATCHES=--microbatches

Per cell: compile seconds on this machine, memory per chip (the compiler's total and
peak), fits, and the roofline lower bound with the MFU it would mean (estimates from the
chip's peak figures, not measurements). A cell that does not compile within --limit
seconds says so. Finished cells are kept in DIR/cells/ and not run again, so an
interrupted table resumes.

    python benchmarks/compile_table.py --models large,xl,xxl --attention gqa8,mha \
        --topology v4-128 --output benchmarks/results/compile [--limit 1200]

Needs the tpu extra (pip install -e ".[tpu]").
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = {
    'unrolled': dict(SCAN_LAYERS='False', REMAT_POLICY="'none'"),
    'scan': dict(SCAN_LAYERS='True', REMAT_POLICY="'none'"),
    'scan+minimal': dict(SCAN_LAYERS='True', REMAT_POLICY="'minimal'"),
    '+microbatches': dict(SCAN_LAYERS='True', REMAT_POLICY="'minimal'"),
}
ATTENTION = {'gqa8': ['--gin_file=attention/gqa.gin', '--gin.NUM_KV_HEADS=8'],
             'mha': ['--gin_file=attention/mha.gin']}
# Model-parallel size per model on the slice: enough to hold the parameters, small enough
# that data parallelism keeps most of the chips (the XXL file's choice for XXL).
MESH_MODEL = {'large': 4, 'xl': 8, 'xxl': 8}
GIB = 1024 ** 3


def command(model: str, attention: str, column: str, args) -> list:
  flags = [f'--gin_file=models/t5_1_1/{model}.gin', '--gin_file=experiments/paper/uptrain_c4.gin',
           *ATTENTION[attention], f'--gin.MESH_MODEL={MESH_MODEL[model]}']
  flags += [f'--gin.{k}={v}' for k, v in COLUMNS[column].items()]
  if column == '+microbatches':
    flags.append(f'--gin.NUM_MICROBATCHES={args.microbatches}')
  return ['gqa-jax', 'compile', *flags, '--topology', args.topology]


def run_cell(model: str, attention: str, column: str, args) -> dict:
  out = args.output / 'cells' / f'{model}-{attention}-{column}'
  record_file = out / 'cell.json'
  if record_file.exists():
    return json.loads(record_file.read_text())
  argv = command(model, attention, column, args) + ['--output', str(out)]
  start = time.time()
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.limit)
    status, tail = proc.returncode, (proc.stderr.strip().splitlines() or [''])[-1]
  except subprocess.TimeoutExpired:
    status, tail = None, f'did not compile within {args.limit} s'
  record = {'model': model, 'attention': attention, 'column': column,
            'command': ' '.join(argv[:-2]), 'status': status, 'wall_seconds':
            round(time.time() - start, 1), 'message': tail}
  report_file = out / 'compile.json'
  if status in (0, 3) and report_file.exists():
    report = json.loads(report_file.read_text())
    record.update(fits=report['fits'], compile_seconds=round(report.get('compile_seconds') or 0, 1),
                  mesh=report.get('mesh'))
    if 'memory_per_device_bytes' in report:
      memory = report['memory_per_device_bytes']
      record.update(total_gib=round(memory['total'] / GIB, 2),
                    peak_gib=round((memory.get('peak') or 0) / GIB, 2),
                    roofline_step_seconds=report.get('roofline_step_seconds'),
                    mfu_at_roofline=report.get('mfu_at_roofline'))
    else:  # the compiler refused it: what it needed, from its out-of-memory error
      record.update(needed_gib=round((report.get('needed_bytes') or 0) / GIB, 2),
                    available_gib=round((report.get('available_bytes') or 0) / GIB, 2))
  out.mkdir(parents=True, exist_ok=True)
  record_file.write_text(json.dumps(record, indent=1) + '\n')
  return record


def cell_text(r: dict) -> str:
  if r['status'] is None:
    return r['message']
  if r['status'] not in (0, 3):
    return f"error (status {r['status']}): {r['message'][:120]}"
  if 'needed_gib' in r:
    return (f"{r['compile_seconds']} s; does NOT fit: needs {r['needed_gib']} GiB of "
            f"{r['available_gib']} GiB")
  fits = 'fits' if r['fits'] else 'does NOT fit'
  bound = (f", step >= {r['roofline_step_seconds']:.2f} s (MFU <= {r['mfu_at_roofline']:.2f})"
           if r.get('roofline_step_seconds') and r['fits'] else '')
  return (f"{r['compile_seconds']} s; {r['total_gib']} GiB total, {r['peak_gib']} peak; "
          f"{fits}{bound}")


def markdown(records, args) -> str:
  lines = [f'`gqa-jax compile` of the paper\'s uptraining step (uptrain_c4.gin: batch 2048 x '
           f'512/114, Adafactor) on {args.topology}, compile-only devices. Compile seconds on '
           f'this machine ({os.cpu_count()} cores); memory per chip is the compiler\'s '
           '(total = arguments + outputs + temporaries - aliased; peak = live buffers); the '
           'step bound is a roofline LOWER-BOUND ESTIMATE from the chip\'s peak figures, not '
           f'a measurement. +microbatches: {args.microbatches}. {time.strftime("%Y-%m-%d")}.',
           '', 'Command: `python benchmarks/compile_table.py ' + ' '.join(sys.argv[1:]) + '`',
           '', '| model | attention | mesh model | ' + ' | '.join(COLUMNS) + ' |',
           '|---|---|---|' + '---|' * len(COLUMNS)]
  rows = {}
  for r in records:
    rows.setdefault((r['model'], r['attention']), {})[r['column']] = cell_text(r)
  for (model, attention), cells in rows.items():
    lines.append(f'| {model} | {attention} | {MESH_MODEL[model]} | '
                 + ' | '.join(cells.get(c, '') for c in COLUMNS) + ' |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='large,xl,xxl')
  parser.add_argument('--attention', default='gqa8,mha')
  parser.add_argument('--columns', default=','.join(COLUMNS))
  parser.add_argument('--topology', default='v4-128')
  parser.add_argument('--microbatches', type=int, default=16)
  parser.add_argument('--limit', type=int, default=1200, help='seconds per cell')
  parser.add_argument('--output', type=Path, required=True)
  args = parser.parse_args()
  records = []
  for model in args.models.split(','):
    for attention in args.attention.split(','):
      for column in args.columns.split(','):
        records.append(run_cell(model, attention, column, args))
        print(json.dumps(records[-1]), flush=True)
  text = markdown(records, args)
  print(text)
  (args.output / 'compile_table.md').write_text(text)


if __name__ == '__main__':
  main()
