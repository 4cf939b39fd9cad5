"""Pre-flight check: a run's step compiled for a TPU slice we do not have (`gqa-jax compile`).

    gin_utils.parse(gin_files, gin_bindings)           # `gqa-jax train`'s files and flags
    settings = preflight.settings_from_gin('train')     # what train.train would run with
    report = preflight.compile_step(settings, preflight.get_topology('v4-128'))
    print(preflight.format_report(report))             # DoesNotFit when it exceeds HBM

Everything is abstract: parameters, optimizer state and batch are ShapeDtypeStructs with
the shardings the run would give them (partitioning's rules, train._train's way), so no
weight is allocated, no data read and no checkpoint opened. The step is the run's own
(`train.make_train_step`, `EncoderDecoderModel._score_impl`, `._predict_impl`), lowered
on a mesh of compile-only TPU devices from libtpu (`jax.experimental.topologies`, as
MaxText's train_compile.py does) or on this machine's devices (`local`).

What comes back is the compiler's, per device: memory (a program that does not fit HBM
fails to compile, with XLA's RESOURCE_EXHAUSTED error), FLOPs and bytes accessed
(`cost_analysis`), and the collectives of the optimised HLO. From those and the chip's
published peak figures, a roofline: the step can take no less than max(FLOPs / peak,
bytes / HBM bandwidth, collective bytes / ICI bandwidth). It is a lower-bound estimate,
never a measurement, and the MFU it implies is an upper bound.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import math
import os
import re
import time
import warnings
from typing import Any, Collection, Dict, List, Mapping, Optional, Tuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gqa_jax import evaluation, gin_utils, info, microbatches, models, network, partitioning
from gqa_jax import native_stderr, train
from gqa_jax.errors import ConfigError

STEPS = ('train', 'eval', 'infer')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
ESTIMATE_NOTE = ('roofline_step_seconds is a lower-bound estimate from the chip\'s published '
                 'peak figures, not a measurement; mfu_at_roofline is the MFU a step that '
                 'short would mean, an upper bound.')


# == Chips and slices ==============================================================
@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: published per-chip figures (bytes, bytes/s, FLOP/s) and how
  libtpu names its topologies."""
  name: str                  # as in slice names: 'v4'
  device_kind: str           # jax's Device.device_kind
  hbm_bytes: int
  peak_flops: float          # bf16, per chip
  hbm_bandwidth: float       # bytes/s, per chip
  ici_bandwidth: float       # bytes/s, per chip, all links, both directions
  topology_prefix: str       # libtpu's: 'v4' in 'v4:2x2x1' ('v5' for v5p)
  chip_config: str           # libtpu's chip_config_name: one device per chip
  cores_in_name: int         # a slice name counts TensorCores (2 a chip) or chips (1)
  dims: int                  # 3-D torus or 2-D
  source: str


