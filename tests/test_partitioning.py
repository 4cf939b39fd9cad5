"""Mesh, logical axis rules (kv_heads), sharded forward and train step vs one device,
multi-host batches. Multi-device checks run in subprocesses with 8 forced CPU devices
(XLA_FLAGS must be set before jax is imported; this process has one device)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import jax
import numpy as np
import pytest

from gqa_jax import network, partitioning

TINY = dict(vocab_size=128, dtype='float32')


def run_python(code: str, devices: int = 8, env=None, timeout=600):
  """A child Python running `code`, which writes its JSON result to $RESULT_PATH (a file,
  not stdout: Gloo's C++ logging shares stdout and can land on the result's line)."""
  handle, result_path = tempfile.mkstemp(suffix='.json')
  os.close(handle)
  env = {**os.environ, **(env or {}),
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'JAX_PLATFORMS': 'cpu', 'RESULT_PATH': result_path}
  proc = subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  proc.result_path = result_path
  return proc


def result_of(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  try:
    assert proc.returncode == 0, err[-3000:]
    with open(proc.result_path) as f:
      return json.load(f)
  finally:
    os.remove(proc.result_path)


# --- 8 devices, one process ---------------------------------------------------------------
SHARDED = """
import json, os
import jax, jax.numpy as jnp, numpy as np, optax
from gqa_jax import models, network, optimizers, partitioning as pt

out = {'devices': jax.device_count()}
out['mesh_4x2'] = dict(pt.create_mesh(data=4, model=2).shape)
out['mesh_2x4'] = dict(pt.create_mesh(model=4).shape)
try:
  pt.make_global_batch({'x': np.ones((6, 3))}, pt.create_mesh(model=2))
except ValueError as e:
  out['bad_batch'] = str(e)

rng = np.random.RandomState(0)
tgt = rng.randint(2, 128, (8, 6))
batch = {'encoder_input_tokens': rng.randint(2, 128, (8, 10)),
         'decoder_input_tokens': np.concatenate([np.zeros((8, 1), int), tgt[:, :-1]], 1),
         'decoder_target_tokens': tgt,
         'decoder_loss_weights': (rng.rand(8, 6) > 0.2).astype(np.float32)}
tx = optimizers.adafactor(0.01, min_dim_size_to_factor=16)

def random_params(cfg):  # fan-in scaled normals: quicker than Flax's init, as good here
  shapes = network.param_shapes(cfg)
  return jax.tree.map(lambda s: (rng.randn(*s.shape) / np.sqrt(s.shape[0] if len(s.shape) > 1
                                 else 1)).astype(np.float32), shapes)

def train_step(model, params, state, batch):
  (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, None)
  updates, state = tx.update(grads, state, params)
  return loss, optax.apply_updates(params, updates), state

KV = ('decoder', 'layers_0', 'self_attention', 'key', 'kernel')
def at(tree, path):
  for k in path:
    tree = tree[k]
  return tree

def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

one_device = {}
for kv_heads, data, model_size, train in [(2, 4, 2, True), (1, 4, 2, False), (2, 2, 4, False)]:
  cfg = network.get_preset('tiny', vocab_size=128, dtype='float32').with_kv_heads(kv_heads)
  model = models.EncoderDecoderModel(network.Transformer(cfg))
  if kv_heads not in one_device:
    params = random_params(cfg)
    state = tx.init(params)
    # One device: everything on device 0, no mesh.
    one_device[kv_heads] = (params, state, *jax.jit(
        lambda p, s, b: train_step(model, p, s, b) if train
        else (model.loss_fn(p, b, None)[0], p, s))(params, state, batch))
  params, state, loss1, params1, _ = one_device[kv_heads]

  mesh = pt.create_mesh(data=data, model=model_size)
  rules = pt.standard_logical_axis_rules(cfg, mesh)
  p_sh = pt.param_shardings(cfg, mesh, rules)
  s_sh = pt.opt_state_shardings(tx, params, p_sh)
  sp = pt.shard_tree(params, p_sh)
  sb = pt.make_global_batch(batch, mesh)
  r = out[f'K{kv_heads}_{data}x{model_size}'] = {}
  with pt.mesh_context(mesh, rules):
    if train:
      step = jax.jit(lambda p, s, b: train_step(model, p, s, b),
                     out_shardings=(pt.replicated(mesh), p_sh, s_sh))
      loss8, params8, _ = step(sp, pt.shard_tree(state, s_sh), sb)
      r['max_param_diff'] = max_diff(params1, params8)
      r['max_param_step'] = max_diff(params1, params)
      r['moved_sharded'] = at(params8, KV).sharding.spec == at(p_sh, KV).spec
    else:
      loss8 = jax.jit(lambda p, b: model.loss_fn(p, b, None)[0])(sp, sb)
  kernel = at(sp, KV)
  r.update({
      'rule': dict(rules)['kv_heads'],
      'kv_spec': list(at(p_sh, KV).spec),
      'kv_shard_shape': list(kernel.addressable_shards[0].data.shape),
      'kv_shape': list(kernel.shape),
      'query_spec': list(at(p_sh, KV[:-2] + ('query', 'kernel')).spec),
      'v_spec': list(at(s_sh[0].v, ('encoder', 'relpos_bias', 'rel_embedding')).spec),
      'batch_spec': list(sb['encoder_input_tokens'].sharding.spec),
      'loss1': float(loss1), 'loss8': float(loss8)})

