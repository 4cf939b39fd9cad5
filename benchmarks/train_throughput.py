"""Benchmark: training throughput of presets, against a large matmul measured in the same run.

For each preset: compile the real train step (gqa_jax.train.make_train_step, Adafactor),
time it on random token batches (median of several steps after warm-up), and report
tokens/s. The step's FLOPs come from XLA's cost analysis of the compiled step; the
achieved FLOP rate is compared with that of a large matmul timed after each step (the
same phases of the machine; medians of both).

    python benchmarks/train_throughput.py [--presets tiny,small] [--batch 8]
        [--inputs 128] [--targets 32] [--steps 5] [--output DIR]

With --encoder-heads Q/K,... the first preset is timed once per encoder attention
variant: Q query heads (SQA, Reactive AI 2025, when Q < num_heads; head_dim unchanged) and
K KV heads, e.g. for base (12 heads) `12/12,12/3,6/3,6/6,3/3` = MHA, GQA, SQA, sSQA, xSQA.
Their steps are timed in interleaved rounds (one step of each variant per round, medians
over rounds), so that the ratios to the first variant share the machine's state:

    python benchmarks/train_throughput.py --presets base --encoder-heads 12/12,12/3,6/3,6/6,3/3 \
        --batch 2 --inputs 1024 --targets 32 --steps 5 --output experiments/sqa
"""

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax import models, network, optimizers, partitioning
from gqa_jax.experiments import bench
from gqa_jax.train import make_train_step


def sqa_name(query_heads: int, kv_heads: int, num_heads: int) -> str:
  """The SQA paper's names for an attention with Q query and K KV heads of N."""
  if query_heads == num_heads:
    return network.variant_name(kv_heads, num_heads)
  if query_heads == kv_heads == num_heads // 2:
    return 'sSQA'
  kind = 'xSQA' if 4 * query_heads <= num_heads else 'SQA'
  return f'{kind} {query_heads}Q-{kv_heads}KV'


def encoder_variant(config: network.T5Config, spec: str) -> network.T5Config:
  """`config` with the encoder's attention of `spec` ('Q/K'): ValueError names the fix."""
  try:
    query_heads, kv_heads = (int(x) for x in spec.split('/'))
  except ValueError:
    raise ValueError(f'--encoder-heads entry {spec!r}: write Q/K (query heads / KV heads), '
                     'e.g. 6/3.') from None
  # T5Config checks that K divides Q and Q is positive, naming the field.
  return dataclasses.replace(config, encoder_query_heads=query_heads,
                             encoder_kv_heads=kv_heads)


class _Step:
  """One preset's compiled train step on a fixed random batch, timed one call at a time."""

  def __init__(self, config: network.T5Config, batch: int, inputs: int, targets: int):
    self.config = config
    model = models.EncoderDecoderModel(network.Transformer(config), z_loss=1e-4)
    optimizer = optimizers.adafactor(optimizers.create_learning_rate_schedule())
    mesh = partitioning.create_mesh()
    rules = partitioning.standard_logical_axis_rules(config, mesh)
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(2, config.vocab_size, (batch, n), dtype=np.int32)
    tgt = tokens(targets)
    self.data = {'encoder_input_tokens': tokens(inputs), 'decoder_target_tokens': tgt,
                 'decoder_input_tokens': np.concatenate([np.zeros((batch, 1), np.int32),
                                                         tgt[:, :-1]], 1),
                 'decoder_loss_weights': np.ones((batch, targets), np.float32)}
    self.context = partitioning.mesh_context(mesh, rules)
    with self.context:
      shardings = partitioning.param_shardings(config, mesh, rules)
      self.params = jax.jit(lambda: network.init_params(config, jax.random.PRNGKey(0)),
                            out_shardings=shardings)()
      opt_shardings = partitioning.opt_state_shardings(optimizer, self.params, shardings)
      self.opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(self.params)
      step = make_train_step(model, optimizer, shardings, opt_shardings, seed=0)
      start = time.perf_counter()
      self.compiled = step.lower(self.params, self.opt_state, self.data,
                                 jnp.int32(0)).compile()
      self.compile_seconds = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get('flops', float('nan')))
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
    self.calls = 0

  def time_one(self) -> float:
    """Seconds of one step (the compiled executable needs no mesh context)."""
    start = time.perf_counter()
    self.params, self.opt_state, metrics = self.compiled(
        self.params, self.opt_state, self.data, jnp.int32(self.calls))
    jax.block_until_ready(metrics)
    self.calls += 1
    return time.perf_counter() - start

  def record(self, seconds: float) -> dict:
    batch, inputs = self.data['encoder_input_tokens'].shape
    targets = self.data['decoder_target_tokens'].shape[1]
    return {'params': self.num_params, 'batch': batch, 'inputs': inputs,
            'targets': targets, 'step_seconds': seconds,
            'target_tokens_per_second': batch * targets / seconds,
            'all_tokens_per_second': batch * (inputs + targets) / seconds,
            'step_flops': self.flops, 'achieved_flops_per_second': self.flops / seconds}