GIB = 1024 ** 3
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GBps. That page
    # gives no per-chip ICI figure; 6 links x 45 GB/s each way is from Google's "How to
    # Scale Your Model" (jax-ml.github.io/scaling-book/tpus): an estimate.
    'v4': Chip('v4', 'TPU v4', 32 * GIB, 275e12, 1200e9, 540e9, 'v4', 'megacore', 2, 3,
               'cloud.google.com/tpu/docs/v4; ICI: jax-ml.github.io/scaling-book/tpus'),
    # docs.cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB at 819 GBps, ICI 400 GBps
    # bidirectional per chip.
    'v5e': Chip('v5e', 'TPU v5 lite', 16 * GIB, 197e12, 819e9, 400e9, 'v5e', 'default', 1, 2,
                'docs.cloud.google.com/tpu/docs/v5e'),
    # docs.cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB at 2765 GBps, ICI 1200
    # GBps bidirectional per chip.
    'v5p': Chip('v5p', 'TPU v5', 95 * GIB, 459e12, 2765e9, 1200e9, 'v5', 'megacore', 2, 3,
                'docs.cloud.google.com/tpu/docs/v5p'),
    # docs.cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB at 1638 GBps, ICI 800 GBps
    # bidirectional per chip.
    'v6e': Chip('v6e', 'TPU v6 lite', 32 * GIB, 918e12, 1638e9, 800e9, 'v6e', 'default', 1, 2,
                'docs.cloud.google.com/tpu/docs/v6e'),
}
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e'}  # Cloud's accelerator type for v5e
# Slice shapes by chip count: Cloud TPU's documented single-slice topologies.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}
# libtpu builds v5e/v6e slices from whole 2x2 hosts: a single chip (v5e-1) is refused.
_SHAPES_2D = {4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass
class Topology:
  """The devices a step is compiled for: `local` (this machine) or a TPU slice."""
  name: str                          # as the user typed it
  devices: List[Any]
  chip: Optional[Chip]               # None: figures unknown (CPU, GPU)
  tpu_topology: Optional[str] = None  # libtpu's name, 'v4:2x2x1'
  num_slices: int = 1
  hbm_bytes: Optional[int] = None


def _known_names() -> str:
  return ('local, a slice name (v4-8 ... v4-8192, v5p-8 ... v5p-12288, v5e-4 ... v5e-256, '
          'v6e-4 ... v6e-256) or a topology such as v4:2x2x1 or v5e:2x4')


def parse_topology(name: str) -> Tuple[Chip, Tuple[int, ...]]:
  """(chip, slice shape in chips) of a slice name ('v4-128': TensorCores for v4/v5p, so
  64 chips, 4x4x4; 'v5e-256': chips, 16x16) or of a topology ('v4:4x4x4')."""
  text = name.strip().lower()
  match = re.fullmatch(r'(v\d+[a-z]*)([-:])([\dx]+)', text)
  if match:
    generation, sep, size = match.groups()
    chip = CHIPS.get(_ALIASES.get(generation, generation))
    if chip is not None and sep == ':':
      shape = tuple(int(d) for d in size.split('x') if d)
      if len(shape) == chip.dims and min(shape) >= 1:
        return chip, shape
    elif chip is not None and size.isdigit() and int(size) % chip.cores_in_name == 0:
      chips = int(size) // chip.cores_in_name
      shape = (_SHAPES_3D if chip.dims == 3 else _SHAPES_2D).get(chips)
      if shape is not None:
        return chip, shape
  raise ConfigError(f'--topology {name}: unknown TPU slice; use {_known_names()}.')


def libtpu_available() -> bool:
  """Whether libtpu (the `tpu` extra) is installed: it gives the compile-only devices."""
  path = os.environ.get('TPU_LIBRARY_PATH')
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec('libtpu') is not None


def start_jax_quietly():
  """Starts jax's backends with libtpu's start-up warnings hidden (see
  `_native_stderr_hidden`): once libtpu is installed, jax tries its TPU plugin in every
  process, and on a machine without TPUs libtpu complains on stderr. A no-op once jax has
  started."""
  if libtpu_available():
    with _native_stderr_hidden():
      jax.devices()


def get_topology(name: str = 'local', num_slices: int = 1) -> Topology:
  """The devices to compile for: this machine's (`local`) or a TPU slice's compile-only
  devices, one per chip (v4/v5p as megacore), `num_slices` slices of it.

  Raises ConfigError for an unknown name, or when libtpu is missing (the fix: pip install
  -e ".[tpu]").
  """
  if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
    raise ConfigError(f'--num-slices {num_slices!r}: must be a positive integer.')
  if name == 'local':
    if num_slices != 1:
      raise ConfigError('--num-slices needs a TPU --topology (e.g. v5e-256): the local '
                        "devices are this machine's, one slice.")
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    chip = next((c for c in CHIPS.values() if c.device_kind == devices[0].device_kind), None)
    return Topology('local', devices, chip, hbm_bytes=stats.get('bytes_limit'))
  chip, shape = parse_topology(name)
  if not libtpu_available():
    raise ConfigError(f'--topology {name} needs libtpu for compile-only TPU devices: '
                      'pip install -e ".[tpu]" (or use --topology local).')
  # libtpu wires a slice as a torus where it is one: 3-D slices whose sides are all
  # multiples of 4 (cloud.google.com/tpu/docs/v4), 2-D sides of a full pod's 16.
  wrap = (tuple(d % 4 == 0 for d in shape) if chip.dims == 3
          else tuple(d == 16 for d in shape) + (False,))
  tpu_topology = f'{chip.topology_prefix}:{"x".join(map(str, shape))}'
  start_jax_quietly()
  if jax.default_backend() != 'tpu':
    # No TPU is driven by this process: compile-only devices touch no chip, so two
    # compiles (or a compile and the tests) may load libtpu at once; by default the
    # second would fail on libtpu's /tmp/libtpu_lockfile.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', 'true')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  error = None
  with _native_stderr_hidden() as hidden:
    try:
      devices = topologies.get_topology_desc(
          platform='tpu', topology_name=tpu_topology, chip_config_name=chip.chip_config,
          num_slices=num_slices, wrap=wrap).devices
    except Exception as e:  # libtpu reports a bad topology with several exception types
      error = e
  if error is not None:
    raise ConfigError(f'--topology {name} ({tpu_topology}): libtpu refused it: '
                      f'{_first_line(error)} {_first_line(hidden.text)}'.strip()) from error
  return Topology(name, list(devices), chip, tpu_topology, num_slices, chip.hbm_bytes)


def _native_stderr_hidden():
  """libtpu prints warnings about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES from C++ when
  it starts on a machine without TPUs; they mean nothing for a compile-only topology.
  Setting those variables would silence it too, but would tell libtpu something untrue.
  The captured text is kept for an error message."""
  return native_stderr.captured()


def _first_line(value) -> str:
  text = str(value).strip()
  return text.splitlines()[0] if text else ''


def make_mesh(topology: Topology, mesh_data: int = -1, mesh_model: int = 1) -> Mesh:
  """The run's ('data', 'model') mesh over the topology's devices; with several slices
  the data axis spans them (only data parallelism crosses the slower links between
  slices) and each slice holds whole model groups."""
  mesh = partitioning.create_mesh(mesh_data, mesh_model, devices=topology.devices)
  slices = topology.num_slices
  if slices == 1:
    return mesh
  data, model = mesh.shape['data'], mesh.shape['model']
  if data % slices:
    raise ConfigError(f'--gin.MESH_DATA={data} does not split over --num-slices {slices}: '
                      'data parallelism spans the slices, so use a multiple of '
                      f'{slices}.')
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  # allow_split_physical_axes: a model axis of 2 on a 4x4 slice (as jax.make_mesh allows).
  grid = mesh_utils.create_hybrid_device_mesh((data // slices, model), (slices, 1),
                                              topology.devices, allow_split_physical_axes=True)
  return Mesh(grid, partitioning.MESH_AXES, (jax.sharding.AxisType.Auto,) * 2)


# == Settings ======================================================================
@dataclasses.dataclass(frozen=True)
class CompileSettings:
  """What `compile_step` compiles; checked once, when built.

  Attributes:
    step: 'train' (the training step with its optimizer update), 'eval' (the teacher-
      forced scoring pass) or 'infer' (greedy decoding of a batch).
    batch_size, feature_lengths: the step's global batch and {'inputs', 'targets'}.
    pack: the train batch carries packing's segment ids and positions.
    logical_axis_rules: the run's rules, or a callable (config, mesh) -> rules, or None
      for partitioning's standard rules, as train.train builds them (with the
      partitioning dims, once train.train takes them: read if present).
  """
  model: models.EncoderDecoderModel
  optimizer: Any
  batch_size: int
  feature_lengths: Mapping[str, int]
  step: str = 'train'
  mesh_data: int = -1
  mesh_model: int = 1
  logical_axis_rules: Any = None
  random_seed: int = 0
  num_microbatches: Optional[int] = None
  activation_partitioning_dims: int = 1
  parameter_partitioning_dims: int = 1
  pack: bool = False

  def __post_init__(self):
    if self.step not in STEPS:
      raise ConfigError(f'--step {self.step!r}: use one of {", ".join(STEPS)}.')
    what = 'BATCH_SIZE' if self.step == 'train' else 'EVAL_BATCH_SIZE'
    if (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer))
        or self.batch_size < 1):
      raise ConfigError(f'--gin.{what}={self.batch_size!r}: must be a positive integer.')
    lengths = self.feature_lengths
    if (not isinstance(lengths, Mapping) or not {'inputs', 'targets'} <= set(lengths)
        or any(isinstance(lengths[k], bool) or not isinstance(lengths[k], (int, np.integer))
               or lengths[k] < 1 for k in ('inputs', 'targets'))):
      raise ConfigError(f'--gin.TASK_FEATURE_LENGTHS={lengths!r}: must map \'inputs\' and '
                        "'targets' to positive integers, e.g. "
                        """"--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 114}".""")
    if self.step == 'train' and self.optimizer is None:
      raise ConfigError('no optimizer is configured for train.train: add a run file such '
                        'as runs/pretrain.gin.')

  @property
  def config(self) -> network.T5Config:
    return self.model.module.config


