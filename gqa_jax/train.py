"""Training (pretrain, uptrain, finetune), configured with gin the T5X way.

    gqa-jax train --gin_file=experiments/tiny_pretrain.gin --gin.MODEL_DIR=\\"/tmp/run\\"
    python -m gqa_jax.train --gin_file=...   # the same

Where a run starts: the latest checkpoint in MODEL_DIR (a resumed run, which
takes precedence), else INITIAL_CHECKPOINT_PATH (any format gqa_jax reads, e.g.
a converted checkpoint: uptraining continues from its step), else a fresh init.
The log says which and why. Uptraining runs ALPHA x the source's pretraining
steps (its step, unless UPTRAIN_SOURCE_STEPS says otherwise).

MODEL_DIR belongs to one run at a time: the run holds MODEL_DIR/.lock (a second
run on it is refused, naming the first). MODEL_DIR/run.json records where the run
began (step, INITIAL_CHECKPOINT_PATH, uptraining's source steps); it is written
with the run's first checkpoint and trusted only beside checkpoints, so a run that
stopped before saving anything leaves nothing that a later run would resume. A
resumed run starts from the newest checkpoint that restores: newer damaged ones
are named and moved aside (`checkpoint_<step>.corrupt-<time>`), never deleted.
"""

import contextlib
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import optax

from gqa_jax import checkpoints, evaluation, locks, models, network, optimizers, outputs
from gqa_jax import microbatches, partitioning, train_utils
from gqa_jax.checkpoints import training as ckpt_lib
from gqa_jax.errors import ConfigError, UserInputError
from gqa_jax.train_utils import DatasetConfig, MetricsLogger, log

Array = jax.Array


