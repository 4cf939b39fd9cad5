"""Nothing lost, round 3: `gqa-jax convert`, `calibrate` and `inspect`.

Calibration statistics are of the checkpoint they are used with and finite (a model whose
vocabulary is smaller than the task's, or one that holds NaN, is refused by calibrate; a
file of another model or with NaN is refused by convert); an overwrite killed at any
step never turns into a damaged DST on a rerun; a training checkpoint that is not a
whole Orbax commit is damaged to inspect and loading as it is to train; over-long
output names are one-line errors; no convert flag is silently ignored; a WGQA or CLA
checkpoint given to a plain config names the fix.

Everything runs from a temporary working folder with relative paths, as users type it.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from conftest import assert_user_error
from gqa_jax import calibration, checkpoints, network, outputs
from gqa_jax import convert as convert_lib
from gqa_jax.checkpoints import orbax, t5x, training
from gqa_jax.errors import ConfigError

FIXTURE = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny'
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')
TASK = 'gqa_builtin_span_corruption'  # 4100 ids
VOCAB = 4224  # the built-in configs' table for them
STEP = 3
# As the built statistics are collected: one compile of the forward for the whole file.
CALIBRATE = ['--task', TASK, '--num-examples', '2', '--input-length', '32',
             '--target-length', '8', '--batch-size', '2', '--quiet',
             '--stacks', 'encoder,decoder_self,decoder_cross']


def tiny(seed, **overrides):
  """(config, flat parameters) of the tiny preset, initialised from `seed`."""
  cfg = network.get_preset('tiny', vocab_size=VOCAB, dtype='float32', **overrides)
  return cfg, {'/'.join(k): np.array(v) for k, v in flatten_dict(
      network.init_params(cfg, jax.random.PRNGKey(seed))).items()}


def write_t5x(path, params, step=STEP):
  """A T5X legacy checkpoint of `params` (no optimizer state; no step if step is None)."""
  leaves = [(f'target/{k}', v) for k, v in params.items()]
  if step is not None:
    leaves.append(('state/step', np.int32(step)))
  t5x.write_all(Path(path) / f'checkpoint_{step or 0}', leaves)
  return Path(path)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Tiny T5X checkpoints: a (MHA), b (another init of a's config), c (a's widths and
  layers, another mlp_dim), nostep (a without a step), wgqa and cla (conversions of a),
  and stats_a: `gqa-jax calibrate` of a (every stack)."""
  root = tmp_path_factory.mktemp('built')
  _, a = tiny(1)
  write_t5x(root / 'a', a)
  write_t5x(root / 'b', tiny(2)[1])
  write_t5x(root / 'c', tiny(1, mlp_dim=48)[1])
  write_t5x(root / 'nostep', a, step=None)
  quiet = dict(progress=False, notify=lambda message: None)
  convert_lib.convert(root / 'a', root / 'wgqa', 2, method='wgqa', **quiet)
  convert_lib.convert(root / 'a', root / 'cla', 2, kv_layers='cla2', **quiet)
  calibration.collect(root / 'a', TASK, 2, root / 'stats_a.npz', input_length=32,
                      target_length=8, batch_size=2, stacks=network.STACKS, progress=False)
  return root


@pytest.fixture
def work(tmp_path, monkeypatch, built):
  """A working folder holding copies of the built checkpoints and stats_a.npz."""
  for path in built.iterdir():
    (shutil.copytree if path.is_dir() else shutil.copy)(path, tmp_path / path.name)
  monkeypatch.chdir(tmp_path)
  return tmp_path


def hidden(folder, name='out'):
  return sorted(p.name for p in Path(folder).glob(f'.{name}.*'))


def loads_and_verifies(path):
  """The checkpoint at `path` opens and every tensor reads back intact."""
  source = checkpoints.open_checkpoint(path)
  bad, _ = checkpoints.verify(source, progress=False)
  assert not bad, bad
  return source


# ------------------------------------------------------------ calibration ----

