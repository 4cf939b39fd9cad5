"""T5X's legacy checkpoint format: a msgpack `checkpoint` file plus zarr leaves.

`checkpoint_<step>/checkpoint` holds {'version': 3, 'optimizer': {'target':
params, 'state': {'step', 'param_states'}}}. Large leaves are tensorstore zarr
arrays in sub-folders named by the dotted tree path, referenced by a spec dict
whose path is relative to the checkpoint folder (`kvstore.path`, or a top-level
`path` in older files; drivers file, gfile or gcs). Small leaves (the step,
factored Adafactor rows/columns, placeholders) are inline numpy values.
"""

import copy
import os
from pathlib import Path
from typing import Iterable, Tuple

import numpy as np
import tensorstore as ts
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from gqa_jax.checkpoints import base, orbax

FORMAT = 't5x-legacy'
# Leaves kept inline in the msgpack, as T5X does: the step, factored second-moment
# rows/columns and the (1,)-shaped placeholders of unused slots.
_INLINE_SLOTS = ('v_row', 'v_col')
_MAX_CHUNK_BYTES = 64 << 20


def is_t5x_legacy(path: Path) -> bool:
  return (path / 'checkpoint').is_file()


def _is_spec(node) -> bool:
  return isinstance(node, dict) and 'driver' in node


_DRIVERS = ('zarr', 'zarr3')


def _local_spec(spec: dict, ckpt_dir: Path, what: str = 'tensor',
                allow_external_links: bool = False) -> dict:
  """The spec with its (relative) path resolved inside ckpt_dir, on the file driver.

  gfile and gcs specs of a checkpoint that was copied to local disk name the same
  relative folders, so every driver resolves against the local checkpoint folder (by
  the path's last component, so `..` cannot leave it). An absolute local path is
  used only where it lies inside ckpt_dir: one that exists elsewhere would have a
  crafted checkpoint read (and `convert` copy) any file on the machine.
  """
  spec = copy.deepcopy(spec)
  if spec.get('driver') not in _DRIVERS:
    raise base.CheckpointError(f'{what}: tensorstore driver {spec.get("driver")!r} is not '
                               f'one T5X writes ({", ".join(_DRIVERS)}): corrupted or '
                               'crafted checkpoint.')
  kvstore = spec.get('kvstore')
  rel = kvstore.get('path') if isinstance(kvstore, dict) else spec.pop('path', None)
  if not rel or not isinstance(rel, str):
    raise base.CheckpointError(f'tensorstore spec without a path in {ckpt_dir}: {spec}')
  rel = rel.rstrip('/')
  local = ckpt_dir / Path(rel).name
  driver = kvstore.get('driver', 'file') if isinstance(kvstore, dict) else 'file'
  if driver == 'file' and os.path.isabs(rel):
    path = os.path.normpath(rel)
    if base.within(path, os.path.abspath(ckpt_dir)) or os.path.exists(path):
      local = Path(path)  # outside ckpt_dir and existing: refused just below
  local = base.inside(ckpt_dir, local, what, allow_external_links)
  spec['kvstore'] = {'driver': 'file', 'path': str(local) + '/'}
  spec.pop('path', None)
  spec.pop('context', None)  # a context could name other file roots or resources
  return spec


def _zarr_tensor(spec: dict, where: str) -> base.Tensor:
  try:
    store = ts.open(spec, open=True).result()
  except Exception as e:
    raise base.CheckpointError(f'cannot open {where}: {e} (missing or corrupted array '
                               'folder: copy the checkpoint again).') from e
  read = lambda: ts.open(spec, open=True).result().read().result()
  return base.Tensor(tuple(store.shape), np.dtype(store.dtype.numpy_dtype), read, where)