def make_train_step(model: models.EncoderDecoderModel, optimizer, param_shardings,
                    opt_shardings, seed: int, num_microbatches: Optional[int] = None):
  """The jitted step: gradients of the model loss, one optimizer update.

  With `num_microbatches` n > 1 the gradients of the global batch [B, ...] are
  accumulated over n strided microbatches of B / n rows (`microbatches`): the same loss,
  metrics and update as the whole batch's, with the activations of B / n rows.
  """
  base_rng = jax.random.PRNGKey(seed)

  def train_step(params, opt_state, batch, step):
    # Dropout depends only on (seed, step): a resumed run draws the same masks.
    rng = jax.random.fold_in(base_rng, step)
    dropout_rng = rng if model.module.config.dropout_rate > 0 else None
    if num_microbatches is None or num_microbatches == 1:
      grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    else:
      grad_fn = microbatches.value_and_grad(model, num_microbatches)
    (_, metrics), grads = grad_fn(params, batch, dropout_rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['loss_per_token'] = metrics['cross_ent_loss'] / jnp.maximum(metrics['weight_sum'], 1)
    return params, opt_state, metrics

  return jax.jit(train_step, donate_argnums=(0, 1),
                 out_shardings=(param_shardings, opt_shardings, None))


def uptrain_steps(alpha: float, source_steps: int) -> int:
  """The paper's uptraining budget: alpha of the original pretraining steps (0 for the
  paper's alpha = 0 cell: the converted checkpoint is used as it is)."""
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
    raise ConfigError(f'--gin.ALPHA={alpha!r} must lie in [0, 1]: the fraction of the '
                      "source's pretraining steps to uptrain for (the paper uses 0.05 and 0.1).")
  return int(round(alpha * source_steps))


class LossNotFinite(UserInputError, FloatingPointError):
  """The loss turned NaN or infinite: the settings (learning rate) or the data are at fault."""


LOCK_FILE = '.lock'     # in MODEL_DIR, held by process 0 for the whole run (locks.hold)
RUN_FILE = 'run.json'   # where the run started; written with the run's first checkpoint


def train(*, model: models.EncoderDecoderModel, model_dir: str,
          train_dataset_cfg: DatasetConfig, optimizer: optax.GradientTransformation,
          learning_rate_schedule: Callable[[int], float],
          total_steps: Optional[int] = None, checkpoint_period: int = 1000,
          keep_checkpoints: Optional[int] = None, log_period: int = 1,
          initial_checkpoint_path: Optional[str] = None, uptrain_alpha: Optional[float] = None,
          uptrain_source_steps: Optional[int] = None, mesh_data: int = -1, mesh_model: int = 1,
          logical_axis_rules=None, random_seed: int = 0,
          infer_eval_dataset_cfg: Optional[DatasetConfig] = None, eval_period: Optional[int] = None,
          eval_num_examples: Optional[int] = None, best_metric: Optional[str] = None,
          best_mode: str = 'max', num_microbatches: Optional[int] = None,
          activation_partitioning_dims: int = 1, parameter_partitioning_dims: int = 1) -> Dict[str, Any]:
  """Trains `model` until step `total_steps` (absolute, as in T5X). Returns a summary.

  Every `eval_period` steps and at the last step the model decodes
  `infer_eval_dataset_cfg` (greedy, as in the paper) and is scored by the task's
  metrics; with `best_metric` ('task/metric', e.g. 'gqa_builtin_docstring/rougeL') the
  best checkpoint is kept in MODEL_DIR/best/. A resumed run first evaluates its
  checkpoint if a kill stopped that checkpoint's eval (`evaluation.PeriodicEval`).

  With `uptrain_alpha`, the run instead ends alpha x the source's pretraining steps
  after the step it started from (the paper's uptraining budget).

  With `num_microbatches` n > 1 each step accumulates the gradients of n strided
  microbatches of BATCH_SIZE / n rows before its one update (the same update as the
  whole batch's, with the activation memory of a microbatch); None or 1: no accumulation.

  Every setting is checked before anything is written (ConfigError naming the gin
  binding); the run then holds MODEL_DIR's lock until it returns. SIGTERM and SIGINT
  (Ctrl-C) stop it after the current step with a checkpoint: the summary says
  'preempted' and `exit_status` gives the command's non-zero status.

  Raises:
    ConfigError: a setting that cannot work, or a MODEL_DIR that does not fit the run.
    CheckpointError: INITIAL_CHECKPOINT_PATH does not fit, or no checkpoint in MODEL_DIR
      restores.
    OutputLocked: another run holds MODEL_DIR.
  """
  _require(MODEL_DIR=model_dir, MIXTURE_OR_TASK_NAME=train_dataset_cfg.mixture_or_task_name,
           TASK_FEATURE_LENGTHS=train_dataset_cfg.task_feature_lengths,
           INITIAL_CHECKPOINT_PATH=initial_checkpoint_path)
  if uptrain_alpha is None:
    _require(TRAIN_STEPS=total_steps)
  # == Settings: all checked before anything is read or written ========================
  evaluating = infer_eval_dataset_cfg is not None and eval_period is not None
  _check_settings(total_steps=total_steps, checkpoint_period=checkpoint_period,
                  keep_checkpoints=keep_checkpoints, log_period=log_period,
                  initial_checkpoint_path=initial_checkpoint_path, uptrain_alpha=uptrain_alpha,
                  uptrain_source_steps=uptrain_source_steps, random_seed=random_seed,
                  eval_period=eval_period, eval_num_examples=eval_num_examples,
                  best_metric=best_metric, best_mode=best_mode)
  model_dir = _check_model_dir(model_dir)
  config: network.T5Config = model.module.config
  train_dataset_cfg.validate('BATCH_SIZE')
  train_utils.check_vocabulary(train_dataset_cfg, config)
  if evaluating:
    infer_eval_dataset_cfg.validate('EVAL_BATCH_SIZE')
    train_utils.check_vocabulary(infer_eval_dataset_cfg, config)
    train_utils.check_best_metric(best_metric, infer_eval_dataset_cfg)
  mesh = partitioning.create_mesh(data=mesh_data, model=mesh_model)
  if train_dataset_cfg.batch_size % mesh.shape['data']:
    raise ConfigError(f'--gin.BATCH_SIZE={train_dataset_cfg.batch_size} does not split over '
                      f'the {mesh.shape["data"]} data-parallel devices (MESH_DATA): use a '
                      f'multiple of {mesh.shape["data"]}.')
  microbatches.check_num_microbatches(num_microbatches, train_dataset_cfg.batch_size,
                                      mesh.shape['data'])
  rules = logical_axis_rules or partitioning.standard_logical_axis_rules(
      config, mesh, activation_partitioning_dims, parameter_partitioning_dims)
  settings = dict(
      total_steps=total_steps, checkpoint_period=checkpoint_period,
      keep_checkpoints=keep_checkpoints, log_period=log_period,
      initial_checkpoint_path=initial_checkpoint_path, uptrain_alpha=uptrain_alpha,
      uptrain_source_steps=uptrain_source_steps, random_seed=random_seed,
      eval_cfg=infer_eval_dataset_cfg if evaluating else None, eval_period=eval_period,
      eval_num_examples=eval_num_examples, best_metric=best_metric, best_mode=best_mode,
      num_microbatches=num_microbatches)
  # The layers' activation constraints bind to this mesh while steps are traced.
  with partitioning.mesh_context(mesh, rules), _owning(model_dir):
    return _train(model=model, model_dir=model_dir, train_dataset_cfg=train_dataset_cfg,
                  optimizer=optimizer, learning_rate_schedule=learning_rate_schedule,
                  mesh=mesh, rules=rules, **settings)


def exit_status(summary: Mapping[str, Any]) -> int:
  """The command's exit status for a train summary: 0, or 128 + the signal that stopped
  it (130 for Ctrl-C, 143 for SIGTERM), so that a preempted run never reads as done."""
  if summary.get('preempted'):
    return 128 + int(getattr(signal, summary.get('signal') or 'SIGTERM'))
  return 0


def _train(*, model, model_dir: Path, train_dataset_cfg, optimizer, learning_rate_schedule,
           mesh, rules, total_steps, checkpoint_period, keep_checkpoints, log_period,
           initial_checkpoint_path, uptrain_alpha, uptrain_source_steps, random_seed,
           eval_cfg, eval_period, eval_num_examples, best_metric, best_mode, num_microbatches):
  config: network.T5Config = model.module.config
  param_shardings = partitioning.param_shardings(config, mesh, rules)
  abstract_params = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      network.param_shapes(config), param_shardings)

  # == Where the run starts =======================================================
  ckpt = ckpt_lib.TrainCheckpointer(model_dir, keep_checkpoints, config)
  if ckpt.unfinished:
    log(f'removing {len(ckpt.unfinished)} unfinished save(s) of an interrupted run from '
        f'MODEL_DIR: {", ".join(ckpt.unfinished[:3])}{" ..." if len(ckpt.unfinished) > 3 else ""}')
  run_file = model_dir / RUN_FILE
  initial = (str(checkpoints.resolve_path(initial_checkpoint_path, builtin=True))
             if initial_checkpoint_path else None)
  data_position, restored_opt_state, source, params = {}, None, None, None
  if ckpt.all_steps():
    params, restored_opt_state, start_step, data_position = _resume(ckpt, optimizer,
                                                                   abstract_params)
    latest = start_step
    run = _recorded_run(run_file, initial, uptrain_source_steps)
  else:
    latest = None
    if run_file.exists():  # from a run that stopped before its first checkpoint
      log(f'ignoring {run_file}: MODEL_DIR has no checkpoint, so it describes no run to '
          'resume; this run replaces it with its first checkpoint.')
    if initial_checkpoint_path:
      log(f'starting from INITIAL_CHECKPOINT_PATH={initial_checkpoint_path} (MODEL_DIR has '
          'no checkpoint yet).')
      source = ckpt_lib.open_checked(initial_checkpoint_path, config)
    start_step = (source.step or 0) if source else 0
    run = {'start_step': start_step, 'initial_checkpoint_path': initial}

  # == How far it goes ============================================================
  if uptrain_alpha is not None:
    run_start = run['start_step'] if run else _initial_step(initial_checkpoint_path)
    source_steps = uptrain_source_steps or (run or {}).get('source_steps') or (
        run_start if initial_checkpoint_path else None)
    if not source_steps:
      raise ConfigError('uptraining with ALPHA needs the source pretraining steps: start '
                        'from a checkpoint that records its step or set '
                        '--gin.UPTRAIN_SOURCE_STEPS.')
    steps = uptrain_steps(uptrain_alpha, source_steps)
    if steps < 1:
      raise ConfigError(f'--gin.ALPHA={uptrain_alpha} x {source_steps} source steps rounds to '
                        f'0 uptraining steps: raise ALPHA to at least '
                        f'{0.5 / source_steps:.2g} (or check UPTRAIN_SOURCE_STEPS).')
    if run is not None:
      run['source_steps'] = source_steps
    if total_steps is not None and not _is_required(total_steps):
      # A pretraining file applied after runs/uptrain.gin sets it; ALPHA decides, as before.
      log(f'TRAIN_STEPS={total_steps} is not used: an uptraining run (ALPHA) ends ALPHA x '
          'the source steps after its start (runs/uptrain.gin sets TRAIN_STEPS = None; '
          'apply it after the pretraining files).')
    total_steps = run_start + steps
    log(f'uptraining: ALPHA={uptrain_alpha} x {source_steps} source steps = {steps} steps, '
        f'from step {run_start} to {total_steps}.')
  if latest is None and total_steps <= start_step:
    raise ConfigError(
        f'--gin.TRAIN_STEPS={total_steps} is not beyond step {start_step} of '
        f'INITIAL_CHECKPOINT_PATH={initial_checkpoint_path}: nothing would be trained. '
        "TRAIN_STEPS is absolute, as in T5X (the checkpoint's step plus the steps to train): "
        f'e.g. --gin.TRAIN_STEPS={start_step + total_steps} for {total_steps} more steps.')
  if latest is not None and total_steps < latest:
    raise ConfigError(
        f'MODEL_DIR {model_dir} is already at step {latest} (checkpoint_{latest}), beyond '
        f'the {total_steps} steps this run ends at: nothing would be trained. TRAIN_STEPS is '
        'absolute, as in T5X: raise it to train further, or choose another MODEL_DIR.')
  if latest is not None and total_steps == latest:
    log(f'MODEL_DIR {model_dir} is already at step {latest}, where this run ends: nothing '
        'to train (raise TRAIN_STEPS, absolute as in T5X, to train further).')
    if eval_cfg is not None and evaluation.eval_unfinished(model_dir, latest, eval_period,
                                                           total_steps):
      _periodic_eval(model_dir, eval_cfg, eval_period, eval_num_examples, best_metric,
                     best_mode).redo(model, params, latest)
    return {'step': latest, 'model_dir': str(model_dir), 'final_metrics': {},
            'preempted': False, 'signal': None}

  # == The parameters and optimizer state ==========================================
  if source is not None:
    params, _ = ckpt_lib.restore_params(initial_checkpoint_path, config, param_shardings,
                                        source=source)
    restored_opt_state = initial_opt_state(source=source, params=abstract_params,
                                           step=start_step, optimizer=optimizer,
                                           path=initial_checkpoint_path)
  elif params is None:
    log('starting from a fresh initialisation (no checkpoint in MODEL_DIR, no '
        'INITIAL_CHECKPOINT_PATH).')
    params = jax.jit(lambda: network.init_params(config, jax.random.PRNGKey(random_seed)),
                     out_shardings=param_shardings)()
  opt_shardings = partitioning.opt_state_shardings(optimizer, abstract_params, param_shardings)
  opt_state = partitioning.shard_tree(
      restored_opt_state if restored_opt_state is not None
      else jax.jit(optimizer.init, out_shardings=opt_shardings)(params), opt_shardings)
  evaluator = None
  if eval_cfg is not None:
    evaluator = _periodic_eval(model_dir, eval_cfg, eval_period, eval_num_examples,
                               best_metric, best_mode)
    if latest is not None and evaluation.eval_unfinished(model_dir, latest, eval_period,
                                                         total_steps):
      evaluator.redo(model, params, latest)  # before training on: nothing left unscored

  # == Data ===========================================================================
  batches_done = int(data_position.get('batches', 0))
  shard_id, num_shards = partitioning.host_data_shard(mesh)
  batches = train_dataset_cfg.iterator(start_batch=batches_done, shard_id=shard_id,
                                       num_shards=num_shards)
  to_global = lambda local: partitioning.make_global_batch(local, mesh)

  # == Loop ===========================================================================
  step_fn = make_train_step(model, optimizer, param_shardings, opt_shardings, random_seed,
                            num_microbatches)
  logger = MetricsLogger(model_dir, start_step, total_steps)
  step, last_saved, metrics = start_step, latest, {}
  # A fresh run records where it began with its first checkpoint (not before: a run.json
  # without checkpoints would describe a run that never saved anything).
  run_to_record = run if latest is None else None

  def save(reason):
    nonlocal last_saved, run_to_record
    if run_to_record is not None:
      _write_json(run_file, run_to_record)
      run_to_record = None
    ckpt.save(step, params, optimizers.to_t5x_param_states(opt_state, params),
              {'batches': batches_done}, {'reason': reason})
    last_saved = step
  # A data source's one-line errors, raised through tf.data. Imported here: gqa_jax.data
  # loads TensorFlow (seconds), and importing this module (the CLI, experiments) stays light.
  from gqa_jax import data
  with _stop_on_signals() as stop, data.data_errors():
    try:
      while step < total_steps and stop.signal is None:
        batch = to_global(next(batches))
        params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(step))
        step, batches_done = step + 1, batches_done + 1
        due_save = step % checkpoint_period == 0 and step != last_saved
        if step % log_period == 0 or step == total_steps or due_save:
          metrics = jax.device_get(metrics)
          if not math.isfinite(float(metrics['loss'])):
            kept = (f'the last good checkpoint is {model_dir}/checkpoint_{last_saved}'
                    if last_saved is not None else 'no checkpoint was saved')
            raise LossNotFinite(f'loss is {metrics["loss"]} at step {step}: stopping; '
                                f'{kept}. Lower the learning rate or check the data.')
        if step % log_period == 0 or step == total_steps:
          logger.log(step, metrics, float(learning_rate_schedule(step)),
                     tokens=float(metrics['weight_sum']) * log_period)
        due_eval = evaluator is not None and evaluation.eval_due(step, evaluator.period,
                                                                total_steps)
        if due_save or (due_eval and step != last_saved):
          save('period' if due_save else 'eval')
        if due_eval:
          evaluator.run(model, params, step)
      if step > start_step and step != last_saved:
        save('preempted' if stop.signal else 'end')
    finally:
      logger.close()
      train_utils.close_batches(batches)
  name = signal.Signals(stop.signal).name if stop.signal else None
  if name:
    saved = (f'saved {model_dir}/checkpoint_{step}' if last_saved == step
             else 'no step was trained, nothing saved')
    log(f'{name}: stopped at step {step} of {total_steps}; {saved}. Rerun the same command '
        'to resume.')
  return {'step': step, 'model_dir': str(model_dir), 'final_metrics': {
      k: float(v) for k, v in metrics.items()}, 'preempted': bool(name), 'signal': name}


