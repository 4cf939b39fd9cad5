"""Adafactor on stacked (scanned) layers: the layer axis is a batch dimension (T5X's
FactorDim.BATCH), and the T5X state layout stays the unscanned one.

Oracle: the same Adafactor on the unscanned tree. A stacked tree is built here from the
unscanned one (`stack`: every `<stack>/layers_<i>` leaf stacked at axis 1 under
`<stack>/<stack>`), as T5Config.scan_layers lays out the parameters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gqa_jax import network, optimizers

AXIS = network.SCAN_AXIS
# Dims >= 128 so that Adafactor factors: query/out [128, 128] and MLP [128, 192] kernels
# are factored, MQA's K/V [128, 64] and the norm scales [128] are not. 2 encoder and 3
# decoder layers: stacks of different lengths.
CONFIG = network.T5Config(vocab_size=256, dtype='float32', emb_dim=128, num_heads=2,
                          head_dim=64, mlp_dim=192, num_encoder_layers=2,
                          num_decoder_layers=3, decoder_self_kv_heads=1,
                          decoder_cross_kv_heads=1)
STEPS = 3


# --- trees ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def unscanned_shapes():
  return jax.eval_shape(functools.partial(network.init_params, CONFIG),
                        jax.random.PRNGKey(0))


def layer_of(path) -> int:
  """i for a leaf under layers_<i>, else 0."""
  names = [str(getattr(k, 'key', k)) for k in path]
  return next((int(n[len('layers_'):]) for n in names if n.startswith('layers_')), 0)


def random_tree(seed, scale=1.0, layer_scales=(1.0, 3.0, 0.1)):
  """Normal values; layer i scaled by layer_scales[i], so that a layer's RMS is not the
  stacked leaf's (a whole-leaf clip or parameter scale would show)."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (scale * layer_scales[layer_of(path)] * rng.randn(*x.shape)
                       ).astype(np.float32), unscanned_shapes())


def gradients():
  # Layer 1's gradients grow from step to step, so its scaled update exceeds the clipping
  # threshold; layer 0's shrink and stay under it.
  return [random_tree(10 + k, layer_scales=(0.3 ** k, 3.0 ** k, 1.0))
          for k in range(STEPS)]


def layer_keys(subtree):
  return sorted((k for k in subtree if k.startswith('layers_')),
                key=lambda k: int(k[len('layers_'):]))


def stack(tree):
  """The scanned layout of an unscanned tree: '<stack>/layers_<i>/x' -> '<stack>/<stack>/x'
  with layer i at index i of axis 1."""
  out = dict(tree)
  for name, scanned in network.SCANNED_SUBTREE.items():
    sub = dict(tree[name])
    layers = [sub.pop(k) for k in layer_keys(tree[name])]
    sub[scanned] = jax.tree.map(lambda *xs: np.stack(xs, axis=AXIS), *layers)
    out[name] = sub
  return out


def unstack(tree):
  """The inverse of `stack`."""
  out = dict(tree)
  for name, scanned in network.SCANNED_SUBTREE.items():
    sub = dict(tree[name])
    stacked = sub.pop(scanned)
    num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[AXIS]
    for i in range(num_layers):
      sub[f'layers_{i}'] = jax.tree.map(lambda x: np.take(np.asarray(x), i, axis=AXIS), stacked)
    out[name] = sub
  return out


def run(tx, params, grads_per_step, state=None):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in grads_per_step:
    params, state = step(params, state, grads)
  return params, state


def whole_leaf_adafactor(learning_rate, beta1=None, **kw):
  """The optax chain `adafactor` was before stacked leaves: every RMS over a whole leaf."""
  return optax.chain(
      optax.scale_by_factored_rms(**kw), optax.clip_by_block_rms(1.0),
      optax.scale_by_learning_rate(optax.constant_schedule(learning_rate),
                                   flip_sign=False),
      optax.scale_by_param_block_rms(1e-3),
      *([optax.ema(beta1, debias=False, accumulator_dtype=jnp.float32)] if beta1 else []),
      optax.scale(-1.0))


@functools.lru_cache(maxsize=None)
def runs(beta1, min_dim=128):
  """(params, unscanned run's (params, state), stacked run's (params, state)) after STEPS
  updates of the same Adafactor from the same start."""
  params = random_tree(0, scale=0.05)
  grads = gradients()
  tx = optimizers.adafactor(0.01, beta1=beta1, min_dim_size_to_factor=min_dim)
  return params, run(tx, params, grads), run(tx, stack(params), [stack(g) for g in grads])


def moved(after, before):
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                      after, before)