def settings_from_gin(step: str = 'train') -> CompileSettings:
  """The settings `gqa-jax train` would run with, from the parsed gin config.

  gin.get_bindings(train.train) resolves the arguments gin would pass to train.train
  (macros, scoped references such as @train/train_utils.DatasetConfig()) without calling
  it: train() would take MODEL_DIR's lock, check the task and read data. Unset macros
  (%gin.REQUIRED) come back as gin.REQUIRED, so what a compile does not need (MODEL_DIR,
  MIXTURE_OR_TASK_NAME, TRAIN_STEPS, INITIAL_CHECKPOINT_PATH) may stay unset. Without a
  train.train binding (eval/infer files only), evaluation.evaluate's or .infer's are read.
  """
  fn = next((f for f in (train.train, evaluation.evaluate, evaluation.infer)
             if _bindings(f, resolve=False)), None)
  if fn is None or (step == 'train' and fn is not train.train):
    raise ConfigError('no gin file configures train.train: add a run file such as '
                      'runs/pretrain.gin (for --step eval/infer, runs/eval.gin works too).')
  defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
              if p.default is not inspect.Parameter.empty}
  bound = {**defaults, **_bindings(fn, resolve=True)}
  model = _required(bound.get('model'), 'MODEL', 'add a model file such as '
                    'models/t5_1_1/tiny.gin')
  kwargs = dict(model=model, step=step, mesh_data=bound.get('mesh_data', -1),
                mesh_model=bound.get('mesh_model', 1))
  if fn is train.train:
    kwargs.update(optimizer=bound.get('optimizer'), random_seed=bound.get('random_seed', 0),
                  logical_axis_rules=bound.get('logical_axis_rules'),
                  activation_partitioning_dims=bound.get('activation_partitioning_dims', 1),
                  parameter_partitioning_dims=bound.get('parameter_partitioning_dims', 1))
    data = bound.get('train_dataset_cfg')
    if step != 'train':
      data = bound.get('infer_eval_dataset_cfg') or data
    data = _required(data, 'the dataset', 'add a run file such as runs/pretrain.gin')
    kwargs.update(batch_size=_required(data.batch_size, 'EVAL_BATCH_SIZE' if step != 'train'
                                       else 'BATCH_SIZE'),
                  feature_lengths=_required(data.task_feature_lengths, 'TASK_FEATURE_LENGTHS'),
                  pack=bool(data.pack) and step == 'train',
                  num_microbatches=bound.get('num_microbatches'))
  else:
    kwargs.update(optimizer=None,
                  batch_size=_required(bound.get('batch_size'), 'EVAL_BATCH_SIZE'),
                  feature_lengths=_required(bound.get('task_feature_lengths'),
                                            'TASK_FEATURE_LENGTHS'))
  return CompileSettings(**kwargs)


def _bindings(fn, resolve: bool) -> dict:
  """gin's bindings of `fn` ({} when no parsed file configures it)."""
  try:
    gin.get_configurable(fn)  # registered by a file's dynamic registration, ever
  except ValueError:
    return {}
  try:
    return gin.get_bindings(fn, resolve_references=resolve)
  except Exception as e:  # gin reports unbound macros and bad values with several types
    unbound = gin_utils.unbound_macros()
    if unbound:
      raise ConfigError(f'the gin files use {", ".join("%" + m for m in unbound)} but '
                        f'nothing binds it: add a file that defines it, or pass '
                        f'--gin.{unbound[0]}=VALUE.') from e
    raise ConfigError(f'in gin config: {_first_line(e)}') from e


def _required(value, name: str, fix: str = ''):
  if value is gin.REQUIRED or value is None:
    how = fix or (f'pass --gin.{name}=...' + (
        """ (e.g. --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 114}")"""
        if name == 'TASK_FEATURE_LENGTHS' else ''))
    raise ConfigError(f'{name} is not set: {how}.')
  return value


# == Compiling =====================================================================
class DoesNotFit(Exception):
  """The step needs more HBM than the chip has: XLA refused to compile it.

  Attributes: report (compile_step's report, `fits` False) and message (one line: the
  numbers and the options that would help).
  """

  def __init__(self, message: str, report: Dict[str, Any]):
    super().__init__(message)
    self.message, self.report = message, report


