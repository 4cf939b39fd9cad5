"""Adafactor against a NumPy T5X Adafactor written from its definition; T5X state layout;
T5X learning-rate schedules."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gqa_jax import optimizers
from gqa_jax.checkpoints import open_checkpoint

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny' / 'legacy'
SHAPES = {'factored': (256, 192), 'wide': (128, 320), 'unfactored': (64, 32),
          'vector': (64,), 'scalarish': (1,)}


# --- the oracle: T5X's Adafactor in NumPy (float64), from the paper and T5X's docs ------
def t5x_layout_of_factors(shape, row_sums, col_sums):
  """T5X's v_row / v_col for a 2-D [r, c] parameter from the paper's R (sums over each
  row, length r) and C (sums over each column, length c). T5X calls the larger dim the
  column dim (equal dims: the last one), and stores means: v_row drops the column dim."""
  r, c = shape
  if r > c:  # axis 0 is the column dim: v_row = means over axis 0
    return col_sums / r, row_sums / c
  return row_sums / c, col_sums / r


CLIPPED = []  # whether each oracle update was clipped, so tests can check it ran


def np_adafactor(params, grads_per_step, start_step, lr_fn, state=None, beta1=None,
                 weight_decay=None, decay_rate=0.8, eps1=1e-30, eps2=1e-3, clip=1.0,
                 min_dim=128):
  """Runs T5X's update; state per param: R, C (factored) or V, and M. Returns (params,
  state) after len(grads_per_step) updates starting at `start_step`."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  if state is None:
    state = {}
    for k, p in params.items():
      fact = p.ndim == 2 and min(p.shape) >= min_dim
      state[k] = ({'R': np.zeros(p.shape[0]), 'C': np.zeros(p.shape[1])} if fact
                  else {'V': np.zeros(p.shape)})
      state[k]['M'] = np.zeros(p.shape)
  for i, grads in enumerate(grads_per_step):
    step = start_step + i
    # T5X computes the decay in float32 (t = float32(step) + 1); near step 1e6 its
    # rounding changes 1 - decay by ~1e-3 relative, so the oracle does the same.
    t = np.float32(step) + np.float32(1.0)
    decay = np.float64(np.float32(1.0) - t ** np.float32(-decay_rate))
    lr = lr_fn(step)
    for k, p in params.items():
      g = np.asarray(grads[k], np.float64)
      s = state[k]
      g2 = g * g + eps1
      if 'R' in s:
        s['R'] = decay * s['R'] + (1 - decay) * g2.sum(axis=1)
        s['C'] = decay * s['C'] + (1 - decay) * g2.sum(axis=0)
        v_hat = np.outer(s['R'], s['C']) / s['R'].sum()  # the paper's rank-1 estimate
      else:
        s['V'] = decay * s['V'] + (1 - decay) * g2
        v_hat = s['V']
      y = g / np.sqrt(v_hat)
      denom = max(1.0, np.sqrt(np.mean(y * y)) / clip)
      CLIPPED.append(denom > 1.0)
      y = y / denom
      u = lr * max(np.sqrt(np.mean(p * p)), eps2) * y
      if beta1 is not None:
        s['M'] = beta1 * s['M'] + (1 - beta1) * u
        u = s['M']
      params[k] = (p - u) if weight_decay is None else (1 - weight_decay) * p - u
  return params, state


def np_state_to_t5x(state, beta1):
  out = {}
  for k, s in state.items():
    if 'R' in s:
      shape = (len(s['R']), len(s['C']))
      v_row, v_col = t5x_layout_of_factors(shape, s['R'], s['C'])
      out.update({f'{k}/v_row': v_row, f'{k}/v_col': v_col, f'{k}/v': np.zeros(1)})
    else:
      out.update({f'{k}/v_row': np.zeros(1), f'{k}/v_col': np.zeros(1), f'{k}/v': s['V']})
    out[f'{k}/m'] = s['M'] if beta1 is not None else np.zeros(1)
  return {'param_states/' + k: v for k, v in out.items()}


def t5x_to_np_state(flat, params):
  """Inverse of np_state_to_t5x for factored slots (sums from T5X's means)."""
  state = {}
  for k, p in params.items():
    get = lambda s: np.asarray(flat[f'param_states/{k}/{s}'], np.float64)
    if p.ndim == 2 and get('v').shape == (1,):
      r, c = p.shape
      if r > c:
        state[k] = {'C': get('v_row') * r, 'R': get('v_col') * c}
      else:
        state[k] = {'R': get('v_row') * c, 'C': get('v_col') * r}
    else:
      state[k] = {'V': get('v')}
    state[k]['M'] = get('m') if get('m').shape == p.shape else np.zeros(p.shape)
  return state


