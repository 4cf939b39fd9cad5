"""Evaluation and inference entry points, on seqio's Evaluator (T5X's way).

    gqa-jax eval  --gin_file=models/t5_1_1/tiny.gin --gin_file=runs/eval.gin \\
        --gin.CHECKPOINT_PATH=\\"/tmp/run\\" --gin.EVAL_OUTPUT_DIR=\\"/tmp/run/eval\\" ...
    gqa-jax infer --gin_file=...  --gin_file=runs/infer.gin ...

seqio decodes, postprocesses and scores the predictions with the task's metric
functions (ROUGE, BLEU, TriviaQA F1/EM) and writes them as JSONL
(`<task>-<step>.jsonl`) next to `<task>-metrics.jsonl`. Tasks with a score metric
(the built-in summarisation task's `nll`) also get the targets' log-likelihood under
the model (`score_fn_for`).
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

from gqa_jax import checkpoints, models, outputs, partitioning
from gqa_jax.checkpoints import training as ckpt_lib
from gqa_jax.errors import ConfigError
from gqa_jax.train_utils import DatasetConfig, log

# gqa_jax.data and seqio load TensorFlow (seconds): they are imported where a task is
# used, so that importing this module (train.py does, and so does the CLI) stays light.


def predict_fn_for(model: models.EncoderDecoderModel, params, batch_size: int,
                   decode_seed: int = 0, **decode_kwargs):
  """seqio's predict_fn: (index, model features) dataset -> [(index, token ids)].

  Batches are padded to `batch_size` so that decoding compiles once. `decode_kwargs` go
  to `EncoderDecoderModel.predict_batch` (method, num_decodes, alpha, temperature, topk,
  topp, max_decode_steps, prompt_with_targets); sampling draws batch i's rng from
  fold_in(PRNGKey(decode_seed), i), so a rerun samples the same predictions.
  """
  sample = decode_kwargs.get('method') == 'sample'

  def predict_fn(dataset):
    out = []
    keys = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens')
    for i, (index, batch) in enumerate(_padded_batches(dataset, batch_size, keys)):
      rng = jax.random.fold_in(jax.random.PRNGKey(decode_seed), i) if sample else None
      decodes = np.asarray(model.predict_batch(params, batch, rng, **decode_kwargs))
      out.extend(zip(index, decodes[:len(index)].tolist()))
    return out
  return predict_fn


def score_fn_for(model: models.EncoderDecoderModel, params, batch_size: int):
  """seqio's score_fn: (index, model features) dataset -> [(index, (log-likelihood of
  the target summed over its tokens, number of target tokens))], teacher-forced."""
  def score_fn(dataset):
    out = []
    for index, batch in _padded_batches(dataset, batch_size, models.MODEL_FEATURES):
      n = len(index)
      scores = np.asarray(model.score_batch(params, batch), np.float64)[:n]
      tokens = np.asarray(models.target_weights(batch), np.float64).sum(axis=-1)[:n]
      out.extend(zip(index, zip(scores.tolist(), tokens.tolist())))
    return out
  return score_fn


def _padded_batches(dataset, batch_size: int, keys):
  """(example indices, the `keys` features of their batch zero-padded to `batch_size`
  rows, so that each function compiles once) for every batch of the dataset."""
  for index, features in dataset.batch(batch_size).as_numpy_iterator():
    pad = batch_size - len(index)
    yield index.tolist(), {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
                           for k, v in features.items() if k in keys}


class Evaluation:
  """Decodes one task or mixture's split with a model and scores it, step after step."""

  def __init__(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
               output_dir: str, split: str = 'validation', batch_size: int = 32,
               num_examples: Optional[int] = None, compute_metrics: bool = True):
    from gqa_jax import data  # registers the tasks; TensorFlow (see the imports)
    del data
    import seqio  # after gqa_jax.data, which loads TensorFlow quietly
    self.output_dir = checkpoints.resolve_path(output_dir)  # relative, ~, ..
    self.output_dir.mkdir(parents=True, exist_ok=True)
    self.batch_size = batch_size
    self.compute_metrics = compute_metrics
    self.evaluator = seqio.Evaluator(
        mixture_or_task_name, seqio.EncDecFeatureConverter(pack=False), eval_split=split,
        sequence_length=dict(task_feature_lengths), num_examples=num_examples,
        logger_cls=[seqio.JSONLogger], log_dir=str(self.output_dir),
        async_compute_metrics=False)

  def run(self, model: models.EncoderDecoderModel, params, step: int,
          **decode_kwargs) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} (empty without metrics); predictions go to JSONL.
    decode_kwargs: `predict_fn_for`'s (greedy by default)."""
    metrics, outputs = self.evaluator.evaluate(
        compute_metrics=self.compute_metrics, step=step,
        predict_fn=predict_fn_for(model, params, self.batch_size, **decode_kwargs),
        score_fn=score_fn_for(model, params, self.batch_size))
    if self.compute_metrics:  # seqio's JSONLogger has written the predictions
      return {task: {k: float(v) for k, v in values.items()}
              for task, values in metrics.result().items()}
    self._write_predictions(outputs, step)
    return {}

  def _write_predictions(self, outputs, step: int):
    """Without metrics seqio logs nothing: one JSONL line per example, in order."""
    import seqio  # TensorFlow (see the imports); gqa_jax.data was loaded by __init__
    for task in self.evaluator.eval_tasks:
      predictions = outputs[task.name][seqio.metrics.ModelOutputType.PREDICTION]
      vocab = task.output_features['targets'].vocabulary
      examples = self.evaluator.cached_task_datasets[task.name].as_numpy_iterator()
      text = lambda x: x.decode() if isinstance(x, bytes) else x
      with open(self.output_dir / f'{task.name}-{step:06d}.jsonl', 'w') as f:
        for example, tokens in zip(examples, predictions):
          f.write(json.dumps({'input': text(example.get('inputs_pretokenized')),
                              'target': text(example.get('targets_pretokenized')),
                              'output': vocab.decode(list(tokens))}) + '\n')