@needs_fixture
def test_calibrate_refuses_a_checkpoint_with_a_smaller_vocabulary(gqa, tmp_path, monkeypatch):
  """The T5X fixture embeds 128 ids, the task has 4100: refused before any work, no
  statistics written (they were all NaN)."""
  monkeypatch.chdir(tmp_path)
  result = gqa('calibrate', FIXTURE / 'legacy', *CALIBRATE, '-o', 'stats.npz')
  assert_user_error(result, 'vocabulary of 4100 ids', 'embeds only 128')
  assert list(tmp_path.iterdir()) == []


def test_calibrate_refuses_to_write_non_finite_statistics(gqa, work):
  """A checkpoint holding NaN: calibrate stops with one line and writes no statistics."""
  _, params = tiny(1)
  params['encoder/encoder_norm/scale'][3] = np.nan
  write_t5x('nan', params)
  result = gqa('calibrate', 'nan', *CALIBRATE, '-o', 'nan.npz')
  assert_user_error(result, 'NaN', 'nothing was written', 'inspect --verify')
  assert not Path('nan.npz').exists() and hidden('.', 'nan.npz') == []


def rewrite_stats(path, change):
  """The calibration file at `path` with its moments changed by change(entry, moment)."""
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays = {k: change(k, v) if k.startswith('moment/') else v for k, v in arrays.items()}
  np.savez(path, **arrays)


def edit_metadata(path, **changes):
  """The calibration file at `path` with its metadata changed."""
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays['metadata'] = np.array(json.dumps(dict(json.loads(str(arrays['metadata'][()])),
                                                **changes)))
  np.savez(path, **arrays)


def test_convert_refuses_non_finite_statistics(gqa, work):
  """What calibrate wrote for a too-small vocabulary (NaN moments) is one line, exit 2."""
  rewrite_stats('stats_a.npz', lambda k, v: np.full_like(v, np.nan))
  result = gqa('convert', 'a', 'out', '--num-kv-heads', '2', '--method', 'svd',
               '--calibration', 'stats_a.npz', '--quiet')
  assert_user_error(result, 'stats_a.npz', 'NaN', 'gqa-jax calibrate')
  assert not Path('out').exists() and hidden('.') == []


@pytest.mark.parametrize('other, named', [
    ('b', ['weights differ']),  # another init of the same config
    ('c', ['mlp_dim=64', 'mlp_dim=48']),  # same width and layers, another config
])
def test_convert_refuses_statistics_of_another_model(gqa, work, other, named):
  result = gqa('convert', other, 'out', '--num-kv-heads', '2', '--method', 'svd',
               '--calibration', 'stats_a.npz', '--quiet')
  calibrated = calibration.load('stats_a.npz').metadata['checkpoint']  # built/a/checkpoint_3
  assert_user_error(result, 'stats_a.npz', calibrated, str(work / other),
                    'rerun gqa-jax calibrate', *named)
  assert not Path('out').exists() and hidden('.') == []
  # The model they were computed on is converted with them.
  assert gqa('convert', 'a', 'out', '--num-kv-heads', '2', '--method', 'svd',
             '--calibration', 'stats_a.npz', '--quiet').status == 0


def test_calibrate_refuses_to_continue_a_file_of_another_model(gqa, work):
  """`b` sits where `a` was calibrated (same path, step and config): the fingerprint
  tells them apart, so its examples are not added to a's."""
  edit_metadata('stats_a.npz', checkpoint=str((work / 'a' / f'checkpoint_{STEP}').resolve()))
  assert gqa('calibrate', 'a', *CALIBRATE, '-o', 'stats_a.npz').status == 0  # nothing to do
  shutil.rmtree('a')
  shutil.copytree('b', 'a')
  result = gqa('calibrate', 'a', *CALIBRATE, '-o', 'stats_a.npz')
  assert_user_error(result, 'fingerprint', 'choose another -o')


# ----------------------------------------------------- killed --overwrite ----