# --- helpers ------------------------------------------------------------------------------
def random_tree(seed, scale=1.0):
  rng = np.random.RandomState(seed)
  return {k: (scale * rng.randn(*s)).astype(np.float32) for k, s in SHAPES.items()}


def run_optax(tx, params, grads_per_step, state=None):
  state = tx.init(params) if state is None else state
  step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
      *tx.update(g, s, p)))
  for grads in grads_per_step:
    params, state = step(params, state, grads)
  return params, state


def assert_tree_close(actual, expected, rtol=1e-5, atol_scale=0.0):
  """rtol per element; atol_scale * max|expected| absorbs float32 rounding of values that
  cancel to near zero (a parameter p - u with u close to p)."""
  assert set(actual) == set(expected)
  for k in expected:
    atol = atol_scale * np.max(np.abs(expected[k]))
    np.testing.assert_allclose(np.asarray(actual[k], np.float64), expected[k], rtol=rtol,
                               atol=atol, err_msg=k)


# --- Adafactor equals T5X's -------------------------------------------------------------
@pytest.mark.parametrize('beta1,weight_decay', [(None, None), (0.9, None), (None, 1e-3)])
def test_adafactor_matches_numpy_t5x(beta1, weight_decay):
  params = random_tree(0, scale=0.05)
  params['scalarish'] = np.full((1,), 1e-4, np.float32)  # below epsilon2: scale is eps2
  grads = [random_tree(10 + i) for i in range(5)]
  # Warm-up 2 so that the rsqrt schedule changes during the run and its step is tested.
  schedule = optimizers.create_learning_rate_schedule('constant * rsqrt_decay', 0.1, 2)
  np_lr = lambda s: 0.1 / np.sqrt(max(s, 2))
  tx = optimizers.adafactor(schedule, beta1=beta1, weight_decay_rate=weight_decay)
  got_params, got_state = run_optax(tx, params, grads)
  CLIPPED.clear()
  want_params, want_state = np_adafactor(params, grads, 0, np_lr, beta1=beta1,
                                         weight_decay=weight_decay)
  assert any(CLIPPED) and not all(CLIPPED)  # both branches of update clipping ran
  assert_tree_close(got_params, want_params, rtol=1e-5, atol_scale=1e-6)
  got_flat = optimizers.to_t5x_param_states(got_state, params)
  # m, like the parameters, is a sum of signed terms: absolute tolerance for cancellation.
  assert_tree_close(got_flat, np_state_to_t5x(want_state, beta1), rtol=1e-5,
                    atol_scale=1e-6)
  assert int(optimizers.get_step(got_state)) == 5


def test_restored_step_continues_decay_and_schedule():
  params = random_tree(2, scale=0.05)
  rng = np.random.RandomState(3)
  init = {}  # a T5X state as a converted checkpoint holds it (positive second moments)
  for k, p in params.items():
    fact = p.ndim == 2 and min(p.shape) >= 128
    init[k] = ({'R': rng.rand(p.shape[0]) + 0.5, 'C': rng.rand(p.shape[1]) + 0.5} if fact
               else {'V': rng.rand(*p.shape) + 0.5})
    if fact:  # sums of R and C are both the sum of all entries
      init[k]['C'] *= init[k]['R'].sum() / init[k]['C'].sum()
    init[k]['M'] = np.zeros(p.shape)
  flat = np_state_to_t5x(init, None)
  step0 = 1_000_000
  tx = optimizers.adafactor()  # T5.1.1 pre-training: rsqrt schedule, lr(1e6) = 1e-3
  state = optimizers.from_t5x_param_states(flat, params, step0, tx)
  assert int(optimizers.get_step(state)) == step0
  grads = [random_tree(20 + i) for i in range(3)]
  got_params, got_state = run_optax(tx, params, grads, state)
  want_params, want_state = np_adafactor(
      params, grads, step0, lambda s: 1.0 / np.sqrt(max(s, 10000)),
      state={k: dict(v) for k, v in init.items()})
  assert_tree_close(got_params, want_params, rtol=1e-5, atol_scale=1e-6)
  assert_tree_close(optimizers.to_t5x_param_states(got_state, params),
                    np_state_to_t5x(want_state, None), rtol=1e-5)
  assert int(optimizers.get_step(got_state)) == step0 + 3


