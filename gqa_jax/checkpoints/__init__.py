"""Checkpoint formats: T5X legacy, T5X Orbax, Hugging Face T5 and gqa_jax's own.

    config, params = gqa_jax.checkpoints.load_model(path)   # any supported format

`open_checkpoint(path)` gives a `Source` whose tensors are read lazily, one at a
time (what the converter uses). A path may name a step folder
(`checkpoint_<step>/`), a model folder holding several (the latest is used),
a Hugging Face model folder, or its weights file; `builtin:<name>` names a checkpoint
shipped with the package (`builtin_checkpoints()`).
"""

import dataclasses
import re
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from flax.traverse_util import unflatten_dict

from gqa_jax import network
from gqa_jax.checkpoints import orbax, t5x
from gqa_jax.checkpoints.base import (CheckpointError, Source, Tensor, builtin_checkpoints,
                                      infer_config, resolve_path, verify)

FORMATS = ('t5x-legacy', 't5x-orbax', 'gqa-jax', 'hf-safetensors', 'hf-pytorch')
_STEP_DIR = re.compile(r'^checkpoint_(\d+)$')


def step_of_dir(path: Path) -> Optional[int]:
  """The step in a checkpoint_<step> folder name, or None for any other name."""
  match = _STEP_DIR.match(Path(path).name)
  return int(match.group(1)) if match else None


def latest_step_dir(path: Path):
  """The checkpoint_<step> sub-folder with the largest step, or None."""
  steps = [(step, p) for p in path.iterdir()
           if p.is_dir() and (step := step_of_dir(p)) is not None]
  return max(steps)[1] if steps else None


def resolve(path) -> Tuple[str, Path]:
  """(format family, folder or file to open) for a user-given path."""
  path = resolve_path(path, builtin=True)
  if not path.exists():
    raise CheckpointError(f'checkpoint path {str(path)!r} does not exist.')
  if path.is_file() and path.name == 'checkpoint':
    path = path.parent
  if path.is_dir():
    if t5x.is_t5x_legacy(path):
      return 't5x-legacy', path
    if orbax.is_orbax(path):
      return 'orbax', path
    step_dir = latest_step_dir(path)
    if step_dir is not None:
      return resolve(step_dir)
  from gqa_jax.checkpoints import hf  # safetensors is imported only when needed
  if hf.is_hf_checkpoint(path):
    return 'hf', path
  raise CheckpointError(
      f'{str(path)!r} is not a checkpoint this version reads: expected a T5X legacy '
      "folder (with a 'checkpoint' msgpack file), an Orbax step folder (with state/), a "
      'folder of checkpoint_<step> folders, or a Hugging Face T5 folder (config.json and '
      'model.safetensors).')


def open_checkpoint(path, allow_pickle: bool = False,
                    allow_external_links: bool = False) -> Source:
  """Opens any supported checkpoint; no tensor data is read yet.

  Every file the checkpoint names must lie inside its folder, also after resolving
  symlinks unless `allow_external_links` (see `base.inside`).
  """
  family, where = resolve(path)
  if family == 't5x-legacy':
    return t5x.open_t5x_legacy(where, allow_external_links)
  if family == 'orbax':
    return orbax.open_orbax(where, allow_external_links)
  from gqa_jax.checkpoints import hf  # safetensors is imported only when needed
  return hf.open_hf(where, allow_pickle=allow_pickle,
                    allow_external_links=allow_external_links)


def load_model(path, allow_pickle: bool = False, allow_external_links: bool = False,
               scan_layers: bool = False) -> Tuple[network.T5Config, dict]:
  """(config, params) of any supported checkpoint, params as a nested dict of NumPy
  arrays in T5X's tree, ready for `network.Transformer(config).apply`. With
  `scan_layers`, the config runs scanned and the layers' parameters are stacked
  (`network.stack_layers`)."""
  source = open_checkpoint(path, allow_pickle, allow_external_links)
  config, params = source.config, read_params(source)
  if scan_layers:
    config = dataclasses.replace(config, scan_layers=True)
    params = network.stack_layers(params, config)
  return config, params


def read_params(source: Source) -> dict:
  """Every parameter of an opened checkpoint, as a nested dict of NumPy arrays."""
  return unflatten_dict({tuple(k.split('/')): np.asarray(t.read())
                         for k, t in source.params.items()})


__all__ = ['CheckpointError', 'FORMATS', 'Source', 'Tensor', 'builtin_checkpoints',
           'infer_config', 'latest_step_dir', 'load_model', 'open_checkpoint', 'read_params',
           'resolve', 'resolve_path', 'step_of_dir', 'verify']
