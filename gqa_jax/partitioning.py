"""Device mesh, logical axis rules and placement of trees, single and multi host.

The mesh has T5X's two axes, ('data', 'model'). Parameters and activations carry
logical axis names (layers.py); `standard_logical_axis_rules` maps them to the mesh
as T5X does, plus our own `kv_heads` axis (K/V kernels [D, K*H] and the KV cache, keys
[B, K, H, S] and values [B, K, S, H]): sharded over 'model' when every KV-head count of
the model divides evenly over it, replicated otherwise (an MQA model's single KV head
cannot be split).

    mesh = create_mesh(model=2)
    rules = standard_logical_axis_rules(config, mesh)
    params = shard_tree(params, param_shardings(config, mesh, rules))
    with mesh_context(mesh, rules):       # activations' logical constraints
      loss = jax.jit(loss_fn)(params, shard_tree(batch, data_sharding(mesh)))
"""

import contextlib
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gqa_jax import network
from gqa_jax.errors import ConfigError

LogicalAxisRules = List[Tuple[str, Optional[str]]]
MESH_AXES = ('data', 'model')


# --- mesh ---------------------------------------------------------------------------------
def create_mesh(data: int = -1, model: int = 1,
                devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all, of every host).

  Args:
    data: data-parallel size; -1 uses every device not used by `model`.
    model: model-parallel size. Devices of one model group are adjacent in the device
      order (the same host where possible), as T5X lays out its submesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  # Named by their gin macros: these come from --gin.MESH_DATA / --gin.MESH_MODEL.
  for name, value in (('MESH_MODEL', model), ('MESH_DATA', data)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ConfigError(f'--gin.{name}={value!r}: must be an integer (MESH_DATA=-1 uses '
                        'every device not used by MESH_MODEL).')
  if model < 1 or n % model:
    fits = [d for d in range(1, n + 1) if n % d == 0]
    raise ConfigError(f'--gin.MESH_MODEL={model} (model={model}) must be >= 1 and divide '
                      f'the {n} devices (jax.device_count()): use one of {fits}.')
  if data == -1:
    data = n // model
  if data < 1 or data * model != n:
    raise ConfigError(f'--gin.MESH_DATA={data} x MESH_MODEL={model} (data={data} x '
                      f'model={model}) != the {n} devices (jax.device_count()): use '
                      f'--gin.MESH_DATA=-1 or {n // model}.')
  auto = (jax.sharding.AxisType.Auto,) * 2  # shardings propagate (T5X's pjit semantics)
  try:
    return jax.make_mesh((data, model), MESH_AXES, auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # topology the helper rejects
    return Mesh(np.asarray(devices, dtype=object).reshape(data, model), MESH_AXES, auto)


def _model_size(mesh_or_size: Union[Mesh, int]) -> int:
  return mesh_or_size.shape['model'] if isinstance(mesh_or_size, Mesh) else int(mesh_or_size)


# --- logical axis rules -------------------------------------------------------------------
def kv_heads_mesh_axis(config: network.T5Config, model_size: int) -> Optional[str]:
  """'model' if every stack's KV-head count divides over `model_size` devices, else None."""
  counts = {s: config.kv_heads(s) for s in network.STACKS}
  return 'model' if all(k % model_size == 0 for k in counts.values()) else None


def _check_divisible(config: network.T5Config, rules: LogicalAxisRules, model_size: int):
  """The axes T5X shards over 'model' must split evenly: fail now, naming the fix."""
  # Query heads may differ per stack (SQA: {stack}_query_heads < num_heads), and every
  # count shards over 'heads' / 'joined_kv' (query and out kernels, relative-position
  # tables): each must split.
  heads = [('num_heads', config.num_heads)] + [
      (f'{s}_query_heads', config.query_heads(s)) for s in network.STACKS
      if config.query_heads(s) != config.num_heads]
  sizes = {'heads': heads,
           'joined_kv': [(f'{what} * head_dim', n * config.head_dim) for what, n in heads],
           'mlp': [('mlp_dim', config.mlp_dim)], 'vocab': [('vocab_size', config.vocab_size)],
           'embed': [('emb_dim', config.emb_dim)]}
  for logical, mesh_axis in rules:
    if mesh_axis != 'model' or logical not in sizes:
      continue
    for what, size in sizes[logical]:
      if size % model_size:
        divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= 64]
        raise ConfigError(f'{what}={size} (logical axis {logical!r}) does not split over '
                          f'model={model_size} devices: use a model size (--gin.MESH_MODEL) '
                          f'in {divisors}.')


def standard_logical_axis_rules(config: Optional[network.T5Config] = None,
                                model_size: Union[Mesh, int] = 1,
                                activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Optional[LogicalAxisRules] = None
                                ) -> LogicalAxisRules:
  """T5X's `standard_logical_axis_rules`, plus ('kv_heads', 'model' or None).

  Args:
    config: the model; decides the `kv_heads` rule and is checked against the mesh.
      Without it `kv_heads` is replicated (always valid).
    model_size: the mesh (or its 'model' size).
    activation_partitioning_dims, parameter_partitioning_dims: 1 or 2, as in T5X
      (2-D parameters shard `embed` over 'data'; 2-D activations shard it over 'model').
    additional_rules: appended, as in T5X (earlier rules win).
  """
  model_size = _model_size(model_size)
  dims = (activation_partitioning_dims, parameter_partitioning_dims)
  if dims not in ((1, 1), (1, 2), (2, 1), (2, 2)):
    raise ConfigError(f'activation_partitioning_dims={dims[0]}, parameter_partitioning_dims='
                      f'{dims[1]}: each must be 1 or 2.')
  kv_heads = kv_heads_mesh_axis(config, model_size) if config is not None else None
  embed = {(1, 1): [('embed', None)], (2, 1): [('embed', 'model')],
           (1, 2): [('embed', 'data')], (2, 2): [('embed', 'model'), ('embed', 'data')]}[dims]
  rules = [('batch', 'data'), ('vocab', 'model'), ('mlp', 'model'), ('heads', 'model'),
           ('kv', None), ('joined_kv', 'model'),
           # Before `embed`, so that K/V kernels [embed, kv_heads] shard like query's.
           ('kv_heads', kv_heads),
           *embed,
           ('relpos_buckets', None), ('abspos_buckets', None), ('length', None),
           ('layers', None), ('stack', None), ('mlp_activations', None)]
  if config is not None:
    _check_divisible(config, rules, model_size)
  return rules + list(additional_rules or [])


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalAxisRules) -> Iterator[None]:
  """Mesh and axis rules for tracing: layers' logical constraints become shardings."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


# --- shardings and placement --------------------------------------------------------------
def param_shardings(config: network.T5Config, mesh: Mesh,
                    rules: Optional[LogicalAxisRules] = None):
  """NamedSharding per parameter, from the network's logical axes and `rules`
  (default: the standard rules for this config and mesh)."""
  rules = standard_logical_axis_rules(config, mesh) if rules is None else rules
  return nn.logical_to_mesh_sharding(network.param_logical_axes(config), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batches: the leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, P('data'))


def opt_state_shardings(optimizer, param_shapes, shardings):
  """Shardings for `optimizer`'s state: slots shaped like their parameter (Adafactor's
  full `v`, momentum) follow the parameter; factored `v_row`/`v_col`, placeholders and
  step counts are replicated (as T5X's `derive_logical_axes`).

  Args:
    optimizer: an optax transformation (e.g. `optimizers.adafactor()`).
    param_shapes: the parameters, or their ShapeDtypeStructs.
    shardings: `param_shardings(...)`, a tree like the parameters.
  """
  mesh = jax.tree_util.tree_leaves(shardings)[0].mesh
  state_shapes = jax.eval_shape(optimizer.init, param_shapes)
  follow = lambda leaf, param, sharding: (
      sharding if tuple(leaf.shape) == tuple(param.shape) else replicated(mesh))
  return optax.tree_map_params(optimizer, follow, state_shapes, param_shapes, shardings,
                               transform_non_params=lambda _: replicated(mesh))


def shard_tree(tree, shardings):
  """Places a tree of host arrays (identical on every host) with the given shardings;
  a single sharding applies to every leaf."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, tree)
  return jax.device_put(tree, shardings)


# --- multi-host -----------------------------------------------------------------------------
def initialize_distributed(coordinator_address: Optional[str] = None,
                           process_count: Optional[int] = None,
                           process_index: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None,
                           cpu_collectives: Optional[str] = None) -> bool:
  """`jax.distributed.initialize` for multi-host runs; a no-op for one process.

  Call before anything else touches jax devices. On TPU pods and SLURM, jax finds the
  coordinator itself: pass process_count without an address. `cpu_collectives`
  ('gloo' or 'mpi') enables cross-process collectives between CPU devices.
  Returns whether it initialised.
  """
  if process_count is None or process_count == 1:
    return False
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=process_count, process_id=process_index,
                             local_device_ids=local_device_ids)
  return True