class PeriodicEval:
  """Decodes and scores a validation split during training; keeps the best checkpoint.

  The best checkpoint's files are hard-linked into MODEL_DIR/best/checkpoint_<step>
  (no extra disk; checkpoint files never change once written), so that
  KEEP_CHECKPOINTS may delete the original. MODEL_DIR/best/best.json says which.
  """

  def __init__(self, dataset_cfg: DatasetConfig, model_dir: Path, period: int,
               num_examples: Optional[int], best_metric: Optional[str], best_mode: str):
    if best_mode not in ('max', 'min'):
      raise ConfigError(f"--gin.BEST_MODE={best_mode!r}: use 'max' or 'min'.")
    self.period, self.model_dir = period, model_dir
    self.best_metric, self.best_mode = best_metric, best_mode
    self.evaluation = Evaluation(
        mixture_or_task_name=dataset_cfg.mixture_or_task_name,
        task_feature_lengths=dataset_cfg.task_feature_lengths,
        output_dir=str(model_dir / 'eval'), split=dataset_cfg.split,
        batch_size=dataset_cfg.batch_size, num_examples=num_examples)
    best_file = model_dir / 'best' / 'best.json'
    self.best = json.loads(best_file.read_text()) if best_file.exists() else None

  def run(self, model, params, step: int):
    results = self.evaluation.run(model, params, step)
    flat = {f'{task}/{name}': value for task, values in results.items()
            for name, value in values.items()}
    if jax.process_index() != 0:
      return flat
    with open(self.model_dir / 'eval_metrics.jsonl', 'a') as f:
      f.write(json.dumps({'step': step, **flat}) + '\n')
    log(f'eval at step {step}: ' + ', '.join(f'{k} {v:.3f}' for k, v in flat.items()))
    if self.best_metric:
      if self.best_metric not in flat:
        raise ConfigError(f'--gin.BEST_METRIC={self.best_metric!r} is not among the eval '
                          f'metrics {sorted(flat)}.')
      value = flat[self.best_metric]
      better = (self.best is None or (value > self.best['value'] if self.best_mode == 'max'
                                      else value < self.best['value']))
      if better:
        self._keep_best(step, value)
    return flat

  def _keep_best(self, step: int, value: float):
    best_dir = self.model_dir / 'best'
    tmp = self.model_dir / '.best.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(self.model_dir / f'checkpoint_{step}', tmp / f'checkpoint_{step}',
                    copy_function=os.link)
    self.best = {'metric': self.best_metric, 'value': value, 'step': step,
                 'path': str(best_dir / f'checkpoint_{step}')}
    (tmp / 'best.json').write_text(json.dumps(self.best, indent=2) + '\n')
    shutil.rmtree(best_dir, ignore_errors=True)
    os.rename(tmp, best_dir)
    log(f'new best {self.best_metric} = {value:.3f} at step {step}: {best_dir}')


