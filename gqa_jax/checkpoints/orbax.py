"""Orbax PyTree checkpoints: T5X's (`checkpoint_<step>/state`) and gqa_jax's own.

Both hold T5X's tree {'target': params, 'state': {'step', 'param_states'}}.
gqa_jax adds `gqa_jax.json` in the step folder (model config, conversion record).
Leaves are read one at a time with tensorstore, from the names Orbax gives them
(the dotted tree path) in its OCDBT or per-leaf zarr layout.
"""

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import tensorstore as ts

from gqa_jax import layers, network
from gqa_jax.checkpoints import base

METADATA_FILE = 'gqa_jax.json'
ITEM = 'state'


def is_orbax(path: Path) -> bool:
  return (path / ITEM / '_METADATA').is_file()


_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(network.T5Config)}
# Orbax's per-step metadata; gqa_jax's record sits in its custom_metadata, which Orbax
# writes into the step's temporary folder, so it commits with the tensors.
STEP_METADATA = '_CHECKPOINT_METADATA'
CUSTOM_KEY = 'gqa_jax'
# What Orbax's CheckpointManager writes into a step folder before it commits the step
# (by renaming its temporary folder): a gqa_jax training step folder missing one is not a
# whole commit. The same rule as `gqa-jax train`'s (checkpoints/training.py's
# ORBAX_COMMIT_FILES, which sets such a step aside), so that inspect and loading agree.
COMMIT_FILES = ('commit_success.txt', STEP_METADATA)
# The data position that gqa_jax's TrainCheckpointer saves beside `state`
# (JsonCheckpointHandler's file): it marks a training step folder also when its
# _CHECKPOINT_METADATA, which names the handlers, is gone.
_TRAINING_DATASET = Path('dataset') / 'metadata'


def check_metadata(info, where: str) -> dict:
  """gqa_jax's metadata record, checked: a JSON object whose `config` makes a T5Config.

  Raises:
    CheckpointError: naming `where`, what is wrong and how to fix it.
  """
  fix = 'restore it from a copy of the checkpoint, or delete it to infer the config from ' \
        'the tensor shapes'
  if not isinstance(info, dict):
    raise base.CheckpointError(f'{where} holds a JSON {type(info).__name__}, not an object '
                               f'with the model config: {fix}.')
  config = info.get('config')
  if config is None:
    return info
  if not isinstance(config, dict):
    raise base.CheckpointError(f'{where}: "config" is a {type(config).__name__}, not an '
                               f'object: {fix}.')
  unknown = sorted(set(config) - set(_CONFIG_FIELDS))
  if unknown:
    raise base.CheckpointError(f'{where}: unknown keys in "config": {", ".join(unknown)} '
                               f'(known: {", ".join(_CONFIG_FIELDS)}); remove them or {fix}.')
  wrong = [f'{k}={v!r}' for k, v in config.items() if not _valid_field(k, v)]
  if wrong:
    raise base.CheckpointError(f'{where}: invalid values in "config": {", ".join(wrong)}; '
                               f'correct them or {fix}.')
  try:
    info = dict(info, config=network.T5Config(**config))
  except (TypeError, ValueError) as e:
    raise base.CheckpointError(f'{where}: "config" is not a valid model config ({e}): '
                               f'{fix}.') from e
  return info


def _valid_field(name: str, value) -> bool:
  if name == 'dtype':
    return value in ('float32', 'bfloat16', 'float16')
  if name == 'mlp_activations':
    return isinstance(value, list) and value and all(isinstance(a, str) for a in value)
  if name in ('logits_via_embedding', 'float32_attention_logits'):
    return isinstance(value, bool)
  if name == 'dropout_rate':
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
  if name.endswith(('_kv_heads', '_query_heads', '_kv_weights', '_kv_layers')) and value is None:
    return True
  if name.endswith('_kv_weights'):
    return value in layers.KV_WEIGHT_SHAPES
  if name == 'kv_weights_init':
    return value in layers.KV_WEIGHT_INITS
  if name.endswith('_kv_layers'):
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_config(params: Dict[str, base.Tensor], config: network.T5Config, where: str):
  """Refuses a recorded config that does not describe the checkpoint's tensors."""
  try:
    base.check_shapes(params, config, f'the config in {where}')
  except base.CheckpointError as e:
    raise base.CheckpointError(f'{e}. Restore that file from a copy of the checkpoint, or '
                               'delete it to infer the config from the tensor shapes.') from e


