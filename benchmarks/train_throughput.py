"""Benchmark: training throughput of presets, against a large matmul measured in the same run.

For each preset: compile the real train step (gqa_jax.train.make_train_step, Adafactor),
time it on random token batches (median of several steps after warm-up), and report
tokens/s. The step's FLOPs come from XLA's cost analysis of the compiled step; the
achieved FLOP rate is compared with that of a large float32 matmul timed in this run.

    python benchmarks/train_throughput.py [--presets tiny,small] [--batch 8]
        [--inputs 128] [--targets 32] [--steps 5] [--output DIR]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax import models, network, optimizers, partitioning
from gqa_jax.train import make_train_step


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times)


def step_throughput(preset: str, batch: int, inputs: int, targets: int, steps: int) -> dict:
  config = network.get_preset(preset, dtype='float32')
  model = models.EncoderDecoderModel(network.Transformer(config), z_loss=1e-4)
  optimizer = optimizers.adafactor(optimizers.create_learning_rate_schedule())
  mesh = partitioning.create_mesh()
  rules = partitioning.standard_logical_axis_rules(config, mesh)
  rng = np.random.default_rng(0)
  tokens = lambda n: rng.integers(2, config.vocab_size, (batch, n), dtype=np.int32)
  tgt = tokens(targets)
  data = {'encoder_input_tokens': tokens(inputs), 'decoder_target_tokens': tgt,
          'decoder_input_tokens': np.concatenate([np.zeros((batch, 1), np.int32),
                                                  tgt[:, :-1]], 1),
          'decoder_loss_weights': np.ones((batch, targets), np.float32)}
  with partitioning.mesh_context(mesh, rules):
    shardings = partitioning.param_shardings(config, mesh, rules)
    params = jax.jit(lambda: network.init_params(config, jax.random.PRNGKey(0)),
                     out_shardings=shardings)()
    opt_shardings = partitioning.opt_state_shardings(optimizer, params, shardings)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    step = make_train_step(model, optimizer, shardings, opt_shardings, seed=0)
    compiled = step.lower(params, opt_state, data, jnp.int32(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', float('nan')))
    times = []
    for i in range(steps + 1):  # the first run warms up
      start = time.perf_counter()
      params, opt_state, metrics = compiled(params, opt_state, data, jnp.int32(i))
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  seconds = statistics.median(times[1:])
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return {'preset': preset, 'params': num_params, 'batch': batch, 'inputs': inputs,
          'targets': targets, 'step_seconds': seconds,
          'target_tokens_per_second': batch * targets / seconds,
          'all_tokens_per_second': batch * (inputs + targets) / seconds,
          'step_flops': flops, 'achieved_flops_per_second': flops / seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--presets', default='tiny,small')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--inputs', type=int, default=128)
  parser.add_argument('--targets', type=int, default=32)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--output', default=None, help='folder for train_throughput.json')
  args = parser.parse_args()
  matmul = matmul_flops_per_second()
  records = []
  for preset in args.presets.split(','):
    record = step_throughput(preset, args.batch, args.inputs, args.targets, args.steps)
    record['matmul_flops_per_second'] = matmul
    record['fraction_of_matmul_rate'] = record['achieved_flops_per_second'] / matmul
    records.append(record)
    print(f"{preset:6s} {record['params']:>12,} params  step {record['step_seconds']:.3f} s  "
          f"{record['all_tokens_per_second']:>9,.0f} tokens/s "
          f"({record['target_tokens_per_second']:,.0f} target tokens/s)  "
          f"{record['achieved_flops_per_second'] / 1e9:6.1f} GFLOP/s = "
          f"{record['fraction_of_matmul_rate']:.2f} x the matmul's "
          f"{matmul / 1e9:.1f} GFLOP/s", flush=True)
  result = {'device': str(jax.devices()[0]), 'device_count': jax.device_count(),
            'records': records, 'command': 'python benchmarks/train_throughput.py ' +
            ' '.join(f'--{k} {v}' for k, v in vars(args).items() if v is not None)}
  if args.output:
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / 'train_throughput.json').write_text(json.dumps(result, indent=2))
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
