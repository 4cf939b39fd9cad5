"""Gradient accumulation (NUM_MICROBATCHES): the microbatches' summed loss, metrics,
gradients and update equal the whole batch's for every loss normaliser; strided split;
a dropout key per microbatch; the batch-size check; the step on 8 data-parallel devices."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gqa_jax import microbatches, models, network, train
from gqa_jax.errors import ConfigError
from conftest import assert_user_error
from test_partitioning import result_of, run_python
from test_train import run_args

VOCAB, B, S, T, N = 32, 8, 7, 6, 4  # N microbatches of B / N = 2 rows
# One layer per stack: accumulation does not depend on depth, and compiling stays quick.
CFG = network.get_preset('tiny', vocab_size=VOCAB, dtype='float32', num_encoder_layers=1,
                         num_decoder_layers=1).with_kv_heads(2)
NORMALIZERS = (None, 2.0, 'NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS',
               'AVERAGE_PER_SEQUENCE')
# XLA:CPU compiles in about half the time at its lowest backend optimisation level; both
# sides of every comparison are compiled alike. Compiling is most of this file's time.
FAST = {'xla_backend_optimization_level': 0}


def compiled(jitted, *args):
  """`jitted` (a jax.jit function) compiled with FAST for `args`."""
  return jitted.lower(*args).compile(compiler_options=FAST)


def random_params(cfg, seed=0):
  """Fan-in scaled normals: quicker than Flax's init (no compile), as good here."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: (rng.randn(*s.shape) / np.sqrt(s.shape[0])).astype(np.float32),
                      network.param_shapes(cfg))


def make_batch(packed: bool, weighted: bool, seed: int = 0):
  """B rows with padded targets; `packed`: two segments per row (segment ids, positions);
  `weighted`: decoder_loss_weights, all zero on rows 1 and 5 (= microbatch 1: a microbatch
  without a single counted token)."""
  rng = np.random.RandomState(seed)
  lengths = rng.randint(2, T + 1, B)
  tgt = np.where(np.arange(T) < lengths[:, None], rng.randint(2, VOCAB, (B, T)), 0)
  batch = {'encoder_input_tokens': rng.randint(2, VOCAB, (B, S)),
           'decoder_input_tokens': np.concatenate([np.zeros((B, 1), int), tgt[:, :-1]], 1),
           'decoder_target_tokens': tgt}
  if packed:
    def segments(length, n):  # [B, n]: ids 1, 2 split at a random point, 0 after `length`
      cut = rng.randint(1, n, (B, 1))
      ids = np.where(np.arange(n) < cut, 1, 2)
      return np.where(np.arange(n) < length, ids, 0), np.where(ids == 1, np.arange(n),
                                                                np.arange(n) - cut)
    batch['encoder_segment_ids'], batch['encoder_positions'] = segments(S, S)
    batch['decoder_segment_ids'], batch['decoder_positions'] = segments(lengths[:, None], T)
  if weighted:
    weights = rng.rand(B, T).astype(np.float32) * (tgt > 0)
    weights[[1, 5]] = 0.0
    batch['decoder_loss_weights'] = weights
  return batch


def assert_trees_close(got, want, rtol=1e-4):
  """Leaf by leaf, to float32 round-off relative to the leaf's largest entry."""
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol,
                               atol=1e-5 * max(np.max(np.abs(w)), 1e-6),
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module', autouse=True)
def eight_devices(request):
  """The 8-device child, started with this file's first test so that it compiles on
  another core meanwhile (its test comes last); None when that test is not selected."""
  if not any(item.name == 'test_eight_data_parallel_devices'
             for item in request.session.items):
    yield None
    return
  proc = run_python(EIGHT_DEVICES)
  yield proc
  if proc.poll() is None:
    proc.kill()
  proc.communicate()
  if os.path.exists(proc.result_path):
    os.remove(proc.result_path)


def test_split_is_strided():
  x = np.arange(8 * 3).reshape(8, 3)
  micro = np.asarray(microbatches.split(x, 4))  # [4, 2, 3]
  assert micro.shape == (4, 2, 3)
  for j in range(4):
    np.testing.assert_array_equal(micro[j], x[j::4])