# SQA: the encoder's 2 query heads (and its relative-position table) shard over model=2.
import dataclasses
cfg = dataclasses.replace(network.get_preset('tiny', vocab_size=128, dtype='float32'),
                          encoder_query_heads=2, encoder_kv_heads=2)
model = models.EncoderDecoderModel(network.Transformer(cfg))
params = random_params(cfg)
loss1 = jax.jit(lambda p, b: model.loss_fn(p, b, None)[0])(params, batch)
mesh = pt.create_mesh(data=4, model=2)
rules = pt.standard_logical_axis_rules(cfg, mesh)
p_sh = pt.param_shardings(cfg, mesh, rules)
with pt.mesh_context(mesh, rules):
  loss8 = jax.jit(lambda p, b: model.loss_fn(p, b, None)[0])(
      pt.shard_tree(params, p_sh), pt.make_global_batch(batch, mesh))
q = ('encoder', 'layers_0', 'attention', 'query', 'kernel')
out['sqa'] = {'loss1': float(loss1), 'loss8': float(loss8),
              'query_shape': list(at(params, q).shape), 'query_spec': list(at(p_sh, q).spec)}
with open(os.environ['RESULT_PATH'], 'w') as f:
  json.dump(out, f)
"""


@pytest.fixture(scope='module')
def sharded():
  return result_of(run_python(SHARDED))


def test_mesh_shapes(sharded):
  assert sharded['devices'] == 8
  assert sharded['mesh_4x2'] == {'data': 4, 'model': 2}
  assert sharded['mesh_2x4'] == {'data': 2, 'model': 4}
  assert 'global batch size 6 does not split over data=4' in sharded['bad_batch']


def test_kv_kernels_shard_only_when_kv_heads_divide(sharded):
  gqa, mqa, gqa_on_4 = sharded['K2_4x2'], sharded['K1_4x2'], sharded['K2_2x4']
  assert gqa['rule'] == 'model' and gqa['kv_spec'] == [None, 'model']
  assert gqa['kv_shape'] == [32, 16] and gqa['kv_shard_shape'] == [32, 8]  # one head each
  assert mqa['rule'] is None and mqa['kv_spec'] in ([], [None, None])
  assert mqa['kv_shard_shape'] == [32, 8]  # the single KV head, replicated
  assert gqa_on_4['rule'] is None  # 2 KV heads over 4 devices: replicated
  for r in (gqa, mqa, gqa_on_4):
    assert r['query_spec'] == [None, 'model']  # joined_kv -> model, as T5X
    assert r['v_spec'] == ['model', None]  # unfactored Adafactor v follows its parameter
    assert r['batch_spec'] == ['data']


@pytest.mark.parametrize('name', ['K2_4x2', 'K1_4x2', 'K2_2x4'])
def test_sharded_loss_equals_one_device(sharded, name):
  r = sharded[name]
  np.testing.assert_allclose(r['loss8'], r['loss1'], rtol=1e-5)


def test_sharded_adafactor_step_equals_one_device(sharded):
  r = sharded['K2_4x2']
  assert r['moved_sharded']
  assert r['max_param_step'] > 1e-3  # the step moved the parameters ...
  assert r['max_param_diff'] < 1e-4 * r['max_param_step']  # ... and the same way


# --- 2 processes x 4 devices ----------------------------------------------------------------
MULTIHOST = """
import json, os, sys
import numpy as np
from gqa_jax import partitioning as pt
pid = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ['PID'])
assert pt.initialize_distributed('localhost:%(port)d', 2, pid, cpu_collectives='gloo')
import jax, jax.numpy as jnp
mesh = pt.create_mesh(model=2)  # 8 global devices: data 4 x model 2
shard, num_shards = pt.host_data_shard(mesh)
global_batch = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
rows = global_batch.shape[0] // num_shards
local = {'x': global_batch[shard * rows:(shard + 1) * rows]}
batch = pt.make_global_batch(local, mesh)
total = jax.jit(lambda b: jnp.sum(b['x'] * jnp.arange(1, 9)[:, None]),
                out_shardings=pt.replicated(mesh))(batch)
with open(os.environ['RESULT_PATH'], 'w') as f:
  json.dump({'pid': pid, 'devices': jax.device_count(), 'local': jax.local_device_count(),
             'shard': [shard, num_shards], 'shape': list(batch['x'].shape),
             'total': int(total)}, f)