KILL = textwrap.dedent('''
    import os, shutil, sys
    from pathlib import Path
    from gqa_jax import cli
    point = sys.argv[1]
    ours = lambda p: Path(p).name == 'out' or Path(p).name.startswith('.out.')
    rename, rmtree, count = os.rename, shutil.rmtree, [0]
    def dying_rename(a, b):
      rename(a, b)
      if ours(a) or ours(b):
        count[0] += 1
        if point == f'rename{count[0]}':
          os._exit(9)
    def dying_rmtree(path, *args, **kwargs):
      if point == 'rmtree' and ours(path):  # half of the files deleted, then killed
        files = sorted(p for p in Path(path).rglob('*') if p.is_file())
        for p in files[:len(files) // 2]:
          p.unlink()
        os._exit(9)
      return rmtree(path, *args, **kwargs)
    os.rename, shutil.rmtree = dying_rename, dying_rmtree
    sys.exit(cli.main(['convert', 'a', 'out', '--num-kv-heads', '1', '--quiet',
                       '--overwrite', '--output-format', 't5x']))  # t5x: no Orbax import
    ''')


@pytest.mark.parametrize('point', ['rename1', 'rename2', 'rename3', 'rmtree'])
def test_a_killed_overwrite_never_becomes_a_damaged_dst(gqa, work, point):
  """A conversion with --overwrite killed after each rename of its swap, and in the middle
  of deleting the previous output. Then DST, if there, is whole; the user removes DST and
  converts again: the result is whole too (a half-deleted previous output is never put
  back), and a rerun with --overwrite leaves nothing hidden beside DST."""
  assert gqa('convert', 'a', 'out', '--num-kv-heads', '2', '--quiet').status == 0
  died = subprocess.run([sys.executable, '-c', KILL, point], capture_output=True, text=True)
  assert died.returncode in (0, 9), died.stderr[-2000:]
  if Path('out').exists():
    assert loads_and_verifies('out').config.kv_heads('decoder_self') in (1, 2)
  shutil.rmtree('out', ignore_errors=True)
  result = gqa('convert', 'a', 'out', '--num-kv-heads', '1', '--quiet')
  assert result.status in (0, 2), result.err[-2000:]
  source = loads_and_verifies('out')
  if result.status == 0:
    assert source.config.kv_heads('decoder_self') == 1
  else:  # the previous DST, hidden by a swap that had not committed, put back whole
    assert_user_error(result, 'already exists')
    assert 'restored' in result.err and source.config.kv_heads('decoder_self') == 2
  assert gqa('convert', 'a', 'out', '--num-kv-heads', '1', '--quiet',
             '--overwrite').status == 0
  assert loads_and_verifies('out').config.kv_heads('decoder_self') == 1
  assert hidden('.') == []


# ----------------------------------------------- training checkpoints ----

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """MODEL_DIR of gqa-jax train's checkpointer with one step (checkpoint_2)."""
  path = tmp_path_factory.mktemp('train') / 'run'
  cfg, _ = tiny(1)
  params = network.init_params(cfg, jax.random.PRNGKey(0))
  training.TrainCheckpointer(path, config=cfg).save(2, params, {}, {'batches': 2})
  return path


def test_the_commit_rule_is_train_s():
  assert tuple(orbax.COMMIT_FILES) == tuple(training.ORBAX_COMMIT_FILES)


@pytest.mark.parametrize('missing', ['_CHECKPOINT_METADATA', 'commit_success.txt'])
def test_a_training_checkpoint_that_is_not_a_whole_commit_is_damaged(gqa, tmp_path,
                                                                     monkeypatch, run_dir,
                                                                     missing):
  """What `gqa-jax train` sets aside as 'not a complete Orbax commit' is damaged to
  inspect --verify (exit 2) and refused by loading (eval's path), with one line."""
  shutil.copytree(run_dir, tmp_path / 'run')
  monkeypatch.chdir(tmp_path)
  assert gqa('inspect', '--verify', 'run').status == 0  # whole, it is fine
  (tmp_path / 'run' / 'checkpoint_2' / missing).unlink()
  result = gqa('inspect', '--verify', 'run')
  assert_user_error(result, 'checkpoint_2', missing, 'not a complete Orbax commit')
  cfg, _ = tiny(1)
  for load in (lambda: checkpoints.load_model('run'),
               lambda: training.open_checked('run', cfg)):
    with pytest.raises(checkpoints.CheckpointError, match=missing):
      load()


