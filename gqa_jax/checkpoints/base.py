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
import zlib
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from gqa_jax import network
from gqa_jax.errors import UserInputError


class CheckpointError(UserInputError):
  """A checkpoint that cannot be read or written: the message names the problem and fix."""


# Checkpoints shipped with the package, named `builtin:<name>` wherever a checkpoint is
# read (convert's SRC, INITIAL_CHECKPOINT_PATH, CHECKPOINT_PATH, inspect), as the public
# T5.1.1 checkpoints are named by their gs:// paths.
BUILTIN_PREFIX = 'builtin:'
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / 'pretrained'


def builtin_checkpoints() -> Tuple[str, ...]:
  """Names of the shipped checkpoints (`builtin:<name>`)."""
  if not PRETRAINED_DIR.is_dir():
    return ()
  return tuple(sorted(p.name for p in PRETRAINED_DIR.iterdir()
                      if p.is_dir() and any(q.name.startswith('checkpoint_')
                                            for q in p.iterdir())))


def resolve_path(path, *, builtin: bool = False) -> Path:
  """A user's path (relative, with `~`, `..` or spaces) as an absolute, normalised Path.

  Orbax refuses relative destinations and tensorstore rejects `..` components, so
  every path is made absolute once, where it enters gqa_jax. Symlinks are kept
  (abspath, not resolve): a user's linked data folder stays what they named.

  builtin: `builtin:<name>` names a shipped checkpoint (a path that is only read);
    without it such a name is refused, so nothing is ever written into the package.
  """
  text = os.fspath(path)
  if isinstance(text, str) and text.startswith(BUILTIN_PREFIX):
    name = text[len(BUILTIN_PREFIX):]
    if not builtin:
      raise CheckpointError(f'{text} is a shipped checkpoint, which is only read: write to '
                            'a folder of your own.')
    available = builtin_checkpoints()
    if name not in available:
      raise CheckpointError(
          f'{text}: no such built-in checkpoint; available: '
          f'{", ".join(BUILTIN_PREFIX + n for n in available) or "none in this install"}.')
    return PRETRAINED_DIR / name
  return Path(os.path.abspath(os.path.expanduser(text)))


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


# ------------------------------------------------------------- containment ----