def host_data_shard(mesh: Mesh) -> Tuple[int, int]:
  """(shard index, number of shards) of the global batch this process should read.

  Processes whose devices sit at the same 'data' positions (one model group spread over
  several hosts) read the same shard; seqio's ShardInfo(index, num_shards).
  """
  devices = mesh.devices.reshape(mesh.shape['data'], -1)  # [data, model]
  me = jax.process_index()
  rows = [r for r in range(devices.shape[0]) if any(d.process_index == me for d in devices[r])]
  if not rows:
    raise ValueError('this process has no device in the mesh.')
  per_host = len(rows)
  if rows != list(range(rows[0], rows[0] + per_host)) or rows[0] % per_host:
    raise ValueError(f'this process holds data rows {rows}: not one contiguous block; '
                     'build the mesh with create_mesh (model groups within a host).')
  return rows[0] // per_host, mesh.shape['data'] // per_host


def make_global_batch(local_batch: Mapping[str, Any], mesh: Mesh,
                      global_batch_size: Optional[int] = None):
  """Global jax.Arrays sharded over 'data' from this process's shard of the batch.

  Each process passes the rows of its `host_data_shard(mesh)` (all of the batch with a
  single process). The global batch size is inferred unless given.
  """
  sharding = data_sharding(mesh)
  num_shards = host_data_shard(mesh)[1]

  def make(x):
    x = np.asarray(x)
    size = global_batch_size or x.shape[0] * num_shards
    if size % mesh.shape['data']:
      raise ValueError(f'global batch size {size} does not split over data='
                       f'{mesh.shape["data"]} devices: use a multiple of {mesh.shape["data"]}.')
    return jax.make_array_from_process_local_data(sharding, x, (size,) + x.shape[1:])
  return jax.tree_util.tree_map(make, dict(local_batch))