"""


def test_two_processes_build_one_global_batch():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [run_python(MULTIHOST % {'port': port}, devices=4, env={'PID': str(i)})
           for i in range(2)]
  results = sorted((result_of(p) for p in procs), key=lambda r: r['pid'])
  expected = int(np.sum(np.arange(24).reshape(8, 3) * np.arange(1, 9)[:, None]))
  for pid, r in enumerate(results):
    assert r['devices'] == 8 and r['local'] == 4
    assert r['shard'] == [pid, 2]
    assert r['shape'] == [8, 3] and r['total'] == expected


# --- rules and checks, in this process ------------------------------------------------------
def test_standard_rules_are_t5x_plus_kv_heads():
  cfg = network.get_preset('xxl').with_kv_heads(8)
  rules = partitioning.standard_logical_axis_rules(cfg, 8)
  assert dict(rules) == {
      'batch': 'data', 'vocab': 'model', 'mlp': 'model', 'heads': 'model', 'kv': None,
      'joined_kv': 'model', 'kv_heads': 'model', 'embed': None, 'relpos_buckets': None,
      'abspos_buckets': None, 'length': None, 'layers': None, 'stack': None,
      'mlp_activations': None}
  two_d = partitioning.standard_logical_axis_rules(cfg, 8, 2, 2)
  assert [r for r in two_d if r[0] == 'embed'] == [('embed', 'model'), ('embed', 'data')]
  assert dict(partitioning.standard_logical_axis_rules(cfg, 8, 1, 2))['embed'] == 'data'
  extra = partitioning.standard_logical_axis_rules(cfg, 8, additional_rules=[('x', 'data')])
  assert extra[-1] == ('x', 'data')


@pytest.mark.parametrize('kv_heads,model_size,axis', [
    (8, 8, 'model'), (8, 4, 'model'), (8, 16, None), (1, 2, None), (1, 1, 'model'),
    (64, 16, 'model')])
def test_kv_heads_rule(kv_heads, model_size, axis):
  cfg = network.get_preset('xxl').with_kv_heads(kv_heads)  # encoder stays MHA (64)
  assert dict(partitioning.standard_logical_axis_rules(cfg, model_size))['kv_heads'] == axis
  assert partitioning.kv_heads_mesh_axis(cfg, model_size) == axis


def test_every_stack_must_divide():
  cfg = network.get_preset('xxl').with_kv_heads(1, stacks=('encoder',))  # decoder MHA
  assert partitioning.kv_heads_mesh_axis(cfg, 2) is None
  assert dict(partitioning.standard_logical_axis_rules())['kv_heads'] is None  # no config


def test_heads_that_do_not_split_fail_with_the_fix():
  cfg = network.get_preset('small')  # 6 heads
  with pytest.raises(ValueError, match=r'num_heads=6 .* model=4 .*\[1, 2, 3, 6\]'):
    partitioning.standard_logical_axis_rules(cfg, 4)
  with pytest.raises(ValueError, match='activation_partitioning_dims'):
    partitioning.standard_logical_axis_rules(cfg, 1, 3)


def test_sqa_query_heads_shard_and_give_the_one_device_loss(sharded):
  r = sharded['sqa']
  assert r['query_shape'] == [32, 2 * 8] and r['query_spec'] == [None, 'model']
  np.testing.assert_allclose(r['loss8'], r['loss1'], rtol=1e-5)


def test_sqa_query_heads_that_do_not_split_fail_with_the_fix():
  import dataclasses
  cfg = dataclasses.replace(network.get_preset('xxl'), encoder_query_heads=2,
                            encoder_kv_heads=2)  # 64 heads; 2 query heads in the encoder
  assert dict(partitioning.standard_logical_axis_rules(cfg, 2))['heads'] == 'model'
  with pytest.raises(ValueError, match=r'encoder_query_heads=2 .* model=4 .*\[1, 2\]'):
    partitioning.standard_logical_axis_rules(cfg, 4)


def test_single_device_helpers():
  assert partitioning.initialize_distributed(None, None, None) is False
  assert partitioning.initialize_distributed('localhost:1', 1, 0) is False
  with pytest.raises(ValueError, match='model=2'):
    partitioning.create_mesh(model=2)
  mesh = partitioning.create_mesh()
  assert dict(mesh.shape) == {'data': 1, 'model': 1}
  assert partitioning.host_data_shard(mesh) == (0, 1)
  batch = partitioning.make_global_batch({'x': np.ones((4, 3), np.int32)}, mesh)
  assert batch['x'].shape == (4, 3) and batch['x'].sharding.spec == jax.sharding.PartitionSpec('data')
  cfg = network.get_preset('tiny', **TINY)
  shardings = partitioning.param_shardings(cfg, mesh)
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), network.param_shapes(cfg))
  params = partitioning.shard_tree(zeros, shardings)
  assert params['token_embedder']['embedding'].sharding == \
      shardings['token_embedder']['embedding']
  one = partitioning.shard_tree({'a': np.ones(2)}, partitioning.replicated(mesh))
  assert one['a'].sharding == partitioning.replicated(mesh)
