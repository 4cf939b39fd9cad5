"""What every checkpoint reader returns: lazily read tensors under T5X's flat names.

A reader maps a checkpoint to a `Source`: the parameters (and, where the format
has them, the Adafactor states and the step) as `Tensor`s keyed by T5X's
slash-joined tree paths (`encoder/layers_0/attention/query/kernel`,
`param_states/encoder/.../v_row`). Nothing is read until `Tensor.read()`, so a
converter holds one tensor at a time.
"""

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from gqa_jax import network
from gqa_jax.errors import UserInputError


class CheckpointError(UserInputError):
  """A checkpoint that cannot be read or written: the message names the problem and fix."""


def resolve_path(path) -> Path:
  """A user's path (relative, with `~`, `..` or spaces) as an absolute, normalised Path.

  Orbax refuses relative destinations and tensorstore rejects `..` components, so
  every path is made absolute once, where it enters gqa_jax. Symlinks are kept
  (abspath, not resolve): a user's linked data folder stays what they named.
  """
  return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A tensor not yet read: its shape and dtype, and a function that reads it."""
  shape: Tuple[int, ...]
  dtype: np.dtype
  reader: Callable[[], np.ndarray]
  where: str = ''  # file or store it comes from, for error messages

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  def read(self) -> np.ndarray:
    try:
      value = np.asarray(self.reader())
    except CheckpointError:
      raise
    except Exception as e:  # tensorstore, zlib, safetensors, OS errors all land here
      raise CheckpointError(f'cannot read tensor data from {self.where}: {e} '
                            '(the file is truncated or corrupted: copy it again).') from e
    if tuple(value.shape) != tuple(self.shape):
      raise CheckpointError(f'{self.where}: data has shape {value.shape}, metadata says '
                            f'{self.shape} (corrupted checkpoint).')
    return value


def constant(value) -> Tensor:
  value = np.asarray(value)
  return Tensor(value.shape, value.dtype, lambda: value, 'inline value')


@dataclasses.dataclass
class Source:
  """A checkpoint opened for reading.

  Attributes:
    format: 't5x-legacy', 't5x-orbax', 'gqa-jax', 'hf-safetensors' or 'hf-pytorch'.
    path: the checkpoint directory (or file) as given.
    params: flat parameter name -> Tensor, in T5X's tree and layout.
    config: the model config (from metadata, or inferred from shapes).
    step: the training step, if the checkpoint records one.
    opt_state: flat 'param_states/<param>/<v_row|v_col|v|m>' -> Tensor (T5X's
      Adafactor state), or None when the format has no optimizer state.
    metadata: anything else worth showing (source of a conversion, ...).
  """
  format: str
  path: str
  params: Dict[str, Tensor]
  config: network.T5Config
  step: Optional[int] = None
  opt_state: Optional[Dict[str, Tensor]] = None
  metadata: dict = dataclasses.field(default_factory=dict)


_LAYER = re.compile(r'^(encoder|decoder)/layers_(\d+)/')


def infer_config(shapes: Dict[str, Tuple[int, ...]], **overrides) -> network.T5Config:
  """The T5Config whose parameter tree has these shapes (T5.1.1 or original T5).

  Activation dtype and dropout are not in a checkpoint: dtype defaults to
  bfloat16 and dropout to 0, unless given in `overrides`.
  """
  def need(name):
    if name not in shapes:
      raise CheckpointError(f'parameter {name!r} is missing: not a T5 encoder-decoder '
                            'checkpoint (or an incomplete one).')
    return shapes[name]

  vocab, emb = need('token_embedder/embedding')
  num_heads = need('encoder/relpos_bias/rel_embedding')[0]
  head_dim = need('encoder/layers_0/attention/query/kernel')[1] // num_heads
  layers = {'encoder': set(), 'decoder': set()}
  for name in shapes:
    m = _LAYER.match(name)
    if m:
      layers[m.group(1)].add(int(m.group(2)))
  gated = 'encoder/layers_0/mlp/wi_0/kernel' in shapes
  mlp_dim = need('encoder/layers_0/mlp/wi_0/kernel' if gated else
                 'encoder/layers_0/mlp/wi/kernel')[1]
  kv = lambda name: need(name)[1] // head_dim
  kw = dict(
      vocab_size=vocab, dtype='bfloat16', emb_dim=emb, num_heads=num_heads,
      num_encoder_layers=len(layers['encoder']), num_decoder_layers=len(layers['decoder']),
      head_dim=head_dim, mlp_dim=mlp_dim,
      mlp_activations=('gelu', 'linear') if gated else ('relu',), dropout_rate=0.0,
      logits_via_embedding='decoder/logits_dense/kernel' not in shapes,
      encoder_kv_heads=kv('encoder/layers_0/attention/key/kernel'),
      decoder_self_kv_heads=kv('decoder/layers_0/self_attention/key/kernel'),
      decoder_cross_kv_heads=kv('decoder/layers_0/encoder_decoder_attention/key/kernel'))
  for stack in network.STACKS:  # MHA is stored as None, as in the presets
    if kw[f'{stack}_kv_heads'] == num_heads:
      kw[f'{stack}_kv_heads'] = None
  kw.update(overrides)
  try:
    return network.T5Config(**kw)
  except ValueError as e:
    raise CheckpointError(f'inconsistent parameter shapes: {e}') from e


def check_shapes(params: Dict[str, Tensor], config: network.T5Config, what: str):
  """Raises CheckpointError unless `params` has exactly the tree of `config`."""
  from flax.traverse_util import flatten_dict
  expected = {'/'.join(k): tuple(v.shape)
              for k, v in flatten_dict(network.param_shapes(config)).items()}
  missing = sorted(set(expected) - set(params))
  extra = sorted(set(params) - set(expected))
  wrong = [f'{k}: {tuple(params[k].shape)} (expected {expected[k]})'
           for k in sorted(set(expected) & set(params)) if tuple(params[k].shape) != expected[k]]
  problems = ([f'missing {missing[:5]}'] if missing else []) + (
      [f'unexpected {extra[:5]}'] if extra else []) + ([f'shape {wrong[:5]}'] if wrong else [])
  if problems:
    raise CheckpointError(f'{what} does not match the model config: ' + '; '.join(problems))