def _time_probe(probe) -> float:
  """Seconds of one probe call after an untimed one: the first call after a train step ran
  25-40% slower than the next ones on the 2-core CPU (caches and threads still busy with
  the step), which would understate the machine's matmul rate."""
  jax.block_until_ready(probe())
  start = time.perf_counter()
  jax.block_until_ready(probe())
  return time.perf_counter() - start


def step_throughput(preset: str, batch: int, inputs: int, targets: int, steps: int,
                    dtype: str = 'float32', matmul_size: int = 2048) -> dict:
  """One preset's train step (activations in `dtype`; parameters float32, as T5X), each
  timed step followed by one timed call of the matmul probe (`_time_probe`), so that the
  step's FLOP rate is compared with the probe's in the same phases of the machine (medians
  of both)."""
  step = _Step(network.get_preset(preset, dtype=dtype), batch, inputs, targets)
  flops, probe = bench._matmul_probe(matmul_size, jnp.dtype(dtype))
  times, probe_times = [], []
  for i in range(steps + 1):  # the first round warms up
    seconds, probe_seconds = step.time_one(), _time_probe(probe)
    if i:
      times.append(seconds)
      probe_times.append(probe_seconds)
  record = {'preset': preset, 'dtype': dtype, **step.record(statistics.median(times))}
  matmul = flops / statistics.median(probe_times)
  return {**record, 'matmul_flops_per_second': matmul,
          'fraction_of_matmul_rate': record['achieved_flops_per_second'] / matmul}


def encoder_heads_rounds(preset: str, specs, batch: int, inputs: int, targets: int,
                         steps: int, matmul_size: int = 2048) -> Tuple[list, float]:
  """(one record per encoder attention variant ('Q/K'), the matmul probe's FLOP rate):
  `steps` interleaved rounds after one warm-up round, each ending with one timed call of
  the matmul probe (`_time_probe`; its median rate); `ratio_to_first`: step time over the
  first variant's."""
  base = network.get_preset(preset, dtype='float32')
  variants = [(spec, _Step(encoder_variant(base, spec), batch, inputs, targets))
              for spec in specs]
  flops, probe = bench._matmul_probe(matmul_size, jnp.float32)
  times = {spec: [] for spec, _ in variants}
  probe_times = []
  for round_ in range(steps + 1):
    for spec, step in variants:
      seconds = step.time_one()
      if round_:
        times[spec].append(seconds)
    probe_seconds = _time_probe(probe)
    if round_:
      probe_times.append(probe_seconds)
    print(f'  round {round_}/{steps}' + (' (warm-up)' if not round_ else ''), flush=True)
  records = []
  for spec, step in variants:
    q, k = (int(x) for x in spec.split('/'))
    median = statistics.median(times[spec])
    records.append({'preset': preset, 'encoder_heads': spec, 'query_heads': q,
                    'kv_heads': k, 'variant': sqa_name(q, k, base.num_heads),
                    'step_seconds_all': times[spec], **step.record(median)})
  first = records[0]
  for r in records:
    r['ratio_to_first'] = r['step_seconds'] / first['step_seconds']
    r['flops_ratio_to_first'] = r['step_flops'] / first['step_flops']
  return records, flops / statistics.median(probe_times)


