"""T5X's Adafactor as a chain of optax transformations, T5X's learning-rate schedules,
and the conversion of the optimizer state to and from T5X's checkpoint layout.

T5X's Adafactor (t5x/adafactor.py) updates each parameter p with gradient g at step s
(the step *before* the update, counted from 0):

    decay = 1 - (s - step_offset + 1) ** -decay_rate
    v     = decay * v + (1 - decay) * (g**2 + epsilon1)      # factored: row/col means
    y     = g / sqrt(v)                                      # factored: g * row * col factors
    y     = y / max(1, rms(y) / clipping_threshold)
    u     = lr(s) * max(rms(p), epsilon2) * y
    m     = beta1 * m + (1 - beta1) * u; u = m               # only with beta1
    p     = p - u  (- weight_decay_rate * p)

optax's `scale_by_factored_rms`, `clip_by_block_rms`, `scale_by_learning_rate`,
`scale_by_param_block_rms`, `ema` and `add_decayed_weights` compute exactly these
steps in this order (they were ported from the same code), including the choice of
factored dimensions (the two largest, `v_row` drops the largest). What optax lacks,
and this module adds: `epsilon2` and a global-norm clip in the constructor, a
learning rate that is always a schedule of the absolute step (so the state has the
same structure whatever the schedule), and the state layout of T5X checkpoints:
`param_states/<param path>/{v_row, v_col, v, m}` plus `step`.

Call `update(grads, state, params)`: the parameter scale needs the parameters.

Stacked leaves (scanned layers, `T5Config.scan_layers`): a leaf for which
`network.scanned_layer_axis(path)` is not None holds a stack's L layers along that axis
('encoder/encoder/attention/query/kernel' [D, L, N*H]). Adafactor treats the axis as a
batch dimension, T5X's `FactorDim.BATCH`: the factored dims and second moments, the
update clipping and the parameter scale are a layer's (the three optax steps run under
`jax.vmap` over the axis), so a scanned run takes the unscanned run's steps. Its slots
keep the layer axis at the same position (`v_row` [D, L]); the T5X layout stays the
unscanned one, `param_states/encoder/layers_<i>/...` with per-layer shapes.
"""

from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import FactoredState

from gqa_jax import network

Schedule = Callable[[Any], Any]
SLOTS = ('v_row', 'v_col', 'v', 'm')
PREFIX = 'param_states/'
_SCHEDULE_FACTORS = ('constant', 'linear_warmup', 'linear_decay', 'rsqrt_decay',
                     'rsqrt_normalized_decay', 'decay_every', 'cosine_decay')


