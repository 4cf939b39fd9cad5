"""What the training loop logs and reads: dataset configs, metrics, progress lines."""

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional

import jax
import numpy as np

from gqa_jax.errors import ConfigError

# gqa_jax.data and seqio load TensorFlow (seconds): they are imported where a dataset is
# checked or read, so that importing this module (the CLI and the benchmark log with it)
# stays light.


def log(message: str):
  """One line to stderr from the first process (the others stay quiet)."""
  if jax.process_index() == 0:
    print(f'[gqa-jax] {message}', file=sys.stderr, flush=True)


def check_int(name: str, value, optional: bool = False, minimum: int = 1, fix: str = ''):
  """Raises ConfigError naming the gin binding unless `value` is an int >= `minimum`
  (or None, if `optional`)."""
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    kind = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
    raise ConfigError(f'--gin.{name}={value!r}: must be {kind}'
                      + (' or None' if optional else '') + (f' ({fix})' if fix else '') + '.')


def check_best_metric(best_metric: Optional[str], eval_cfg: 'DatasetConfig'):
  """BEST_METRIC is 'task/metric' with a task that the eval mixture or task scores."""
  if best_metric is None:
    return
  from gqa_jax import data  # registers the tasks; TensorFlow (see the imports)
  import seqio  # after gqa_jax.data, which loads TensorFlow quietly
  provider = seqio.get_mixture_or_task(eval_cfg.mixture_or_task_name)
  tasks = [t.name for t in (provider.tasks if isinstance(provider, seqio.Mixture)
                            else [provider])]
  task, _, metric = best_metric.partition('/') if isinstance(best_metric, str) else ('', '', '')
  if not metric or '/' in metric or task not in tasks:
    raise ConfigError(f'--gin.BEST_METRIC={best_metric!r}: must be \'task/metric\' with a '
                      f'task of the eval ({", ".join(tasks)}), e.g. '
                      f'\'{tasks[0]}/rougeL\' (a name from eval_metrics.jsonl).')
  # Known before any step: a misspelt metric would otherwise stop the run at its first eval.
  names = data.metrics.metric_names(task)
  if names is not None and metric not in names:
    raise ConfigError(f'--gin.BEST_METRIC={best_metric!r}: {task} reports no {metric!r}; '
                      f'its metrics are {", ".join(sorted(names))}.')


def check_vocabulary(dataset_cfg: 'DatasetConfig', config):
  """The dataset's task ids all fit the model's embedding (else the loss is NaN from the
  first step, which no learning rate fixes). Call after `DatasetConfig.validate`."""
  from gqa_jax import data  # TensorFlow (see the imports)
  data.check_vocabulary(dataset_cfg.mixture_or_task_name, config.vocab_size,
                        what=f'the model (network.T5Config.vocab_size={config.vocab_size})')


