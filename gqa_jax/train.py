"""Training (pretrain, uptrain, finetune), configured with gin the T5X way.

    gqa-jax train --gin_file=experiments/tiny_pretrain.gin --gin.MODEL_DIR=\\"/tmp/run\\"
    python -m gqa_jax.train --gin_file=...   # the same

Where a run starts: the latest checkpoint in MODEL_DIR (a resumed run, which
takes precedence), else INITIAL_CHECKPOINT_PATH (any format gqa_jax reads, e.g.
a converted checkpoint: uptraining continues from its step), else a fresh init.
The log says which and why. Uptraining runs ALPHA x the source's pretraining
steps (its step, unless UPTRAIN_SOURCE_STEPS says otherwise).
"""

import json
import math
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqa_jax import checkpoints, models, network, optimizers, partitioning
from gqa_jax.checkpoints import training as ckpt_lib
from gqa_jax import train_utils
from gqa_jax.train_utils import DatasetConfig, MetricsLogger, log

Array = jax.Array


def make_train_step(model: models.EncoderDecoderModel, optimizer, param_shardings,
                    opt_shardings, seed: int):
  """The jitted step: gradients of the model loss, one optimizer update."""
  base_rng = jax.random.PRNGKey(seed)

  def train_step(params, opt_state, batch, step):
    # Dropout depends only on (seed, step): a resumed run draws the same masks.
    rng = jax.random.fold_in(base_rng, step)
    dropout_rng = rng if model.module.config.dropout_rate > 0 else None
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(params, batch, dropout_rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['loss_per_token'] = metrics['cross_ent_loss'] / jnp.maximum(metrics['weight_sum'], 1)
    return params, opt_state, metrics

  return jax.jit(train_step, donate_argnums=(0, 1),
                 out_shardings=(param_shardings, opt_shardings, None))


def uptrain_steps(alpha: float, source_steps: int) -> int:
  """The paper's uptraining budget: alpha of the original pretraining steps."""
  if not 0 <= alpha <= 1:
    raise ValueError(f'ALPHA={alpha} must lie in [0, 1] (the paper uses 0.05 and 0.1).')
  return int(round(alpha * source_steps))


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
          best_mode: str = 'max') -> Dict[str, Any]:
  """Trains `model` until step `total_steps` (absolute, as in T5X). Returns a summary.

  Every `eval_period` steps the model decodes `infer_eval_dataset_cfg` (greedy, as in
  the paper) and is scored by the task's metrics; with `best_metric` ('task/metric',
  e.g. 'gqa_builtin_docstring/rougeL') the best checkpoint is kept in MODEL_DIR/best/.

  With `uptrain_alpha`, the run instead ends alpha x the source's pretraining steps
  after the step it started from (the paper's uptraining budget).
  """
  _require(MODEL_DIR=model_dir, MIXTURE_OR_TASK_NAME=train_dataset_cfg.mixture_or_task_name,
           TASK_FEATURE_LENGTHS=train_dataset_cfg.task_feature_lengths,
           INITIAL_CHECKPOINT_PATH=initial_checkpoint_path)
  if uptrain_alpha is None:
    _require(TRAIN_STEPS=total_steps)
  model_dir = checkpoints.resolve_path(model_dir)  # relative, ~, .. as the user typed them
  config: network.T5Config = model.module.config
  mesh = partitioning.create_mesh(data=mesh_data, model=mesh_model)
  rules = logical_axis_rules or partitioning.standard_logical_axis_rules(config, mesh)
  # The layers' activation constraints bind to this mesh while steps are traced.
  with partitioning.mesh_context(mesh, rules):
    evaluator = None
    if infer_eval_dataset_cfg is not None and eval_period:
      evaluator = train_utils.PeriodicEval(infer_eval_dataset_cfg, model_dir, eval_period,
                                           eval_num_examples, best_metric, best_mode)
    return _train(model, model_dir, train_dataset_cfg, optimizer,
                  learning_rate_schedule, total_steps, checkpoint_period, keep_checkpoints,
                  log_period, initial_checkpoint_path, uptrain_alpha, uptrain_source_steps,
                  mesh, rules, random_seed, evaluator)