def compile_step(settings: CompileSettings, topology: Optional[Topology] = None,
                 fit_options: Optional[Collection[str]] = None) -> Dict[str, Any]:
  """Lowers and compiles `settings.step` on `topology` (default: local) from abstract
  inputs, and returns the report (see `format_report` and the module doc).

  Args:
    fit_options: the gin macros the parsed config uses (gin_utils.used_macros()); a
      DoesNotFit message suggests only those among SCAN_LAYERS, REMAT_POLICY,
      NUM_MICROBATCHES and PARAMETER_PARTITIONING_DIMS. None: suggest them all.

  Raises:
    ConfigError: a setting that cannot work on this mesh.
    DoesNotFit: the compiler ran out of HBM.
  """
  topology = topology or get_topology('local')
  config = settings.config
  mesh = make_mesh(topology, settings.mesh_data, settings.mesh_model)
  data_size = mesh.shape['data']
  if settings.step == 'train':
    if settings.batch_size % data_size:
      raise ConfigError(f'--gin.BATCH_SIZE={settings.batch_size} does not split over the '
                        f'{data_size} data-parallel devices (MESH_DATA): use a multiple of '
                        f'{data_size}.')
    microbatches.check_num_microbatches(settings.num_microbatches, settings.batch_size,
                                        data_size)
  rules = settings.logical_axis_rules
  rules = (rules(config, mesh) if callable(rules)
           else rules or partitioning.standard_logical_axis_rules(
               config, mesh, settings.activation_partitioning_dims,
               settings.parameter_partitioning_dims))
  report = {'step': settings.step, 'topology': topology.name,
            'tpu_topology': topology.tpu_topology, 'num_slices': topology.num_slices,
            'device_kind': topology.devices[0].device_kind,
            'num_devices': len(topology.devices),
            'mesh': {k: int(v) for k, v in mesh.shape.items()},
            'batch_size': int(settings.batch_size),
            'feature_lengths': {k: int(v) for k, v in settings.feature_lengths.items()},
            'num_microbatches': settings.num_microbatches if settings.step == 'train' else None,
            'parameters': info.count_params(config)['total'],
            'hbm_per_device_bytes': topology.hbm_bytes,
            'model_flops_per_step': model_flops(config, settings.step, settings.batch_size,
                                                settings.feature_lengths)}
  # Built outside the mesh context: under it, eager work (a PRNG key, the dummy tokens
  # that trace the parameter tree) would be placed on the mesh's devices, which compile
  # but cannot run.
  fn, args, groups = _abstract_step(settings, mesh, rules)
  # The layers' activation constraints bind to this mesh while the step is traced.
  with partitioning.mesh_context(mesh, rules):
    start = time.perf_counter()
    lowered = fn.lower(*args)
    report['lower_seconds'] = time.perf_counter() - start
    start = time.perf_counter()
    try:
      with _no_cache_writes(bool(topology.tpu_topology)):
        compiled = lowered.compile()
    except Exception as e:  # XLA's JaxRuntimeError; only running out of memory is ours
      if not _is_out_of_memory(e):
        raise
      report['compile_seconds'] = time.perf_counter() - start
      raise _does_not_fit(e, report, settings, topology, fit_options) from e
    report['compile_seconds'] = time.perf_counter() - start
  report['memory_per_device_bytes'] = memory_per_device(compiled, groups)
  total = report['memory_per_device_bytes']['total']
  hbm = topology.hbm_bytes
  # On TPU the compiler itself refuses a program larger than HBM: compiled means it fits.
  report['fits'] = True if topology.tpu_topology else (None if hbm is None else total <= hbm)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  report['compiler_flops_per_device'] = _number(cost.get('flops'))
  report['compiler_bytes_accessed_per_device'] = _number(cost.get('bytes accessed'))
  hlo = compiled.as_text() or ''
  report['collectives'] = parse_collectives(hlo)
  report['hlo_while_loops'] = while_trip_counts(hlo)
  # The compiler counts a loop body once: scale its bytes by the HLO's own count with
  # and without trips (1 without loops).
  once, per_trip = hlo_bytes_accessed(hlo)
  report['hlo_loop_bytes_factor'] = per_trip / once if once and report['hlo_while_loops'] else 1.0
  compiler_bytes = report['compiler_bytes_accessed_per_device']
  report['bytes_accessed_per_step_per_device'] = (
      None if compiler_bytes is None else compiler_bytes * report['hlo_loop_bytes_factor'])
  report.update(roofline(report, topology.chip))
  report['chip'] = None if topology.chip is None else {
      'name': topology.chip.name, 'hbm_bytes': topology.chip.hbm_bytes,
      'peak_bf16_flops_per_s': topology.chip.peak_flops,
      'hbm_bytes_per_s': topology.chip.hbm_bandwidth,
      'ici_bytes_per_s': topology.chip.ici_bandwidth, 'source': topology.chip.source}
  report['note'] = ESTIMATE_NOTE
  return report


@contextlib.contextmanager
def _no_cache_writes(active: bool):
  """No persistent compilation cache entries written while active: a compile-only TPU
  executable cannot be read back (JAX warns on every later lookup of its key)."""
  if not active:
    yield
    return
  option = 'jax_persistent_cache_min_compile_time_secs'
  saved = getattr(jax.config, option)
  jax.config.update(option, float('inf'))
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', 'Error reading persistent compilation cache')
      yield
  finally:
    jax.config.update(option, saved)


# Public names for the other compile-only users (`bench decode --topology`).
no_cache_writes = _no_cache_writes


def _abstract_step(settings: CompileSettings, mesh: Mesh, rules):
  """(jitted step, its abstract arguments, {group: leaves} for the memory split)."""
  config = settings.config
  param_shardings = partitioning.param_shardings(config, mesh, rules)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        network.param_shapes(config), param_shardings)
  b, inputs, targets = (settings.batch_size, settings.feature_lengths['inputs'],
                        settings.feature_lengths['targets'])
  if settings.step == 'train':
    opt_shardings = partitioning.opt_state_shardings(settings.optimizer, params,
                                                     param_shardings)
    opt_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(settings.optimizer.init, params), opt_shardings)
    batch = _batch(b, inputs, targets, partitioning.data_sharding(mesh), settings.pack)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=partitioning.replicated(mesh))
    kwargs = {}  # gradient accumulation, where this tree's train step has it
    if 'num_microbatches' in inspect.signature(train.make_train_step).parameters:
      kwargs['num_microbatches'] = settings.num_microbatches
    fn = train.make_train_step(settings.model, settings.optimizer, param_shardings,
                               opt_shardings, settings.random_seed, **kwargs)
    return fn, (params, opt_state, batch, step), {
        'parameters': params, 'optimizer_state': opt_state, 'batch': batch, 'other': step}
  # Evaluation hands the jitted functions host batches: replicated over the mesh.
  replicated = partitioning.replicated(mesh)
  if settings.step == 'eval':
    batch = _batch(b, inputs, targets, replicated, pack=False)
    fn = jax.jit(settings.model._score_impl)  # pylint: disable=protected-access
    return fn, (params, batch), {'parameters': params, 'batch': batch}
  batch = {'encoder_input_tokens': jax.ShapeDtypeStruct((b, inputs), jnp.int32,
                                                        sharding=replicated)}
  # The periodic eval's decoding (greedy, as the paper): predict_batch's defaults.
  predict = settings.model._predict_impl  # pylint: disable=protected-access
  fn = jax.jit(functools.partial(
      predict, method='greedy', num_decodes=1, alpha=0.6, temperature=1.0, topk=0, topp=0.0,
      length=targets, max_decode_steps=None, rescale_log_probs=True,
      return_all_decodes=False))
  return fn, (params, batch, None), {'parameters': params, 'batch': batch}


