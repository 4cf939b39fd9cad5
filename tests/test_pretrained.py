"""`builtin:<name>` checkpoints: shipped checkpoints named wherever a checkpoint is read,
never written to; and the shipped `builtin:t5_mini` itself (its config, size, record).

The name-resolution tests point the package's pretrained folder at a temporary one
holding a converted copy of the shared T5X fixture, so they run without the shipped
checkpoint and take the same code path a user's command takes."""

import dataclasses
import json
import pathlib

import pytest

from conftest import assert_user_error
from gqa_jax import checkpoints, gin_utils
from gqa_jax.checkpoints import base

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 't5x_tiny' / 'legacy'
SHIPPED = base.PRETRAINED_DIR / 't5_mini'


@pytest.fixture
def pretrained_dir(gqa, tmp_path, monkeypatch):
  """A pretrained folder with one checkpoint, `builtin:fixture` (the T5X fixture as a
  gqa_jax checkpoint), in place of the package's."""
  if not FIXTURE.exists():
    pytest.skip(f'no T5X fixture at {FIXTURE}')
  folder = tmp_path / 'pretrained'
  source = checkpoints.open_checkpoint(FIXTURE)
  r = gqa('convert', FIXTURE, folder / 'fixture' / f'checkpoint_{source.step}',
          '--num-kv-heads', source.config.num_heads, '--quiet')
  assert r.status == 0, r.err
  monkeypatch.setattr(base, 'PRETRAINED_DIR', folder)
  work = tmp_path / 'work'
  work.mkdir()
  monkeypatch.chdir(work)
  return folder


def test_a_builtin_name_is_read_like_a_path(gqa, pretrained_dir):
  assert checkpoints.builtin_checkpoints() == ('fixture',)
  r = gqa('inspect', 'builtin:fixture', '--verify')
  assert r.status == 0, r.err
  by_name = checkpoints.open_checkpoint('builtin:fixture')
  by_path = checkpoints.open_checkpoint(pretrained_dir / 'fixture')
  assert by_name.config == by_path.config and by_name.step == by_path.step
  r = gqa('convert', 'builtin:fixture', 'gqa2', '--num-kv-heads', '2', '--quiet')
  assert r.status == 0, r.err
  assert checkpoints.open_checkpoint('gqa2').config.kv_heads('decoder_self') == 2


def test_an_unknown_builtin_name_lists_the_shipped_ones(gqa, pretrained_dir):
  assert_user_error(gqa('inspect', 'builtin:t5_mni'),
                    'builtin:t5_mni: no such built-in checkpoint', 'available: builtin:fixture')


def test_a_builtin_checkpoint_is_never_written(gqa, pretrained_dir):
  before = sorted(str(p.relative_to(pretrained_dir)) for p in pretrained_dir.rglob('*'))
  assert_user_error(gqa('convert', 'builtin:fixture', 'builtin:fixture', '--num-kv-heads',
                        '2', '--overwrite', '--quiet'),
                    'builtin:fixture is a shipped checkpoint, which is only read')
  after = sorted(str(p.relative_to(pretrained_dir)) for p in pretrained_dir.rglob('*'))
  assert after == before
  assert not any(pathlib.Path('.').iterdir())


def test_the_shipped_checkpoint_is_the_model_of_its_gin_file():
  """builtin:t5_mini has the config of models/builtin/t5_mini.gin, is MHA everywhere,
  verifies (CRC-32 of every tensor), stays under 20 MB, and records its curve."""
  source = checkpoints.open_checkpoint('builtin:t5_mini')
  assert all(source.config.kv_heads(s) == source.config.num_heads
             for s in ('encoder', 'decoder_self', 'decoder_cross'))
  # The converter records the KV heads explicitly; the gin file leaves them at num_heads.
  unset = {f'{s}_kv_heads': None for s in ('encoder', 'decoder_self', 'decoder_cross')}
  assert (dataclasses.replace(source.config, **unset)
          == gin_utils.load_config(['models/builtin/t5_mini.gin']))
  assert source.opt_state, 'the Adafactor state is kept, for uptraining'
  bad, compared = checkpoints.verify(source, progress=False)
  assert not bad and compared == len(source.params) + len(source.opt_state)
  size = sum(p.stat().st_size for p in SHIPPED.rglob('*') if p.is_file())
  assert size < 20e6
  record = json.loads((SHIPPED / 'curve.json').read_text())
  assert record['step'] == source.step
  # The recorded flatness is the criterion recomputed from the recorded curve: under 1%
  # better from the last score at or before 80% of the steps to the last score. (The
  # shipped build is not flat yet: issue 15 stays open on it; README says so.)
  curve = record['validation_nll']
  assert curve[-1]['step'] == source.step
  start = [p for p in curve if p['step'] <= 0.8 * source.step][-1]
  improvement = (start['nll'] - curve[-1]['nll']) / start['nll']
  assert record['last_fifth_improvement'] == pytest.approx(improvement)
  assert record['flat'] == (improvement < 0.01)
  assert record['train_seconds'] <= 2 * 3600
