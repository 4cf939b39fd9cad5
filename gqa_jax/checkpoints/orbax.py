"""Orbax PyTree checkpoints: T5X's (`checkpoint_<step>/state`) and gqa_jax's own.

Both hold T5X's tree {'target': params, 'state': {'step', 'param_states'}}.
gqa_jax adds `gqa_jax.json` in the step folder (model config, conversion record).
Leaves are read one at a time with tensorstore, from the names Orbax gives them
(the dotted tree path) in its OCDBT or per-leaf zarr layout.
"""

import json
from pathlib import Path
from typing import Dict

import numpy as np
import tensorstore as ts

from gqa_jax import network
from gqa_jax.checkpoints import base

METADATA_FILE = 'gqa_jax.json'
ITEM = 'state'


def is_orbax(path: Path) -> bool:
  return (path / ITEM / '_METADATA').is_file()


def open_orbax(step_dir: Path) -> base.Source:
  state_dir = (step_dir / ITEM).resolve()
  try:
    metadata = json.loads((state_dir / '_METADATA').read_text())
    tree = metadata['tree_metadata']
  except (OSError, ValueError, KeyError) as e:
    raise base.CheckpointError(f'{state_dir}/_METADATA is unreadable ({e}): not a complete '
                               'Orbax checkpoint.') from e
  if not (state_dir / 'commit_success.txt').exists() and not (
      step_dir / 'commit_success.txt').exists():
    raise base.CheckpointError(f'{step_dir} has no commit_success.txt: an unfinished Orbax '
                               'save. Use a complete checkpoint.')
  driver = 'zarr3' if metadata.get('use_zarr3') else 'zarr'
  context = ts.Context()  # one OCDBT manifest cache for all leaves
  tensors = {}
  for entry in tree.values():
    keys = [str(k['key']) for k in entry['key_metadata']]
    stored = '.'.join(keys)
    kvstore = ({'driver': 'ocdbt', 'base': f'file://{state_dir}', 'path': stored}
               if metadata.get('use_ocdbt', True) else
               {'driver': 'file', 'path': str(state_dir / stored)})
    tensors['/'.join(keys)] = _tensor({'driver': driver, 'kvstore': kvstore}, context,
                                      f'{step_dir}: {"/".join(keys)}')
  params = {k[len('target/'):]: t for k, t in tensors.items() if k.startswith('target/')}
  opt = {k[len('state/'):]: t for k, t in tensors.items() if k.startswith('state/param_states/')}
  step = int(tensors['state/step'].read()) if 'state/step' in tensors else None
  info, fmt = {}, 't5x-orbax'
  if (step_dir / METADATA_FILE).is_file():
    info, fmt = json.loads((step_dir / METADATA_FILE).read_text()), 'gqa-jax'
  shapes = {k: t.shape for k, t in params.items()}
  config = (network.T5Config(**info['config']) if 'config' in info
            else base.infer_config(shapes))
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
