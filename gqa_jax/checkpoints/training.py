"""Training checkpoints: Orbax CheckpointManager folders in T5X's layout.

MODEL_DIR/checkpoint_<step>/ holds `state` (T5X's tree: {'target': params,
'state': {'step', 'param_states'}}), `dataset` (the data position, JSON) and
`gqa_jax.json` (model config), so every reader in `gqa_jax.checkpoints` opens a
training checkpoint, and a converted checkpoint starts a run.
"""

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from gqa_jax import network
from gqa_jax.checkpoints import base, orbax as orbax_format


def _nest(flat: Dict[str, Any]) -> dict:
  return unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def _flat(tree: dict) -> Dict[str, Any]:
  return {'/'.join(k): v for k, v in flatten_dict(tree).items()}


class TrainCheckpointer:
  """Saves and restores (params, T5X-layout optimizer state, step, data position)."""

  def __init__(self, model_dir, keep: Optional[int] = None, config=None):
    self.model_dir = Path(model_dir)
    self.config = config
    self.manager = ocp.CheckpointManager(
        self.model_dir.resolve(), item_names=('state', 'dataset'),
        options=ocp.CheckpointManagerOptions(
            step_prefix='checkpoint', max_to_keep=keep, create=True,
            enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, params, param_states: Dict[str, Any], data_position: dict,
           metadata: Optional[dict] = None):
    """param_states: flat 'param_states/<param>/<slot>' -> array (T5X's Adafactor)."""
    state = {'step': np.int32(step)}
    if param_states:
      state['param_states'] = _nest({k[len('param_states/'):]: v
                                     for k, v in param_states.items()})
    tree = {'target': params, 'state': state}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(tree), dataset=ocp.args.JsonSave(data_position)),
        force=True)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      info = dict(metadata or {})
      if self.config is not None:
        info['config'] = self.config.to_dict()
      info['step'] = step
      orbax_format.write_metadata(self.model_dir / f'checkpoint_{step}', info)

  def restore(self, step: int, abstract_params,
              abstract_param_states: Optional[Dict[str, Any]]) -> Tuple[Any, dict, int, dict]:
    """Restores onto the shardings of the abstract trees (jax.ShapeDtypeStruct leaves).

    Returns (params, flat param_states, step, data_position).
    """
    state = {'step': jax.ShapeDtypeStruct((), np.int32)}
    if abstract_param_states:
      state['param_states'] = _nest({k[len('param_states/'):]: v
                                     for k, v in abstract_param_states.items()})
    abstract = {'target': abstract_params, 'state': state}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        dataset=ocp.args.JsonRestore()))
    tree = restored.state
    flat_states = {f'param_states/{k}': v
                   for k, v in _flat(tree['state'].get('param_states', {})).items()}
    return tree['target'], flat_states, int(tree['state']['step']), dict(restored.dataset or {})


def check_initial_checkpoint(source: base.Source, config: network.T5Config, path: str):
  """A source whose parameters do not fit `config` fails with the fix named: an MHA
  checkpoint needs `gqa-jax convert` before it can start a GQA run."""
  try:
    base.check_shapes(source.params, config, f'initial checkpoint {path}')
  except base.CheckpointError as e:
    theirs = {s: source.config.kv_heads(s) for s in network.STACKS}
    ours = {s: config.kv_heads(s) for s in network.STACKS}
    hint = ''
    if theirs != ours:
      hint = (f' It has KV heads {theirs}, the run wants {ours}: convert it first, e.g. '
              f'`gqa-jax convert {path} OUT --num-kv-heads '
              f'{config.kv_heads("decoder_self")}`, and start from OUT.')
    raise base.CheckpointError(f'{e}.{hint}') from e