def assert_trees_close(actual, expected, rtol, atol=None):
  """Per leaf: |a - e| <= rtol * max|e| (float32 round-off of sums of signed terms), plus
  atol's leaf where given."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  atol = jax.tree.map(lambda _: 0.0, expected) if atol is None else atol
  for (path, a), e, extra in zip(jax.tree_util.tree_leaves_with_path(actual),
                                 jax.tree_util.tree_leaves(expected),
                                 jax.tree_util.tree_leaves(atol)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * np.max(np.abs(e)) + extra,
                               err_msg=jax.tree_util.keystr(path))


def assert_moved_close(got, want, start):
  """got and want moved alike from start: to 1e-5 of the step, plus the float32 rounding
  of the parameters themselves (a few ulps of the largest)."""
  ulps = jax.tree.map(lambda p: 4 * np.finfo(np.float32).eps * np.max(np.abs(p)), start)
  assert_trees_close(moved(got, start), moved(want, start), rtol=1e-5, atol=ulps)


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def max_relative_difference(actual, expected):
  return max(float(np.max(np.abs(a - e)) / np.max(np.abs(e))) for a, e in zip(
      jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)))


# --- the update ---------------------------------------------------------------------------
# min_dim 2: a norm scale [D] is never factored, but its stack [D, L] would be if the
# layer axis counted as a dim.
@pytest.mark.parametrize('beta1,min_dim', [(None, 128), (0.9, 128), (None, 2)])
def test_stacked_update_is_the_unstacked_update_layer_by_layer(beta1, min_dim):
  params, (want, _), (got, _) = runs(beta1, min_dim)
  # Compare the distance moved: the parameters themselves would hide a wrong step.
  assert_moved_close(unstack(got), want, params)


def test_whole_leaf_rms_would_take_other_steps():
  """The control: the scenario tells per-layer from whole-leaf clipping and scale."""
  params, (want, _), _ = runs(None)
  grads = gradients()
  whole, _ = run(whole_leaf_adafactor(0.01), stack(params), [stack(g) for g in grads])
  assert max_relative_difference(moved(unstack(whole), params), moved(want, params)) > 0.1
  # Update clipping is active in the scenario (a run without it moves elsewhere).
  unclipped, _ = run(optimizers.adafactor(0.01, clipping_threshold=None), params, grads)
  assert max_relative_difference(moved(unclipped, params), moved(want, params)) > 0.1


def test_unstacked_tree_runs_as_the_plain_optax_chain_bit_for_bit():
  params, grads = random_tree(1, scale=0.05), gradients()[:2]
  got = run(optimizers.adafactor(0.01, beta1=0.9), params, grads)
  assert_trees_equal(got, run(whole_leaf_adafactor(0.01, beta1=0.9), params, grads))


def test_stacked_slots_keep_the_layer_axis():
  params = stack(random_tree(2))
  state = jax.eval_shape(optimizers.adafactor(0.01, beta1=0.9).init, params)
  factored, momentum = state[0], state[4]
  enc, dec = params['encoder']['encoder'], params['decoder']['decoder']
  assert factored.v_row['encoder']['encoder']['attention']['query']['kernel'].shape == (
      128, 2)
  # [128, 192] per layer: v_row drops the largest dim (192), v_col the other.
  assert factored.v_row['decoder']['decoder']['mlp']['wi_0']['kernel'].shape == (128, 3)
  assert factored.v_col['decoder']['decoder']['mlp']['wi_0']['kernel'].shape == (192, 3)
  # Not factored: MQA's K/V and the norm scales keep a full v, shaped like the parameter.
  assert dec['self_attention']['key']['kernel'].shape == (128, 3, 64)
  assert factored.v['decoder']['decoder']['self_attention']['key']['kernel'].shape == (
      128, 3, 64)
  assert factored.v['encoder']['encoder']['pre_mlp_layer_norm']['scale'].shape == (
      enc['pre_mlp_layer_norm']['scale'].shape)
  assert factored.v_row['encoder']['encoder']['pre_mlp_layer_norm']['scale'].shape == (1, 2)
  # Unstacked leaves as before.
  assert factored.v_row['token_embedder']['embedding'].shape == (128,)
  assert momentum.ema['encoder']['encoder']['mlp']['wo']['kernel'].shape == (192, 2, 128)


def test_tree_map_params_sees_the_stacked_slots():
  """optax.tree_map_params (partitioning's opt_state_shardings) inits with a placeholder."""
  params = stack(random_tree(3))
  tx = optimizers.adafactor(0.01)
  state = jax.eval_shape(tx.init, params)
  same = optax.tree_map_params(tx, lambda s, p: tuple(s.shape) == tuple(p.shape), state,
                               params, transform_non_params=lambda _: None)
  assert same[0].v['encoder']['encoder']['pre_attention_layer_norm']['scale']
  assert not same[0].v_row['encoder']['encoder']['attention']['query']['kernel']


# --- T5X's layout -------------------------------------------------------------------------
@pytest.mark.parametrize('beta1', [None, 0.9])
def test_t5x_layout_of_a_stacked_run_is_the_unscanned_runs(beta1):
  params, (_, want_state), (_, got_state) = runs(beta1)
  want = optimizers.to_t5x_param_states(want_state, params)
  got = optimizers.to_t5x_param_states(got_state, stack(params))
  assert set(got) == set(want)
  assert 'param_states/decoder/layers_2/self_attention/key/kernel/v' in got
  assert got['param_states/encoder/layers_1/attention/query/kernel/v_row'].shape == (128,)
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
  assert_trees_close(got, want, rtol=1e-5)
  assert int(optimizers.get_step(got_state)) == STEPS


@pytest.mark.parametrize('beta1', [None, 0.9])
def test_stacked_state_round_trips_through_the_t5x_layout(beta1):
  params, _, (_, state) = runs(beta1)
  stacked = stack(params)
  tx = optimizers.adafactor(0.01, beta1=beta1)
  flat = optimizers.to_t5x_param_states(state, stacked)
  for target in (stacked, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                       stacked)):
    back = optimizers.from_t5x_param_states(flat, target, STEPS, tx)
    assert_trees_equal(back, jax.device_get(state))


