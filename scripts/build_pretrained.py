#!/usr/bin/env python
"""Builds the shipped pretrained MHA checkpoint `builtin:t5_mini` (run once).

The offline analogue of the public T5.1.1 checkpoints that the paper starts from: the
model of gin_configs/models/builtin/t5_mini.gin pretrained on the built-in span
corruption task (CPython docstrings and language-reference text) with the T5.1.1
recipe (runs/pretrain.gin: Adafactor, rsqrt schedule) and the settings of
gin_configs/experiments/pretrained/t5_mini.gin, scored on the validation split's span
corruption loss (`nll`, nats per target token) every EVAL_PERIOD steps.

    python scripts/build_pretrained.py [--workdir build/t5_mini] [--steps N]
        [--max-steps M] [--chunk C] [--max-hours H]

1. `gqa-jax train` into WORKDIR to N steps (resumes when rerun: a stopped build
   continues);
2. the validation curve from WORKDIR/eval_metrics.jsonl: the build is "flat" when the
   loss improved by under 1% over the last fifth of the steps (from the last score at or
   before 80% of the steps to the last one). While it is not, training continues C steps
   further (the rsqrt schedule does not depend on the total, so this is one run), up to M
   steps or H hours of training in all;
3. `gqa-jax convert WORKDIR/checkpoint_<last> gqa_jax/pretrained/t5_mini --num-kv-heads 8`: the same MHA model written as a gqa_jax checkpoint (Orbax with
   gqa_jax.json and a CRC-32 per tensor, Adafactor state kept for uptraining);
4. gqa_jax/pretrained/t5_mini/curve.json (the command, the curve, seconds, size) and
   curve.png.

The checkpoint is replaced only when the new one is complete (convert's own atomic
rename); `--overwrite` is needed to replace a shipped one.
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAME = 't5_mini'
GIN_FILES = ['models/builtin/t5_mini.gin', 'runs/pretrain.gin',
             'experiments/pretrained/t5_mini.gin']
TASK = 'gqa_builtin_span_corruption'
METRIC = f'{TASK}/nll'               # the validation loss that must flatten
CODE_METRIC = f'{TASK}_code/nll'     # the mixture's other task, recorded beside it


def flatness(curve):
  """(relative improvement of the validation loss over the last fifth of the steps,
  the two points compared): the last eval at or before 80% of the steps vs the last, so
  that the window is never shorter than a fifth."""
  last_step = curve[-1]['step']
  start = [p for p in curve if p['step'] <= 0.8 * last_step][-1]
  return (start['nll'] - curve[-1]['nll']) / start['nll'], start, curve[-1]


def read_curve(workdir: Path):
  points = []
  path = workdir / 'eval_metrics.jsonl'
  if path.exists():
    for line in path.read_text().splitlines():
      record = json.loads(line)
      if METRIC in record:
        points.append({'step': record['step'], 'nll': record[METRIC],
                       'code_nll': record.get(CODE_METRIC)})
  # A resumed build may have scored a step twice: keep the last score of each step.
  return sorted({p['step']: p for p in points}.values(), key=lambda p: p['step'])


def read_train_loss(workdir: Path):
  """Training loss per logged step (summed loss / target tokens), for the figure."""
  out = {}
  path = workdir / 'metrics.jsonl'
  if path.exists():
    for line in path.read_text().splitlines():
      r = json.loads(line)
      if 'cross_ent_loss' in r and r.get('weight_sum'):
        out[r['step']] = r['cross_ent_loss'] / r['weight_sum']
  return [{'step': s, 'loss': v} for s, v in sorted(out.items())]


def plot(curve, train, path: Path):
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.6))
  if train:
    ax.plot([p['step'] for p in train], [p['loss'] for p in train], lw=0.8, alpha=0.6,
            label='train (per target token)')
  ax.plot([p['step'] for p in curve], [p['nll'] for p in curve], 'o-', ms=3,
          label='validation nll, text')
  if all(p.get('code_nll') is not None for p in curve):
    ax.plot([p['step'] for p in curve], [p['code_nll'] for p in curve], 's-', ms=3,
            label='validation nll, code')
  ax.set_xlabel('step')
  ax.set_ylabel('span corruption loss (nats / token)')
  ax.set_title(f'builtin:{NAME} pretraining')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='build/t5_mini',
                      help='the training run (MODEL_DIR); kept, so a rerun resumes.')
  parser.add_argument('--steps', type=int, default=5000,
                      help='train at least this many steps (default 5000: the source '
                           'steps that the report grid\'s uptraining budget allows).')
  parser.add_argument('--max-steps', type=int, default=5000,
                      help='while not flat, continue up to this many steps (default 5000: '
                           'do not continue).')
  parser.add_argument('--chunk', type=int, default=500,
                      help='steps added each time the loss is not yet flat (default 500).')
  parser.add_argument('--max-hours', type=float, default=2.0,
                      help='start no chunk that would take the training time of the '
                           'whole build past this (default 2).')
  parser.add_argument('--out', default=str(REPO / 'gqa_jax' / 'pretrained' / NAME),
                      help='where the shipped checkpoint goes.')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a checkpoint already in --out.')
  parser.add_argument('--gin', action='append', default=[],
                      help='extra gin bindings for the training run (as --gin.X=Y, '
                           'without the --gin. prefix).')
  args = parser.parse_args(argv)

  from gqa_jax import checkpoints, cli
  workdir = Path(os.path.expanduser(args.workdir)).absolute()
  out = Path(os.path.expanduser(args.out)).absolute()
  if out.exists() and any(out.glob('checkpoint_*')) and not args.overwrite:
    parser.error(f'{out} already holds a checkpoint: pass --overwrite to replace it.')
  if args.chunk < 1 or args.steps < 1 or args.max_steps < args.steps:
    parser.error('need --steps >= 1, --chunk >= 1 and --max-steps >= --steps.')
  base_argv = ['train', *[f'--gin_file={f}' for f in GIN_FILES],
               f'--gin.MODEL_DIR={json.dumps(str(workdir))}']
  base_argv += [f'--gin.{b}' for b in args.gin]
  target, commands = args.steps, []
  while True:
    train_argv = base_argv + [f'--gin.TRAIN_STEPS={target}']
    command = 'gqa-jax ' + ' '.join(shlex.quote(a) for a in train_argv)
    commands.append(command)
    print(f'build_pretrained: {command}', flush=True)
    start = time.time()
    status = cli.main(train_argv)
    seconds = time.time() - start
    # Every invocation's wall time, so that a build resumed after a stop still reports
    # what the whole pretraining took.
    with open(workdir / 'build_times.jsonl', 'a') as f:
      f.write(json.dumps({'finished': time.strftime('%Y-%m-%d %H:%M:%S'), 'status': status,
                          'steps': target, 'seconds': round(seconds, 1)}) + '\n')
    if status:
      return status
    total_seconds = sum(json.loads(line)['seconds']
                        for line in (workdir / 'build_times.jsonl').read_text().splitlines())
    curve, train = read_curve(workdir), read_train_loss(workdir)
    if len(curve) < 2:
      print('build_pretrained: fewer than two validation scores in '
            f'{workdir}/eval_metrics.jsonl; set EVAL_PERIOD.', file=sys.stderr)
      return 1
    improvement, first, last = flatness(curve)
    flat = improvement < 0.01
    print(f'build_pretrained: validation nll {first["nll"]:.4f} at step {first["step"]} -> '
          f'{last["nll"]:.4f} at step {last["step"]}: {100 * improvement:.2f}% over the '
          f'last fifth ({"flat" if flat else "not flat yet"}); {total_seconds / 60:.0f} min '
          'of training so far', flush=True)
    next_chunk_seconds = total_seconds / max(last['step'], 1) * args.chunk
    if flat:
      break
    if target + args.chunk > args.max_steps:
      print(f'build_pretrained: NOT flat at --max-steps {args.max_steps}; shipping it '
            'marked "flat": false. Rerun with a larger --max-steps to continue.')
      break
    if total_seconds + next_chunk_seconds > args.max_hours * 3600:
      print(f'build_pretrained: NOT flat within --max-hours {args.max_hours}; shipping it '
            'marked "flat": false. Rerun with a larger --max-hours to continue.')
      break
    target += args.chunk

  step_dir = checkpoints.latest_step_dir(workdir)
  staging = out.parent / f'.{out.name}.build'
  shutil.rmtree(staging, ignore_errors=True)
  status = cli.main(['convert', str(step_dir), str(staging),
                     '--num-kv-heads', str(checkpoints.open_checkpoint(step_dir).config.num_heads),
                     '--quiet'])
  if status:
    return status
  size = sum(p.stat().st_size for p in staging.rglob('*') if p.is_file())
  record = {'name': f'builtin:{NAME}', 'command': command, 'commands': commands,
            'gin_files': GIN_FILES, 'step': checkpoints.step_of_dir(step_dir),
            'train_seconds': round(total_seconds, 1),
            'validation_nll': curve, 'train_loss': train,
            'last_fifth_improvement': improvement, 'flat': flat, 'bytes': size}
  (staging / 'curve.json').write_text(json.dumps(record, indent=1) + '\n')
  plot(curve, train, staging / 'curve.png')
  if out.exists():
    shutil.rmtree(out)
  os.rename(staging, out)
  print(f'build_pretrained: wrote {out} ({size / 2**20:.1f} MiB, {step_dir.name})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
