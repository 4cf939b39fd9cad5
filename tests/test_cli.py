"""The `gqa-jax` command line and the gin files under gin_configs/."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import gin
import pytest

from gqa_jax import cli
from gqa_jax import gin_utils
from gqa_jax import info
from gqa_jax import network
from gqa_jax.errors import ConfigError

GIN_DIR = Path(__file__).resolve().parent.parent / 'gin_configs'
MODEL_FILES = sorted((GIN_DIR / 'models' / 't5_1_1').glob('*.gin'))


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def _run(capsys, *argv):
  """(exit status, stdout, stderr) of an in-process `gqa-jax argv...`."""
  status = cli.main(list(argv))
  out, err = capsys.readouterr()
  return status, out, err


def _assert_one_line_error(status, err, *fragments):
  assert status == 2
  assert err.startswith('gqa-jax: error: ') and err.count('\n') == 1, err
  assert 'Traceback' not in err
  for fragment in fragments:
    assert fragment in err


# ---------------------------------------------------------------- gin files ----

def test_model_gin_files_cover_the_presets():
  assert sorted(p.stem for p in MODEL_FILES) == sorted(network.PRESETS)


@pytest.mark.parametrize('path', MODEL_FILES, ids=lambda p: p.stem)
def test_model_gin_file_equals_preset(path):
  assert gin_utils.load_config([str(path)]) == network.PRESETS[path.stem]
  # Found through the default search path, as the CLI names them.
  assert gin_utils.load_config([f'models/t5_1_1/{path.stem}.gin']) == network.PRESETS[path.stem]


@pytest.mark.parametrize('size', list(network.PRESETS))
def test_attention_gin_files(size):
  load = lambda attention, *bindings: gin_utils.load_config(
      [f'models/t5_1_1/{size}.gin', f'attention/{attention}.gin'], bindings)
  preset = network.PRESETS[size]
  n = preset.num_heads
  kv_heads = lambda cfg: tuple(cfg.kv_heads(s) for s in network.STACKS)
  assert load('mha') == preset
  assert kv_heads(load('mqa')) == (n, 1, 1)
  assert kv_heads(load('gqa', 'NUM_KV_HEADS = 2')) == (n, 2, 2)
  if n % 8 == 0:  # the paper's GQA-8 default
    assert kv_heads(load('gqa')) == (n, 8, 8)
  else:
    with pytest.raises(ValueError, match='decoder_self_kv_heads=8'):
      load('gqa')
  # A later mha.gin undoes an earlier gqa.gin; NUM_KV_HEADS is then used by no file, and
  # binding it anyway is refused (the user believes they configured GQA-2).
  files = [f'models/t5_1_1/{size}.gin', 'attention/gqa.gin', 'attention/mha.gin']
  assert gin_utils.load_config(files) == preset
  with pytest.raises(ConfigError, match='NUM_KV_HEADS is bound but no gin file uses it'):
    gin_utils.load_config(files, ['NUM_KV_HEADS = 2'])


def test_gin_errors():
  with pytest.raises(FileNotFoundError, match='nope.gin.*searched'):
    gin_utils.load_config(['models/t5_1_1/nope.gin'])
  with pytest.raises(ValueError, match="parameter named 'bogus'"):
    gin_utils.load_config(['models/t5_1_1/tiny.gin'], ['network.T5Config.bogus = 1'])
  with pytest.raises(ValueError, match='does not divide|invalid for num_heads'):
    gin_utils.load_config(['models/t5_1_1/tiny.gin'], ['network.T5Config.num_heads = 3',
                                                        'network.T5Config.encoder_kv_heads = 2'])


def test_user_gin_file_with_include_and_search_path(tmp_path):
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'tiny_mqa.gin').write_text(
      "include 'models/t5_1_1/tiny.gin'\n"
      "include 'attention/mqa.gin'\n"
      'network.T5Config.num_decoder_layers = 3\n')
  config = gin_utils.load_config(['tiny_mqa.gin'], search_paths=[str(tmp_path / 'mine')])
  assert config == dataclasses.replace(network.PRESETS['tiny'].with_kv_heads(1),
                                      num_decoder_layers=3)


def test_rewrite_gin_args():
  assert gin_utils.rewrite_gin_args(['info', '--gin.NUM_KV_HEADS=4', '--json']) == [
      'info', '--gin_bindings=NUM_KV_HEADS = 4', '--json']
  with pytest.raises(ValueError, match='NAME=VALUE'):
    gin_utils.rewrite_gin_args(['--gin.NUM_KV_HEADS'])


# --------------------------------------------------------------------- CLI ----

def test_info_tables(capsys):
  status, out, _ = _run(capsys, 'info', '--size', 'tiny')
  assert status == 0
  assert 'emb 32, 4 heads x head_dim 8, 2+2 layers' in out
  assert 'input length 2048, output length 512, batch 32' in out
  assert 'keeps no KV cache' in out
  for variant in ('MHA', 'GQA-2', 'MQA'):
    assert variant in out


def test_info_json_matches_library(capsys):
  status, out, _ = _run(capsys, 'info', '--preset', 'tiny', '--input-length', '64',
                        '--output-length', '16', '--batch-size', '4', '--stacks',
                        'encoder,decoder_self', '--cache-dtype', 'bfloat16', '--json')
  assert status == 0
  records = json.loads(out)
  expected = info.report(network.get_preset('tiny'), input_length=64, output_length=16,
                         batch_size=4, stacks=('encoder', 'decoder_self'),
                         cache_dtype='bfloat16')
  assert [{k: v for k, v in r.items() if k != 'model'} for r in records] == expected
  assert [r['variant'] for r in records] == ['MHA', 'GQA-2', 'MQA']


@pytest.mark.parametrize('argv, configured', [
    (['--gin_file', 'models/t5_1_1/tiny.gin', '--gin_file', 'attention/mqa.gin'], 'MQA'),
    (['--size', 'tiny', '--gin_file', 'attention/gqa.gin', '--gin.NUM_KV_HEADS=2'], 'GQA-2'),
    (['--size', 'tiny', '--gin_bindings', 'network.T5Config.decoder_self_kv_heads = 2',
      '--gin_bindings', 'network.T5Config.decoder_cross_kv_heads = 2'], 'GQA-2'),
])
def test_info_from_gin(capsys, argv, configured):
  status, out, _ = _run(capsys, 'info', *argv, '--json')
  assert status == 0
  records = json.loads(out)
  assert [r['variant'] for r in records if r['configured']] == [configured]
  assert records[0]['params_total'] == info.count_params(network.PRESETS['tiny'])['total']


@pytest.mark.parametrize('argv, fragments', [
    (['info', '--size', 'huge'], ['--size', 'huge']),
    (['info', '--size', 'tiny', '--gin.network.T5Config.bogus=1'], ['bogus']),
    (['info', '--gin_file', 'missing.gin'], ['missing.gin', 'not found']),
    (['info', '--size', 'small', '--gin_file', 'attention/gqa.gin'], ['num_heads=6']),
    (['info', '--size', 'tiny', '--stacks', 'decoder'], ['--stacks']),
    (['info', '--size', 'tiny', '--output-length', '0'], ['--output-length']),
    (['info', '--size', 'tiny', '--cache-dtype', 'float99'], ['float99']),
    (['info', '--gin.NUM_KV_HEADS'], ['NAME=VALUE']),
    (['frobnicate'], ['frobnicate']),
    ([], ['no command']),
])
def test_user_errors_are_one_line(capsys, argv, fragments):
  _assert_one_line_error(*_run(capsys, *argv)[::2], *fragments)


def test_help_explains_every_flag(capsys):
  status, out, _ = _run(capsys, '--help')
  assert status == 0 and 'info' in out
  status, out, _ = _run(capsys, 'info', '--help')
  assert status == 0
  info_parser = cli.build_parser()._subparsers._group_actions[0].choices['info']
  for action in info_parser._actions:
    assert action.help, action.option_strings
    for option in action.option_strings:
      assert option in out


def test_console_script():
  script = Path(sys.executable).parent / 'gqa-jax'
  if not script.exists():
    pytest.skip('gqa-jax console script is not installed next to this Python')
  result = subprocess.run([str(script), 'info', '--size', 'tiny'], capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr
  assert 'MQA' in result.stdout and 'keeps no KV cache' in result.stdout


# ------------------------------------------------------- paths as users type them ----

FIXTURE = Path(__file__).resolve().parent.parent.parent / 'shared' / 'fixtures' / 't5x_tiny'


@pytest.mark.skipif(not FIXTURE.exists(), reason=f'no T5X fixture at {FIXTURE}')
def test_convert_and_inspect_take_relative_tilde_dotdot_and_spaced_paths(
    tmp_path, monkeypatch, capsys):
  """A source reached through `..`, destinations relative, under `~` and with spaces,
  from a working directory that is not the project's."""
  import shutil
  shutil.copytree(FIXTURE, tmp_path / 'my models' / 't5x_tiny')
  home = tmp_path / 'home'
  home.mkdir()
  monkeypatch.setenv('HOME', str(home))
  work = tmp_path / 'work dir'
  work.mkdir()
  monkeypatch.chdir(work)
  src = '../my models/t5x_tiny/legacy/checkpoint_3'
  for dst in ('out', 'nested/out 2', '~/gqa out'):
    status, out, err = _run(capsys, 'convert', src, dst, '--num-kv-heads', '2', '--quiet')
    assert status == 0, err
    written = (home / 'gqa out') if dst.startswith('~') else (work / dst)
    assert (written / 'checkpoint_3' / 'gqa_jax.json').is_file()
    assert str(written / 'checkpoint_3') in out
    status, out, err = _run(capsys, 'inspect', dst)
    assert status == 0 and 'decoder_self 2 (GQA-2)' in out, err
  assert not list(work.glob('~*'))  # `~` was expanded, not taken as a folder name