def test_every_normalizer_accumulates_to_the_full_batch():
  """For each normaliser, with and without segment ids and decoder_loss_weights: given
  the full batch's factor and weights, the accumulated loss, metrics and gradients equal
  the full batch's. One compiled program takes them as arguments (the forward pass sees
  the packed batch; each variant's weights are computed from its own features; a factor
  of None is exactly 1.0 and weights None all ones: x / 1 and x * 1 are exact). The
  train-step and dropout tests cover the model computing them itself, None included."""
  model = models.EncoderDecoderModel(network.Transformer(CFG), label_smoothing=0.1,
                                     z_loss=1e-4)
  params = random_params(CFG)

  @jax.jit
  def full_and_accumulated(params, batch, factor, weights):
    full = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, None,
                                                           (factor, weights))
    accumulated = microbatches.value_and_grad(model, N)(params, batch, None, (factor, weights))
    return full, accumulated

  batch = make_batch(packed=True, weighted=True)
  features = {k: v for k, v in batch.items() if k != 'decoder_loss_weights'}
  run = None
  for segments in (False, True):
    for weighted in (False, True):
      variant = {k: v for k, v in batch.items()
                 if (segments or 'segment' not in k) and (weighted or 'weights' not in k)}
      for name in NORMALIZERS:
        factor, weights = models.loss_normalizing_factor_and_weights(name, variant)
        factor = np.float32(1.0 if factor is None else factor)
        weights = np.ones((B, T), np.float32) if weights is None else np.asarray(weights)
        run = run or compiled(full_and_accumulated, params, features, factor, weights)
        ((loss, metrics), grads), ((micro_loss, micro_metrics), micro_grads) = run(
            params, features, factor, weights)
        case = (segments, weighted, name)
        assert set(micro_metrics) == set(metrics), case
        assert_trees_close((micro_loss, micro_metrics), (loss, metrics), rtol=1e-5)
        assert_trees_close(micro_grads, grads)
        assert float(loss) > 0 and float(micro_metrics['weight_sum']) > 0, case


def test_train_step_matches_the_full_batch_step():
  """make_train_step(num_microbatches=4), the model computing its normaliser itself
  (AVERAGE_PER_SEQUENCE over packed segments, a microbatch without a counted token):
  every metric and the parameters after one step equal the one-batch step's. SGD: an
  update linear in the gradient, so the test above stands for every normaliser
  (Adafactor's first step divides each gradient by its own magnitude, which would
  magnify the round-off of gradients that are ~0)."""
  model = models.EncoderDecoderModel(network.Transformer(CFG), label_smoothing=0.1,
                                     z_loss=1e-4, loss_normalizing_factor='AVERAGE_PER_SEQUENCE')
  params = random_params(CFG, seed=1)
  batch = make_batch(packed=True, weighted=True, seed=1)
  optimizer = optax.sgd(0.5)
  results = []
  for n in (None, N):
    step = train.make_train_step(model, optimizer, None, None, seed=0, num_microbatches=n)
    args = (jax.tree.map(np.array, params), optimizer.init(params), batch, jnp.int32(0))
    results.append(compiled(step, *args)(*args))  # donates its copy of the parameters
  (full_params, _, full_metrics), (micro_params, _, micro_metrics) = results
  assert set(micro_metrics) == set(full_metrics) == {
      'loss', 'z_loss', 'cross_ent_loss', 'weight_sum', 'accuracy', 'grad_norm',
      'loss_per_token'}
  assert_trees_close(micro_metrics, full_metrics, rtol=1e-5)
  assert_trees_close(micro_params, full_params)
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), full_params, params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the step did move the parameters