def markdown(records, matmul: float, command: str) -> str:
  lines = ['| variant | encoder Q/K | step (s) | ratio to ' + records[0]['variant'] +
           ' | FLOPs ratio | GFLOP/s | fraction of matmul |',
           '|---|---|---:|---:|---:|---:|---:|']
  for r in records:
    lines.append(f"| {r['variant']} | {r['encoder_heads']} | {r['step_seconds']:.3f} | "
                 f"{r['ratio_to_first']:.3f} | {r['flops_ratio_to_first']:.3f} | "
                 f"{r['achieved_flops_per_second'] / 1e9:.1f} | "
                 f"{r['achieved_flops_per_second'] / matmul:.2f} |")
  r = records[0]
  lines += ['', f"{jax.devices()[0].platform} ({jax.device_count()} device), float32, "
            f"preset {r['preset']}, batch {r['batch']}, inputs {r['inputs']}, targets "
            f"{r['targets']}; Adafactor train step; medians of {len(r['step_seconds_all'])} "
            'interleaved rounds; FLOPs from XLA\'s cost analysis of each compiled step; '
            f'matmul {matmul / 1e9:.1f} GFLOP/s (median of one call per round).', '',
            f'`{command}`']
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--presets', default='tiny,small')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--inputs', type=int, default=128)
  parser.add_argument('--targets', type=int, default=32)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--output', default=None, help='folder for train_throughput.json')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='activation dtype of the presets and of the matmul probe '
                           '(parameters stay float32); bfloat16 on GPU/TPU (default: '
                           '%(default)s: XLA:CPU does not vectorise bfloat16 dots).')
  parser.add_argument('--matmul-size', type=int, default=2048, metavar='M',
                      help='the [M, M] x [M, M] matmul probe whose rate the train step is '
                           'compared with (default: %(default)s; 8192 on a GPU).')
  parser.add_argument('--encoder-heads', default=None, metavar='Q/K,...',
                      help='time the first preset once per encoder attention variant '
                           '(Q query heads / K KV heads; SQA when Q < num_heads) in '
                           'interleaved rounds; writes sqa.json and sqa.md to --output.')
  args = parser.parse_args()
  command = 'python benchmarks/train_throughput.py ' + ' '.join(
      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
  if args.encoder_heads:
    preset = args.presets.split(',')[0]
    try:
      specs = [encoder_variant(network.get_preset(preset), s) and s
               for s in args.encoder_heads.split(',')]
    except ValueError as e:
      parser.error(str(e))
    records, matmul = encoder_heads_rounds(preset, specs, args.batch, args.inputs,
                                           args.targets, args.steps, args.matmul_size)
    table = markdown(records, matmul, command)
    print(table)
    if args.output:
      out = Path(args.output).expanduser()
      out.mkdir(parents=True, exist_ok=True)
      (out / 'sqa.json').write_text(json.dumps(
          {'device': str(jax.devices()[0]), 'matmul_flops_per_second': matmul,
           'records': records, 'command': command}, indent=2))
      (out / 'sqa.md').write_text(table)
    return
  records = []
  for preset in args.presets.split(','):
    record = step_throughput(preset, args.batch, args.inputs, args.targets, args.steps,
                             args.dtype, args.matmul_size)
    matmul = record['matmul_flops_per_second']
    records.append(record)
    print(f"{preset:6s} {record['params']:>12,} params  step {record['step_seconds']:.3f} s  "
          f"{record['all_tokens_per_second']:>9,.0f} tokens/s "
          f"({record['target_tokens_per_second']:,.0f} target tokens/s)  "
          f"{record['achieved_flops_per_second'] / 1e9:6.1f} GFLOP/s = "
          f"{record['fraction_of_matmul_rate']:.2f} x the matmul's "
          f"{matmul / 1e9:.1f} GFLOP/s", flush=True)
  result = {'device': str(jax.devices()[0]), 'device_kind': jax.devices()[0].device_kind,
            'device_count': jax.device_count(), 'matmul_size': args.matmul_size,
            'records': records, 'command': command}
  if args.output:
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / 'train_throughput.json').write_text(json.dumps(result, indent=2))
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
