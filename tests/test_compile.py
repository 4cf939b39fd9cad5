"""`gqa-jax compile` and gqa_jax.preflight: the pre-flight compile of a run's step.

Unmarked tests run everywhere on CPU (the HLO parser, slice names, FLOP counts, the
`local` topology). Tests marked `tpu_compile` compile for TPU slices with libtpu's
compile-only devices: skipped without it, run by .ci/run after `pip install -e ".[tpu]"`
(`pytest -m tpu_compile`).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import gin_utils, network, preflight
from gqa_jax.cli import compile as compile_cli
from gqa_jax.errors import ConfigError
from conftest import assert_user_error

TINY = ['--gin_file=models/t5_1_1/tiny.gin', '--gin_file=runs/pretrain.gin']
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"
MEMORY_FIELDS = {'arguments', 'outputs', 'temporaries', 'aliased', 'total', 'peak',
                 'parameters', 'optimizer_state', 'batch'}
REPORT_FIELDS = {'step', 'topology', 'num_devices', 'mesh', 'compile_seconds',
                 'memory_per_device_bytes', 'hbm_per_device_bytes', 'fits',
                 'model_flops_per_step', 'compiler_flops_per_device',
                 'compiler_bytes_accessed_per_device', 'collectives',
                 'roofline_step_seconds', 'roofline', 'mfu_at_roofline', 'note'}
needs_libtpu = pytest.mark.skipif(not preflight.libtpu_available(),
                                  reason='needs libtpu: pip install -e ".[tpu]"')


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def _check_memory(memory: dict):
  assert MEMORY_FIELDS <= set(memory)
  assert memory['total'] == (memory['arguments'] + memory['outputs'] + memory['temporaries']
                             - memory['aliased'])


# ---------------------------------------------------------- the HLO parser ----

# A hand-written optimised module for 4 devices: an all-reduce in a 6-trip while loop (the
# trip count only in its condition, as TPU prints scans), an asynchronous all-gather, two
# reduce-scatters (explicit and mesh-style groups), an all-to-all wrapped in async-start /
# async-done (both name the wrapped computation) and a collective-permute.
HLO = """HloModule jit_train_step, is_scheduled=true, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[256,128])) -> (s32[], f32[256,128]) {
  %p = (s32[]{:T(128)}, f32[256,128]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %w = f32[256,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %all-reduce.1 = f32[256,128]{1,0:T(8,128)S(1)} all-reduce(%w), channel_id=1, replica_groups={{0,1},{2,3}}, use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(step)/while/body/dot_general"}
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  ROOT %t = (s32[]{:T(128)}, f32[256,128]{1,0:T(8,128)}) tuple(%next, %all-reduce.1)
}

%cond (p.1: (s32[], f32[256,128])) -> pred[] {
  %n = s32[]{:T(128)} constant(6)
  %p.1 = (s32[]{:T(128)}, f32[256,128]{1,0:T(8,128)}) parameter(0)
  %i.1 = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i.1, %n), direction=LT
}

%wrapped_all_to_all (a: bf16[64,32]) -> bf16[64,32] {
  %a = bf16[64,32]{1,0} parameter(0)
  ROOT %all-to-all.1 = bf16[64,32]{1,0} all-to-all(%a), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
}

ENTRY %main.5_spmd (arg: f32[256,128], x: bf16[64,32]) -> (f32[256,128], f32[256,128]) {
  %arg = f32[256,128]{1,0} parameter(0)
  %x = bf16[64,32]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[256,128]{1,0}) tuple(%zero, %arg)
  %while.1 = (s32[], f32[256,128]{1,0}) while(%init), condition=%cond, body=%body
  %slice = f32[64,128]{1,0} slice(%arg), slice={[0:64], [0:128]}
  %all-gather-start = (f32[64,128]{1,0}, f32[256,128]{1,0}) all-gather-start(%slice), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}
  %all-gather-done = f32[256,128]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter.1 = f32[64,128]{1,0} reduce-scatter(%arg), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %reduce-scatter.2 = f32[128,128]{1,0} reduce-scatter(%arg), channel_id=7, replica_groups=mesh['data'=2,'model'=2] {'model'}, dimensions={0}, to_apply=%add
  %async-start = ((bf16[64,32]{1,0}), bf16[64,32]{1,0}, s32[]) async-start(%x), calls=%wrapped_all_to_all
  %async-done = bf16[64,32]{1,0} async-done(%async-start), calls=%wrapped_all_to_all
  %collective-permute.1 = bf16[64,32]{1,0} collective-permute(%async-done), channel_id=6, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %gte = f32[256,128]{1,0} get-tuple-element(%while.1), index=1
  ROOT %out = (f32[256,128]{1,0}, f32[256,128]{1,0}) tuple(%gte, %all-gather-done)
}
"""


def test_collectives_are_counted_per_trip_with_their_full_size():
  collectives = preflight.parse_collectives(HLO)
  f32_full = 256 * 128 * 4
  assert collectives == {
      'all-reduce': {'count': 6, 'bytes': 6 * f32_full},          # a loop body, 6 trips
      'all-gather': {'count': 1, 'bytes': f32_full},               # once, at its -done
      'reduce-scatter': {'count': 2, 'bytes': 64 * 128 * 4 * 4 + 128 * 128 * 4 * 2},
      'all-to-all': {'count': 1, 'bytes': 64 * 32 * 2},            # async pair: once
      'collective-permute': {'count': 1, 'bytes': 64 * 32 * 2}}
  assert preflight.while_trip_counts(HLO) == [6]


def test_known_trip_count_wins_and_unknown_loops_count_once():
  known = HLO.replace('body=%body', 'body=%body, backend_config={"known_trip_count":{"n":"3"}}')
  assert preflight.parse_collectives(known)['all-reduce']['count'] == 3
  unknown = HLO.replace('constant(6)', 'constant(6)\n  %m = s32[] constant(9)')
  assert preflight.while_trip_counts(unknown) == [None]
  assert preflight.parse_collectives(unknown)['all-reduce']['count'] == 1
  assert preflight.parse_collectives('') == {k: {'count': 0, 'bytes': 0}
                                             for k in preflight.COLLECTIVES}


def _bytes(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['bytes accessed'], preflight.hlo_bytes_accessed(compiled.as_text())


@pytest.mark.parametrize('grad', [False, True])
def test_hlo_bytes_agree_with_the_compiler_and_scale_loops_per_trip(grad):
  """Counted from the optimised HLO, one pass of every loop is the compiler's own
  'bytes accessed' (the oracle); counted per trip, a loop of n layers costs n bodies."""
  layer = lambda x, w: (jnp.tanh(x @ w) * 1.5, None)

  def program(layers, unroll):
    def f(x, ws):
      return jax.lax.scan(layer, x, ws, unroll=unroll)[0].sum()
    return jax.grad(f, argnums=1) if grad else f

  x = jnp.ones((128, 256))
  per_trip, one_pass = {}, {}
  for layers in (4, 8):
    ws = jnp.ones((layers, 256, 256))
    compiler, (once, per_trip[layers]) = _bytes(program(layers, 1), x, ws)
    one_pass[layers] = once
    assert once == pytest.approx(compiler, rel=1e-3)
    assert per_trip[layers] > 1.5 * once  # the loop bodies, n times
    compiler, (once, unrolled) = _bytes(program(layers, True), x, ws)  # no loop left
    assert once == unrolled == pytest.approx(compiler, rel=1e-3)
    # A loop re-slices its weights each trip: never less traffic than the unrolled program.
    assert per_trip[layers] >= 0.99 * unrolled
  # One pass holds each body once, the step n times: 4 more layers add 4 more bodies.
  # (Forward only: the backward's stacked gradients outside the loop grow with n too.)
  body = (per_trip[8] - per_trip[4]) / 4
  for layers in (4, 8) if not grad else ():
    assert per_trip[layers] - one_pass[layers] == pytest.approx((layers - 1) * body, rel=0.02)

def test_out_of_memory_messages_are_parsed():
  gib = 1024 ** 3
  assert preflight.parse_out_of_memory(
      'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
      'temporaries (63.50G) exceeds available HBM (15.75G).') == (int(63.5 * gib),
                                                                  int(15.75 * gib))
  assert preflight.parse_out_of_memory(
      'XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.96G '
      'of 15.48G hbm. Exceeded hbm capacity by 5.48G.') == (int(20.96 * gib),
                                                            int(15.48 * gib))
  assert preflight.parse_out_of_memory('RESOURCE_EXHAUSTED: something else') == (None, None)



@pytest.mark.parametrize('scan, remat, microbatches, parameter_dims, expected, absent', [
    (False, 'none', None, 1, ['SCAN_LAYERS=True', "'minimal'", 'NUM_MICROBATCHES=N',
                              'PARAMETER_PARTITIONING_DIMS=2'], []),
    # What is already set is not suggested again; what could go further says how.
    (True, 'minimal', 16, 2, ["REMAT_POLICY=\"'full'\"", 'NUM_MICROBATCHES (more than 16)'],
     ['SCAN_LAYERS', "'minimal'", 'PARAMETER_PARTITIONING_DIMS']),
    (True, 'full', None, 1, ['NUM_MICROBATCHES=N'], ['SCAN_LAYERS', 'REMAT_POLICY']),
])
def test_does_not_fit_suggests_only_what_is_not_set(scan, remat, microbatches, parameter_dims,
                                                    expected, absent):
  from gqa_jax import models
  config = network.get_preset('tiny', scan_layers=scan, remat_policy=remat)
  settings = preflight.CompileSettings(
      model=models.EncoderDecoderModel(network.Transformer(config)), optimizer=object(),
      batch_size=8, feature_lengths={'inputs': 8, 'targets': 8},
      num_microbatches=microbatches, parameter_partitioning_dims=parameter_dims)
  error = RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
                       'required for HLO temporaries (63.50G) exceeds available HBM (15.75G).')
  report = {'mesh': {'data': 8, 'model': 1}}
  message = str(preflight._does_not_fit(error, report, settings,
                                        preflight.get_topology('local'), None))
  assert 'needs 63.50 GiB per device' in message and 'MESH_MODEL' in message, message
  for text in expected:
    assert text in message, (text, message)
  for text in absent:
    assert text not in message, (text, message)
  assert report['fits'] is False and report['needed_bytes'] == int(63.5 * 1024 ** 3)

# ------------------------------------------------------------- slice names ----

@pytest.mark.parametrize('name, chip, shape', [
    ('v4-8', 'v4', (2, 2, 1)), ('v4-128', 'v4', (4, 4, 4)),   # TensorCores: 64 chips
    ('v5p-64', 'v5p', (2, 4, 4)), ('v5e-256', 'v5e', (16, 16)),  # chips
    ('v5litepod-8', 'v5e', (2, 4)), ('v6e-8', 'v6e', (2, 4)), ('v4:2x2x3', 'v4', (2, 2, 3)),
])
def test_slice_names(name, chip, shape):
  got_chip, got_shape = preflight.parse_topology(name)
  assert (got_chip.name, got_shape) == (chip, shape)


@pytest.mark.parametrize('name', ['v4-7', 'v4-6', 'v9-8', 'v5e-3', 'v4:2x2', 'tpu'])
def test_unknown_slice_names_are_refused(name):
  with pytest.raises(ConfigError, match='unknown TPU slice; use local, a slice name'):
    preflight.parse_topology(name)


def test_chip_figures_cite_their_source():
  for chip in preflight.CHIPS.values():
    assert chip.source and chip.hbm_bytes and chip.peak_flops and chip.hbm_bandwidth
    assert chip.ici_bandwidth


# -------------------------------------------------------------- model FLOPs ----

def test_model_flops_count_every_product_once():
  cfg = network.get_preset('tiny')  # emb 32, 4 heads x 8, mlp 64 (gated), 2+2 layers
  d, n, h, f, v = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  b, s, t = 2, 16, 4
  mlp = 3 * d * f  # wi_0, wi_1, wo
  # Per layer: encoder q/k/v/o + MLP on S tokens, attention S x S; decoder self q/k/v/o,
  # cross q/o and MLP on T tokens, cross k/v on S tokens; attention T x T and T x S.
  encoder = 2 * (2 * b * s * (4 * d * n * h + mlp) + 4 * b * s * s * n * h)
  decoder = 2 * (2 * b * t * (6 * d * n * h + mlp) + 2 * b * s * 2 * d * n * h
                 + 4 * b * t * (t + s) * n * h)
  forward = encoder + decoder + 2 * b * t * d * v  # + the logits
  lengths = {'inputs': s, 'targets': t}
  assert preflight.model_flops(cfg, 'eval', b, lengths) == forward
  assert preflight.model_flops(cfg, 'train', b, lengths) == 3 * forward
  assert preflight.model_flops(cfg, 'infer', 2 * b, lengths) > 0


# ------------------------------------------------------- the local topology ----

def test_local_compile_from_a_user_directory(gqa, tmp_path, monkeypatch):
  """The local topology needs no libtpu: CPU, a tiny train step, MODEL_DIR and the task
  unset (a compile needs neither), the output folder relative as typed."""
  monkeypatch.chdir(tmp_path)
  r = gqa('compile', *TINY, LENGTHS, '--gin.BATCH_SIZE=2', '--output', 'pre flight')
  assert r.status == 0, r.err[-3000:]
  assert 'memory per device' in r.out and 'LOWER-BOUND ESTIMATE' in r.out
  report = json.loads((tmp_path / 'pre flight' / 'compile.json').read_text())
  assert REPORT_FIELDS <= set(report)
  assert (report['topology'], report['mesh'], report['step']) == (
      'local', {'data': 1, 'model': 1}, 'train')
  memory = report['memory_per_device_bytes']
  _check_memory(memory)
  # One device holds everything: parameters are float32; the packed batch is 8 int32
  # features, 3 of [2, 16] (encoder) and 5 of [2, 4] (decoder).
  params = sum(math.prod(s) for s in network.flat_param_shapes(
      network.get_preset('tiny')).values())
  assert memory['parameters'] == 4 * params == 4 * report['parameters']
  assert memory['batch'] == 4 * (3 * 2 * 16 + 5 * 2 * 4)
  # Adafactor keeps a full second moment for dims < 128 (all of tiny's): about one copy.
  assert memory['parameters'] <= memory['optimizer_state'] < 1.01 * memory['parameters']
  assert report['model_flops_per_step'] == preflight.model_flops(
      network.get_preset('tiny'), 'train', 2, {'inputs': 16, 'targets': 4})
  assert report['compiler_flops_per_device'] > 0
  # No published figures for a CPU: no roofline, and no verdict without an HBM size.
  assert report['fits'] is None and report['roofline_step_seconds'] is None


@pytest.mark.parametrize('argv, fragments', [
    ([*TINY], ['TASK_FEATURE_LENGTHS is not set', '--gin.TASK_FEATURE_LENGTHS=']),
    ([*TINY, LENGTHS, '--topology', 'v9-8'], ['--topology v9-8', 'unknown TPU slice']),
    ([*TINY, LENGTHS, '--num-slices', '2'], ['--num-slices', 'TPU --topology']),
    (['--gin_file=models/t5_1_1/tiny.gin'], ['no gin file configures train.train']),
    ([*TINY, LENGTHS, '--step', 'decode'], ['--step', 'decode']),
    ([*TINY, LENGTHS, '--gin.BATCH_SIZE=3', '--gin.NUM_MICROBATCHES=2'],
     ['NUM_MICROBATCHES=2', 'BATCH_SIZE=3']),
])
def test_user_errors_are_one_line(gqa, argv, fragments):
  assert_user_error(gqa('compile', *argv), *fragments)


def test_a_tpu_topology_without_libtpu_names_the_extra(gqa, monkeypatch):
  monkeypatch.setattr(preflight, 'libtpu_available', lambda: False)
  assert_user_error(gqa('compile', *TINY, LENGTHS, '--topology', 'v4-128'),
                    '--topology v4-128 needs libtpu', 'pip install -e ".[tpu]"')


# ------------------------------------------------------- TPU slices (libtpu) ----

@needs_libtpu
@pytest.mark.tpu_compile
def test_train_step_on_a_v4_slice(gqa, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  r = gqa('compile', *TINY, LENGTHS, '--gin.BATCH_SIZE=8', '--gin.MESH_MODEL=2',
          '--topology', 'v4-8', '--output', 'out')
  assert r.status == 0, r.err[-3000:]
  report = json.loads((tmp_path / 'out' / 'compile.json').read_text())
  assert REPORT_FIELDS <= set(report)
  # v4-8 counts TensorCores: 4 chips, one megacore device each.
  assert (report['num_devices'], report['device_kind']) == (4, 'TPU v4')
  assert report['mesh'] == {'data': 2, 'model': 2} and report['fits'] is True
  assert report['hbm_per_device_bytes'] == 32 * 1024 ** 3
  memory = report['memory_per_device_bytes']
  _check_memory(memory)
  # By hand: with MESH_MODEL=2 every kernel, the embedding and the relative-position
  # tables split in two (heads, mlp, joined_kv, vocab over 'model'); norm scales are
  # replicated. Float32, per device.
  shapes = network.flat_param_shapes(network.get_preset('tiny'))
  scales = sum(math.prod(s) for n, s in shapes.items() if n.endswith('/scale'))
  others = sum(math.prod(s) for n, s in shapes.items() if not n.endswith('/scale'))
  assert memory['parameters'] == 4 * (others // 2 + scales)
  assert memory['batch'] == 4 * (3 * 8 * 16 + 5 * 8 * 4) // 2  # rows over data=2
  assert report['collectives']['all-reduce']['count'] > 0  # gradients over 'data'
  assert 0 < report['roofline_step_seconds']
  assert report['roofline']['bound'] in ('compute', 'hbm', 'ici')
  assert 0 < report['mfu_at_roofline'] <= 1


@needs_libtpu
@pytest.mark.tpu_compile
@pytest.mark.parametrize('step', ['eval', 'infer'])
def test_eval_and_infer_steps(step):
  gin_utils.parse(['models/t5_1_1/tiny.gin', 'runs/pretrain.gin'],
                  ["TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 4}", 'EVAL_BATCH_SIZE = 8'])
  report = preflight.compile_step(preflight.settings_from_gin(step),
                                  preflight.get_topology('v5e-8'))
  assert (report['step'], report['batch_size'], report['num_devices']) == (step, 8, 8)
  assert report['fits'] is True and report['memory_per_device_bytes']['optimizer_state'] == 0
  _check_memory(report['memory_per_device_bytes'])
  if step == 'infer':
    assert report['hlo_while_loops']  # the decode loop


@needs_libtpu
@pytest.mark.tpu_compile
def test_slices_join_over_the_data_axis():
  topology = preflight.get_topology('v5e-16', num_slices=2)
  mesh = preflight.make_mesh(topology, -1, 2)
  assert len(topology.devices) == 32 and dict(mesh.shape) == {'data': 16, 'model': 2}
  # A model group (a row) stays in one slice; the data axis crosses them.
  assert [{d.slice_index for d in row} for row in mesh.devices] == [{0}] * 8 + [{1}] * 8
  with pytest.raises(ConfigError, match='does not split over --num-slices 2'):
    preflight.make_mesh(preflight.get_topology('v4-8', num_slices=2), -1, 8)


@needs_libtpu
@pytest.mark.tpu_compile
def test_a_step_that_does_not_fit_is_one_line_and_status_3(tmp_path):
  """A separate process, as users run it: libtpu's start-up warnings must not show."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  r = subprocess.run(
      [sys.executable, '-m', 'gqa_jax.cli', 'compile', *TINY, '--step', 'eval',
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 512}",
       '--gin.EVAL_BATCH_SIZE=8192', '--topology', 'v5e-8', '--output', 'out'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == compile_cli.DOES_NOT_FIT == 3, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('gqa-jax: does not fit: the eval step '
                                                 'needs '), r.stderr
  assert 'a v5e chip has 15.75 GiB of HBM' in lines[0] and 'MESH_MODEL' in lines[0]
  assert 'TPU_' not in r.stderr and 'Traceback' not in r.stderr
  report = json.loads((Path(tmp_path) / 'out' / 'compile.json').read_text())
  assert report['fits'] is False and report['needed_bytes'] > report['available_bytes']
  assert np.isclose(report['available_bytes'], 15.75 * 1024 ** 3, rtol=1e-3)