# == Where a run starts: helpers ===================================================
def _resume(ckpt: ckpt_lib.TrainCheckpointer, optimizer, abstract_params):
  """(params, optax state, step, data position) of the newest checkpoint in MODEL_DIR
  that restores. Newer ones that do not (truncated, corrupted, half copied) are named,
  moved aside (not deleted) and skipped; a checkpoint of another model is an error."""
  config = ckpt.config
  abstract_states = optimizers.t5x_param_state_shapes(optimizer, abstract_params)
  bad = []
  for step in ckpt.all_steps():
    why = ckpt.incomplete(step)
    if why is None:
      try:
        on_disk = checkpoints.open_checkpoint(ckpt.step_dir(step))
      except checkpoints.CheckpointError as e:
        why = str(e)
      else:
        # Another model (another KV-head count): not damage, and nothing to fall back to.
        ckpt_lib.check_model_dir_checkpoint(on_disk, config, ckpt.model_dir)
        try:
          params, states, start_step, position = ckpt.restore(step, abstract_params,
                                                              abstract_states)
        except Exception as e:  # whatever Orbax or tensorstore raise on damaged files
          why = f'{type(e).__name__}: {_one_line(e)}'
    if why is None:
      break
    bad.append((step, why))
    log(f'checkpoint_{step} in MODEL_DIR does not restore: {why}')
  else:
    names = '; '.join(f'checkpoint_{s}: {w}' for s, w in bad)
    raise checkpoints.CheckpointError(
        f'no checkpoint in MODEL_DIR {ckpt.model_dir} restores ({names}). Nothing was moved '
        'or deleted: move them out of MODEL_DIR to start over, or choose another MODEL_DIR.')
  for bad_step, why in bad:
    aside = ckpt.set_aside(bad_step)
    log(f'moved checkpoint_{bad_step} aside to {aside} (kept, not deleted).')
  log(f'resuming from {ckpt.model_dir}/checkpoint_{start_step}'
      + (f', the newest checkpoint that restores ({len(bad)} newer did not)' if bad else '')
      + ': MODEL_DIR has checkpoints, which take precedence over INITIAL_CHECKPOINT_PATH.')
  opt_state = optimizers.from_t5x_param_states(states, params, start_step, optimizer)
  return params, opt_state, start_step, position