def _batch(batch_size: int, inputs: int, targets: int, sharding, pack: bool):
  """The seqio EncDecFeatureConverter's features, int32 [B, length], as ShapeDtypeStructs."""
  names = {'encoder_input_tokens': inputs, 'decoder_input_tokens': targets,
           'decoder_target_tokens': targets, 'decoder_loss_weights': targets}
  if pack:
    names.update(encoder_segment_ids=inputs, encoder_positions=inputs,
                 decoder_segment_ids=targets, decoder_positions=targets)
  return {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32, sharding=sharding)
          for k, n in names.items()}


def _number(value) -> Optional[float]:
  return None if value is None else float(value)


# == Memory ========================================================================
def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest
  shard of each leaf; a leaf without a sharding counts whole)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, 'sharding', None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total


def memory_per_device(compiled, groups: Mapping[str, Any]) -> Dict[str, int]:
  """The compiler's per-device bytes (arguments, outputs, temporaries, aliased, and
  total = arguments + outputs + temporaries - aliased; peak, XLA's peak of live
  buffers), and the arguments split by what they hold (bytes of each group's shards:
  XLA's own count adds layout padding)."""
  stats = compiled.memory_analysis()
  field = lambda name: int(getattr(stats, name, 0) or 0) if stats is not None else 0
  out = {'arguments': field('argument_size_in_bytes'),
         'outputs': field('output_size_in_bytes'),
         'temporaries': field('temp_size_in_bytes'),
         'aliased': field('alias_size_in_bytes')}
  out['total'] = out['arguments'] + out['outputs'] + out['temporaries'] - out['aliased']
  # XLA's own peak of live buffers, where this jax reports it: on TPU, temporaries that
  # XLA places in on-chip memory are not in `temporaries` (it can read 0).
  peak = getattr(stats, 'peak_memory_in_bytes', None) if stats is not None else None
  out['peak'] = None if peak is None else int(peak)
  for name in ('parameters', 'optimizer_state', 'batch'):
    out[name] = shard_bytes(groups[name]) if name in groups else 0
  return out


# == Model FLOPs ===================================================================
def model_flops(config: network.T5Config, step: str, batch_size: int,
                feature_lengths: Mapping[str, int]) -> int:
  """FLOPs (2 per multiply-add) of the model's matrix products in one step, whole batch.

  A kernel of P parameters costs 2P per token it sees: encoder kernels and the cross-
  attention K/V kernels see the S input tokens, the other decoder kernels and the
  logits the T target tokens (6 x parameters x tokens for a train step, split by which
  tokens each parameter sees). Attention adds its scores and values products, 4 x Q x H
  per pair of positions per layer (encoder S x S, decoder self T x T, cross T x S; Q the
  stack's query heads). A train step is 3 forward passes (forward, two for backward);
  eval is one; infer is the encoder and cross K/V once plus T cached decode steps
  (`info.decode_step_flops`). Embedding lookups, norms and softmax are not counted.
  WGQA's K/V kernels are counted at their stored size, not the pooled size.
  """
  b, s, t = batch_size, feature_lengths['inputs'], feature_lengths['targets']
  per_token = {'inputs': 0, 'targets': 0, 'encoder': 0}
  for name, shape in network.flat_param_shapes(config).items():
    parts = name.split('/')
    if parts[-1] != 'kernel' and not (config.logits_via_embedding and parts[-1] == 'embedding'):
      continue  # norms, relative-position tables, WGQA weights: no matrix product
    size = 2 * int(np.prod(shape))
    if parts[0] == 'encoder':
      per_token['encoder'] += size
    elif 'encoder_decoder_attention' in parts and parts[-2] in ('key', 'value'):
      per_token['inputs'] += size   # projected from the encoder output
    else:
      per_token['targets'] += size  # decoder kernels, logits (or the tied embedding)
  h = config.head_dim
  enc_attention = 4 * b * s * s * config.query_heads('encoder') * h * config.num_encoder_layers
  dec_attention = 4 * b * t * h * config.num_decoder_layers * (
      t * config.query_heads('decoder_self') + s * config.query_heads('decoder_cross'))
  encoder = (per_token['encoder'] + per_token['inputs']) * b * s + enc_attention
  if step == 'infer':
    return int(encoder + t * info.decode_step_flops(config, s, t, b)['total'])
  forward = encoder + per_token['targets'] * b * t + dec_attention
  return int(3 * forward if step == 'train' else forward)


# == The optimised HLO =============================================================
_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2,
                'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
                'f64': 8, 'c64': 8, 'c128': 16}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$')
_CALLEE = re.compile(r'\b(?:calls|to_apply|body|condition|true_computation|false_computation)'
                     r'=%?([\w.\-]+)')
_CALLEES = re.compile(r'\b(?:branch_computations|called_computations)=\{([^}]*)\}')


