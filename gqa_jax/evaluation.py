"""Evaluation and inference entry points, on seqio's Evaluator (T5X's way).

    gqa-jax eval  --gin_file=models/t5_1_1/tiny.gin --gin_file=runs/eval.gin \\
        --gin.CHECKPOINT_PATH=\\"/tmp/run\\" --gin.EVAL_OUTPUT_DIR=\\"/tmp/run/eval\\" ...
    gqa-jax infer --gin_file=...  --gin_file=runs/infer.gin ...

seqio decodes, postprocesses and scores the predictions with the task's metric
functions (ROUGE, BLEU, TriviaQA F1/EM) and writes them as JSONL
(`<task>-<step>.jsonl`) next to `<task>-metrics.jsonl`. Tasks with a score metric
(the built-in summarisation task's `nll`) also get the targets' log-likelihood under
the model (`score_fn_for`). The output folder is locked while it is written
(`OUTPUT_LOCK`): a second eval or infer into it is refused, naming the first.
"""

import ctypes
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import jax
import numpy as np

from gqa_jax import checkpoints, locks, models, outputs, partitioning
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


EVAL_RECORDS = 'eval_metrics.jsonl'   # in MODEL_DIR: one line per evaluated step
BEST_DIR = 'best'                     # in MODEL_DIR: the best checkpoint and best.json
_NEW_BEST = '.best.partial'           # a new best being made; whole once best.json is in
_OLD_BEST = '.best.old'               # the previous best, set aside while the new moves in
OUTPUT_LOCK = '.lock'                 # in EVAL_OUTPUT_DIR / INFER_OUTPUT_DIR (locks.own)


def eval_due(step: int, period: int, last_step: int) -> bool:
  """Periodic eval's steps: every `period` steps, and the run's last step."""
  return step % period == 0 or step == last_step


def eval_unfinished(model_dir: Path, step: int, period: int, last_step: int) -> bool:
  """Whether the eval of `step` is due but not recorded in MODEL_DIR's eval_metrics.jsonl:
  the run that saved checkpoint_<step> was stopped during its eval (a resumed run redoes
  it). The first process's view decides for all the processes of a run."""
  missing = eval_due(step, period, last_step) and step not in {
      r['step'] for r in _read_records(model_dir / EVAL_RECORDS)}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