@dataclasses.dataclass
class DatasetConfig:
  """T5X's DatasetConfig fields that gqa_jax uses (a seqio task or mixture)."""
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = 'train'
  batch_size: int = 8
  shuffle: bool = True
  seed: Optional[int] = 0
  pack: bool = False
  host_sharding: str = 'rows'

  def validate(self, batch_size_name: str = 'BATCH_SIZE'):
    """Raises ConfigError, naming the gin binding, for a setting that cannot work; and
    for an unknown task or split (checked by gqa_jax.data before any data is read)."""
    from gqa_jax import data  # TensorFlow (see the imports)
    check_int(batch_size_name, self.batch_size)
    lengths = self.task_feature_lengths
    if not isinstance(lengths, Mapping) or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
        for v in lengths.values()) or not {'inputs', 'targets'} <= set(lengths):
      raise ConfigError(f'--gin.TASK_FEATURE_LENGTHS={lengths!r}: must map \'inputs\' and '
                        "'targets' to positive integers, e.g. "
                        """"--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 114}".""")
    if self.seed is not None:
      check_int('DatasetConfig.seed', self.seed, minimum=0)
    if self.host_sharding not in ('rows', 'seqio'):
      raise ConfigError(f"host_sharding={self.host_sharding!r}: use 'rows' or 'seqio'.")
    data.check_task(self.mixture_or_task_name, self.split)

  def iterator(self, start_batch: int = 0, shard_id: int = 0,
               num_shards: int = 1) -> Iterator[Dict[str, np.ndarray]]:
    """This host's rows of each global batch from `start_batch` on: the same batches an
    uninterrupted run would see there (deterministic order, position restored by
    skipping).

    host_sharding 'rows' (default): every host builds the global batch and keeps its
    rows, so results do not depend on the number of hosts (exact, at the cost of each
    host running the whole input pipeline). 'seqio': each host reads its own shard of
    the data (T5X's way; scales to pods, but the examples depend on the host count).
    """
    from gqa_jax import data  # TensorFlow (see the imports)
    if self.batch_size % num_shards:
      raise ConfigError(f'--gin.BATCH_SIZE={self.batch_size} must be divisible by the number '
                        f'of data shards ({num_shards}).')
    if self.host_sharding not in ('rows', 'seqio'):
      raise ConfigError(f"host_sharding={self.host_sharding!r}: use 'rows' or 'seqio'.")
    by_rows = self.host_sharding == 'rows'
    batches = data.get_dataset(
        self.mixture_or_task_name, split=self.split,
        task_feature_lengths=dict(self.task_feature_lengths),
        batch_size=self.batch_size if by_rows else self.batch_size // num_shards,
        shuffle=self.shuffle, seed=self.seed, shard_id=0 if by_rows else shard_id,
        num_shards=1 if by_rows else num_shards, pack=self.pack, start_batch=start_batch)
    if not by_rows or num_shards == 1:
      return batches
    rows = self.batch_size // num_shards
    return _Rows(batches, shard_id, rows)


class _Rows(Iterator[Dict[str, np.ndarray]]):
  """Rows [shard_id * rows, (shard_id + 1) * rows) of each batch of `batches`."""

  def __init__(self, batches, shard_id: int, rows: int):
    self.batches, self._slice = batches, slice(shard_id * rows, (shard_id + 1) * rows)

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    return {k: v[self._slice] for k, v in next(self.batches).items()}

  def close(self) -> None:
    self.batches.close()


def close_batches(batches) -> None:
  """Stops a training iterator's input pipeline (`DataIterator.close`: seconds saved at
  the end of every run), where it has one."""
  close = getattr(batches, 'close', None)
  if close is not None:
    close()


class MetricsLogger:
  """metrics.jsonl (one object per logged step), TensorBoard events and a progress line."""

  def __init__(self, model_dir: Path, start_step: int, total_steps: int):
    self.primary = jax.process_index() == 0
    self.start_step, self.total_steps = start_step, total_steps
    self.start_time = self.last_time = time.time()
    self.last_step = start_step
    self.file = open(model_dir / 'metrics.jsonl', 'a') if self.primary else None
    self.tb = None
    if self.primary:
      try:
        from flax.metrics import tensorboard
        self.tb = tensorboard.SummaryWriter(str(model_dir / 'tensorboard' / 'train'))
      except ImportError:  # TensorFlow is absent: metrics.jsonl still has everything
        log('TensorFlow is not installed: no TensorBoard events, metrics.jsonl only.')

  def log(self, step: int, metrics: Mapping[str, float], learning_rate: float, tokens: int):
    if not self.primary:
      return
    now = time.time()
    seconds = max(now - self.last_time, 1e-9)
    rate = (step - self.last_step) / seconds
    record = {'step': step, **{k: float(v) for k, v in metrics.items()},
              'learning_rate': learning_rate, 'tokens_per_second': tokens / seconds,
              'steps_per_second': rate, 'elapsed_seconds': now - self.start_time}
    self.file.write(json.dumps(record) + '\n')
    self.file.flush()
    if self.tb is not None:
      for key, value in record.items():
        if key != 'step':
          self.tb.scalar(key, value, step)
    eta = (self.total_steps - step) / rate if rate > 0 else float('nan')
    log(f'step {step}/{self.total_steps}  loss {record["loss"]:.4f} '
        f'({record.get("loss_per_token", float("nan")):.3f}/token)  '
        f'lr {learning_rate:.2e}  {record["tokens_per_second"]:,.0f} tokens/s  '
        f'ETA {_duration(eta)}')
    self.last_time, self.last_step = now, step

  def close(self):
    if self.file:
      self.file.close()
    if self.tb is not None:
      self.tb.flush()


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'