def test_decay_at_step_one_million():
  # T5X: decay = 1 - (step + 1)^-0.8 with step the count before the update.
  params = {'vector': np.ones((4,), np.float32)}
  v0 = np.array([1.0, 2.0, 3.0, 4.0])
  flat = {'param_states/vector/v': v0, 'param_states/vector/v_row': np.zeros(1),
          'param_states/vector/v_col': np.zeros(1), 'param_states/vector/m': np.zeros(1)}
  tx = optimizers.adafactor()
  state = optimizers.from_t5x_param_states(flat, params, 1_000_000, tx)
  g = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
  _, new_state = tx.update({'vector': g}, state, params)
  decay = 1.0 - (1_000_000 + 1.0) ** -0.8
  new_v = optimizers.to_t5x_param_states(new_state, params)['param_states/vector/v']
  np.testing.assert_allclose(new_v, decay * v0 + (1 - decay) * (g.astype(np.float64) ** 2
                                                                + 1e-30), rtol=1e-6)


# --- T5X layout -------------------------------------------------------------------------
@pytest.mark.parametrize('beta1', [None, 0.9])
def test_t5x_layout_round_trip_is_exact(beta1):
  params = random_tree(4, scale=0.05)
  tx = optimizers.adafactor(0.01, beta1=beta1)
  _, state = run_optax(tx, params, [random_tree(30 + i) for i in range(2)])
  flat = optimizers.to_t5x_param_states(state, params)
  assert flat['param_states/factored/v_row'].shape == (192,)  # v_row drops the largest dim
  assert flat['param_states/factored/v_col'].shape == (256,)
  assert flat['param_states/wide/v_row'].shape == (128,)
  assert flat['param_states/wide/v_col'].shape == (320,)
  for k in ('v_row', 'v_col'):
    assert flat[f'param_states/unfactored/{k}'].shape == (1,)
  assert flat['param_states/factored/v'].shape == (1,)
  assert flat['param_states/unfactored/m'].shape == ((64, 32) if beta1 else (1,))
  back = optimizers.from_t5x_param_states(flat, params, 2, tx)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(back)


@pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')
def test_fixture_param_states_round_trip():
  source = open_checkpoint(FIXTURE)
  params = {}
  for name, t in source.params.items():
    node = params
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = t.read()
  tx = optimizers.adafactor(min_dim_size_to_factor=16)  # as the fixture was trained
  # Our optimizer lays out the state with T5X's shapes.
  fresh = optimizers.to_t5x_param_states(tx.init(params), params)
  assert {k: v.shape for k, v in fresh.items()} == {
      k: tuple(t.shape) for k, t in source.opt_state.items()}
  state = optimizers.from_t5x_param_states(source.opt_state, params, source.step, tx)
  assert int(optimizers.get_step(state)) == 3
  back = optimizers.to_t5x_param_states(state, params)
  assert set(back) == set(source.opt_state)
  for k, t in source.opt_state.items():
    np.testing.assert_array_equal(np.asarray(back[k]), t.read(), err_msg=k)
  # And it trains on from there.
  grads = jax.tree_util.tree_map(lambda p: 0.01 * np.ones_like(p), params)
  new_params, _ = run_optax(tx, params, [grads], state)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(new_params))


def test_mismatched_factoring_fails_or_refactors():
  params = random_tree(5, scale=0.05)
  grads = [random_tree(40 + i) for i in range(3)]
  full_tx = optimizers.adafactor(0.01, min_dim_size_to_factor=10**6)  # nothing factored
  fact_tx = optimizers.adafactor(0.01)
  _, full_state = run_optax(full_tx, params, grads)
  _, fact_state = run_optax(fact_tx, params, grads)
  full_flat = optimizers.to_t5x_param_states(full_state, params)
  with pytest.raises(ValueError, match='min_dim_size_to_factor'):
    optimizers.from_t5x_param_states(full_flat, params, 3, fact_tx)
  # Full v -> factored: the row/column means are exactly the factored accumulators.
  state = optimizers.from_t5x_param_states(full_flat, params, 3, fact_tx, allow_refactor=True)
  assert_tree_close(optimizers.to_t5x_param_states(state, params),
                    {k: np.asarray(v, np.float64) for k, v in
                     optimizers.to_t5x_param_states(fact_state, params).items()}, rtol=1e-5)
  # Factored -> full: Adafactor's rank-one estimate.
  fact_flat = optimizers.to_t5x_param_states(fact_state, params)
  state = optimizers.from_t5x_param_states(fact_flat, params, 3, full_tx, allow_refactor=True)
  v = optimizers.to_t5x_param_states(state, params)['param_states/factored/v']
  r, c = (np.asarray(fact_flat[f'param_states/factored/{s}'], np.float64)
          for s in ('v_row', 'v_col'))  # [192] (axis 1), [256] (axis 0)
  np.testing.assert_allclose(v, np.outer(c, r) / r.mean(), rtol=1e-5)