class PeriodicEval:
  """Decodes and scores a validation split during training; keeps the best checkpoint.

  The best checkpoint's files are hard-linked into MODEL_DIR/best/checkpoint_<step>
  (no extra disk; checkpoint files never change once written), so that
  KEEP_CHECKPOINTS may delete the original. MODEL_DIR/best/best.json says which, and
  with which value: a resumed run compares its evals with it.

  Nothing a kill interrupts is lost. A new best is made whole beside the old one
  (`.best.partial`, whole once its best.json is written), then the two are exchanged in
  one atomic step (`exchange_paths`; where the file system cannot, the old one is renamed
  aside to `.best.old` and the new one into place) and the old one deleted; a run that starts
  finishes or undoes a swap that a kill interrupted (`_recover_best`). An eval's line in
  eval_metrics.jsonl is written last, after the best is kept, replacing any line of the
  same step: a step without a line is evaluated again (`eval_unfinished`).
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
    self.best = None
    if jax.process_index() == 0:  # the one process that writes MODEL_DIR's eval files
      self.best = self._known_best(_recover_best(model_dir))

  def _known_best(self, best: Optional[dict]) -> Optional[dict]:
    """best.json of MODEL_DIR/best, if it was chosen the way this run chooses."""
    if best is None or not self.best_metric:
      return best
    chosen = (best.get('metric'), best.get('mode', self.best_mode))
    if chosen != (self.best_metric, self.best_mode):
      log(f'{self.model_dir / BEST_DIR} was chosen by {chosen[0]} ({chosen[1]}), this run '
          f'chooses by {self.best_metric} ({self.best_mode}): its next eval replaces it.')
      return None
    return best

  def run(self, model, params, step: int):
    primary = jax.process_index() == 0
    if primary:  # seqio's lines of an earlier eval of this step, stopped by a kill
      for path in sorted((self.model_dir / 'eval').glob('*-metrics.jsonl')):
        _drop_step(path, step)
    results = self.evaluation.run(model, params, step)
    flat = {f'{task}/{name}': value for task, values in results.items()
            for name, value in values.items()}
    if not primary:
      return flat
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
    # Last: a step with a line is done (a kill before it means the eval is redone).
    _write_record(self.model_dir / EVAL_RECORDS, {'step': step, **flat})
    return flat

  def redo(self, model, params, step: int):
    """Evaluates checkpoint_<step>, whose eval a kill stopped (`eval_unfinished`)."""
    log(f'evaluating checkpoint_{step} first: {EVAL_RECORDS} has no line for it (the run '
        'that saved it was stopped during its eval).')
    return self.run(model, params, step)

  def _keep_best(self, step: int, value: float):
    best_dir, new, old = (self.model_dir / n for n in (BEST_DIR, _NEW_BEST, _OLD_BEST))
    shutil.rmtree(new, ignore_errors=True)  # a swap's leftover (_recover_best removes them)
    shutil.copytree(self.model_dir / f'checkpoint_{step}', new / f'checkpoint_{step}',
                    copy_function=os.link)
    best = {'metric': self.best_metric, 'mode': self.best_mode, 'value': value,
            'step': step, 'path': str(best_dir / f'checkpoint_{step}')}
    _write_atomically(new / 'best.json', json.dumps(best, indent=2) + '\n')  # new is whole
    if not best_dir.exists():
      os.rename(new, best_dir)
    elif exchange_paths(new, best_dir):  # one step: best/ is never missing
      shutil.rmtree(new)  # now the old best (_recover_best removes it after a kill)
    else:  # no atomic exchange here: best/ is missing between the renames
      os.rename(best_dir, old)
      os.rename(new, best_dir)
      shutil.rmtree(old)
    self.best = best
    log(f'new best {self.best_metric} = {value:.3f} at step {step}: {best_dir}')


def exchange_paths(a: Path, b: Path) -> bool:
  """Swaps two existing paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE).
  False, with nothing changed, where the system or file system does not offer it."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):  # a C library older than glibc 2.28
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  error = ctypes.get_errno()
  if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(error, os.strerror(error), str(a), None, str(b))


def _recover_best(model_dir: Path) -> Optional[dict]:
  """Finishes or undoes a best-checkpoint swap that a kill interrupted; returns best.json
  of MODEL_DIR/best (None if there is no best yet).

  A whole new best (its best.json written) was chosen over the old one: it moves into
  place unless best/ is already whole (then it was not yet renamed aside: the swap had
  not begun). The old one set aside goes back when there is nothing else.
  """
  best_dir, new, old = (model_dir / n for n in (BEST_DIR, _NEW_BEST, _OLD_BEST))
  if _read_best(best_dir) is None:
    if _read_best(new) is not None:
      if best_dir.exists():  # half deleted by an earlier version's swap
        shutil.rmtree(best_dir)
      os.rename(new, best_dir)
      log(f'{best_dir}: finished keeping the new best checkpoint (a kill interrupted it).')
    elif not best_dir.exists() and _read_best(old) is not None:
      os.rename(old, best_dir)
      log(f'{best_dir}: restored the best checkpoint (a kill interrupted its replacement).')
    elif best_dir.exists():
      log(f'{best_dir} has no readable best.json: its best value is unknown, the next '
          'eval replaces it.')
  for leftover in (new, old):
    if leftover.exists():
      shutil.rmtree(leftover)
  return _read_best(best_dir)


def _read_best(folder: Path) -> Optional[dict]:
  """best.json of a whole best folder (one that holds the checkpoint it names), or None."""
  try:
    best = json.loads((folder / 'best.json').read_text())
    whole = (folder / f'checkpoint_{int(best["step"])}').is_dir()
    float(best['value'])
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return best if whole else None