@needs_fixture
def test_t5x_orbax_checkpoints_still_load():
  source = loads_and_verifies(FIXTURE / 'orbax' / 'checkpoint_3')
  assert source.format == 't5x-orbax'


# ----------------------------------------------------------- long names ----

def test_over_long_output_names_are_one_line_errors(gqa, work):
  too_long = 'd' * 256  # over the file system's limit by itself
  result = gqa('convert', 'a', too_long, '--num-kv-heads', '2', '--quiet')
  assert_user_error(result, 'DST', '256 bytes', '255')
  # Legal by itself, but not the hidden names written beside it (.NAME.lock, .partial-).
  result = gqa('convert', 'a', 'd' * 250, '--num-kv-heads', '2', '--quiet')
  assert_user_error(result, 'DST', '250 bytes', 'at most 236')
  result = gqa('calibrate', 'a', *CALIBRATE, '-o', 's' * 246 + '.npz')
  assert_user_error(result, '-o', '250 bytes')
  assert sorted(p.name for p in work.iterdir() if len(p.name) > 200) == []
  assert hidden('.', 'd' * 250) == []
  # Every command's output folder check: a component over the limit.
  with pytest.raises(ConfigError, match='256 bytes'):
    outputs.check_output_dir(Path('x' * 256) / 'y', 'EVAL_OUTPUT_DIR')
  with pytest.raises(ConfigError, match=r'\.NAME\.partial-'):
    outputs.check_output_name('n' * 240, 'NAME', '.partial-12345678')
  assert outputs.check_output_name('n' * 230, 'NAME', '.partial-12345678') == work / ('n' * 230)


# -------------------------------------------------------- unused flags ----

@pytest.mark.parametrize('src, flags, named', [
    ('a', ['--num-kv-heads', '2', '--layer-method', 'first'], ['--layer-method', '--kv-layers']),
    ('a', ['--kv-layers', '0,1', '--layer-method', 'first'], ['--layer-method', 'no layer']),
    ('a', ['--num-kv-heads', '2', '--wgqa-weights', 'row'], ['--wgqa-weights needs --method wgqa']),
    ('a', ['--num-kv-heads', '2', '--wgqa-init', 'normal'], ['--wgqa-init needs --method wgqa']),
    ('a', ['--num-kv-heads', '2', '--method', 'random', '--grouping', 'similarity'],
     ['--grouping similarity', '--method random']),
    ('a', ['--num-kv-heads', '4', '--grouping', 'similarity'], ['--grouping similarity']),
    ('a', ['--num-kv-heads', '4', '--method', 'first'], ['--method first', 'KV heads']),
    ('a', ['--kv-layers', 'cla2', '--method', 'first'], ['--method first', 'KV heads']),
    ('a', ['--num-kv-heads', '2', '--stacks', 'decoder_self,decoder_cross,decoder_self'],
     ['--stacks', 'decoder_self', 'more than once']),
    ('a', ['--num-kv-heads', '2', '--opt-state', 'drop'], ['--opt-state', 'no optimizer state']),
    ('nostep', ['--num-kv-heads', '2', '--reset-step'], ['--reset-step', 'no step']),
    ('wgqa', ['--fold', '--method', 'mean'], ['--fold', '--method']),
    ('a', ['--num-kv-heads', '2', '--seed', '3'], ['--seed 3', '--method mean', 'draws none']),
    ('a', ['--num-kv-heads', '2', '--method', 'wgqa', '--seed', '1'],
     ['--seed 1', '--wgqa-init mean']),
])
def test_no_convert_flag_is_silently_ignored(gqa, work, src, flags, named):
  result = gqa('convert', src, 'out', *flags, '--quiet')
  assert_user_error(result, *named)
  assert not Path('out').exists() and hidden('.') == []