def _shape_bytes(shape_text: str) -> float:
  """Bytes of an HLO shape ('f32[8,128]{1,0}', or a tuple of them)."""
  total = 0.0
  for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape_text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _computations(hlo_text: str) -> Tuple[Dict[str, List[str]], Optional[str]]:
  """{computation name: its instruction lines}, and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      match = re.match(r'(ENTRY\s+)?%?([^\s(]+)', line)
      current = match.group(2)
      comps[current] = []
      if match.group(1):
        entry = current
    elif line.startswith('}'):
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def _trip_count(line: str, comps: Mapping[str, List[str]]) -> Optional[int]:
  """A while loop's trip count: XLA's known_trip_count, else the one integer constant
  its condition compares the counter with (a scan's `i < n`); None if neither."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
  if known:
    return int(known.group(1))
  condition = re.search(r'\bcondition=%?([\w.\-]+)', line)
  body = comps.get(condition.group(1), []) if condition else []
  constants = {int(c) for l in body
               for c in re.findall(r'[su](?:32|64)\[\][^=]*?\sconstant\((\d+)\)', l)}
  return constants.pop() if len(constants) == 1 else None


def _multiplicities(comps: Mapping[str, List[str]], entry: Optional[str]) -> Dict[str, int]:
  """How many times each computation runs per step: a while body once per trip (an
  unknown trip count counts once), anything else once per call."""
  edges = {name: [] for name in comps}
  for name, lines in comps.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match or match.group(2) in ('async-done', 'async-update'):
        continue  # the async-start of the same operation already called it
      trips = _trip_count(line, comps) if match.group(2) == 'while' else None
      callees = _CALLEE.findall(line) + [c.strip().lstrip('%') for group in
                                         _CALLEES.findall(line) for c in group.split(',')]
      for callee in callees:
        if callee in comps:
          edges[name].append((callee, trips or 1))
  order, seen = [], set()

  def visit(name):  # depth first, callees before callers
    seen.add(name)
    for callee, _ in edges[name]:
      if callee not in seen:
        visit(callee)
    order.append(name)

  if entry is None:
    return {name: 1 for name in comps}
  visit(entry)
  counts = dict.fromkeys(comps, 0)
  counts[entry] = 1
  for name in reversed(order):  # every caller before its callees
    for callee, factor in edges[name]:
      counts[callee] += counts[name] * factor
  return counts


def _group_size(line: str, num_partitions: int) -> int:
  """Devices in each replica group of a collective (for reduce-scatter's input size)."""
  explicit = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  if explicit:
    return len([d for d in explicit.group(1).split(',') if d])
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if iota:
    return int(iota.group(2))
  named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if named:
    sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", named.group(1)))
    return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", named.group(2)))
  return num_partitions


def parse_collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """{kind: {'count', 'bytes'}} for each kind in COLLECTIVES, per device and per step.

  Counted from the optimised (partitioned, per-device) HLO: an asynchronous pair once,
  at its -done; an operation in a loop body once per trip. Bytes are the full-size side
  of each operation: the result of all-reduce, all-gather, all-to-all and collective-
  permute, the input of reduce-scatter (its result times the group size).
  """
  comps, entry = _computations(hlo_text)
  counts = _multiplicities(comps, entry)
  partitions = re.search(r'num_partitions=(\d+)', hlo_text)
  num_partitions = int(partitions.group(1)) if partitions else 1
  out = {kind: {'count': 0, 'bytes': 0} for kind in COLLECTIVES}
  for name, lines in comps.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape, opcode = match.group(1), match.group(2)
      kind = opcode[:-len('-done')] if opcode.endswith('-done') else opcode
      if kind not in out or opcode.endswith('-start'):
        continue
      size = _shape_bytes(shape)
      if kind == 'reduce-scatter':
        size *= _group_size(line, num_partitions)
      out[kind]['count'] += counts[name]
      out[kind]['bytes'] += int(size * counts[name])
  return out


def while_trip_counts(hlo_text: str) -> List[Optional[int]]:
  """The trip count of every while loop in the optimised HLO (None: unknown). The
  compiler's cost_analysis counts a loop's body once, whatever its trip count."""
  comps, _ = _computations(hlo_text)
  return [_trip_count(line, comps) for lines in comps.values() for line in lines
          if (m := _INSTRUCTION.match(line)) and m.group(2) == 'while']



_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=')
# Instructions that move no data of their own (a loop's or a call's body is counted
# where it runs).
_NO_TRAFFIC = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while',
               'call', 'conditional', 'after-all', 'partition-id', 'replica-id',
               'opt-barrier', 'add-dependency'}


def _fusion_traffic(lines: List[str]) -> Tuple[Dict[int, Optional[float]], Optional[float]]:
  """What a fused computation reads of each parameter and writes: {parameter number:
  bytes read, None for all of it}, bytes written (None: its whole result). A parameter
  that is only sliced is read as far as the slices go; the buffer of an in-place
  dynamic-update-slice at the root is neither read nor written beyond the update."""
  params, shapes, users, root = {}, {}, {}, None
  for line in lines:
    match, defined = _INSTRUCTION.match(line), _NAME.match(line)
    if not match or not defined:
      continue
    name, shape, opcode = defined.group(1), match.group(1), match.group(2)
    shapes[name] = shape
    if opcode == 'parameter':
      params[name] = int(re.match(r'\s*(\d+)', match.group(3)).group(1))
    operands = re.findall(r'%([\w.\-]+)', match.group(3).split(')')[0])
    for position, operand in enumerate(operands):
      users.setdefault(operand, []).append((opcode, shape, position, operands))
    if line.lstrip().startswith('ROOT'):
      root = (opcode, operands)
  read, written = {}, None
  for name, number in params.items():
    uses = users.get(name, [])
    if uses and all(u[0] in ('slice', 'dynamic-slice', 'gather') and u[2] == 0 for u in uses):
      read[number] = sum(_shape_bytes(u[1]) for u in uses)
    elif (uses and root and root[0] == 'dynamic-update-slice' and root[1][0] == name
          and len(uses) == 1):
      read[number] = 0.0
  if root and root[0] == 'dynamic-update-slice' and len(root[1]) > 1:
    written = _shape_bytes(shapes.get(root[1][1], ''))
  return read, written