def test_unscanned_checkpoint_state_loads_into_a_stacked_run():
  """Layer i of the stacked slots is 'layers_<i>'; training on equals the unscanned run."""
  params, (want, want_state), _ = runs(0.9)
  tx = optimizers.adafactor(0.01, beta1=0.9)
  flat = optimizers.to_t5x_param_states(want_state, params)
  state = optimizers.from_t5x_param_states(flat, stack(want), STEPS, tx)
  assert_trees_equal(optimizers.to_t5x_param_states(state, stack(want)),
                     jax.device_get(flat))
  grads = gradients()[1:]
  got, _ = run(tx, stack(want), [stack(g) for g in grads], state)
  again, _ = run(tx, want, grads, want_state)
  assert_moved_close(unstack(got), again, want)


def test_t5x_param_state_shapes_of_a_stacked_tree():
  params = stack(random_tree(4))
  tx = optimizers.adafactor(beta1=0.9)
  want = optimizers.to_t5x_param_states(tx.init(unstack(params)), unstack(params))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'model'))
  spec = lambda *a: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*a))
  # Layer axis replicated, 'model' on the last dim (stacked: after the layer axis).
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=spec(*([None] * (x.ndim - 1) + ['model']))), params)
  shapes = optimizers.t5x_param_state_shapes(tx, abstract)
  assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {
      k: (v.shape, v.dtype) for k, v in want.items()}
  query = 'param_states/encoder/layers_1/attention/query/kernel'
  assert shapes[f'{query}/m'].sharding == spec(None, 'model')  # less the layer axis
  assert shapes[f'{query}/v_row'].sharding == spec()
  norm = 'param_states/decoder/layers_2/pre_mlp_layer_norm/scale'
  assert shapes[f'{norm}/v'].sharding == spec(None)  # [D, L]: 'model' was the layer axis
  assert shapes['param_states/token_embedder/embedding/m'].sharding == spec(None, 'model')


def test_refactoring_a_stacked_tree_is_the_unscanned_refactoring():
  params = random_tree(5)
  full_tx = optimizers.adafactor(0.01, min_dim_size_to_factor=10**6)  # nothing factored
  rng = np.random.RandomState(6)
  full = {k: (rng.rand(*v.shape) + 0.5).astype(np.float32) for k, v in
          optimizers.t5x_param_state_shapes(full_tx, params).items()}
  tx = optimizers.adafactor(0.01)
  want_flat, want_names = optimizers.refactor_t5x_param_states(full, params, tx)
  got_flat, got_names = optimizers.refactor_t5x_param_states(full, stack(params), tx)
  assert sorted(got_names) == sorted(want_names)
  assert 'encoder/layers_1/mlp/wo/kernel' in got_names
  assert_trees_equal(got_flat, want_flat)
  want = optimizers.from_t5x_param_states(full, params, 7, tx, allow_refactor=True)
  got = optimizers.from_t5x_param_states(full, stack(params), 7, tx, allow_refactor=True)
  assert_trees_equal(optimizers.to_t5x_param_states(got, stack(params)),
                     optimizers.to_t5x_param_states(want, params))


def test_missing_layer_slots_are_named_by_their_unscanned_path():
  params, (_, state), _ = runs(None)
  flat = optimizers.to_t5x_param_states(state, params)
  del flat['param_states/decoder/layers_2/mlp/wo/kernel/v_row']
  with pytest.raises(ValueError, match='decoder/layers_2/mlp/wo/kernel/v_row'):
    optimizers.from_t5x_param_states(flat, stack(params), STEPS)


def test_a_stacked_leaf_without_its_layer_axis_is_refused():
  params = {'encoder': {'encoder': {'norm': {'scale': np.zeros((4,), np.float32)}}}}
  with pytest.raises(ValueError, match=r'encoder/encoder/norm/scale has shape \(4,\)'):
    optimizers.adafactor(0.01).init(params)
  with pytest.raises(ValueError, match=r'encoder/encoder/norm/scale has shape \(4,\)'):
    optimizers.t5x_param_state_shapes(optimizers.adafactor(0.01), params)
