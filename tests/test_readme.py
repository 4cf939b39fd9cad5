"""The README's commands, run as a user runs them, so that the README cannot drift.

Every ```bash block of README.md is split into commands the way a shell splits them
(continuation lines joined, comments dropped, quotes and escapes resolved by shlex)
and every `gqa-jax ...` command is run in order, in the block's own fresh temporary
working directory, with its relative paths as written. Only sizes are changed: flags
appended after the README's own (the later flag or gin binding wins, as for a user)
make models tiny and step counts small, and commands that would run a whole
54-run sweep run with --dry-run. The checkpoints the convert examples name are
created first under the same relative names (a tiny 8-head T5X legacy checkpoint at
`t5_1_1_xxl/checkpoint_1000000`, a tiny Hugging Face T5.1.1 at `hf_t5_v1_1_large/`).
The Python API block runs with the `small` preset swapped for `tiny` and a real batch.
The `pip install ...` lines are what `.ci/run` executes verbatim (the quickstart
included), so they are not repeated here.
"""

import re
import shlex
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from gqa_jax import cli, network, optimizers
from gqa_jax.checkpoints import t5x

README = Path(__file__).resolve().parent.parent / 'README.md'

# Appended to a command by its subcommand: tiny models, few steps, no transformers peer.
_TINY_MODEL = ['--gin_bindings=network.T5Config.' + b for b in (
    'emb_dim=32', 'head_dim=8', 'mlp_dim=64', 'num_encoder_layers=1',
    'num_decoder_layers=1', 'vocab_size=128')]
# (Two decoder layers: the README's --kv-layers cla2 shares K/V between two.)
_BENCH = ['--input-length', '16', '--output-length', '4', '--batch-size', '2',
          '--repeats', '1', '--step-repeats', '1', '--rounds', '1', '--matmul-size', '64',
          '--no-hf', *_TINY_MODEL,
          '--gin_bindings=network.T5Config.num_decoder_layers=2']