def check_settings(*, mixture_or_task_name, task_feature_lengths, output_dir, split,
                   batch_size, num_examples, decode_method, num_decodes, temperature, topk,
                   topp, max_decode_steps, compute_metrics: bool = True):
  """Raises ConfigError for a setting that cannot work, naming the gin macro that sets
  it (EVAL_* for eval, INFER_* for infer), before any checkpoint is read. Returns the
  resolved output folder."""
  from gqa_jax import data  # TensorFlow (see the imports)
  prefix = 'EVAL' if compute_metrics else 'INFER'
  lengths = task_feature_lengths
  if (not isinstance(lengths, Mapping) or not {'inputs', 'targets'} <= set(lengths)
      or not all(isinstance(lengths[k], int) and lengths[k] > 0
                 for k in ('inputs', 'targets'))):
    raise ConfigError(f'TASK_FEATURE_LENGTHS={lengths!r}: give positive lengths for both '
                      "features, e.g. {'inputs': 512, 'targets': 128}.")
  if not _positive_int(batch_size):
    raise ConfigError(f'{prefix}_BATCH_SIZE={batch_size!r} must be a positive integer.')
  if num_examples is not None and not _positive_int(num_examples):
    raise ConfigError(f'{prefix}_NUM_EXAMPLES={num_examples!r} must be a positive integer, '
                      'or None for the whole split.')
  if decode_method not in models.DECODE_METHODS:
    raise ConfigError(f'DECODE_METHOD={decode_method!r} is unknown: use one of '
                      f'{", ".join(repr(m) for m in models.DECODE_METHODS)}.')
  if not _positive_int(num_decodes):
    raise ConfigError(f'NUM_DECODES={num_decodes!r} must be a positive integer.')
  if not isinstance(temperature, (int, float)) or temperature < 0:
    raise ConfigError(f'TEMPERATURE={temperature!r} must be >= 0 (0 means greedy).')
  if not isinstance(topk, int) or topk < 0:
    raise ConfigError(f'TOPK={topk!r} must be an integer >= 0 (0: no top-k cut).')
  if not isinstance(topp, (int, float)) or not 0 <= topp <= 1:
    raise ConfigError(f'TOPP={topp!r} must be in [0, 1] (0: no nucleus cut).')
  if topk and topp:
    raise ConfigError(f'TOPK={topk} and TOPP={topp}: set at most one of them.')
  if max_decode_steps is not None and not (
      _positive_int(max_decode_steps) and max_decode_steps <= lengths['targets']):
    raise ConfigError(f'MAX_DECODE_STEPS={max_decode_steps!r} must be in [1, '
                      f"{lengths['targets']}] (the targets length), or None.")
  data.check_task(mixture_or_task_name, split, split_what=f'{prefix}_SPLIT')
  return outputs.check_output_dir(output_dir, f'{prefix}_OUTPUT_DIR')


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def evaluate(*, model: models.EncoderDecoderModel, checkpoint_path: str,
             mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
             output_dir: str, split: str = 'validation', batch_size: int = 32,
             num_examples: Optional[int] = None, decode_method: str = 'greedy',
             num_decodes: int = 1, beam_alpha: float = 0.6, temperature: float = 1.0,
             topk: int = 0, topp: float = 0.0, max_decode_steps: Optional[int] = None,
             prompt_with_targets: bool = False, decode_seed: int = 0,
             compute_metrics: bool = True, mesh_data: int = -1,
             mesh_model: int = 1) -> Dict[str, Any]:
  """Decodes `split` with the checkpoint's parameters; writes predictions (and metrics).

  The paper decodes greedily (the default). Also: `decode_method='beam'` with
  `num_decodes` beams and length penalty `beam_alpha`; 'sample' (best of `num_decodes`)
  at `temperature`, cut to `topk` or `topp`, seeded by `decode_seed`. For any method,
  `max_decode_steps` limits the tokens decoded after the prompt, and
  `prompt_with_targets` (T5X's) forces each example's decoder_input_tokens, EOS
  removed, as a prompt that the output keeps. Semantics: `EncoderDecoderModel.
  predict_batch_with_aux`.
  Parameters are sharded over a ('data', 'model') mesh of `mesh_data` x `mesh_model`
  devices with the training loop's rules, so a model that trains sharded evaluates too.
  """
  from gqa_jax import data  # TensorFlow (see the imports)
  # Every setting, the task, the output folder and the checkpoint are checked before
  # the model is built or a tensor read; nothing is written until they pass.
  output_dir = check_settings(
      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      output_dir=output_dir, split=split, batch_size=batch_size, num_examples=num_examples,
      decode_method=decode_method, num_decodes=num_decodes, temperature=temperature,
      topk=topk, topp=topp, max_decode_steps=max_decode_steps,
      compute_metrics=compute_metrics)
  config = model.module.config
  source = _open_checkpoint(checkpoint_path, config)
  mesh = partitioning.create_mesh(data=mesh_data, model=mesh_model)
  rules = partitioning.standard_logical_axis_rules(config, mesh)
  with partitioning.mesh_context(mesh, rules):
    # The training loop's shardings, read one tensor at a time.
    params, step = ckpt_lib.restore_params(
        checkpoint_path, config, partitioning.param_shardings(config, mesh, rules),
        source=source)
    log(f'{"evaluating" if compute_metrics else "inferring"} {checkpoint_path} (step {step}) '
        f'on {mixture_or_task_name}:{split} -> {output_dir} (mesh {dict(mesh.shape)})')
    with data.data_errors():  # a bad record of the task's files: one line naming it
      evaluation = Evaluation(
          mixture_or_task_name=mixture_or_task_name,
          task_feature_lengths=task_feature_lengths, output_dir=output_dir, split=split,
          batch_size=batch_size, num_examples=num_examples, compute_metrics=compute_metrics)
      metrics = evaluation.run(model, params, step, method=decode_method,
                               num_decodes=num_decodes, alpha=beam_alpha,
                               temperature=temperature, topk=topk, topp=topp,
                               max_decode_steps=max_decode_steps,
                               prompt_with_targets=prompt_with_targets,
                               decode_seed=decode_seed)
  summary = {'step': step, 'checkpoint': checkpoint_path, 'metrics': metrics,
             'predictions': sorted(str(p) for p in output_dir.glob('*.jsonl')
                                   if not p.name.endswith('-metrics.jsonl'))}
  (output_dir / f'summary_{step}.json').write_text(json.dumps(summary, indent=2) + '\n')
  return summary


def _open_checkpoint(checkpoint_path: str, config):
  """The checkpoint (metadata only, no tensors read), refused with one line when it is
  missing, not a checkpoint, or does not fit the model's config."""
  path = checkpoints.resolve_path(checkpoint_path, builtin=True)  # relative, ~, builtin:
  if not path.exists():
    raise ConfigError(f'CHECKPOINT_PATH {checkpoint_path} does not exist: give a '
                      "checkpoint_<step> folder or a training run's MODEL_DIR.")
  return ckpt_lib.open_checked(path, config, checkpoint_path)


def infer(**kwargs) -> Dict[str, Any]:
  """`evaluate` without metrics: predictions JSONL only."""
  return evaluate(compute_metrics=False, **kwargs)
