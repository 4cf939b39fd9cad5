"""The README's command blocks that train or benchmark (minutes each), run as
test_readme.py runs the others; a file of their own so that pytest-xdist can run them
beside it."""

import gin
import pytest

from test_readme import BASH_BLOCKS, block_id, is_heavy, run_block

HEAVY_BLOCKS = [b for b in BASH_BLOCKS if is_heavy(b)]


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def test_the_heavy_blocks_are_found():
  assert {block_id(b).split()[0] for b in HEAVY_BLOCKS} == {'bench', 'train'}


@pytest.mark.parametrize('block', HEAVY_BLOCKS, ids=[block_id(b) for b in HEAVY_BLOCKS])
def test_readme_block_runs_as_written(block, tmp_path, monkeypatch, capsys):
  run_block(block, tmp_path, monkeypatch, capsys)