# --- T5X's factoring rule in one function ----------------------------------------------
RULE_SHAPES = [(256, 256), (256, 128), (128, 256), (256, 64), (64, 256), (4224, 256),
               (128, 320), (16, 16), (4, 32), (64,), (1,), (), (3, 200, 150), (150, 3, 200)]


@pytest.mark.parametrize('min_dim', [16, 128])
@pytest.mark.parametrize('beta1', [None, 0.9])
def test_slot_shapes_are_the_optimizers_own(min_dim, beta1):
  """t5x_slot_shapes (what the converter writes) == the state adafactor() creates."""
  params = {f'p{i}': jnp.zeros(shape) for i, shape in enumerate(RULE_SHAPES)}
  tx = optimizers.adafactor(0.01, beta1=beta1, min_dim_size_to_factor=min_dim)
  flat = optimizers.to_t5x_param_states(jax.eval_shape(tx.init, params), params)
  for name, p in params.items():
    want = optimizers.t5x_slot_shapes(p.shape, min_dim_size_to_factor=min_dim,
                                      momentum=beta1 is not None)
    assert {s: tuple(flat[f'param_states/{name}/{s}'].shape) for s in want} == want, p.shape


def test_slot_shapes_t5x_facts():
  """T5X's _factored_dims: d1, d0 = second largest, largest (argsort order on ties);
  v_row drops d0, v_col drops d1; unused slots are (1,) placeholders."""
  shapes = optimizers.t5x_slot_shapes
  assert shapes((256, 256)) == {'v_row': (256,), 'v_col': (256,), 'v': (1,), 'm': (1,)}
  # A GQA-2 K/V kernel pooled from [256, 256] factors the other way round ...
  assert shapes((256, 128)) == {'v_row': (128,), 'v_col': (256,), 'v': (1,), 'm': (1,)}
  # ... and MQA's [256, 64] is not factored at all.
  assert shapes((256, 64)) == {'v_row': (1,), 'v_col': (1,), 'v': (256, 64), 'm': (1,)}
  assert shapes((256, 64), min_dim_size_to_factor=16)['v_row'] == (64,)
  assert shapes((256, 256), factored=False)['v'] == (256, 256)
  assert shapes((3, 200, 150), momentum=True) == {
      'v_row': (3, 150), 'v_col': (3, 200), 'v': (1,), 'm': (3, 200, 150)}
  assert shapes(())['v'] == () and shapes((64,))['v'] == (64,)


def test_factoring_is_read_off_the_slots():
  shapes = {'k': (256, 256), 'pool': (256, 64), 'rel': (4, 32), 'norm': (256,)}
  slots = lambda m: {p: optimizers.t5x_slot_shapes(s, min_dim_size_to_factor=m)
                     for p, s in shapes.items()}
  assert optimizers.t5x_factoring(slots(128), shapes) == 128
  # Any threshold in (64, 256] writes the same slots: T5X's default is preferred.
  assert optimizers.t5x_factoring(slots(100), shapes) == 128
  # 16 writes slots 128 cannot: the nearest threshold that writes them (in (4, 64]).
  assert optimizers.t5x_factoring(slots(16), shapes) == 64
  assert optimizers.t5x_factoring(slots(16), shapes, prefer=16) == 16
  assert optimizers.t5x_factoring(slots(10**6), shapes) == 257  # never factored
  mixed = dict(slots(128), pool=slots(16)['pool'], k=slots(10**6)['k'])
  assert optimizers.t5x_factoring(mixed, shapes) is None  # no single threshold


