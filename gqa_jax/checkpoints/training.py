"""Training checkpoints: Orbax CheckpointManager folders in T5X's layout.

MODEL_DIR/checkpoint_<step>/ holds `state` (T5X's tree: {'target': params,
'state': {'step', 'param_states'}}), `dataset` (the data position, JSON) and, in
Orbax's `_CHECKPOINT_METADATA` (custom_metadata.gqa_jax, committed with the step), the
model config, so every reader in `gqa_jax.checkpoints` opens a training checkpoint,
and a converted checkpoint starts a run. (gqa_jax before that kept the config in a
`gqa_jax.json` beside `state`; such checkpoints still load.)

A step folder that does not restore (truncated, corrupted, half copied) is moved
aside by `set_aside`, never deleted: `checkpoint_<step>.corrupt-<time>` is a name
Orbax's manager does not list, so the step is not picked again.
"""

import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from gqa_jax import network
from gqa_jax.checkpoints import base, open_checkpoint, orbax as orbax_format


def _nest(flat: Dict[str, Any]) -> dict:
  return unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def _flat(tree: dict) -> Dict[str, Any]:
  return {'/'.join(k): v for k, v in flatten_dict(tree).items()}


class TrainCheckpointer:
  """Saves and restores (params, T5X-layout optimizer state, step, data position)."""

  def __init__(self, model_dir, keep: Optional[int] = None, config=None):
    self.model_dir = Path(model_dir)
    self.config = config
    # Saves that a kill interrupted leave Orbax temporary folders (the run holds MODEL_DIR's
    # lock, so none belongs to a live process): Orbax removes them; the log says so.
    self.unfinished = sorted(p.name for p in self.model_dir.glob('*.orbax-checkpoint-tmp*'))
    self.manager = ocp.CheckpointManager(
        self.model_dir.resolve(), item_names=('state', 'dataset'),
        options=ocp.CheckpointManagerOptions(
            step_prefix='checkpoint', max_to_keep=keep, create=True,
            enable_async_checkpointing=False, cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    """The steps Orbax lists in MODEL_DIR, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def step_dir(self, step: int) -> Path:
    return self.model_dir / f'checkpoint_{step}'

  def incomplete(self, step: int) -> Optional[str]:
    """Why the step folder is not a whole Orbax commit, or None.

    Orbax writes both files before it commits a step (by renaming its temporary
    folder); a step folder missing one was not written that way: a half-finished
    copy, or files removed since. Orbax itself would still try to restore it.
    """
    missing = [f for f in ORBAX_COMMIT_FILES if not (self.step_dir(step) / f).is_file()]
    return f'{" and ".join(missing)} missing (not a complete Orbax commit)' if missing else None

  def set_aside(self, step: int) -> Path:
    """Renames a step folder that does not restore out of Orbax's sight; returns the new
    path. Its data stays for the user to inspect or delete."""
    old = self.step_dir(step)
    new = old.with_name(f'{old.name}.corrupt-{time.strftime("%Y%m%d-%H%M%S")}')
    while new.exists():  # two in one second: keep both
      new = new.with_name(new.name + '+')
    if jax.process_index() == 0:  # MODEL_DIR is shared by the processes of a run
      old.rename(new)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'gqa_jax: set aside checkpoint_{step}')
    self.manager.reload()  # forget the step, so that keeping N checkpoints ignores it
    return new

  def save(self, step: int, params, param_states: Dict[str, Any], data_position: dict,
           metadata: Optional[dict] = None):
    """param_states: flat 'param_states/<param>/<slot>' -> array (T5X's Adafactor).

    The model config and `metadata` go into the step's Orbax metadata
    (_CHECKPOINT_METADATA, custom_metadata.gqa_jax), which Orbax writes in the step's
    temporary folder: they commit with the tensors, so no kill can leave a step folder
    without them.
    """
    state = {'step': np.int32(step)}
    if self.config is not None and self.config.scan_layers:
      params = network.unstack_layers(params, self.config)  # checkpoints hold layers_<i>
    if param_states:
      state['param_states'] = _nest({k[len('param_states/'):]: v
                                     for k, v in param_states.items()})
    tree = {'target': params, 'state': state}
    info = dict(metadata or {})
    if self.config is not None:
      info['config'] = self.config.to_dict()
    info['layout'] = LAYOUT
    info['step'] = step
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(tree), dataset=ocp.args.JsonSave(data_position)),
        force=True, custom_metadata={orbax_format.CUSTOM_KEY: info})
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_params,
              abstract_param_states: Optional[Dict[str, Any]]) -> Tuple[Any, dict, int, dict]:
    """Restores onto the shardings of the abstract trees (jax.ShapeDtypeStruct leaves).

    Returns (params, flat param_states, step, data_position); params stacked when the
    config runs scanned (the checkpoint holds them unscanned).
    """
    scanned = abstract_params
    if self.config is not None and self.config.scan_layers:
      abstract_params = unstack_abstract(abstract_params, self.config)
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
    params = tree['target']
    if scanned is not abstract_params:
      params = stack_on(params, self.config, scanned)
    return params, flat_states, int(tree['state']['step']), dict(restored.dataset or {})


ORBAX_COMMIT_FILES = ('commit_success.txt', '_CHECKPOINT_METADATA')
# The parameter layout every gqa_jax checkpoint holds: T5X's layers_<i> subtrees, also
# for runs of scanned models (recorded beside the config; readers stack at load).
LAYOUT = 'unscanned'


def unstack_abstract(abstract_params, config: network.T5Config):
  """Abstract (jax.ShapeDtypeStruct) stacked parameters -> the unscanned ones, each
  layer's leaf sharded as its stack was, less the layer axis."""
  def one(leaf):
    shape = leaf.shape[:network.SCAN_AXIS] + leaf.shape[network.SCAN_AXIS + 1:]
    sharding = getattr(leaf, 'sharding', None)
    if sharding is not None:
      spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
      sharding = jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(
              *(spec[:network.SCAN_AXIS] + spec[network.SCAN_AXIS + 1:])))
    return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)

  out = dict(abstract_params)
  for stack, n in (('encoder', config.num_encoder_layers),
                   ('decoder', config.num_decoder_layers)):
    name = network.SCANNED_SUBTREE[stack]
    if stack in out and name in out[stack]:
      sub = dict(out[stack])
      per_layer = jax.tree.map(one, sub.pop(name))
      sub.update({f'layers_{i}': per_layer for i in range(n)})
      out[stack] = sub
  return out


def stack_on(params, config: network.T5Config, abstract_stacked):
  """Unscanned parameters -> stacked, placed on the shardings of `abstract_stacked`
  (one jitted stacking; the unscanned arrays are freed when the caller drops them)."""
  shardings = jax.tree.map(lambda a: getattr(a, 'sharding', None), abstract_stacked)
  if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda x: x is None)):
    return network.stack_layers(params, config)
  return jax.jit(lambda p: network.stack_layers(p, config), out_shardings=shardings)(params)


