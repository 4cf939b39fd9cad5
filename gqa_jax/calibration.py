"""Calibration statistics for K/V conversion: the input second moment of each attention
module that projects K/V, C = sum_t x_t^T x_t / (number of tokens), float64 [D, D], over
the real (non-padding) tokens of a task's examples (`gqa-jax calibrate`).

`convert --method svd/procrustes` and `--grouping similarity` weight their errors by C
(`lowrank`): E|x W - x W'|^2 = |L^T (W - W')|_F^2 with C = L L^T.

What x is, per attention module (the producer layers only: a CLA/MLKV layer that reads
an earlier layer's K/V has no K/V kernels and no entry):
  encoder/layers_i/attention                 encoder layer i's pre_attention_layer_norm
                                             output, over encoder tokens > 0;
  decoder/layers_i/self_attention            decoder layer i's pre_self_attention_layer_norm
                                             output (teacher-forced), over positions whose
                                             decoder_target_tokens > 0;
  decoder/layers_i/encoder_decoder_attention the encoder output (after encoder_norm), over
                                             encoder tokens > 0: the same for every layer,
                                             so it is stored once, as ENCODER_OUTPUT.

The file (STATS) is one .npz: `moment/<entry>` float64 [D, D] per entry and `metadata`,
a JSON string (format, version, checkpoint, step, model config, the checkpoint's
`fingerprint`, task, split, lengths, stacks, examples done, tokens per entry, and which
entry each module reads). Statistics are only of the checkpoint they were computed on,
and finite: `convert` checks both (`Calibration.check_source`, `check_finite`), and
calibrate writes none that are not (a vocabulary larger than the model's embedding is
refused before any work). It is
rewritten atomically after every batch, so a killed run resumes where it was: `collect`
continues after the examples already counted, and the result equals one run over all of
them up to float rounding (sums are float32 per batch, accumulated in float64).

The examples are the first N of the task's split in seqio's deterministic order
(shuffle=False, span corruption's noise seeded by DATA_SEED), unpacked
(EncDecFeatureConverter(pack=False)). The default split is 'train': the conversion gap is
measured on 'validation', which calibration must not see.
"""

import dataclasses
import json
import os
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax import checkpoints, locks, network, outputs
from gqa_jax.checkpoints import base
from gqa_jax.errors import ConfigError, UserInputError

FORMAT = 'gqa-jax-calibration'
VERSION = 1
# T5's span corruption: 512 input tokens give 114 target tokens (noise 0.15, mean span 3).
DEFAULT_INPUT_LENGTH = 512
DEFAULT_TARGET_LENGTH = 114
DEFAULT_SPLIT = 'train'
DEFAULT_BATCH_SIZE = 32
DATA_SEED = 0  # seqio's seed of random preprocessing (span corruption's noise)
# The one entry every cross-attention module reads.
ENCODER_OUTPUT = 'decoder/encoder_output'
# (stack folder, attention module name) of each stack in the parameter tree.
_MODULES = {'encoder': ('encoder', 'attention'), 'decoder_self': ('decoder', 'self_attention'),
            'decoder_cross': ('decoder', 'encoder_decoder_attention')}
_MOMENT = 'moment/'
_METADATA = 'metadata'
# Metadata that must be equal for a file to be continued (resume).
_SAME_TO_RESUME = ('format', 'version', 'checkpoint', 'step', 'config', 'task', 'split',
                   'input_length', 'target_length', 'stacks', 'seed')
# Config fields that fix which modules exist and their [D, D] (`check_matches`).
_SHAPE_FIELDS = ('emb_dim', 'num_encoder_layers', 'num_decoder_layers')
# The temporary file beside STATS, at its longest (`_save`: a process id), for the check
# that its name fits the file system.
_LONGEST_SIBLING = '.partial-' + '9' * 10


class CalibrationError(UserInputError):
  """A calibration file or setting that cannot be used: the message names the fix."""


def module_names(config: network.T5Config, stack: str) -> Tuple[str, ...]:
  """The attention modules of `stack` that project K/V ('decoder/layers_0/self_attention'
  ...): every layer, or the producer layers with CLA/MLKV."""
  folder, name = _MODULES[stack]
  return tuple(f'{folder}/layers_{i}/{name}' for i in config.producer_layers(stack))


def entry_of(module: str) -> str:
  """The stored entry that a module's moment is: ENCODER_OUTPUT for cross-attention,
  else the module itself."""
  return ENCODER_OUTPUT if module.endswith('/encoder_decoder_attention') else module