def within(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


EXTERNAL_LINKS_FLAG = '--allow-external-links'


def inside(root, path, what: str, allow_external_links: bool = False) -> Path:
  """`path` (absolute, normalised) if it lies inside the checkpoint folder `root`.

  A checkpoint names the files it holds (tensorstore specs, a weights index); a
  crafted one could name /etc/passwd or ../../secrets and have `convert` copy them
  into its output. So every file or folder a reader opens must lie inside the
  checkpoint's folder, by name (`..` and absolute paths) and, unless the user allows
  links that leave it (big data folders are often symlinked), after resolving links.

  Raises:
    CheckpointError: naming `what`, the path and the flag that allows links.
  """
  root_abs, path_abs = os.path.abspath(root), os.path.abspath(path)
  if not within(path_abs, root_abs):
    raise CheckpointError(f'{what} points at {path_abs}, outside the checkpoint folder '
                          f'{root_abs}: refused (a checkpoint may only read its own folder; '
                          'copy that data into it).')
  real, real_root = os.path.realpath(path_abs), os.path.realpath(root_abs)
  if not allow_external_links and not within(real, real_root):
    raise CheckpointError(f'{what}: {path_abs} is a link to {real}, outside the checkpoint '
                          f'folder {root_abs}: refused; pass {EXTERNAL_LINKS_FLAG} if you '
                          'trust that link.')
  return Path(path_abs)


def check_links(root, allow_external_links: bool = False):
  """Refuses a symlink anywhere under folder `root` that resolves outside it.

  Links are not followed while walking (a linked folder is checked as one link), so
  the walk stays inside `root` and costs one stat per file.
  """
  if allow_external_links:
    return
  for folder, dirs, files in os.walk(root, followlinks=False):
    for name in dirs + files:
      entry = os.path.join(folder, name)
      if os.path.islink(entry):
        inside(root, entry, os.path.relpath(entry, root))


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
  enc_queries = need('encoder/relpos_bias/rel_embedding')[0]
  head_dim = need('encoder/layers_0/attention/query/kernel')[1] // enc_queries
  weighted = sorted(n for n in shapes if n.endswith(('/key_weights', '/value_weights')))
  if weighted:
    raise CheckpointError(
        f'{weighted[0]}: a WGQA checkpoint, whose KV heads are recorded only in its '
        'gqa_jax.json (no tensor shape holds them): restore that file from a copy of the '
        'checkpoint.')
  module = {'encoder': 'encoder/layers_{}/attention',
            'decoder_self': 'decoder/layers_{}/self_attention',
            'decoder_cross': 'decoder/layers_{}/encoder_decoder_attention'}
  # SQA: the query heads of each stack; num_heads is the most of them (a stack with
  # fewer records them).
  queries = {s: need(f'{module[s].format(0)}/query/kernel')[1] // head_dim
             for s in network.STACKS}
  num_heads = max(queries.values())
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
    if queries[stack] != num_heads:
      kw[f'{stack}_query_heads'] = queries[stack]
    # CLA/MLKV: only the layers that project K/V have key kernels.
    count = len(layers['encoder' if stack == 'encoder' else 'decoder'])
    produced = tuple(i for i in range(count)
                     if f'{module[stack].format(i)}/key/kernel' in shapes)
    if len(produced) < count:
      kw[f'{stack}_kv_layers'] = produced
  kw.update(overrides)
  try:
    return network.T5Config(**kw)
  except ValueError as e:
    raise CheckpointError(f'inconsistent parameter shapes: {e}') from e


def check_shapes(params: Dict[str, Tensor], config: network.T5Config, what: str):
  """Raises CheckpointError unless `params` has exactly the tree of `config`; where the
  two differ in WGQA weights or in which layers have K/V (CLA/MLKV), it names the fix."""
  expected = network.flat_param_shapes(config)
  missing = sorted(set(expected) - set(params))
  extra = sorted(set(params) - set(expected))
  wrong = [f'{k}: {tuple(params[k].shape)} (expected {expected[k]})'
           for k in sorted(set(expected) & set(params)) if tuple(params[k].shape) != expected[k]]
  problems = ([f'missing {missing[:5]}'] if missing else []) + (
      [f'unexpected {extra[:5]}'] if extra else []) + ([f'shape {wrong[:5]}'] if wrong else [])
  if problems:
    raise CheckpointError(f'{what} does not match the model config: ' + '; '.join(
        problems + _variant_hints(set(params), set(expected))))


_KV_KERNEL = re.compile(r'^(?:encoder|decoder)/layers_(\d+)/(attention|self_attention|'
                        r'encoder_decoder_attention)/key(_weights|/kernel)$')


def _kv_layout(names) -> Tuple[Dict[str, Tuple[int, ...]], Tuple[str, ...]]:
  """({stack: the layers with a K kernel}, the stacks with WGQA weights) of a tree."""
  layers, weighted = {}, set()
  for name in names:
    match = _KV_KERNEL.match(name)
    if match:
      stack = network.MODULE_STACK[match.group(2)]
      if match.group(3) == '_weights':
        weighted.add(stack)
      else:
        layers.setdefault(stack, set()).add(int(match.group(1)))
  return ({s: tuple(sorted(v)) for s, v in layers.items()},
          tuple(s for s in network.STACKS if s in weighted))


def _variant_hints(have, want) -> list:
  """How to reconcile a checkpoint's tree (names `have`) with a config's (`want`) when
  they differ in WGQA weights or in the layers that have K/V: [] if they do not."""
  (have_layers, have_weighted), (want_layers, want_weighted) = _kv_layout(have), _kv_layout(want)
  hints = []
  weighted = [s for s in have_weighted if s not in want_weighted]
  if weighted:
    hints.append(f'the checkpoint is WGQA in {", ".join(weighted)} (learned K/V weights) and '
                 'the config is not: fold them into plain GQA kernels with `gqa-jax convert '
                 'CKPT OUT --fold` and use OUT, or give the config its WGQA settings '
                 '(attention/wgqa.gin)')
  unweighted = [s for s in want_weighted if s not in have_weighted]
  if unweighted:
    hints.append(f'the config is WGQA in {", ".join(unweighted)} and the checkpoint has no '
                 'K/V weights: make them with `gqa-jax convert CKPT OUT --method wgqa` from '
                 'its MHA checkpoint, or leave out the WGQA settings')
  shared = {s: v for s, v in have_layers.items() if set(v) < set(want_layers.get(s, ()))}
  if shared:
    settings = ', '.join(f'{s}_kv_layers={v}' for s, v in shared.items())
    hints.append(f'the checkpoint keeps K/V in fewer layers (CLA/MLKV: {settings}) than '
                 'the config: give the config those settings (attention/cla.gin sets the '
                 "decoder's)")
  unshared = [s for s, v in want_layers.items() if set(v) < set(have_layers.get(s, ()))]
  if unshared:
    hints.append(f'the config keeps K/V in fewer layers (CLA/MLKV in {", ".join(unshared)}) '
                 'than the checkpoint: make it with `gqa-jax convert CKPT OUT --kv-layers '
                 '...`, or leave out the kv_layers settings')
  return hints


# ------------------------------------------------------------------ verify ----

CHECKSUM = 'crc32'


def checksum(value: np.ndarray) -> int:
  """CRC-32 of a tensor's bytes, as gqa_jax records it in gqa_jax.json."""
  return zlib.crc32(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


def verify(source: Source, progress: bool = True) -> Tuple[Dict[str, str], int]:
  """Reads every tensor (parameters and optimizer state) one at a time and checks it.

  A tensor is bad when it cannot be read (missing or truncated file, a chunk whose
  compression check fails), when its data's shape or dtype is not the recorded one,
  when it holds NaN or infinity, or when its CRC-32 differs from the one recorded in
  gqa_jax.json (written by `gqa-jax convert`).

  Returns:
    ({name: problem} of the bad tensors, number of tensors whose checksum was compared).
  """
  recorded = source.metadata.get('checksums') or {}
  recorded = recorded.get('tensors', {}) if recorded.get('algorithm') == CHECKSUM else {}
  tensors = {**source.params, **(source.opt_state or {})}
  bad, compared = {}, 0
  total = sum(t.nbytes for t in tensors.values())
  bar = None
  if progress and total >= 256 << 20:  # a bar is noise for small checkpoints
    from tqdm import tqdm
    bar = tqdm(total=total, desc='verifying', unit='B', unit_scale=True, dynamic_ncols=True)
  for name in sorted(tensors):
    tensor = tensors[name]
    try:
      value = tensor.read()
    except CheckpointError as e:
      bad[name] = f'unreadable: {e}'
      continue
    finally:
      if bar is not None:
        bar.update(tensor.nbytes)
    # bfloat16 (ml_dtypes) is not an np.floating subtype: go through float32.
    finite = (np.isfinite(value if value.dtype.kind == 'f' else value.astype(np.float32))
              if value.dtype.kind in 'fV' else None)
    nonfinite = (f'{int(finite.size - finite.sum())} of {finite.size} values are NaN or infinite'
                 if finite is not None and not finite.all() else None)
    if value.dtype != np.dtype(tensor.dtype):
      bad[name] = f'data has dtype {value.dtype}, metadata says {np.dtype(tensor.dtype)}'
      continue
    if name in recorded:
      compared += 1
      if checksum(value) != recorded[name]:
        # The changed bytes are the cause; NaNs they produced are a symptom.
        bad[name] = (f'{CHECKSUM} {checksum(value):08x} differs from the recorded '
                     f'{recorded[name]:08x} (the bytes changed since it was written)'
                     + (f'; {nonfinite}' if nonfinite else ''))
        continue
    if nonfinite:
      bad[name] = nonfinite
  if bar is not None:
    bar.close()
  return bad, compared