_TRAIN = ['--gin.BATCH_SIZE=2', "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]


def _shrink(argv):
  """The README command `argv` at test size (see the module docstring)."""
  command = argv[0]
  if command == 'train':
    if any(a.endswith('runs/uptrain.gin') for a in argv):
      # ALPHA as written, of 20 source steps: 2 uptraining steps for ALPHA=0.1.
      return argv + _TRAIN + ['--gin.UPTRAIN_SOURCE_STEPS=20']
    if any(a.startswith('--gin.INITIAL_CHECKPOINT_PATH=') for a in argv) and any(
        a.startswith('--gin.TRAIN_STEPS=') for a in argv):
      return argv + _TRAIN  # absolute steps past a checkpoint's: as written, at batch 2
    return argv + _TRAIN + ['--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_PERIOD=2']
  if argv[:2] == ['bench', 'decode']:
    # Two variants where the README times every G (each variant compiles its own step).
    return argv + _BENCH + ([] if '--num-kv-heads' in argv else ['--num-kv-heads', '1,2'])
  if command == 'sweep':
    modes = {'--dry-run', '--emit-commands', '--aggregate-only'}
    return argv if modes & set(argv) else argv + ['--dry-run']
  if command in ('info', 'convert', 'inspect'):
    return argv
  if command == 'calibrate':  # a few examples in one batch (the later flag wins)
    return argv + ['--num-examples', '8', '--batch-size', '8', '--quiet']
  raise AssertionError(f'README runs `gqa-jax {command}`: add a size rule for it here.')


def _absolute_to_relative(argv):
  """/data/... and /tmp/... destinations in the README are put under the working folder."""
  return [re.sub(r'(^|=|\\?")/(data|tmp)/', r'\1\2/', a) for a in argv]


def readme_blocks(lang):
  """The README's ```lang blocks, in order."""
  return re.findall(rf'^```{lang}\n(.*?)^```', README.read_text(), re.S | re.M)


def gqa_commands(block):
  """argv lists (without the program name) of the block's gqa-jax commands."""
  commands = []
  for line in block.replace('\\\n', ' ').splitlines():
    words = shlex.split(line, comments=True)
    if words and words[0] == 'gqa-jax':
      commands.append(words[1:])
  return commands


BASH_BLOCKS = [b for b in readme_blocks('bash') if gqa_commands(b)]
# Blocks that train or benchmark take minutes: test_readme_heavy.py runs them, so that
# pytest-xdist (which keeps a file on one worker) gives them to another worker.
HEAVY = ('bench', 'train')


def is_heavy(block) -> bool:
  return gqa_commands(block)[0][0] in HEAVY


def block_id(block) -> str:
  return ' '.join(gqa_commands(block)[0][:2])


def _write_t5x_legacy(path: Path):
  """A tiny 8-head T5.1.1 in T5X's legacy format at T5X's published step, with the
  Adafactor state T5X keeps, where the README's T5.1.1-XXL stands."""
  config = network.T5Config(vocab_size=128, dtype='bfloat16', emb_dim=32, num_heads=8,
                            head_dim=4, mlp_dim=64, num_encoder_layers=2,
                            num_decoder_layers=2)
  params = network.init_params(config, jax.random.PRNGKey(0))
  states = optimizers.to_t5x_param_states(optimizers.adafactor().init(params), params)
  leaves = [('target/' + '/'.join(k), np.asarray(v)) for k, v in flatten_dict(params).items()]
  leaves += [(f'state/{k}', np.asarray(v)) for k, v in states.items()]
  t5x.write_all(path, leaves + [('state/step', np.int32(1_000_000))])


def _write_hf(path: Path):
  from test_hf import hf_config, hf_state, write  # tiny T5.1.1 as transformers saves it
  path.mkdir(parents=True)
  write(path, hf_state(), hf_config())


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def test_every_readme_command_is_covered():
  """The blocks found are the README's command blocks (a parse that found nothing would
  make the tests below vacuous)."""
  commands = [c[0] for b in BASH_BLOCKS for c in gqa_commands(b)]
  assert {'convert', 'inspect', 'train', 'bench', 'sweep', 'info'} <= set(commands)
  assert len(commands) >= 14
  for block in BASH_BLOCKS:
    for argv in gqa_commands(block):
      _shrink(argv)  # every command has a size rule


@pytest.mark.parametrize('block', [b for b in BASH_BLOCKS if not is_heavy(b)],
                         ids=[block_id(b) for b in BASH_BLOCKS if not is_heavy(b)])
def test_readme_block_runs_as_written(block, tmp_path, monkeypatch, capsys):
  run_block(block, tmp_path, monkeypatch, capsys)


def run_block(block, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  if 't5_1_1_xxl/checkpoint_1000000' in block:
    _write_t5x_legacy(Path('t5_1_1_xxl/checkpoint_1000000'))
  if 'hf_t5_v1_1_large' in block:
    _write_hf(Path('hf_t5_v1_1_large'))
  for argv in gqa_commands(block):
    run = _absolute_to_relative(_shrink(argv))
    status = cli.main(run)
    out, err = capsys.readouterr()
    assert status == 0, f'gqa-jax {shlex.join(argv)} -> {status}\n{err[-3000:]}'
    gin.clear_config()
    for word in _absolute_to_relative(argv):  # outputs land where the README says
      if word in ('xxl_gqa8', 'xxl_mqa', 'large_gqa4', 'tiny', 'tiny_gqa2', 'tiny_gqa2_up'):
        assert Path(word).is_dir(), f'{word} missing after gqa-jax {shlex.join(argv)}'


def test_python_api_block_runs():
  """The README's Python example, with `tiny` for `small` and a real batch for the `...`."""
  (code,) = [b for b in readme_blocks('python') if 'predict_batch' in b]
  code = code.replace("get_preset('small')", "get_preset('tiny')")
  code = re.sub(r'batch = \{.*?\}\n', 'batch = BATCH\n', code, flags=re.S)
  assert 'BATCH' in code
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 100, (2, 5)).astype(np.int32)
  batch = {'encoder_input_tokens': rng.integers(2, 100, (2, 7)).astype(np.int32),
           'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           'decoder_target_tokens': targets,
           'decoder_loss_weights': np.ones_like(targets, np.float32)}
  scope = {'BATCH': batch}
  exec(compile(code, 'README.md', 'exec'), scope)  # noqa: S102 (our own README)
  assert np.isfinite(float(scope['loss']))
  assert scope['decodes'].shape[0] == 2 and scope['scores'].shape == (2,)
  assert scope['beams'].shape == scope['decodes'].shape  # the top beam per example
  assert np.asarray(scope['aux']['scores']).shape[0] == 2
  # The first step's logits are those of predict's first greedy token.
  first = np.argmax(np.asarray(scope['logits']), -1)
  assert scope['logits'].shape == (2, scope['config'].vocab_size)
  np.testing.assert_array_equal(first, np.asarray(scope['decodes'])[:, 0])