def _recorded_run(run_file: Path, initial: Optional[str],
                  uptrain_source_steps: Optional[int]) -> Optional[dict]:
  """MODEL_DIR/run.json of the run being resumed, checked against this run's settings;
  None if there is none (runs before it was written with the first checkpoint)."""
  if not run_file.exists():
    return None
  try:
    run = json.loads(run_file.read_text())
    int(run['start_step'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    log(f'ignoring {run_file}: unreadable ({e}).')
    return None
  how = 'fresh initialisation' if run.get('initial_checkpoint_path') is None else (
      f'INITIAL_CHECKPOINT_PATH={run["initial_checkpoint_path"]}')
  if 'initial_checkpoint_path' in run and run['initial_checkpoint_path'] != initial:
    raise ConfigError(
        f'MODEL_DIR {run_file.parent} holds checkpoints of a run that started from a {how} '
        f'(its {RUN_FILE}), but this run starts from '
        f'{"INITIAL_CHECKPOINT_PATH=" + initial if initial else "a fresh initialisation"}: '
        'resuming would continue the other run. Choose another MODEL_DIR, or pass that '
        'run\'s INITIAL_CHECKPOINT_PATH to resume it.')
  recorded = run.get('source_steps')
  if uptrain_source_steps and recorded and uptrain_source_steps != recorded:
    raise ConfigError(
        f'--gin.UPTRAIN_SOURCE_STEPS={uptrain_source_steps}, but the run being resumed in '
        f'MODEL_DIR {run_file.parent} was started with {recorded} (its {RUN_FILE}): use '
        f'{recorded} to resume it, or choose another MODEL_DIR.')
  return run


def _initial_step(initial_checkpoint_path: Optional[str]) -> int:
  """Where an uptraining run began when MODEL_DIR has checkpoints but no run.json: the
  step of its INITIAL_CHECKPOINT_PATH."""
  if initial_checkpoint_path:
    step = checkpoints.open_checkpoint(initial_checkpoint_path).step
    if step is not None:
      return step
  raise ConfigError(f'cannot tell where the uptraining in MODEL_DIR began: it has no '
                    f'{RUN_FILE} and INITIAL_CHECKPOINT_PATH records no step. Choose another '
                    'MODEL_DIR, or train to an absolute --gin.TRAIN_STEPS without ALPHA.')


def _periodic_eval(model_dir: Path, eval_cfg, eval_period, eval_num_examples, best_metric,
                   best_mode) -> evaluation.PeriodicEval:
  return evaluation.PeriodicEval(
      dataset_cfg=eval_cfg, model_dir=model_dir, period=eval_period,
      num_examples=eval_num_examples, best_metric=best_metric, best_mode=best_mode)


# == Settings and MODEL_DIR =========================================================
def _check_settings(*, total_steps, checkpoint_period, keep_checkpoints, log_period,
                    initial_checkpoint_path, uptrain_alpha, uptrain_source_steps, random_seed,
                    eval_period, eval_num_examples, best_metric, best_mode):
  """Every numeric or named setting of train(), by its gin macro, before any work."""
  if uptrain_alpha is not None:
    uptrain_steps(uptrain_alpha, 1)  # range and type
    if uptrain_alpha == 0:
      raise ConfigError('--gin.ALPHA=0 is the paper\'s "no uptraining" cell: there is '
                        'nothing to train; finetune from INITIAL_CHECKPOINT_PATH directly '
                        '(runs/finetune.gin), or set ALPHA > 0.')
    train_utils.check_int('UPTRAIN_SOURCE_STEPS', uptrain_source_steps, optional=True)
  else:
    train_utils.check_int('TRAIN_STEPS', total_steps,
                          fix='the absolute step the run ends at, as in T5X')
  train_utils.check_int('CHECKPOINT_PERIOD', checkpoint_period)
  train_utils.check_int('KEEP_CHECKPOINTS', keep_checkpoints, optional=True,
                        fix='None keeps every checkpoint')
  train_utils.check_int('LOG_PERIOD', log_period)
  train_utils.check_int('EVAL_PERIOD', eval_period, optional=True,
                        fix='None turns periodic eval off')
  train_utils.check_int('EVAL_NUM_EXAMPLES', eval_num_examples, optional=True,
                        fix='None scores the whole split')
  train_utils.check_int('RANDOM_SEED', random_seed, minimum=0)
  if random_seed >= 2 ** 32:
    raise ConfigError(f'--gin.RANDOM_SEED={random_seed}: must be below 2**32.')
  if best_mode not in ('max', 'min'):
    raise ConfigError(f"--gin.BEST_MODE={best_mode!r}: use 'max' or 'min'.")
  if best_metric is not None and eval_period is None:
    raise ConfigError(f'--gin.BEST_METRIC={best_metric!r} needs periodic eval: set '
                      '--gin.EVAL_PERIOD too (the best checkpoint is chosen by it).')
  if initial_checkpoint_path is not None and (
      not isinstance(initial_checkpoint_path, (str, os.PathLike))
      or not str(initial_checkpoint_path)):
    raise ConfigError(f'--gin.INITIAL_CHECKPOINT_PATH={initial_checkpoint_path!r}: must be a '
                      'path in escaped quotes, e.g. --gin.INITIAL_CHECKPOINT_PATH=\\"/ckpt/x\\", '
                      'or None.')


def _check_model_dir(model_dir) -> Path:
  """MODEL_DIR as an absolute path (`~`, relative, `..` as typed) that can be a folder."""
  if not isinstance(model_dir, (str, os.PathLike)) or not str(model_dir):
    raise ConfigError(f'--gin.MODEL_DIR={model_dir!r}: must be a folder path in escaped '
                      'quotes, e.g. --gin.MODEL_DIR=\\"/tmp/run\\".')
  path = outputs.check_output_dir(model_dir, 'MODEL_DIR')  # a file, under a file, read-only
  if (path / 'state').is_dir() or (path / 'checkpoint').is_file():
    raise ConfigError(f'MODEL_DIR {path} is a checkpoint step folder, not a run folder: '
                      'use the folder that holds checkpoint_<step> folders (to start from '
                      'this checkpoint, pass it as INITIAL_CHECKPOINT_PATH and choose a new '
                      'MODEL_DIR).')
  return path


def _owning(model_dir: Path):
  """MODEL_DIR created if need be and locked for the run (process 0: the processes of a
  multi-host run share it). A run refused before it wrote anything leaves no folder."""
  return locks.own(model_dir, f'MODEL_DIR {model_dir}',
                   'wait for that run to finish, or choose another MODEL_DIR',
                   lock=jax.process_index() == 0, lock_name=LOCK_FILE)


class _Stop:
  signal: Optional[int] = None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) set `.signal`: the loop saves and stops
  after the current step. A second Ctrl-C stops at once, without saving."""
  stop = _Stop()

  def handle(sig, _):
    if stop.signal is not None and sig == signal.SIGINT:
      raise KeyboardInterrupt
    stop.signal = sig
    log(f'{signal.Signals(sig).name}: stopping after this step with a checkpoint'
        + (' (Ctrl-C again to stop at once, without saving).' if sig == signal.SIGINT
           else '.'))
  # Handlers can only be set from the main thread (a library caller may use another).
  caught = ((signal.SIGTERM, signal.SIGINT)
            if threading.current_thread() is threading.main_thread() else ())
  previous = {sig: signal.signal(sig, handle) for sig in caught}
  try:
    yield stop
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _write_json(path: Path, value: dict):
  """Written whole or not at all (process 0 only)."""
  if jax.process_index() == 0:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(value) + '\n')
    os.replace(tmp, path)


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())[:500]


def _is_required(value) -> bool:
  return value is gin.REQUIRED


def _require(**values):
  """Gin passes its REQUIRED marker through unset macros: name them instead."""
  for name, value in values.items():
    if value is gin.REQUIRED or value is None and name in ('MODEL_DIR', 'TRAIN_STEPS'):
      raise ConfigError(f'{name} is not set: pass --gin.{name}=... (strings in escaped '
                        'quotes, e.g. --gin.MODEL_DIR=\\"/tmp/run\\").')


def initial_opt_state(source: checkpoints.Source, params, step: int, optimizer, path: str):
  """The optax state restored from INITIAL_CHECKPOINT_PATH's T5X slots, or None if it has none.

  A checkpoint written with another Adafactor factoring (a T5X run with another
  min_dim_size_to_factor) is refactored to this optimizer's, and the log says how much:
  full v -> its exact row/column means; v_row, v_col -> Adafactor's rank-one estimate.
  What no refactoring fixes is a CheckpointError that names the way out.
  """
  if not source.opt_state:
    log(f'INITIAL_CHECKPOINT_PATH={path} has no optimizer state: Adafactor starts from '
        f'zeros at step {step}.')
    return None
  flat = {k: t.read() for k, t in source.opt_state.items()}
  try:
    fitted, refactored = optimizers.refactor_t5x_param_states(flat, params, optimizer)
    # allow_refactor: what is left to fit is reported as what no factoring explains.
    state = optimizers.from_t5x_param_states(fitted, params, step, optimizer,
                                             allow_refactor=True)
  except ValueError as e:
    raise checkpoints.CheckpointError(
        f'the optimizer state of INITIAL_CHECKPOINT_PATH={path} does not fit this run\'s '
        f'optimizer: {e} Convert the checkpoint again (with --opt-state drop to start '
        'Adafactor from zeros), or configure the optimizer that wrote it.') from e
  count = len(jax.tree_util.tree_leaves(params))
  if refactored:
    p = refactored[0]
    log(f'refactored the Adafactor second moments of {len(refactored)} of {count} '
        'parameters (v_row/v_col <-> v): INITIAL_CHECKPOINT_PATH was written with another '
        "factoring (min_dim_size_to_factor) than this run's optimizer, e.g. "
        f'{p}: {_used_slots(flat, p)} -> {_used_slots(fitted, p)}; full v -> its exact '
        'row/column means, v_row/v_col -> the rank-one estimate Adafactor divides by.')
  log(f'restored the optimizer state of {count} parameters at step {step} from '
      'INITIAL_CHECKPOINT_PATH.')
  return state


def _used_slots(flat, param: str) -> str:
  """'v_row (32,), v_col (64,)': the second-moment slots of `param` that are not placeholders."""
  shapes = {s: tuple(flat[f'{optimizers.PREFIX}{param}/{s}'].shape)
            for s in ('v_row', 'v_col', 'v')}
  return ', '.join(f'{s} {shape}' for s, shape in shapes.items() if shape != (1,))


if __name__ == '__main__':
  # `python -m gqa_jax.train` as T5X users type `python -m t5x.train`. Imported here, not
  # at the top: the CLI imports this module, and the training layer never imports the CLI.
  from gqa_jax import cli
  sys.exit(cli.main(['train', *sys.argv[1:]]))