def fingerprint(source: base.Source) -> str:
  """A checksum that tells two checkpoints of one config apart: CRC-32 over the names,
  shapes, dtypes and bytes of its relative-position tables and layer-norm scales, in name
  order. Every training step changes them and a fresh init draws the tables, so two
  models with the same config differ here; they are small, so it costs a few reads
  even for T5-XXL. A copy of a checkpoint, or a conversion that kept these tensors (a
  GQA conversion copies them bit for bit), has the same fingerprint."""
  crc = 0
  for name in sorted(source.params):
    if name.endswith(('/rel_embedding', '/scale')):
      value = np.ascontiguousarray(source.params[name].read())
      crc = zlib.crc32(f'{name} {value.shape} {value.dtype};'.encode(), crc)
      crc = zlib.crc32(value.reshape(-1).view(np.uint8), crc)
  return f'crc32:{crc:08x}'


def _config_record(config: network.T5Config) -> dict:
  """A config as a calibration file records it (JSON: lists, not tuples)."""
  return json.loads(json.dumps(config.to_dict()))


def _stack_of(module: str) -> Optional[str]:
  return network.MODULE_STACK.get(module.rsplit('/', 1)[-1])


def _normalise_stacks(stacks: Sequence[str]) -> Tuple[str, ...]:
  if isinstance(stacks, str):
    stacks = stacks.split(',')
  unknown = [s for s in stacks if s not in network.STACKS]
  if unknown or not stacks:
    raise ConfigError(f'--stacks {",".join(stacks)}: give a comma-separated subset of '
                      f'{",".join(network.STACKS)}.')
  return tuple(s for s in network.STACKS if s in stacks)


# ------------------------------------------------------------------ reading ----

@dataclasses.dataclass
class Calibration:
  """A calibration file: `moment(module)` reads one entry (the last one read is kept, so
  the K and V kernels of a module, and all cross-attention layers, read it once)."""
  path: Path
  metadata: dict
  _last: tuple = dataclasses.field(default=(None, None), init=False, repr=False,
                                   compare=False)

  @property
  def config(self) -> dict:
    """The model config (`T5Config.to_dict()`) of the calibrated checkpoint."""
    return self.metadata['config']

  @property
  def emb_dim(self) -> int:
    return int(self.config['emb_dim'])

  @property
  def modules(self) -> Dict[str, str]:
    """Attention module -> the entry holding its moment."""
    return dict(self.metadata['modules'])

  @property
  def tokens(self) -> Dict[str, int]:
    """Entry -> the number of tokens its moment is the mean over."""
    return dict(self.metadata['tokens'])

  @property
  def num_examples(self) -> int:
    return int(self.metadata['num_examples'])

  def moment(self, module: str) -> np.ndarray:
    """The input second moment [D, D] (float64) of `module`, e.g.
    'decoder/layers_1/encoder_decoder_attention'; CalibrationError if the file has none."""
    entry = self.modules.get(module)
    if entry is None:
      stack = _stack_of(module)
      if stack is None:
        raise CalibrationError(
            f'{self.path}: {module!r} is not an attention module; use names such as '
            "'decoder/layers_0/self_attention' or 'encoder/layers_0/attention'.")
      if stack in self.metadata['stacks']:
        raise CalibrationError(
            f'{self.path} has no statistics for {module} (its stack {stack} was calibrated '
            f'on a model without K/V kernels there, or with fewer layers): rerun gqa-jax '
            f'calibrate on the checkpoint being converted.')
      have = self.metadata['stacks']
      wanted = ','.join(_normalise_stacks([*have, stack]))
      raise CalibrationError(
          f'{self.path} has no statistics for {module}: it covers the stacks '
          f'{",".join(have)}; rerun gqa-jax calibrate with --stacks {wanted} (to another -o).')
    if self._last[0] != entry:
      with np.load(self.path, allow_pickle=False) as npz:
        value = np.asarray(npz[_MOMENT + entry], np.float64)
      if not np.isfinite(value).all():
        bad = int(value.size - np.isfinite(value).sum())
        raise CalibrationError(
            f'{self.path}: {bad} of {value.size} values of {entry} are NaN or infinite (the '
            f'checkpoint {self.metadata.get("checkpoint")} holds some, or its vocabulary is '
            'smaller than the task\'s): run gqa-jax calibrate again, on a checkpoint that '
            'gqa-jax inspect --verify finds intact.')
      value.flags.writeable = False  # kept for the next caller: nobody may change it
      self._last = (entry, value)
    return self._last[1]

  def check_finite(self, modules: Sequence[str]):
    """CalibrationError unless the moments of `modules` are finite (each entry read once;
    the last is kept for `moment`)."""
    for entry in sorted({self.modules[m] for m in modules if m in self.modules}):
      module = next(m for m in modules if self.modules.get(m) == entry)
      self.moment(module)

  def check_source(self, source: base.Source):
    """CalibrationError unless the statistics were computed on the checkpoint `source`:
    the same model config and the same `fingerprint` (weights), whatever its path."""
    theirs = self.metadata.get('checkpoint')
    ours = str(Path(source.path).resolve())
    step = self.metadata.get('step')
    fix = f'rerun gqa-jax calibrate on {ours} (to another -o), and convert with that file.'
    mine = _config_record(source.config)
    differ = sorted(k for k in set(self.config) | set(mine)
                    if self.config.get(k) != mine.get(k))
    if differ:
      show = lambda config: ', '.join(f'{k}={config.get(k)}' for k in differ[:4])
      raise CalibrationError(
          f'{self.path} holds statistics of another model, {theirs} (step {step}; '
          f'{show(self.config)}), not of this checkpoint {ours} ({show(mine)}): {fix}')
    recorded = self.metadata.get('fingerprint')
    if recorded is None:
      raise CalibrationError(
          f'{self.path} records no fingerprint of its checkpoint {theirs} (an older '
          f'gqa-jax calibrate wrote it), so it cannot be matched to {ours}: {fix}')
    here = fingerprint(source)
    if recorded != here:
      raise CalibrationError(
          f'{self.path} holds statistics of {theirs} (step {step}), not of this checkpoint '
          f'{ours} (step {source.step}): same config, but their weights differ (fingerprint '
          f'{recorded} there, {here} here): {fix}')

  def check_matches(self, config: network.T5Config):
    """CalibrationError unless `config` has the width and layers the statistics were
    collected on (the modules and their [D, D] fit)."""
    theirs = self.config
    for field in _SHAPE_FIELDS:
      if theirs.get(field) != getattr(config, field):
        raise CalibrationError(
            f'{self.path} holds statistics of a model with {field}={theirs.get(field)}, '
            f'but this checkpoint has {field}={getattr(config, field)}: rerun gqa-jax '
            'calibrate on the checkpoint being converted.')