def test_each_microbatch_draws_its_own_dropout_mask():
  """Four identical microbatches: with a key per microbatch their dropout losses differ,
  and the accumulated loss is the sum of each one's loss under its folded-in key (the
  summed loss without weights: the accumulator's factor-None, weights-None path)."""
  cfg = network.get_preset('tiny', vocab_size=VOCAB, dtype='float32', dropout_rate=0.3,
                           num_encoder_layers=1, num_decoder_layers=1).with_kv_heads(2)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  params = random_params(cfg, seed=2)
  one = {k: v[:B // N] for k, v in make_batch(packed=False, weighted=False, seed=2).items()}
  # Row i * N + j is row i of microbatch j: every microbatch is `one`.
  batch = {k: np.repeat(v, N, axis=0) for k, v in one.items()}
  rng = jax.random.PRNGKey(7)
  loss_of = compiled(jax.jit(lambda p, b, key: model.loss_fn(p, b, key)[0]), params, one, rng)
  losses = [float(loss_of(params, one, microbatches.microbatch_rng(rng, j))) for j in range(N)]
  assert len(set(losses)) == N, losses  # four keys, four masks
  accumulate = compiled(jax.jit(microbatches.value_and_grad(model, N)), params, batch, rng)
  (loss, _), _ = accumulate(params, batch, rng)
  np.testing.assert_allclose(loss, sum(losses), rtol=1e-5)
  (again, _), _ = accumulate(params, batch, rng)
  assert float(again) == float(loss)  # the masks depend on the key only


@pytest.mark.parametrize('n,batch_size,data,fragments', [
    (3, 8, 1, ['NUM_MICROBATCHES=3', 'BATCH_SIZE=8', 'divisor of 8']),
    (4, 16, 8, ['NUM_MICROBATCHES=4', '4 rows', '8 data-parallel devices',
                'NUM_MICROBATCHES=2']),
    (0, 8, 1, ['NUM_MICROBATCHES=0', 'positive integer']),
    (2.0, 8, 1, ['NUM_MICROBATCHES=2.0', 'positive integer']),
])
def test_check_num_microbatches_names_the_values_and_the_fix(n, batch_size, data, fragments):
  with pytest.raises(ConfigError) as e:
    microbatches.check_num_microbatches(n, batch_size, data)
  for fragment in fragments:
    assert fragment in str(e.value), (fragment, str(e.value))


@pytest.mark.parametrize('n', [None, 1, 2, 8])
def test_check_num_microbatches_accepts_divisors(n):
  microbatches.check_num_microbatches(n, 16, 2)


def test_train_refuses_an_indivisible_batch_before_writing(tmp_path, gqa):
  model_dir = tmp_path / 'run'
  result = gqa(*run_args(model_dir, 2, '--gin.NUM_MICROBATCHES=3'))
  assert_user_error(result, 'NUM_MICROBATCHES=3', 'BATCH_SIZE=8')
  assert not model_dir.exists()


# --- 8 devices, data parallel -------------------------------------------------------------
EIGHT_DEVICES = """
import json, os
import jax, jax.numpy as jnp, numpy as np, optax
from gqa_jax import models, network, partitioning as pt, train

cfg = network.get_preset('tiny', vocab_size=32, dtype='float32', num_encoder_layers=1,
                         num_decoder_layers=1).with_kv_heads(2)
rng = np.random.RandomState(0)
params = jax.tree.map(lambda s: (rng.randn(*s.shape) / np.sqrt(s.shape[0])).astype(np.float32),
                      network.param_shapes(cfg))
tgt = np.where(np.arange(6) < rng.randint(2, 7, (32, 1)), rng.randint(2, 32, (32, 6)), 0)
batch = {'encoder_input_tokens': rng.randint(2, 32, (32, 7)),
         'decoder_input_tokens': np.concatenate([np.zeros((32, 1), int), tgt[:, :-1]], 1),
         'decoder_target_tokens': tgt}
model = models.EncoderDecoderModel(network.Transformer(cfg), z_loss=1e-4,
                                   loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
mesh = pt.create_mesh(data=8)
rules = pt.standard_logical_axis_rules(cfg, mesh)
optimizer = optax.sgd(0.5)
out = {}
with pt.mesh_context(mesh, rules):
  shardings = pt.param_shardings(cfg, mesh, rules)
  for n in (None, 4):
    step = train.make_train_step(model, optimizer, shardings, None, 0, num_microbatches=n)
    p = pt.shard_tree(params, shardings)
    args = (p, optimizer.init(p), pt.make_global_batch(batch, mesh), jnp.int32(0))
    step = step.lower(*args).compile(compiler_options={'xla_backend_optimization_level': 0})
    hlo = step.as_text()
    new, _, metrics = step(*args)
    out[str(n)] = {'params': [np.asarray(x).tolist() for x in jax.tree.leaves(new)],
                   'metrics': {k: float(v) for k, v in metrics.items()},
                   'moves_rows': [c for c in ('all-to-all', 'all-gather', 'collective-permute')
                                  if c in hlo]}
with open(os.environ['RESULT_PATH'], 'w') as f:
  json.dump(out, f)
"""


def test_eight_data_parallel_devices(eight_devices):
  """Microbatches of 32 / 4 = 8 rows on 8 data-parallel devices: the full batch's step,
  and the strided split moves no row between devices (no all-to-all, all-gather or
  collective-permute in the compiled step; the gradient all-reduce is all it adds.
  Contiguous microbatches compile to an all-to-all and a collective-permute)."""
  out = result_of(eight_devices)
  full, micro = out['None'], out['4']
  assert micro['moves_rows'] == [] and full['moves_rows'] == []
  assert_trees_close(micro['metrics'], full['metrics'], rtol=1e-5)
  assert_trees_close([np.array(p) for p in micro['params']],
                     [np.array(p) for p in full['params']])