# --- learning-rate schedules ------------------------------------------------------------
def create_learning_rate_schedule(factors: str = 'constant * rsqrt_decay',
                                  base_learning_rate: float = 1.0,
                                  warmup_steps: int = 10000,
                                  decay_factor: float = 0.5,
                                  steps_per_decay: int = 20000,
                                  steps_per_cycle: int = 100000,
                                  step_offset: int = 0,
                                  min_learning_rate: float = 1e-8) -> Schedule:
  """T5X's `utils.create_learning_rate_scheduler`: lr as a function of the absolute step.

  The defaults are T5.1.1 pre-training's: lr = 1 / sqrt(max(step, 10000)). Finetuning
  in the paper uses `factors='constant', base_learning_rate=1e-3`. A step restored from
  a checkpoint (e.g. 1,000,000 for the public T5.1.1 checkpoints) continues the schedule.

  Factors (joined with '*'): constant, linear_warmup, linear_decay, rsqrt_decay,
  rsqrt_normalized_decay, decay_every, cosine_decay; the result is clipped below at
  `min_learning_rate` and returned as float32.
  """
  names = [n.strip() for n in factors.split('*')]
  unknown = [n for n in names if n not in _SCHEDULE_FACTORS]
  if unknown:
    raise ValueError(f'unknown learning-rate factor(s) {unknown} in {factors!r}; '
                     f'use {" * ".join(_SCHEDULE_FACTORS)} (any subset).')

  def schedule(step):
    step = jnp.maximum(0, jnp.asarray(step) - step_offset)
    lr = 1.0
    for name in names:
      if name == 'constant':
        lr *= base_learning_rate
      elif name == 'linear_warmup':
        lr *= jnp.minimum(1.0, step / warmup_steps)
      elif name == 'linear_decay':
        lr *= base_learning_rate * jnp.minimum(step / warmup_steps,
                                               1.0 + decay_factor * (warmup_steps - step))
      elif name == 'rsqrt_decay':
        lr /= jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == 'rsqrt_normalized_decay':
        lr *= np.sqrt(warmup_steps)
        lr /= jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == 'decay_every':
        lr *= decay_factor ** (step // steps_per_decay)
      elif name == 'cosine_decay':
        progress = jnp.maximum(0.0, (step - warmup_steps) / float(steps_per_cycle))
        lr *= jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
    return jnp.asarray(jnp.maximum(lr, min_learning_rate), jnp.float32)

  return schedule


# --- the optimizer ----------------------------------------------------------------------
def adafactor(learning_rate: Union[float, Schedule, None] = None, *,
              factored: bool = True,
              multiply_by_parameter_scale: bool = True,
              beta1: Optional[float] = None,
              decay_rate: float = 0.8,
              step_offset: int = 0,
              clipping_threshold: Optional[float] = 1.0,
              weight_decay_rate: Optional[float] = None,
              min_dim_size_to_factor: int = 128,
              epsilon1: float = 1e-30,
              epsilon2: float = 1e-3,
              dtype_momentum: Any = jnp.float32,
              global_norm_clip_threshold: Optional[float] = None
              ) -> optax.GradientTransformation:
  """T5X's `adafactor.Adafactor` with its defaults, as an optax transformation.

  Args:
    learning_rate: a schedule step -> lr (see `create_learning_rate_schedule`, the
      default when None) or a constant. T5X evaluates it at the step before the update;
      so does this (optax's schedule count).
    The rest are T5X's arguments of the same names: second-moment decay
    1 - (step - step_offset + 1)^-decay_rate; `v_row`/`v_col` for parameters whose two
    largest dims are >= min_dim_size_to_factor; update clipping at RMS
    `clipping_threshold`; step size scaled by max(RMS(param), epsilon2); momentum
    `beta1` (None: none); decoupled `weight_decay_rate`; `global_norm_clip_threshold`
    clips the gradients before everything else. T5X's `factor_map` and
    `logical_factor_rules` only change rank > 2 parameters (rank <= 2 always uses the
    size heuristic), so the 2-D T5 kernels need neither. Stacked (scanned) leaves are
    updated layer by layer, as T5X's `FactorDim.BATCH` (see the module docstring).
  """
  if learning_rate is None:
    learning_rate = create_learning_rate_schedule()
  # A schedule even for a constant, so that every configuration carries the step count.
  schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(
      float(learning_rate))
  chain = []
  if global_norm_clip_threshold:
    chain.append(optax.clip_by_global_norm(global_norm_clip_threshold))
  chain.append(_per_layer(optax.scale_by_factored_rms(factored, decay_rate, step_offset,
                                                      min_dim_size_to_factor, epsilon1)))
  if clipping_threshold is not None:
    chain.append(_per_layer(optax.clip_by_block_rms(clipping_threshold)))
  chain.append(optax.scale_by_learning_rate(schedule, flip_sign=False))
  if multiply_by_parameter_scale:
    chain.append(_per_layer(optax.scale_by_param_block_rms(epsilon2)))
  if beta1 is not None:
    # T5X's m averages the scaled step (lr * scale * y), which is what reaches ema here.
    chain.append(optax.ema(beta1, debias=False, accumulator_dtype=dtype_momentum))
  if weight_decay_rate is not None:
    chain.append(optax.add_decayed_weights(weight_decay_rate))
  chain.append(optax.scale(-1.0))
  return optax.chain(*chain)


# --- stacked layers: the layer axis is a batch dimension ---------------------------------
def _per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` computed one layer at a time on stacked leaves (T5X's `FactorDim.BATCH`).

  `inner` must compute each leaf on its own, from a state that is a named tuple of a
  shared `count` and trees shaped like the parameters (optax's scale_by_factored_rms,
  clip_by_block_rms, scale_by_param_block_rms). A stacked leaf runs under `jax.vmap`
  over its layer axis, so the RMS and the factored dims are a layer's, and its slots
  hold the layer axis at the same position. A tree without stacked leaves (and optax's
  `tree_map_params` placeholder) goes to `inner` unchanged, so it runs as without this.
  """
  def init_leaf(x, axis):
    if axis is None:
      return inner.init(x)
    one_layer = jax.ShapeDtypeStruct(_drop_axis(x.shape, axis), x.dtype)
    state_axes = _state_axes(jax.eval_shape(inner.init, one_layer), axis)
    return jax.vmap(inner.init, in_axes=axis, out_axes=state_axes)(x)

  def update_leaf(u, state, p, axis):
    if axis is None:
      return inner.update(u, state, p)
    state_axes = _state_axes(state, axis)
    return jax.vmap(inner.update, in_axes=(axis, state_axes, axis),
                    out_axes=(axis, state_axes))(u, state, p)

  def init(params):
    axes, treedef = _layer_axes(params)
    if all(a is None for a in axes):
      return inner.init(params)
    leaves = treedef.flatten_up_to(params)
    return _merge_states([init_leaf(x, a) for x, a in zip(leaves, axes)], treedef)

  def update(updates, state, params=None):
    axes, treedef = _layer_axes(updates)
    if all(a is None for a in axes):
      return inner.update(updates, state, params)
    params = [None] * len(axes) if params is None else treedef.flatten_up_to(params)
    out = [update_leaf(u, s, p, a) for u, s, p, a in zip(
        treedef.flatten_up_to(updates), _split_state(state, treedef), params, axes)]
    return (treedef.unflatten([u for u, _ in out]),
            _merge_states([s for _, s in out], treedef))

  return optax.GradientTransformation(init, update)


def _layer_axes(tree) -> Tuple[List[Optional[int]], Any]:
  """(each leaf's layer axis, None where not stacked; the treedef) of a parameter tree."""
  paths, treedef = _param_paths(tree)
  return [_layer_axis(p, x) for p, x in zip(paths, jax.tree_util.tree_leaves(tree))], treedef


def _layer_axis(path: str, x) -> Optional[int]:
  """The layer axis of leaf `x` at `path`, None where not stacked."""
  axis = network.scanned_layer_axis(path)
  if axis is not None and len(x.shape) <= axis:
    raise ValueError(f'{path} has shape {tuple(x.shape)}: a stacked (scanned) parameter '
                     f'needs its layer axis {axis}; stack the layers with the layer axis at '
                     f'{axis}.')
  return axis


def _drop_axis(shape, axis: Optional[int]) -> Tuple[int, ...]:
  shape = tuple(shape)
  return shape if axis is None else shape[:axis] + shape[axis + 1:]


def _state_axes(state, axis: int):
  """vmap axes of one leaf's state: the count is shared, every slot has the layer axis."""
  return type(state)(**{f: None if f == 'count' else axis for f in state._fields})


def _split_state(state, treedef) -> List[Any]:
  """One state per leaf of `treedef`, each with the shared count, from the tree's state."""
  slots = {f: treedef.flatten_up_to(getattr(state, f)) for f in state._fields
           if f != 'count'}
  return [state._replace(**{f: leaves[i] for f, leaves in slots.items()})
          for i in range(treedef.num_leaves)]


def _merge_states(states: List[Any], treedef):
  """The inverse of `_split_state`: every leaf counts the same steps, the first's is kept."""
  first = states[0]
  return first._replace(**{f: treedef.unflatten([getattr(s, f) for s in states])
                           for f in first._fields if f != 'count'})


# --- T5X's checkpoint layout -----------------------------------------------------------
class _T5xParam(NamedTuple):
  """A parameter as T5X's unscanned tree holds it, and where it lives in ours."""
  name: str  # T5X's path, 'encoder/layers_0/attention/query/kernel'
  shape: Tuple[int, ...]  # its shape in T5X's tree (a stacked leaf's less the layer axis)
  leaf: int  # the index of our leaf that holds it, in flattening order
  axis: Optional[int]  # that leaf's layer axis; None where not stacked
  layer: int  # the index on that axis (0 where not stacked)


def _t5x_params(params) -> List[_T5xParam]:
  """Every parameter of `params` as T5X names it, in flattening order, layers in order.

  A stacked leaf '<stack>/<stack>/<rest>' of shape [D, L, ...] holds the L unscanned
  parameters '<stack>/layers_<i>/<rest>' of shape [D, ...], layer i at index i.
  """
  paths, _ = _param_paths(params)
  out = []
  for j, (path, x) in enumerate(zip(paths, jax.tree_util.tree_leaves(params))):
    axis, shape = _layer_axis(path, x), tuple(x.shape)
    if axis is None:
      out.append(_T5xParam(path, shape, j, None, 0))
      continue
    out += [_T5xParam(_layer_path(path, i), _drop_axis(shape, axis), j, axis, i)
            for i in range(shape[axis])]
  return out


def _layer_path(path: str, layer: int) -> str:
  """'encoder/encoder/<rest>' -> 'encoder/layers_<layer>/<rest>' (the unscanned name)."""
  parts = path.split('/')
  i = next(i for i in range(len(parts) - 1)
           if network.SCANNED_SUBTREE.get(parts[i]) == parts[i + 1])
  return '/'.join(parts[:i + 1] + [f'layers_{layer}'] + parts[i + 2:])


def _layer_of(x, p: _T5xParam):
  """p's slice of a slot (or parameter) leaf: the leaf itself where not stacked."""
  return x if p.axis is None else x[(slice(None),) * p.axis + (p.layer,)]


def _param_paths(params):
  """('a/b/c' for every leaf, treedef) in the flattening order of `params`."""
  def name(key):
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return ['/'.join(name(k) for k in path) for path, _ in leaves], treedef


def _nodes(state, cls):
  """All nodes of type `cls` in an optax state (a tree of named tuples, tuples, dicts)."""
  return [x for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, cls))
          if isinstance(x, cls)]


def _the_factored_state(state) -> FactoredState:
  found = _nodes(state, FactoredState)
  if len(found) != 1:
    raise ValueError(f'expected an Adafactor state with one scale_by_factored_rms state, '
                     f'found {len(found)}: build the optimizer with optimizers.adafactor().')
  return found[0]


def _the_momentum(state):
  found = _nodes(state, optax.EmaState)
  if len(found) > 1:
    raise ValueError(f'expected at most one momentum (ema) state, found {len(found)}.')
  return found[0] if found else None


def _slot_trees(state) -> Dict[str, Any]:
  """{'v_row', 'v_col', 'v' (, 'm' with momentum): tree like the parameters}."""
  factored = _the_factored_state(state)
  slots = {'v_row': factored.v_row, 'v_col': factored.v_col, 'v': factored.v}
  momentum = _the_momentum(state)
  if momentum is not None:
    slots['m'] = momentum.ema
  return slots


def get_step(opt_state) -> Any:
  """The number of updates applied (T5X's `state/step`)."""
  return _the_factored_state(opt_state).count


def to_t5x_param_states(opt_state, params) -> Dict[str, Any]:
  """{'param_states/<param path>/<v_row|v_col|v|m>': array}: T5X's per-parameter slots.

  Unused slots are T5X's placeholders of shape (1,) (m without momentum is a float32
  zero). Stacked (scanned) leaves give their layers' slots under the unscanned names
  ('encoder/layers_<i>/...'), as an unscanned run writes them. Leaves are returned as
  they are, or sliced per layer (jax arrays: fetch them before writing from several
  hosts). The step is `get_step(opt_state)`.
  """
  treedef = jax.tree_util.tree_structure(params)
  t5x = _t5x_params(params)
  flat = {}
  for slot, tree in _slot_trees(opt_state).items():
    if jax.tree_util.tree_structure(tree) != treedef:
      raise ValueError(f'optimizer slot {slot!r} does not have the tree of `params`: '
                       'pass the parameters this state was created for.')
    leaves = jax.tree_util.tree_leaves(tree)
    flat.update({f'{PREFIX}{p.name}/{slot}': _layer_of(leaves[p.leaf], p) for p in t5x})
  if _the_momentum(opt_state) is None:
    flat.update({f'{PREFIX}{p.name}/m': np.zeros((1,), np.float32) for p in t5x})
  return flat


def t5x_param_state_shapes(optimizer: optax.GradientTransformation, params) -> Dict[str, Any]:
  """`to_t5x_param_states` as ShapeDtypeStructs, without computing anything (restore targets).

  Where `params` are ShapeDtypeStructs with shardings, slots shaped like their (per-layer)
  parameter (full v, m) take its sharding, less a stacked leaf's layer axis; the rest are
  replicated on the same mesh.
  """
  flat = jax.eval_shape(lambda p: to_t5x_param_states(optimizer.init(p), p), params)
  by_name = {p.name: p for p in _t5x_params(params)}
  leaves = jax.tree_util.tree_leaves(params)
  out = {}
  for name, x in flat.items():
    p = by_name[name[len(PREFIX):].rsplit('/', 1)[0]]
    sharding = _slot_sharding(getattr(leaves[p.leaf], 'sharding', None), p, x.shape)
    out[name] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return out


def _slot_sharding(sharding, p: _T5xParam, shape):
  """The sharding of one of p's slots, given the sharding of the leaf that holds p."""
  if sharding is None:
    return None
  if tuple(shape) != p.shape:
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  if p.axis is None or not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding  # the leaf's own, or one that does not name axes (a single device)
  spec = tuple(sharding.spec)
  return jax.sharding.NamedSharding(sharding.mesh,
                                    jax.sharding.PartitionSpec(*_drop_axis(spec, p.axis)))


def _read(value) -> np.ndarray:
  return np.asarray(value.read() if hasattr(value, 'read') else value)


# --- T5X's factoring rule: the one place that says which slots a parameter has ------------
def factored_dims(shape, factored: bool = True,
                  min_dim_size_to_factor: int = 128) -> Optional[Tuple[int, int]]:
  """(d1, d0) = (second largest, largest) dim if Adafactor factors `shape`, else None.

  T5X's `Adafactor._factored_dims` (optax's `scale_by_factored_rms` has the same code):
  rank >= 2 and the second largest dim >= min_dim_size_to_factor; ties keep argsort's
  order, so a square kernel has d1 = 0, d0 = 1.
  """
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def t5x_slot_shapes(shape, *, factored: bool = True, min_dim_size_to_factor: int = 128,
                    momentum: bool = False) -> Dict[str, Tuple[int, ...]]:
  """{'v_row', 'v_col', 'v', 'm': shape} that T5X's Adafactor stores for a parameter.

  Factored: v_row drops d0 (the largest dim), v_col drops d1, v is a (1,) placeholder;
  otherwise v is full and v_row, v_col are (1,). m is full with momentum (beta1), else
  (1,). T5X writes its placeholders as float32 zeros of shape (1,).
  """
  shape = tuple(int(d) for d in shape)
  out = {slot: (1,) for slot in SLOTS}
  dims = factored_dims(shape, factored, min_dim_size_to_factor)
  if dims is None:
    out['v'] = shape
  else:
    d1, d0 = dims
    out['v_row'] = shape[:d0] + shape[d0 + 1:]
    out['v_col'] = shape[:d1] + shape[d1 + 1:]
  if momentum:
    out['m'] = shape
  return out


def t5x_factoring(slot_shapes: Mapping[str, Mapping[str, Tuple[int, ...]]],
                  param_shapes: Mapping[str, Tuple[int, ...]],
                  prefer: int = 128) -> Optional[int]:
  """A min_dim_size_to_factor with which `t5x_slot_shapes` gives every stored v slot.

  Args:
    slot_shapes: param path -> {slot: shape} as stored (m is not looked at).
    param_shapes: param path -> shape.
    prefer: returned whenever it fits (T5X's default); otherwise the fitting value
      nearest to it. Shapes only bound the threshold to an interval, and the values in
      it differ only for shapes between the bounds.

  Returns:
    The threshold, or None when none reproduces the slots (not T5X's rule).
  """
  v_slots = {p: {s: tuple(x) for s, x in slots.items() if s != 'm'}
             for p, slots in slot_shapes.items()}
  second = {sorted(param_shapes[p])[-2] for p in v_slots if len(param_shapes[p]) >= 2}
  candidates = sorted({prefer, 1} | second | {d + 1 for d in second},
                      key=lambda c: (abs(c - prefer), c))
  for c in candidates:
    if all(all(t5x_slot_shapes(param_shapes[p], min_dim_size_to_factor=c)[s] == shape
               for s, shape in slots.items()) for p, slots in v_slots.items()):
      return c
  return None


def _refactor(path, shape, have, want_factored):
  """T5X slots of one parameter re-expressed for the other factoring.

  full v -> v_row, v_col: their row and column means, exactly what a factored
  Adafactor would hold (the accumulators are linear in g^2). v_row, v_col -> v: the
  rank-one estimate Adafactor itself divides by, v_row * v_col / mean(v_row).
  """
  dims = factored_dims(shape, min_dim_size_to_factor=0)
  if dims is None:
    raise ValueError(f'{PREFIX}{path}: slots {[(s, have[s].shape) for s in have]} do not fit '
                     f'a parameter of shape {tuple(shape)}, which is never factored.')
  d1, d0 = dims
  factored = t5x_slot_shapes(shape, min_dim_size_to_factor=0)
  if want_factored:
    v = have['v']
    if v.shape != tuple(shape):
      raise ValueError(f'{PREFIX}{path}/v has shape {v.shape}, expected {tuple(shape)}.')
    return {'v_row': v.mean(axis=d0), 'v_col': v.mean(axis=d1), 'v': np.zeros((1,))}
  v_row, v_col = have['v_row'], have['v_col']
  if v_row.shape != factored['v_row'] or v_col.shape != factored['v_col']:
    raise ValueError(f'{PREFIX}{path}: v_row {v_row.shape} / v_col {v_col.shape} do not '
                     f'factor a parameter of shape {tuple(shape)}.')
  row_mean = v_row.mean(axis=d1 if d1 < d0 else d1 - 1, keepdims=True)
  row = np.divide(v_row, row_mean, out=np.zeros_like(v_row), where=row_mean > 0)
  return {'v': np.expand_dims(row, d0) * np.expand_dims(v_col, d1),
          'v_row': np.zeros((1,)), 'v_col': np.zeros((1,))}


def refactor_t5x_param_states(flat: Mapping[str, Any], params,
                              optimizer: Optional[optax.GradientTransformation] = None
                              ) -> Tuple[Dict[str, Any], List[str]]:
  """T5X slots re-expressed where `optimizer` factors a parameter the other way.

  A checkpoint written with another `min_dim_size_to_factor` (or `factored`) stores
  v_row, v_col for a parameter this optimizer keeps a full v for, or the reverse;
  `_refactor` converts them (full v -> exact row/column means; v_row, v_col ->
  Adafactor's rank-one estimate). Slots are compared by shape (lazy tensors stay
  unread) and only the refactored ones are read.

  Returns:
    (flat with the refactored slots replaced, the refactored parameter paths).
    Slots missing, or mismatched in a way no factoring explains, are left for
    `from_t5x_param_states` to report. Paths are T5X's (unscanned) names, also for a
    stacked `params`.
  """
  optimizer = optimizer or adafactor()
  wanted = t5x_param_state_shapes(optimizer, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  out, refactored = dict(flat), []
  prefix = PREFIX if any(k.startswith(PREFIX) for k in flat) else ''
  for p in _t5x_params(params):
    names = {s: f'{prefix}{p.name}/{s}' for s in ('v_row', 'v_col', 'v')}
    if any(n not in flat for n in names.values()):
      continue
    have = {s: tuple(flat[n].shape) for s, n in names.items()}
    want = {s: tuple(wanted[f'{PREFIX}{p.name}/{s}'].shape) for s in names}
    want_factored = want['v'] != p.shape
    other = t5x_slot_shapes(p.shape, factored=not want_factored, min_dim_size_to_factor=0)
    if have == want or have != {s: other[s] for s in names}:
      continue  # fits, or a mismatch that no factoring explains
    fixed = _refactor(p.name, p.shape, {s: _read(flat[n]) for s, n in names.items()},
                      want_factored)
    out.update({n: np.asarray(fixed[s], np.float32) for s, n in names.items()})
    refactored.append(p.name)
  return out, refactored


def from_t5x_param_states(flat: Mapping[str, Any], params, step: int,
                          optimizer: Optional[optax.GradientTransformation] = None,
                          allow_refactor: bool = False):
  """The optax state of `optimizer` (default `adafactor()`) holding T5X's slots and step.

  Args:
    flat: 'param_states/<param path>/<slot>' (or '<param path>/<slot>') -> array or lazy
      `checkpoints.Tensor`, e.g. `open_checkpoint(path).opt_state`; other keys are ignored.
    params: the parameter tree (arrays or ShapeDtypeStructs) the state is for.
    step: the checkpoint's step: every step count of the state is set to it, so that the
      second-moment decay and the learning-rate schedule continue from it.
    optimizer: must factor like the one that wrote the checkpoint (same
      `min_dim_size_to_factor`) unless allow_refactor; a placeholder `m` with momentum
      on starts it at zero, a real `m` without momentum is ignored.
    allow_refactor: convert slots written with a different factoring instead of failing
      (`refactor_t5x_param_states`: full v -> exact row/col means; v_row, v_col ->
      Adafactor's rank-one estimate).

  Returns:
    The state as NumPy arrays (place it with `partitioning.shard_tree`). A stacked
    (scanned) `params` gets its slots stacked from the unscanned names' slots
    ('encoder/layers_<i>/...' is layer i).
  """
  optimizer = optimizer or adafactor()
  flat = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in flat.items()}
  template = jax.eval_shape(optimizer.init, params)
  wanted = {s: jax.tree_util.tree_leaves(t) for s, t in _slot_trees(template).items()}
  t5x = _t5x_params(params)
  _check_slot_names(flat, [p.name for p in t5x], wanted)
  if not 0 <= step <= np.iinfo(np.int32).max:
    raise ValueError(f'step={step} does not fit the int32 step count.')

  if allow_refactor:
    flat, _ = refactor_t5x_param_states(flat, params, optimizer)
  layers = {s: [[] for _ in leaves] for s, leaves in wanted.items()}
  axes = [None] * len(jax.tree_util.tree_leaves(params))
  for p in t5x:
    want = {s: _drop_axis(leaves[p.leaf].shape, p.axis) for s, leaves in wanted.items()}
    for s, x in _read_slots(flat, p, want, allow_refactor).items():
      layers[s][p.leaf].append(np.asarray(x, wanted[s][p.leaf].dtype))
    axes[p.leaf] = p.axis
  treedef = jax.tree_util.tree_structure(params)
  filled = {s: treedef.unflatten([xs[0] if a is None else np.stack(xs, axis=a)
                                  for xs, a in zip(per_leaf, axes)])
            for s, per_leaf in layers.items()}

  def fill(node):
    if isinstance(node, FactoredState):
      return FactoredState(np.asarray(step, node.count.dtype), filled['v_row'],
                           filled['v_col'], filled['v'])
    if isinstance(node, optax.EmaState):
      return optax.EmaState(np.asarray(step, node.count.dtype), filled['m'])
    if _is_counter(node):
      return node._replace(count=np.asarray(step, node.count.dtype))
    if isinstance(node, jax.ShapeDtypeStruct):
      return np.zeros(node.shape, node.dtype)  # any other state starts as optax does
    return node

  return jax.tree_util.tree_map(
      fill, template, is_leaf=lambda x: isinstance(x, (FactoredState, optax.EmaState))
      or _is_counter(x))


def _check_slot_names(flat: Mapping[str, Any], names: List[str], slots) -> None:
  """Every parameter of `names` has every slot in `flat`, and no other parameter has any."""
  missing = [f'{n}/{s}' for n in names for s in slots if f'{n}/{s}' not in flat]
  if missing:
    raise ValueError(f'the checkpoint\'s optimizer state lacks {len(missing)} slot(s), e.g. '
                     f'{[PREFIX + m for m in missing[:3]]}: it holds no (or another model\'s) '
                     'Adafactor state; restore the parameters only.')
  extra = sorted({k.rsplit('/', 1)[0] for k in flat if k.rsplit('/', 1)[-1] in SLOTS}
                 - set(names))
  if extra:
    raise ValueError(f'the checkpoint has optimizer state for {len(extra)} parameter(s) the '
                     f'model lacks, e.g. {extra[:3]}: wrong model config?')


def _read_slots(flat: Mapping[str, Any], p: _T5xParam, want: Mapping[str, Tuple[int, ...]],
                allow_refactor: bool) -> Dict[str, np.ndarray]:
  """p's slots read from `flat` and checked against this optimizer's shapes `want`."""
  have = {s: _read(flat[f'{p.name}/{s}']) for s in want if s != 'm'}
  if any(have[s].shape != want[s] for s in have):
    why = (' and no other factoring explains them: another optimizer\'s state, or a '
           'checkpoint converted by an older gqa-jax (convert it again).' if allow_refactor
           else ': the checkpoint was written with another min_dim_size_to_factor (or '
           'factored); build adafactor() with the same setting, or pass '
           'allow_refactor=True to convert the slots.')
    raise ValueError(
        f'{PREFIX}{p.name}: slots {[(s, have[s].shape) for s in have]} do not match this '
        f'optimizer ({[(s, want[s]) for s in have]}){why}')
  if 'm' in want:
    m = _read(flat[f'{p.name}/m'])
    if m.shape != want['m']:
      if m.shape != (1,):
        raise ValueError(f'{PREFIX}{p.name}/m has shape {m.shape}, expected {p.shape}.')
      m = np.zeros(p.shape)  # the source ran without momentum: start it at zero
    have['m'] = m
  return have


def _is_counter(node) -> bool:
  return (isinstance(node, tuple) and hasattr(node, '_fields') and 'count' in node._fields
          and isinstance(getattr(node, 'count'), jax.ShapeDtypeStruct))