def kv_heads(config: network.T5Config) -> Dict[str, int]:
  return {s: config.kv_heads(s) for s in network.STACKS}


def check_initial_checkpoint(source: base.Source, config: network.T5Config, path: str):
  """A source whose parameters do not fit `config` fails with the fix named: an MHA
  checkpoint needs `gqa-jax convert` before it can start a GQA run; a GQA one cannot
  be converted back to more KV heads."""
  try:
    base.check_shapes(source.params, config, f'initial checkpoint {path}')
  except base.CheckpointError as e:
    raise base.CheckpointError(f'{e}.{_kv_heads_hint(source, config, path)}') from e


def _kv_heads_hint(source: base.Source, config: network.T5Config, path: str) -> str:
  """How to get a checkpoint with the run's KV heads from `source`, or '' if the KV
  heads agree (then the mismatch is elsewhere: another model size)."""
  theirs, ours = kv_heads(source.config), kv_heads(config)
  if theirs == ours:
    return ''
  said = f' It has KV heads {theirs}, the run wants {ours}:'
  more = [s for s in network.STACKS if ours[s] > theirs[s]]
  if more:
    # Pooling heads loses information that nothing restores: go back to the source.
    origin = (source.metadata or {}).get('source', {}).get('path')
    start = f'the checkpoint it was converted from ({origin})' if origin else (
        'the MHA checkpoint it came from')
    return (f'{said} converting to more KV heads ({", ".join(more)}) is not possible; '
            f'convert {start} instead, or configure the run for KV heads {theirs}.')
  fewer = sorted({ours[s] for s in network.STACKS if ours[s] < theirs[s]})
  stacks = tuple(s for s in network.STACKS if ours[s] < theirs[s])
  if len(fewer) > 1:
    return (f'{said} convert it first, once per KV-head count (`gqa-jax convert` with '
            '--num-kv-heads and --stacks), and start from the result.')
  flag = '' if stacks == network.PAPER_STACKS else f' --stacks {",".join(stacks)}'
  return (f'{said} convert it first, e.g. `gqa-jax convert {path} OUT --num-kv-heads '
          f'{fewer[0]}{flag}`, and start from OUT.')