def read_metadata(file: Path) -> dict:
  """gqa_jax.json, checked (see check_metadata); `config` becomes a T5Config."""
  try:
    text = file.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise base.CheckpointError(f'cannot read {file} ({e}): restore it from a copy of the '
                               'checkpoint.') from e
  try:
    info = json.loads(text)
  except ValueError as e:
    raise base.CheckpointError(f'{file} is not JSON ({e}): delete it (the config is then '
                               'inferred from the tensor shapes) or restore it from a copy '
                               'of the checkpoint.') from e
  return check_metadata(info, str(file))


def _step_metadata(step_dir: Path) -> dict:
  """Orbax's _CHECKPOINT_METADATA of a step folder ({} when absent or unreadable)."""
  try:
    value = json.loads((step_dir / STEP_METADATA).read_text())
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def gqa_jax_metadata(step_dir: Path) -> Tuple[Optional[dict], str]:
  """(gqa_jax's record of a step folder or None, where it was found)."""
  custom = _step_metadata(step_dir).get('custom_metadata') or {}
  if CUSTOM_KEY in custom:
    where = f'{step_dir / STEP_METADATA} (custom_metadata.{CUSTOM_KEY})'
    return check_metadata(custom[CUSTOM_KEY], where), where
  # Conversions, and training checkpoints of gqa_jax before the record moved into
  # Orbax's commit, keep it in a file beside state/.
  if (step_dir / METADATA_FILE).is_file():
    return read_metadata(step_dir / METADATA_FILE), str(step_dir / METADATA_FILE)
  return None, ''


def _is_gqa_jax_training(step_dir: Path) -> bool:
  """A step folder saved by gqa_jax's TrainCheckpointer (its dataset item is JSON;
  T5X's Orbax manager writes its own DatasetCheckpointHandler there)."""
  handlers = _step_metadata(step_dir).get('item_handlers') or {}
  return isinstance(handlers, dict) and 'JsonCheckpointHandler' in str(
      handlers.get('dataset', ''))


def incomplete_training_step(step_dir: Path) -> Optional[str]:
  """Why a gqa_jax training step folder is not a whole Orbax commit (COMMIT_FILES
  missing), or None (whole, or not a training checkpoint of gqa_jax)."""
  if not (_is_gqa_jax_training(step_dir) or (step_dir / _TRAINING_DATASET).is_file()):
    return None
  missing = [f for f in COMMIT_FILES if not (step_dir / f).is_file()]
  return f'{" and ".join(missing)} missing' if missing else None