def hlo_bytes_accessed(hlo_text: str) -> Tuple[float, float]:
  """(bytes with every loop body counted once, bytes with each counted once per trip),
  counted from the optimised HLO as the compiler's cost analysis does in outline: each
  instruction outside fusions reads its operands and writes its result (a fusion is one
  instruction; its insides stay in registers and on-chip memory), slices read what
  they take, and dynamic-update-slices write in place.

  The compiler's own 'bytes accessed' is the better count of one pass; the ratio of the
  two numbers here scales it to the whole step, loops and all.
  """
  comps, entry = _computations(hlo_text)
  counts = _multiplicities(comps, entry)
  inside = set()  # fusions' computations and whatever they call
  for lines in comps.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match and match.group(2) == 'fusion':
        inside.update(re.findall(r'\bcalls=%?([\w.\-]+)', line))
  pending = list(inside)
  while pending:
    for callee in _CALLEE.findall('\n'.join(comps.get(pending.pop(), []))):
      if callee not in inside:
        inside.add(callee)
        pending.append(callee)
  traffic = {}
  once = per_trip = 0.0
  for name, lines in comps.items():
    if name in inside:
      continue
    shapes = {}
    for line in lines:
      match, defined = _INSTRUCTION.match(line), _NAME.match(line)
      if match and defined:
        shapes[defined.group(1)] = match.group(1)
    for line in lines:
      match = _INSTRUCTION.match(line)
      if (not match or match.group(2) in _NO_TRAFFIC or match.group(2).endswith('-done')
          or match.group(2) == 'async-update'):
        continue
      shape, opcode = match.group(1), match.group(2)
      operands = re.findall(r'%([\w.\-]+)', match.group(3).split(')')[0])
      reads = [_shape_bytes(shapes.get(o, '')) for o in operands]
      written = _shape_bytes(shape)
      if opcode in ('slice', 'dynamic-slice') and reads:
        reads = [written]
      elif opcode == 'dynamic-update-slice' and len(reads) > 1:
        reads, written = reads[1:], reads[1]
      elif opcode == 'fusion':
        callee = re.search(r'\bcalls=%?([\w.\-]+)', line)
        if callee and callee.group(1) in comps:
          if callee.group(1) not in traffic:
            traffic[callee.group(1)] = _fusion_traffic(comps[callee.group(1)])
          partial, fused_written = traffic[callee.group(1)]
          reads = [min(partial[i], r) if partial.get(i) is not None else r
                   for i, r in enumerate(reads)]
          written = written if fused_written is None else fused_written
      size = written + sum(reads)
      once += size
      per_trip += size * counts[name]
  return once, per_trip


# == Roofline ======================================================================
def roofline(report: Mapping[str, Any], chip: Optional[Chip]) -> Dict[str, Any]:
  """The step's lower-bound time per device from the chip's peak figures, and the MFU
  it would mean.

  compute: the larger of the compiler's FLOPs per device and the model's FLOPs over the
  devices (the compiler counts a loop body once: with scanned layers or microbatches
  its count is a fraction of the step's); memory: the compiler's bytes accessed, scaled
  to every trip of every loop by `hlo_bytes_accessed`'s ratio, over HBM bandwidth;
  collectives: their bytes over the chip's ICI
  bandwidth, slices' links counted as ICI. Every term is a lower bound, so their
  maximum is too.
  """
  empty = {'roofline_step_seconds': None, 'mfu_at_roofline': None,
           'roofline': {'compute_seconds': None, 'hbm_seconds': None, 'ici_seconds': None,
                        'bound': None, 'loop_bytes_factor': None}}
  if chip is None:
    return empty
  devices = report['num_devices']
  flops = max(report.get('compiler_flops_per_device') or 0,
              report['model_flops_per_step'] / devices)
  terms = {'compute_seconds': flops / chip.peak_flops,
           'hbm_seconds': (report.get('bytes_accessed_per_step_per_device')
                           or report.get('compiler_bytes_accessed_per_device') or 0)
                          / chip.hbm_bandwidth,
           'ici_seconds': sum(c['bytes'] for c in report['collectives'].values())
                          / chip.ici_bandwidth}
  seconds = max(terms.values())
  if seconds <= 0:
    return empty
  bound = max(terms, key=terms.get)[:-len('_seconds')]
  return {'roofline_step_seconds': seconds,
          'mfu_at_roofline': report['model_flops_per_step'] / (seconds * chip.peak_flops
                                                               * devices),
          'roofline': {**terms, 'bound': bound,
                       'loop_bytes_factor': report.get('hlo_loop_bytes_factor', 1.0)}}


# == Not fitting ===================================================================
_UNITS = {'': 1, 'B': 1, 'K': 1024, 'M': 1024 ** 2, 'G': 1024 ** 3, 'T': 1024 ** 4}


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text


is_out_of_memory = _is_out_of_memory  # public, as no_cache_writes


def parse_out_of_memory(message: str) -> Tuple[Optional[int], Optional[int]]:
  """(bytes needed, bytes available) from XLA's out-of-memory message, where it says."""
  value = r'([\d.]+)\s*([KMGT]?)i?B?'
  for pattern in (rf'required[^(]*\({value}\)\s*exceeds available[^(]*\({value}\)',
                  rf'Used {value} of {value} hbm'):
    match = re.search(pattern, message)
    if match:
      needed, unit, available, unit2 = match.groups()
      return (int(float(needed) * _UNITS[unit]), int(float(available) * _UNITS[unit2]))
  return None, None


FIT_OPTIONS = (
    ('SCAN_LAYERS', '--gin.SCAN_LAYERS=True'),
    ('REMAT_POLICY', "--gin.REMAT_POLICY=\"'minimal'\" or \"'full'\""),
    ('NUM_MICROBATCHES', '--gin.NUM_MICROBATCHES=N'),
    ('MESH_MODEL', 'a larger --gin.MESH_MODEL'),
    ('PARAMETER_PARTITIONING_DIMS', '--gin.PARAMETER_PARTITIONING_DIMS=2'))