def _read_metadata(path: Path, what: str) -> dict:
  """The metadata of a calibration file, or CalibrationError naming `what` (how the user
  named the file) when it is not one."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      if _METADATA not in npz.files:
        raise ValueError('no metadata')
      metadata = json.loads(str(npz[_METADATA][()]))
      missing = [m for m in set(metadata['modules'].values()) if _MOMENT + m not in npz.files]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    if isinstance(e, OSError) and not path.exists():
      raise CalibrationError(f'{what} does not exist: run gqa-jax calibrate CKPT --task '
                             f'TASK --num-examples N -o {path.name} first.') from None
    raise CalibrationError(f'{what} is not a gqa-jax calibrate file ({e}): choose another '
                           'file, or delete it and run gqa-jax calibrate again.') from None
  if metadata.get('format') != FORMAT or metadata.get('version') != VERSION:
    raise CalibrationError(f'{what} is not a version-{VERSION} gqa-jax calibrate file '
                           f"(format {metadata.get('format')!r}, version "
                           f"{metadata.get('version')!r}): run gqa-jax calibrate again.")
  if missing:
    raise CalibrationError(f'{what} lacks the entries {sorted(missing)} its metadata names: '
                           'the file is damaged; run gqa-jax calibrate again.')
  return metadata


def load(path) -> Calibration:
  """Opens a `gqa-jax calibrate` file (moments are read when asked for)."""
  resolved = base.resolve_path(path)
  if resolved.is_dir():
    raise CalibrationError(f'{path} is a folder: give the .npz file gqa-jax calibrate wrote.')
  return Calibration(resolved, _read_metadata(resolved, str(path)))


# ---------------------------------------------------------------- computing ----

def _second_moment(x, valid):
  """sum over the valid tokens of x_t^T x_t: x [B, S, D], valid [B, S] -> [D, D] float32."""
  x = x.astype(jnp.float32) * valid[..., None].astype(jnp.float32)
  return jnp.einsum('BSD,BSE->DE', x, x, precision=jax.lax.Precision.HIGHEST)


_FUNCTIONS = {}


def moment_sums_fn(config: network.T5Config, stacks: Sequence[str]) -> Callable:
  """A jitted (params, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens)
  -> ({entry: [D, D] float32 sum of x^T x over its real tokens}, {'encoder': tokens,
  'decoder': tokens}) for the modules of `stacks`; one per (config, stacks).

  The K/V inputs are taken where they enter the `key` projection of each attention
  (flax's intercept_methods), in one teacher-forced forward pass; the decoder runs only
  when decoder self-attention is asked for (cross-attention needs the encoder output
  alone), and XLA drops what no moment needs (the logits)."""
  stacks = _normalise_stacks(stacks)
  if (config, stacks) in _FUNCTIONS:
    return _FUNCTIONS[config, stacks]
  model = network.Transformer(config)
  own = {'encoder', 'decoder_self'} & set(stacks)

  def fn(params, encoder_tokens, decoder_inputs, decoder_targets):
    valid = {'encoder': encoder_tokens > 0, 'decoder_self': decoder_targets > 0}
    sums = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == '__call__' and module.name == 'key':
        path = module.path[:-1]  # the attention module's
        stack = network.MODULE_STACK.get(path[-1]) if path else None
        if stack in own:
          sums['/'.join(path)] = _second_moment(args[0], valid[stack])
      return next_fun(*args, **kwargs)

    def forward(transformer):
      encoded = transformer.encode(encoder_tokens, enable_dropout=False)
      if 'decoder_self' in stacks:
        transformer.decode(encoded, encoder_tokens, decoder_inputs, decoder_targets,
                           enable_dropout=False)
      return encoded

    with nn.intercept_methods(interceptor):
      encoded = model.apply({'params': params}, method=forward)
    if 'decoder_cross' in stacks:
      sums[ENCODER_OUTPUT] = _second_moment(encoded, valid['encoder'])
    counts = {'encoder': valid['encoder'].sum(), 'decoder': valid['decoder_self'].sum()}
    return sums, counts

  _FUNCTIONS[config, stacks] = jax.jit(fn)
  return _FUNCTIONS[config, stacks]


def _plan(config: network.T5Config, stacks: Sequence[str]) -> Dict[str, str]:
  """Module -> entry for every K/V-projecting module of `stacks`."""
  return {m: entry_of(m) for s in stacks for m in module_names(config, s)}


def _counted_by(entry: str) -> str:
  """Which tokens an entry is a mean over: 'encoder' or 'decoder'."""
  return 'decoder' if entry.endswith('/self_attention') else 'encoder'


def _examples(task: str, split: str, lengths: Dict[str, int], skip: int, take: int,
              batch_size: int):
  """NumPy batches of the split's examples skip .. skip + take - 1, in seqio's order."""
  import seqio  # TensorFlow: after gqa_jax.data has loaded it quietly (see `collect`)
  import tensorflow as tf  # loaded by gqa_jax.data already (quietly)
  ds = seqio.get_dataset(task, task_feature_lengths=lengths,
                         feature_converter=seqio.EncDecFeatureConverter(pack=False),
                         dataset_split=split, shuffle=False, num_epochs=1, seed=DATA_SEED,
                         use_cached=False, verbose=False)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).skip(skip).take(take).batch(batch_size).as_numpy_iterator()


def _save(path: Path, sums: Dict[str, np.ndarray], metadata: dict):
  """Writes the moments (sums / tokens) and metadata to a file beside `path`, then renames
  it to `path`: a reader (or a killed run) sees the old file or the new one."""
  tmp = path.with_name(f'.{path.name}.partial-{os.getpid()}')
  tokens = metadata['tokens']
  arrays = {_MOMENT + e: s / max(tokens[e], 1) for e, s in sums.items()}
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **{_METADATA: np.array(json.dumps(metadata))}, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _output_path(output) -> Path:
  """-o as an absolute path, refused when it is a folder, its folder cannot be written,
  or its name (or the temporary file's beside it) is too long (nothing is created yet)."""
  if output is None or not str(output).strip():
    raise ConfigError('-o is empty: give the .npz file to write, e.g. -o stats.npz.')
  path = base.resolve_path(output)
  outputs.check_output_name(path, '-o', _LONGEST_SIBLING)
  if path.is_dir():
    raise ConfigError(f'-o {output} is a folder: give a file name, e.g. -o '
                      f'{os.path.join(str(output), "stats.npz")}.')
  outputs.check_output_dir(path.parent, f'the folder of -o {output}')
  return path


def _check_finite_sums(sums: Dict[str, np.ndarray], ckpt, task: str, split: str,
                       done: int, n: int):
  """CalibrationError (before anything of the batch is written) unless a batch's sums
  are finite."""
  bad = sorted(entry for entry, value in sums.items() if not np.isfinite(value).all())
  if bad:
    written = (f'the {done} examples before are kept in -o' if done else
               'nothing was written')
    raise CalibrationError(
        f'checkpoint {ckpt} gives NaN or infinite K/V inputs for {", ".join(bad[:3])} on '
        f'examples {done + 1}..{done + n} of {task}:{split}, so no statistics of them are '
        f'written ({written}): check the checkpoint with gqa-jax inspect --verify.')


def _previous(path: Path, output, ours: dict) -> Optional[dict]:
  """The metadata of the calibration at `path` to continue, None if there is none;
  CalibrationError if it is another calibration (checkpoint, task, lengths ...)."""
  if not path.exists():
    return None
  theirs = _read_metadata(path, f'-o {output}')
  # A file without a fingerprint (an older gqa-jax's) is matched by the rest.
  same = _SAME_TO_RESUME + (('fingerprint',) if 'fingerprint' in theirs else ())
  for key in same:
    if theirs.get(key) != ours.get(key):
      raise CalibrationError(
          f'-o {output} holds another calibration ({key} {theirs.get(key)!r} there, '
          f'{ours.get(key)!r} now): choose another -o, or delete it to start over.')
  try:
    Calibration(path, theirs).check_finite(list(theirs['modules']))
  except CalibrationError as e:
    raise CalibrationError(f'-o {output} cannot be continued: {e} (delete it first)') from None
  return theirs


def collect(ckpt, task: str, num_examples: int, output, *, split: str = DEFAULT_SPLIT,
            input_length: int = DEFAULT_INPUT_LENGTH,
            target_length: int = DEFAULT_TARGET_LENGTH,
            batch_size: int = DEFAULT_BATCH_SIZE,
            stacks: Sequence[str] = network.PAPER_STACKS, progress: bool = True,
            allow_pickle: bool = False, allow_external_links: bool = False,
            notify: Optional[Callable[[str], None]] = None) -> dict:
  """Writes the calibration statistics of checkpoint `ckpt` (any format `convert` reads)
  over the first `num_examples` examples of `task`'s `split` to `output` (see the module
  docstring), continuing a file of the same calibration that holds fewer.

  Returns a summary: path, checkpoint, step, modules, entries, num_examples (done),
  tokens ({'encoder': n, 'decoder': n}), new_examples (counted by this call), resumed_from,
  exhausted (the split ended before num_examples), seconds.
  """
  start = time.time()
  say = notify or (lambda message: None)
  for value, what in ((num_examples, '--num-examples'), (batch_size, '--batch-size'),
                      (input_length, '--input-length'), (target_length, '--target-length')):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ConfigError(f'{what} {value!r} must be a positive integer.')
  stacks = _normalise_stacks(stacks)
  path = _output_path(output)
  source = checkpoints.open_checkpoint(ckpt, allow_pickle, allow_external_links)
  config = source.config
  base.check_shapes(source.params, config, f'checkpoint {ckpt}')
  plan = _plan(config, stacks)
  if not plan:
    raise ConfigError(f'checkpoint {ckpt} has no K/V projections in the stacks '
                      f'{",".join(stacks)}: choose other --stacks.')
  lengths = {'inputs': int(input_length), 'targets': int(target_length)}
  metadata = {
      'format': FORMAT, 'version': VERSION,
      'checkpoint': str(Path(source.path).resolve()), 'checkpoint_format': source.format,
      'step': source.step, 'config': config.to_dict(), 'fingerprint': fingerprint(source),
      'emb_dim': config.emb_dim,
      'task': task, 'split': split, 'input_length': lengths['inputs'],
      'target_length': lengths['targets'], 'stacks': list(stacks), 'seed': DATA_SEED,
      'modules': plan, 'num_examples': 0, 'exhausted': False,
      'tokens': {e: 0 for e in sorted(set(plan.values()))},
      'token_counts': {'encoder': 0, 'decoder': 0}}
  metadata = json.loads(json.dumps(metadata))  # as a file holds it (lists, not tuples)
  summary = {'path': str(path), 'checkpoint': str(ckpt), 'step': source.step,
             'modules': len(plan), 'entries': len(set(plan.values())),
             'emb_dim': config.emb_dim}

  def finished(theirs):
    """The summary when `theirs` (a previous run's metadata) needs no more work."""
    if theirs['num_examples'] < num_examples and not theirs['exhausted']:
      return None
    return dict(summary, num_examples=theirs['num_examples'], tokens=theirs['token_counts'],
                new_examples=0, resumed_from=theirs['num_examples'],
                exhausted=theirs['exhausted'], seconds=round(time.time() - start, 3))

  # A finished calibration returns before TensorFlow is loaded (seconds).
  theirs = _previous(path, output, metadata)
  if theirs is not None and finished(theirs):
    return finished(theirs)
  from gqa_jax import data  # registers the tasks; loads TensorFlow (seconds), quietly
  data.check_task(task, split, what='--task', split_what='--split')
  # Ids past the embedding would read beyond its table: NaN statistics.
  data.check_vocabulary(task, config.vocab_size, what=f'checkpoint {ckpt}')
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'cannot create the folder of -o {output} ({e.strerror}): choose a '
                      'folder you can write.') from e
  with locks.hold(path.parent / f'.{path.name}.lock', f'-o {path}',
                  'wait for that calibration to finish, or choose another -o'):
    for stale in path.parent.glob(f'.{path.name}.partial-*'):  # left by killed runs
      stale.unlink(missing_ok=True)
    sums = {e: np.zeros((config.emb_dim, config.emb_dim)) for e in metadata['tokens']}
    resumed_from = 0
    theirs = _previous(path, output, metadata)  # again: another run may have written it
    if theirs is not None:
      if finished(theirs):
        return finished(theirs)
      metadata.update(num_examples=theirs['num_examples'], tokens=theirs['tokens'],
                      token_counts=theirs['token_counts'])
      resumed_from = theirs['num_examples']
      with np.load(path, allow_pickle=False) as npz:  # back to sums, to add to
        sums = {e: npz[_MOMENT + e] * metadata['tokens'][e] for e in sums}
      say(f'-o {path} holds {resumed_from} examples: continuing with example '
          f'{resumed_from + 1} of {num_examples}.')

    params = jax.device_put(checkpoints.read_params(source))
    fn = moment_sums_fn(config, stacks)
    # Every batch is padded to `rows` so that the forward compiles once, also on resume.
    rows = min(batch_size, num_examples)
    from tqdm import tqdm  # only where a bar is shown
    bar = tqdm(total=num_examples, initial=resumed_from, desc='calibrating', unit='example',
               dynamic_ncols=True, disable=not progress)
    batches = _examples(task, split, lengths, resumed_from, num_examples - resumed_from, rows)
    try:
      with data.data_errors():  # a bad record of the task's files: one line naming it
        for batch in batches:
          n = len(batch['encoder_input_tokens'])
          pad = lambda v: np.pad(v, [(0, rows - n)] + [(0, 0)] * (v.ndim - 1))
          batch_sums, counts = jax.device_get(fn(
              params, pad(batch['encoder_input_tokens']), pad(batch['decoder_input_tokens']),
              pad(batch['decoder_target_tokens'])))
          _check_finite_sums(batch_sums, ckpt, task, split, metadata['num_examples'], n)
          for entry, value in batch_sums.items():
            sums[entry] += np.asarray(value, np.float64)
            metadata['tokens'][entry] += int(counts[_counted_by(entry)])
          for side in ('encoder', 'decoder'):
            metadata['token_counts'][side] += int(counts[side])
          metadata['num_examples'] += n
          _save(path, sums, metadata)
          bar.update(n)
    finally:
      bar.close()
    if metadata['num_examples'] < num_examples:  # the split has fewer examples
      metadata['exhausted'] = True
      _save(path, sums, metadata)
      say(f'{task}:{split} has only {metadata["num_examples"]} examples at these lengths: '
          'all are counted.')
  return dict(summary, num_examples=metadata['num_examples'],
              tokens=dict(metadata['token_counts']),
              new_examples=metadata['num_examples'] - resumed_from,
              resumed_from=resumed_from, exhausted=metadata['exhausted'],
              seconds=round(time.time() - start, 3))