def open_orbax(step_dir: Path, allow_external_links: bool = False) -> base.Source:
  base.check_links(step_dir, allow_external_links)
  why = incomplete_training_step(step_dir)
  if why is not None:
    raise base.CheckpointError(
        f'{step_dir} is damaged: a gqa_jax training checkpoint with {why}, so not a complete '
        'Orbax commit (a half-finished copy, or files removed since; gqa-jax train sets such '
        'a step aside): use another checkpoint_<step>, or copy it again from a good source.')
  state_dir = (step_dir / ITEM).resolve()
  try:
    metadata = json.loads((state_dir / '_METADATA').read_text())
    tree = metadata['tree_metadata']
    entries = [[str(k['key']) for k in entry['key_metadata']] for entry in tree.values()]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise base.CheckpointError(f'{state_dir}/_METADATA is unreadable ({e}): not a complete '
                               'Orbax checkpoint.') from e
  if not (state_dir / 'commit_success.txt').exists() and not (
      step_dir / 'commit_success.txt').exists():
    raise base.CheckpointError(f'{step_dir} has no commit_success.txt: an unfinished Orbax '
                               'save. Use a complete checkpoint.')
  info, where = gqa_jax_metadata(step_dir)
  if info is None and _is_gqa_jax_training(step_dir):
    raise base.CheckpointError(
        f'{step_dir} is a gqa_jax training checkpoint without its model config (its save '
        f'was interrupted before {METADATA_FILE} was written, by a gqa_jax older than this '
        "one): use an earlier checkpoint_<step>, or resume training in its MODEL_DIR (later saves "
        'record it).')
  driver = 'zarr3' if metadata.get('use_zarr3') else 'zarr'
  context = ts.Context()  # one OCDBT manifest cache for all leaves
  tensors = {}
  for keys in entries:
    stored = '.'.join(keys)
    if metadata.get('use_ocdbt', True):
      kvstore = {'driver': 'ocdbt', 'base': f'file://{state_dir}', 'path': stored}
    else:  # one folder per leaf, named by the (untrusted) tree keys
      folder = base.inside(state_dir, state_dir / stored, f'tensor {"/".join(keys)}',
                           allow_external_links)
      kvstore = {'driver': 'file', 'path': str(folder)}
    tensors['/'.join(keys)] = _tensor({'driver': driver, 'kvstore': kvstore}, context,
                                      f'{step_dir}: {"/".join(keys)}')
  params = {k[len('target/'):]: t for k, t in tensors.items() if k.startswith('target/')}
  opt = {k[len('state/'):]: t for k, t in tensors.items() if k.startswith('state/param_states/')}
  step = int(tensors['state/step'].read()) if 'state/step' in tensors else None
  fmt = 't5x-orbax' if info is None else 'gqa-jax'
  info = dict(info or {})
  config = info.pop('config', None)
  if config is None:
    config = base.infer_config({k: t.shape for k, t in params.items()})
  else:
    check_config(params, config, where)
    info['config'] = config.to_dict()
  return base.Source(fmt, str(step_dir), params, config, step, opt or None, info)


def _tensor(spec: dict, context: ts.Context, where: str) -> base.Tensor:
  try:
    store = ts.open(spec, context=context, open=True).result()
  except Exception as e:
    raise base.CheckpointError(f'cannot open {where}: {e} (corrupted checkpoint).') from e
  read = lambda: ts.open(spec, context=context, open=True).result().read().result()
  return base.Tensor(tuple(store.shape), np.dtype(store.dtype.numpy_dtype), read, where)


class OrbaxWriter:
  """Streams leaves into an Orbax checkpoint at `step_dir` with bounded memory.

  Leaves are buffered until they reach `buffer_bytes` (so at most that plus one
  tensor is held) and flushed with Orbax's partial save, which adds them to the
  same checkpoint; close() finalises it. The result is a
  standard Orbax PyTree checkpoint under `step_dir/state`.
  """

  def __init__(self, step_dir: Path, buffer_bytes: int = 1 << 28):
    self.dir = step_dir
    self.buffer_bytes = buffer_bytes
    self.pending: Dict[str, np.ndarray] = {}
    self.pending_bytes = 0
    self.started = False

  def add(self, name: str, value: np.ndarray):
    """name: 'target/<param>', 'state/step' or 'state/param_states/<param>/<slot>'."""
    value = np.asarray(value)
    self.pending[name] = value
    self.pending_bytes += value.nbytes
    if self.pending_bytes >= self.buffer_bytes:
      self.flush()

  def flush(self):
    if not self.pending:
      return
    from flax.traverse_util import unflatten_dict
    import orbax.checkpoint.experimental.v1 as ocp
    tree = unflatten_dict({tuple(k.split('/')): v for k, v in self.pending.items()})
    ocp.partial.save(self.dir, tree)
    self.started = True
    self.pending, self.pending_bytes = {}, 0

  def close(self):
    import orbax.checkpoint.experimental.v1 as ocp
    self.flush()
    if self.started:
      ocp.partial.finalize(self.dir)


def write_metadata(step_dir: Path, info: dict):
  (step_dir / METADATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + '\n')