def open_t5x_legacy(ckpt_dir: Path, allow_external_links: bool = False) -> base.Source:
  """Reads the msgpack tree; array leaves stay on disk until read.

  A `gqa_jax.json` beside the msgpack (a `gqa-jax convert --output-format t5x` output)
  gives the model config and the tensors' checksums.
  """
  base.check_links(ckpt_dir, allow_external_links)
  raw_bytes = (ckpt_dir / 'checkpoint').read_bytes()
  try:
    raw = serialization.msgpack_restore(raw_bytes)
  except Exception as e:
    raise base.CheckpointError(f'{ckpt_dir / "checkpoint"} is not a readable T5X msgpack '
                               f'file ({e}): truncated or corrupted.') from e
  if not isinstance(raw, dict) or not isinstance(raw.get('optimizer'), dict):
    raise base.CheckpointError(f'{ckpt_dir / "checkpoint"} has no optimizer tree: not a '
                               'T5X legacy checkpoint.')
  flat = flatten_dict(raw['optimizer'], is_leaf=lambda _, v: _is_spec(v), sep='/')
  tensors = {}
  for name, leaf in flat.items():
    where = f'{ckpt_dir}: {name}'
    tensors[name] = (_zarr_tensor(_local_spec(leaf, ckpt_dir, f'tensor {name}',
                                              allow_external_links), where)
                     if _is_spec(leaf) else
                     base.Tensor(np.shape(leaf), np.asarray(leaf).dtype,
                                 lambda v=leaf: np.asarray(v), where))
  params = {k[len('target/'):]: t for k, t in tensors.items() if k.startswith('target/')}
  opt = {k[len('state/'):]: t for k, t in tensors.items() if k.startswith('state/param_states/')}
  step = int(tensors['state/step'].read()) if 'state/step' in tensors else None
  metadata = {'version': raw.get('version')}
  config = None
  if (ckpt_dir / orbax.METADATA_FILE).is_file():
    info = orbax.read_metadata(ckpt_dir / orbax.METADATA_FILE)
    config = info.pop('config', None)
    metadata.update(info)
  if config is None:
    config = base.infer_config({k: t.shape for k, t in params.items()})
  else:
    orbax.check_config(params, config, str(ckpt_dir / orbax.METADATA_FILE))
    metadata['config'] = config.to_dict()
  return base.Source(FORMAT, str(ckpt_dir), params, config, step, opt or None, metadata)


def _chunks(shape: Tuple[int, ...], itemsize: int):
  """Chunks under 64 MiB, split along the first axis (T5X writes similar sizes)."""
  if not shape:
    return []
  row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
  return [max(1, min(shape[0], _MAX_CHUNK_BYTES // max(row, 1)))] + list(shape[1:])


class LegacyWriter:
  """Streams leaves into `ckpt_dir` (zarr folders) and writes the msgpack at close()."""

  def __init__(self, ckpt_dir: Path):
    self.dir = ckpt_dir
    self.dir.mkdir(parents=True, exist_ok=False)
    self.tree = {}

  def add(self, name: str, value: np.ndarray):
    """name: 'target/<param>', 'state/step' or 'state/param_states/<param>/<slot>'."""
    value = np.asarray(value)
    inline = (name == 'state/step' or name.rsplit('/', 1)[-1] in _INLINE_SLOTS
              or value.shape == (1,) or value.ndim == 0)
    if inline:
      self.tree[name] = value
      return
    folder = name.replace('/', '.')
    dtype = 'bfloat16' if value.dtype.name == 'bfloat16' else value.dtype.name
    spec = {'driver': 'zarr', 'dtype': dtype,
            'kvstore': {'driver': 'file', 'path': folder + '/'},
            'metadata': {'chunks': _chunks(value.shape, value.dtype.itemsize),
                         'compressor': {'id': 'gzip', 'level': 1},
                         'shape': list(value.shape)}}
    store = ts.open(_local_spec(spec, self.dir), create=True).result()
    store.write(value).result()
    self.tree[name] = spec

  def close(self):
    tree = {'version': 3, 'optimizer': unflatten_dict(
        {tuple(k.split('/')): v for k, v in self.tree.items()})}
    (self.dir / 'checkpoint').write_bytes(serialization.msgpack_serialize(tree))


def write_all(ckpt_dir: Path, leaves: Iterable[Tuple[str, np.ndarray]]):
  writer = LegacyWriter(ckpt_dir)
  for name, value in leaves:
    writer.add(name, value)
  writer.close()