def test_the_flags_that_are_used_still_work(work):
  quiet = dict(progress=False, notify=lambda message: None)
  for dst, kwargs in (('w', dict(method='wgqa', wgqa_weights='row', wgqa_init='normal')),
                      ('l', dict(kv_layers='cla2', layer_method='first')),
                      ('f', dict(method='first', grouping='similarity')),
                      ('m', dict(method='mean', stacks=('decoder_self',)))):
    convert_lib.convert('a', dst, 2, **kwargs, **quiet)
    assert checkpoints.open_checkpoint(dst).config.kv_heads('decoder_self') == 2
  convert_lib.convert('wgqa', 'folded', None, fold=True, **quiet)
  # --seed where weights are drawn: another seed, other weights.
  name = 'decoder/layers_0/self_attention/key/kernel'
  drawn = {}
  for seed in (1, 2):
    convert_lib.convert('a', f'r{seed}', 2, method='random', seed=seed, **quiet)
    drawn[seed] = checkpoints.open_checkpoint(f'r{seed}').params[name].read()
  assert not np.array_equal(drawn[1], drawn[2])


def test_a_sweep_passes_the_seed_only_to_conversions_that_draw_weights():
  from gqa_jax.experiments import grid as grid_lib
  assert convert_lib.uses_seed('random') and convert_lib.uses_seed('wgqa', 'normal')
  assert not any(convert_lib.uses_seed(m) for m in ('mean', 'first', 'svd', None))
  assert not convert_lib.uses_seed('wgqa', 'mean')
  task = 'gqa_builtin_docstring'
  grid = grid_lib.Grid(
      name='t', model_gin='experiments/quickstart/model.gin', kv_heads=[8, 1], alphas=[0.1],
      methods=['mean', 'random', 'wgqa-n'], seeds=[0, 5], tasks=[task],
      pretrain_gins=['runs/pretrain.gin'], pretrain_steps=100,
      uptrain_gins=['runs/uptrain.gin'], finetune_gins={task: ['runs/finetune.gin']},
      finetune_steps={task: 30}, eval_gins={task: ['runs/eval.gin']}, metric={task: 'rougeL'},
      method_options={'wgqa-n': {'convert': ['--method', 'wgqa', '--wgqa-init', 'normal'],
                                 'gin': ['attention/wgqa.gin']}})
  converts = [s for run in grid_lib.plan(grid, '/tmp/x', num_heads=8) for s in run.stages
              if s.kind == 'convert']
  seeds = {}
  for stage in converts:
    method = stage.argv[stage.argv.index('--method') + 1] if '--method' in stage.argv else 'mean'
    init = stage.argv[stage.argv.index('--wgqa-init') + 1] if '--wgqa-init' in stage.argv else ''
    seeds.setdefault((method, init), set()).add(
        stage.argv[stage.argv.index('--seed') + 1] if '--seed' in stage.argv else None)
  assert seeds == {('mean', ''): {None}, ('random', ''): {'0', '5'},
                   ('wgqa', 'normal'): {'0', '5'}}, seeds


# ------------------------------------ WGQA / CLA checkpoint, plain config ----

def test_a_wgqa_or_cla_checkpoint_given_to_a_plain_config_names_the_fix(work):
  plain = network.get_preset('tiny', vocab_size=VOCAB, dtype='float32',
                             decoder_self_kv_heads=2, decoder_cross_kv_heads=2)
  with pytest.raises(checkpoints.CheckpointError, match=r'WGQA.*gqa-jax convert CKPT OUT '
                     r'--fold.*wgqa\.gin'):
    training.open_checked('wgqa', plain)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'CLA/MLKV.*decoder_self_kv_layers=\(0,\).*cla\.gin'):
    training.open_checked('cla', plain)
  # The other way round: a plain checkpoint given to a WGQA or CLA config.
  wgqa_config = checkpoints.open_checkpoint('wgqa').config
  with pytest.raises(checkpoints.CheckpointError, match='--method wgqa'):
    training.open_checked('a', wgqa_config)
  cla_config = checkpoints.open_checkpoint('cla').config
  with pytest.raises(checkpoints.CheckpointError, match='--kv-layers'):
    training.open_checked('a', dataclasses.replace(cla_config, decoder_self_kv_heads=None,
                                                   decoder_cross_kv_heads=None))