def test_refactor_reports_what_it_refactored_and_leaves_the_rest():
  params = {'k': jnp.zeros((256, 128)), 'norm': jnp.zeros((256,))}
  tx = optimizers.adafactor(0.01)
  fresh = optimizers.to_t5x_param_states(tx.init(params), params)
  assert optimizers.refactor_t5x_param_states(fresh, params, tx)[1] == []
  full = dict(fresh, **{'param_states/k/v': np.ones((256, 128), np.float32),
                        'param_states/k/v_row': np.zeros(1, np.float32),
                        'param_states/k/v_col': np.zeros(1, np.float32)})
  fitted, refactored = optimizers.refactor_t5x_param_states(full, params, tx)
  assert refactored == ['k'] and fitted['param_states/k/v_row'].shape == (128,)
  np.testing.assert_array_equal(fitted['param_states/k/v_col'], np.ones(256))
  # The source's orientation (what gqa-jax used to write for pooled kernels): no
  # factoring explains it, so it is left for from_t5x_param_states to refuse.
  swapped = dict(fresh, **{'param_states/k/v_row': np.zeros(256, np.float32),
                           'param_states/k/v_col': np.zeros(128, np.float32)})
  assert optimizers.refactor_t5x_param_states(swapped, params, tx)[1] == []
  with pytest.raises(ValueError, match='no other factoring explains'):
    optimizers.from_t5x_param_states(swapped, params, 0, tx, allow_refactor=True)


def test_missing_slots_are_named():
  params = random_tree(6)
  with pytest.raises(ValueError, match='param_states/'):
    optimizers.from_t5x_param_states({}, params, 0)


# --- schedules --------------------------------------------------------------------------
def test_rsqrt_schedule_hand_values():
  lr = optimizers.create_learning_rate_schedule()  # T5.1.1: 1 / sqrt(max(step, 1e4))
  for step, want in [(0, 1e-2), (5000, 1e-2), (10000, 1e-2), (40000, 1 / np.sqrt(40000)),
                     (1_000_000, 1e-3)]:
    np.testing.assert_allclose(float(lr(step)), want, rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(lr)(jnp.int32(step))), want, rtol=1e-6)


def test_constant_and_other_factors():
  const = optimizers.create_learning_rate_schedule('constant', 1e-3)
  assert float(const(0)) == pytest.approx(1e-3) and float(const(10**6)) == pytest.approx(1e-3)
  warm = optimizers.create_learning_rate_schedule('constant * linear_warmup * rsqrt_decay',
                                                  0.5, 1000)
  assert float(warm(500)) == pytest.approx(0.5 * 0.5 / np.sqrt(1000), rel=1e-6)
  assert float(warm(0)) == pytest.approx(1e-8)  # T5X's min_learning_rate floor
  offset = optimizers.create_learning_rate_schedule(step_offset=1_000_000)
  assert float(offset(1_000_000)) == pytest.approx(1e-2, rel=1e-6)
  with pytest.raises(ValueError, match='rsqrt_decya'):
    optimizers.create_learning_rate_schedule('constant * rsqrt_decya')


def test_state_of_unknown_parameters_is_refused():
  params = random_tree(7)
  flat = optimizers.to_t5x_param_states(optimizers.adafactor().init(params), params)
  del params['vector']
  with pytest.raises(ValueError, match=r"the model lacks, e\.g\. \['vector'\]"):
    optimizers.from_t5x_param_states(flat, params, 0)


def test_gin_configures_optimizer_and_schedule():
  import gin
  gin.clear_config()
  try:
    gin.parse_config('''
        from __gin__ import dynamic_registration
        from gqa_jax import optimizers
        optimizers.adafactor.learning_rate = @optimizers.create_learning_rate_schedule()
        optimizers.create_learning_rate_schedule.factors = 'constant'
        optimizers.create_learning_rate_schedule.base_learning_rate = 1e-3
        optimizers.adafactor.min_dim_size_to_factor = 16
    ''')
    tx = gin.get_configurable(optimizers.adafactor)()
  finally:
    gin.clear_config()
  params = {'kernel': jnp.ones((16, 32))}
  state = tx.init(params)
  assert state[0].v_row['kernel'].shape == (16,)  # factored at 16
  updates, _ = tx.update({'kernel': jnp.ones((16, 32))}, state, params)
  # First step: y = g / |g| = 1, rms(param) = 1, so the update is -lr.
  np.testing.assert_allclose(updates['kernel'], -1e-3, rtol=1e-6)


def test_t5x_param_state_shapes():
  params = random_tree(8)
  tx = optimizers.adafactor(beta1=0.9)
  real = optimizers.to_t5x_param_states(tx.init(params), params)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'model'))
  spec = lambda *a: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*a))
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec('model') if v.ndim
                                      else spec()) for k, v in params.items()}
  shapes = optimizers.t5x_param_state_shapes(tx, abstract)
  assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {
      k: (v.shape, v.dtype) for k, v in real.items()}
  assert shapes['param_states/factored/m'].sharding == spec('model')  # like its param
  assert shapes['param_states/factored/v_row'].sharding == spec()  # replicated