def open_checked(path, config: network.T5Config, name: Optional[str] = None) -> base.Source:
  """The checkpoint at `path` (metadata only, no tensor read), refused by
  `check_initial_checkpoint` unless its parameters fit `config`. `name`: the path as the
  user gave it, for the message (default `path`)."""
  source = open_checkpoint(path)
  check_initial_checkpoint(source, config, str(path) if name is None else name)
  return source


def place_tensors(tensors: Mapping[str, base.Tensor], shardings):
  """Reads tensors one at a time onto their shardings (memory: one tensor at a time).

  `tensors` are named unscanned (as checkpoints store them); a scanned model's stacked
  leaf in `shardings` ('encoder/encoder/...') is read layer by layer and stacked on the
  host (memory: one stacked leaf at a time)."""
  flat_shardings = {'/'.join(k): v for k, v in flatten_dict(shardings).items()}
  return unflatten_dict({tuple(name.split('/')): jax.device_put(
      _read_stacked(tensors, name), sharding) for name, sharding in flat_shardings.items()})


def _read_stacked(tensors: Mapping[str, base.Tensor], name: str) -> np.ndarray:
  """Tensor `name` as float32; a stacked name from its layers_<i> tensors."""
  parts = name.split('/')
  if name in tensors or network.scanned_layer_axis(parts) is None:
    return tensors[name].read().astype(np.float32)
  layers = []
  while (layer := '/'.join([parts[0], f'layers_{len(layers)}'] + parts[2:])) in tensors:
    layers.append(tensors[layer].read().astype(np.float32))
  if not layers:
    raise KeyError(name)
  return np.stack(layers, axis=network.SCAN_AXIS)


def restore_params(path, config: network.T5Config, shardings,
                   source: Optional[base.Source] = None) -> Tuple[Any, int]:
  """(parameters placed on `shardings`, step) of the checkpoint at `path`, opened and
  checked against `config` by `open_checked` (a training run's INITIAL_CHECKPOINT_PATH,
  eval's CHECKPOINT_PATH).

  `source`: the same checkpoint already opened by `open_checked`. Callers open it first
  so that a checkpoint that does not fit is refused before the mesh is built or any
  other work starts; the tensors are read only here.
  """
  if source is None:
    source = open_checked(path, config)
  return place_tensors(source.params, shardings), source.step or 0


def check_model_dir_checkpoint(source: base.Source, config: network.T5Config, model_dir):
  """A MODEL_DIR checkpoint of another model than the run's: resuming from it is
  impossible, and saving beside it would mix two runs in one folder."""
  try:
    base.check_shapes(source.params, config, 'it')
  except base.CheckpointError as e:
    raise base.CheckpointError(
        f'MODEL_DIR {model_dir} holds checkpoints of another model ({Path(source.path).name}: '
        f'{_describe(source.config)}) than this run ({_describe(config)}): choose another '
        f'MODEL_DIR, or run with the config that wrote them ({str(e)[len("it "):]}).') from e


def _describe(config: network.T5Config) -> str:
  return (f'KV heads {kv_heads(config)}, {config.num_heads} heads, emb {config.emb_dim}, '
          f'{config.num_encoder_layers}+{config.num_decoder_layers} layers')