def _does_not_fit(error, report, settings, topology, fit_options) -> DoesNotFit:
  needed, available = parse_out_of_memory(str(error))
  report.update(fits=False, error=_first_line(error), needed_bytes=needed,
                available_bytes=available, note=ESTIMATE_NOTE)
  hbm = available or topology.hbm_bytes
  chip = topology.chip.name if topology.chip else topology.devices[0].device_kind
  need = (f'needs {info.format_bytes(needed)} per device' if needed is not None
          else 'needs more memory per device than it has')
  has = f', a {chip} chip has {info.format_bytes(hbm)} of HBM' if hbm is not None else ''
  # Scanning, remat and microbatches cut a train step's activations; eval and infer
  # keep none for a backward pass.
  wanted = ({m for m, _ in FIT_OPTIONS} if settings.step == 'train'
            else {'MESH_MODEL', 'PARAMETER_PARTITIONING_DIMS'})
  # Options already at the value suggested are not suggested again.
  config = settings.config
  wanted -= {macro for macro, already in (
      ('SCAN_LAYERS', config.scan_layers), ('REMAT_POLICY', config.remat_policy == 'full'),
      ('PARAMETER_PARTITIONING_DIMS', settings.parameter_partitioning_dims == 2)) if already}
  text = dict(FIT_OPTIONS)  # said for what is set now: 'full' after 'minimal', more N
  if config.remat_policy == 'minimal':
    text['REMAT_POLICY'] = "--gin.REMAT_POLICY=\"'full'\""
  if settings.step == 'train' and settings.num_microbatches:
    text['NUM_MICROBATCHES'] = (f'--gin.NUM_MICROBATCHES (more than '
                                f'{settings.num_microbatches})')
  options = [text[macro] for macro, _ in FIT_OPTIONS if macro in wanted and (
      fit_options is None or macro in fit_options or macro == 'MESH_MODEL')]
  if settings.step != 'train':
    options.append('a smaller --gin.EVAL_BATCH_SIZE')
  mesh = report['mesh']
  message = (f'does not fit: the {settings.step} step {need}{has} (--topology '
             f'{topology.name}, mesh data {mesh["data"]} x model {mesh["model"]}); try '
             f'{", ".join(options)}.')
  return DoesNotFit(message, report)


# == The report as text ============================================================
def format_report(report: Mapping[str, Any]) -> str:
  """A short human-readable table of `compile_step`'s report."""
  b = lambda n: '-' if n is None else info.format_bytes(n)
  seconds = lambda s: '-' if s is None else (
      f'{s:.3g} s' if s >= 1 else f'{s * 1e3:.3g} ms' if s >= 1e-3 else f'{s * 1e6:.3g} us')
  mem = report['memory_per_device_bytes']
  mesh = report['mesh']
  where = report['topology'] + (f' ({report["tpu_topology"]}, compile-only)'
                                if report.get('tpu_topology') else '')
  lines = [f'{report["step"]} step on {where}: {report["num_devices"]} x '
           f'{report["device_kind"]}, mesh data {mesh["data"]} x model {mesh["model"]}, '
           f'batch {report["batch_size"]}, lengths {report["feature_lengths"]["inputs"]}/'
           f'{report["feature_lengths"]["targets"]}',
           f'compiled in {report["compile_seconds"]:.1f} s (lowered in '
           f'{report["lower_seconds"]:.1f} s)', '',
           'memory per device (the compiler\'s)',
           f'  arguments     {b(mem["arguments"]):>12}   parameters {b(mem["parameters"])}, '
           f'optimizer state {b(mem["optimizer_state"])}, batch {b(mem["batch"])}',
           f'  outputs       {b(mem["outputs"]):>12}',
           f'  temporaries   {b(mem["temporaries"]):>12}',
           f'  aliased       {b(mem["aliased"]):>12}   (donated inputs reused as outputs)',
           f'  peak          {b(mem.get("peak")):>12}   (XLA\'s peak of live buffers)',
           f'  total         {b(mem["total"]):>12}   of {b(report["hbm_per_device_bytes"])} '
           f'HBM: ' + _fit_words(report),
           '', 'work per step',
           f'  model FLOPs (whole step)              {report["model_flops_per_step"]:.3e}',
           f'  compiler FLOPs per device             '
           f'{_sci(report["compiler_flops_per_device"])}',
           f'  compiler bytes accessed per device    '
           f'{b(report["compiler_bytes_accessed_per_device"])}']
  loops = report.get('hlo_while_loops') or []
  if loops:
    lines += [f'  (the compiler counts a loop body once, FLOPs and bytes; loops of '
              f'{", ".join(str(t or "?") for t in loops)} trips)',
              f'  bytes per step per device, all trips  '
              f'{b(report.get("bytes_accessed_per_step_per_device"))}   (x'
              f'{report.get("hlo_loop_bytes_factor", 1.0):.2f}, from the HLO)']
  lines += ['', 'collectives per device (optimised HLO; loops counted per trip)']
  lines += [f'  {kind:<20} {c["count"]:>6}  {b(c["bytes"]):>12}'
            for kind, c in report['collectives'].items() if c['count']] or ['  none']
  r = report['roofline']
  lines += ['', 'roofline: a LOWER-BOUND ESTIMATE from the chip\'s peak figures, not a '
                'measurement']
  if report['roofline_step_seconds'] is None:
    lines.append('  - (no published figures for this device)')
  else:
    lines += [f'  compute {seconds(r["compute_seconds"])}, HBM {seconds(r["hbm_seconds"])}, '
              f'ICI {seconds(r["ici_seconds"])}: step >= '
              f'{seconds(report["roofline_step_seconds"])} ({r["bound"]}-bound); '
              f'MFU <= {report["mfu_at_roofline"]:.2f}']
    if loops:
      lines.append('  (compute: the model\'s FLOPs where the compiler\'s count, one pass of '
                   'each loop, is smaller; recomputation under remat is then not counted)')
  return '\n'.join(lines)


def _fit_words(report: Mapping[str, Any]) -> str:
  fits, hbm = report['fits'], report['hbm_per_device_bytes']
  if fits and hbm is not None and report['memory_per_device_bytes']['total'] > hbm:
    # XLA placed it: the sum counts temporaries whose lifetimes never overlap.
    return 'fits (the compiler placed it; the sum over-counts temporaries not live together)'
  return {True: 'fits', False: 'does NOT fit', None: 'HBM unknown'}[fits]


def _sci(value: Optional[float]) -> str:
  return '-' if value is None else f'{value:.3e}'