def _train(model, model_dir: Path, train_dataset_cfg, optimizer, learning_rate_schedule,
           total_steps, checkpoint_period, keep_checkpoints, log_period,
           initial_checkpoint_path, uptrain_alpha, uptrain_source_steps, mesh, rules,
           random_seed, evaluator):
  config: network.T5Config = model.module.config
  model_dir.mkdir(parents=True, exist_ok=True)
  param_shardings = partitioning.param_shardings(config, mesh, rules)
  abstract_params = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      network.param_shapes(config), param_shardings)

  # == Where the run starts =======================================================
  ckpt = ckpt_lib.TrainCheckpointer(model_dir, keep_checkpoints, config)
  latest = ckpt.latest_step()
  data_position, restored_opt_state = {}, None
  if latest is not None:
    log(f'resuming from {model_dir}/checkpoint_{latest}: MODEL_DIR has checkpoints, which '
        'take precedence over INITIAL_CHECKPOINT_PATH.')
    abstract_states = optimizers.t5x_param_state_shapes(optimizer, abstract_params)
    params, param_states, start_step, data_position = ckpt.restore(
        latest, abstract_params, abstract_states)
    restored_opt_state = optimizers.from_t5x_param_states(param_states, params, start_step,
                                                          optimizer)
  elif initial_checkpoint_path:
    log(f'starting from INITIAL_CHECKPOINT_PATH={initial_checkpoint_path} (MODEL_DIR has '
        'no checkpoint yet).')
    source = checkpoints.open_checkpoint(initial_checkpoint_path)
    ckpt_lib.check_initial_checkpoint(source, config, initial_checkpoint_path)
    params = place_tensors(source.params, param_shardings)
    start_step = source.step or 0
    restored_opt_state = initial_opt_state(source, abstract_params, start_step, optimizer,
                                           initial_checkpoint_path)
  else:
    log('starting from a fresh initialisation (no checkpoint in MODEL_DIR, no '
        'INITIAL_CHECKPOINT_PATH).')
    params = jax.jit(lambda: network.init_params(config, jax.random.PRNGKey(random_seed)),
                     out_shardings=param_shardings)()
    start_step = 0
  opt_shardings = partitioning.opt_state_shardings(optimizer, abstract_params, param_shardings)
  opt_state = partitioning.shard_tree(
      restored_opt_state if restored_opt_state is not None
      else jax.jit(optimizer.init, out_shardings=opt_shardings)(params), opt_shardings)

  # == How far it goes ============================================================
  # MODEL_DIR/run.json records where the run began (a resumed run keeps its budget).
  run_file = model_dir / 'run.json'
  run = json.loads(run_file.read_text()) if run_file.exists() else {'start_step': start_step}
  if uptrain_alpha is not None:
    source_steps = uptrain_source_steps or run.get('source_steps') or (
        start_step if initial_checkpoint_path else None)
    if not source_steps:
      raise ValueError('uptraining with ALPHA needs the source pretraining steps: start '
                       'from a checkpoint that records its step or set UPTRAIN_SOURCE_STEPS.')
    run['source_steps'] = source_steps
    total_steps = run['start_step'] + uptrain_steps(uptrain_alpha, source_steps)
    log(f'uptraining: ALPHA={uptrain_alpha} x {source_steps} source steps = '
        f'{total_steps - run["start_step"]} steps, from step {run["start_step"]} to '
        f'{total_steps}.')
  if total_steps is None:
    raise ValueError('TRAIN_STEPS is not set.')
  if jax.process_index() == 0:
    run_file.write_text(json.dumps(run) + '\n')

  # == Data ===========================================================================
  batches_done = int(data_position.get('batches', 0))
  shard_id, num_shards = partitioning.host_data_shard(mesh)
  batches = train_dataset_cfg.iterator(start_batch=batches_done, shard_id=shard_id,
                                       num_shards=num_shards)
  to_global = lambda local: partitioning.make_global_batch(local, mesh)

  # == Loop ===========================================================================
  step_fn = make_train_step(model, optimizer, param_shardings, opt_shardings, random_seed)
  logger = MetricsLogger(model_dir, start_step, total_steps)
  stop = {'signal': None}
  previous = signal.signal(signal.SIGTERM, lambda sig, _: stop.update(signal=sig))
  step, last_saved, metrics = start_step, latest, {}

  def save(reason):
    nonlocal last_saved
    ckpt.save(step, params, optimizers.to_t5x_param_states(opt_state, params),
              {'batches': batches_done}, {'reason': reason})
    last_saved = step
  try:
    while step < total_steps and stop['signal'] is None:
      batch = to_global(next(batches))
      params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(step))
      step, batches_done = step + 1, batches_done + 1
      due_save = step % checkpoint_period == 0 and step != last_saved
      if step % log_period == 0 or step == total_steps or due_save:
        metrics = jax.device_get(metrics)
        if not math.isfinite(float(metrics['loss'])):
          kept = (f'the last good checkpoint is {model_dir}/checkpoint_{last_saved}'
                  if last_saved is not None else 'no checkpoint was saved')
          raise FloatingPointError(f'loss is {metrics["loss"]} at step {step}: stopping; '
                                   f'{kept}. Lower the learning rate or check the data.')
      if step % log_period == 0 or step == total_steps:
        logger.log(step, metrics, float(learning_rate_schedule(step)),
                   tokens=float(metrics['weight_sum']) * log_period)
      due_eval = evaluator is not None and step % evaluator.period == 0
      if due_save or (due_eval and step != last_saved):
        save('period' if due_save else 'eval')
      if due_eval:
        evaluator.run(model, params, step)
    if step != last_saved:
      save('preempted' if stop['signal'] else 'end')
  finally:
    signal.signal(signal.SIGTERM, previous)
    logger.close()
  if stop['signal']:
    log(f'SIGTERM: saved checkpoint_{step} and stopped; rerun the same command to resume.')
  return {'step': step, 'model_dir': str(model_dir), 'final_metrics': {
      k: float(v) for k, v in metrics.items()}, 'preempted': bool(stop['signal'])}


def _require(**values):
  """Gin passes its REQUIRED marker through unset macros: name them instead."""
  import gin
  for name, value in values.items():
    if value is gin.REQUIRED or value is None and name in ('MODEL_DIR', 'TRAIN_STEPS'):
      raise ValueError(f'{name} is not set: pass --gin.{name}=... (strings in escaped '
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


def place_tensors(tensors: Mapping[str, checkpoints.Tensor], shardings):
  """Reads tensors one at a time onto their shardings (memory: one tensor at a time)."""
  from flax.traverse_util import flatten_dict, unflatten_dict
  flat_shardings = {'/'.join(k): v for k, v in flatten_dict(shardings).items()}
  return unflatten_dict({tuple(name.split('/')): jax.device_put(
      tensors[name].read().astype(np.float32), sharding)
      for name, sharding in flat_shardings.items()})


if __name__ == '__main__':
  from gqa_jax import cli
  sys.exit(cli.main(['train', *sys.argv[1:]]))