def _read_records(path: Path) -> List[dict]:
  """The whole JSON lines of an eval record file that have a step (none if missing)."""
  records = []
  try:
    lines = path.read_text().splitlines()
  except FileNotFoundError:
    return records
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue  # cut short by a kill of a version that appended in place
    if isinstance(record, dict) and isinstance(record.get('step'), int):
      records.append(record)
  return records


def _write_record(path: Path, record: dict):
  """Adds `record` to a JSONL record file, replacing any line of its step; the file is
  replaced whole (a kill leaves the old one or the new one)."""
  records = [r for r in _read_records(path) if r['step'] != record['step']] + [record]
  records.sort(key=lambda r: r['step'])
  _write_atomically(path, ''.join(json.dumps(r) + '\n' for r in records))


def _drop_step(path: Path, step: int):
  """Removes the lines of `step` from a JSONL record file, if it has any."""
  records = _read_records(path)
  if any(r['step'] == step for r in records):
    _write_atomically(path, ''.join(json.dumps(r) + '\n' for r in records
                                    if r['step'] != step))


def _write_atomically(path: Path, text: str):
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def check_settings(*, mixture_or_task_name, task_feature_lengths, output_dir, split,
                   batch_size, num_examples, decode_method, num_decodes, temperature, topk,
                   topp, max_decode_steps, compute_metrics: bool = True,
                   vocab_size: Optional[int] = None):
  """Raises ConfigError for a setting that cannot work, naming the gin macro that sets
  it (EVAL_* for eval, INFER_* for infer), before any checkpoint is read; and for a task
  whose token ids reach past the model's `vocab_size` rows (given: checked). Returns the
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
  if vocab_size is not None:  # else NaN scores and empty decodes, and exit status 0
    data.check_vocabulary(mixture_or_task_name, vocab_size,
                          what=f'the model (network.T5Config.vocab_size={vocab_size})')
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
  # Every setting, the task (and its vocabulary), the output folder and the checkpoint
  # are checked before the model is built or a tensor read; nothing is written until
  # they pass. The output folder is then locked: one writer at a time.
  config = model.module.config
  checked_dir = check_settings(
      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      output_dir=output_dir, split=split, batch_size=batch_size, num_examples=num_examples,
      decode_method=decode_method, num_decodes=num_decodes, temperature=temperature,
      topk=topk, topp=topp, max_decode_steps=max_decode_steps,
      compute_metrics=compute_metrics, vocab_size=config.vocab_size)
  source = _open_checkpoint(checkpoint_path, config)
  name = f'{"EVAL" if compute_metrics else "INFER"}_OUTPUT_DIR'
  with locks.own(checked_dir, f'{name} {checked_dir}',
                 f'wait for it to finish, or choose another {name}',
                 lock=jax.process_index() == 0, lock_name=OUTPUT_LOCK):
    return _evaluate(
        model=model, checkpoint_path=checkpoint_path, source=source,
        mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
        output_dir=checked_dir, split=split, batch_size=batch_size,
        num_examples=num_examples, compute_metrics=compute_metrics, mesh_data=mesh_data,
        mesh_model=mesh_model, decode_kwargs=dict(
            method=decode_method, num_decodes=num_decodes, alpha=beam_alpha,
            temperature=temperature, topk=topk, topp=topp,
            max_decode_steps=max_decode_steps, prompt_with_targets=prompt_with_targets,
            decode_seed=decode_seed))


def _evaluate(*, model, checkpoint_path, source, mixture_or_task_name, task_feature_lengths,
              output_dir: Path, split, batch_size, num_examples, compute_metrics, mesh_data,
              mesh_model, decode_kwargs) -> Dict[str, Any]:
  """`evaluate` once its settings are checked and its output folder is held."""
  from gqa_jax import data  # TensorFlow (see the imports)
  config = model.module.config
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
      metrics = evaluation.run(model, params, step, **decode_kwargs)
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
