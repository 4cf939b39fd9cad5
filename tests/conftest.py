"""Shared test helpers: the command line run in-process as a user types it."""

import dataclasses
import os
import tempfile
from pathlib import Path

# Many tests compile the same small programs again (the tiny model's train, eval and decode
# steps in every run of a test that restarts a run, in the CLI subprocesses of the
# multi-process and signal tests): JAX's persistent compilation cache, set here before JAX
# is imported and inherited by the xdist workers and those subprocesses, turns the repeats
# into loads. The cache's keys hold the program, the backend and JAX's version; a result
# read from it is the compiled program's own. A JAX_COMPILATION_CACHE_DIR of the caller
# wins.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'gqa_jax_tests_jax_cache_{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import gin
import pytest

from gqa_jax import checkpoints, cli


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject's addopts): one worker per core, at most 4 (each worker loads
  JAX and TensorFlow; more would cost memory for little gain on this suite)."""
  return max(1, min(4, os.cpu_count() or 1))


@dataclasses.dataclass
class CliResult:
  status: int
  out: str
  err: str


@pytest.fixture
def gqa(capsys):
  """run(*argv) -> CliResult of an in-process `gqa-jax argv...` (gin cleared afterwards)."""
  def run(*argv) -> CliResult:
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return CliResult(status, out, err)
  yield run
  gin.clear_config()


def assert_user_error(result: CliResult, *fragments: str):
  """Exit status 2 and exactly one line on stderr, `gqa-jax: error: ...`, naming each
  fragment (the problem and the fix), and no traceback."""
  assert result.status == 2, (result.status, result.err[-3000:])
  assert 'Traceback' not in result.err, result.err[-3000:]
  lines = [l for l in result.err.splitlines() if l.startswith('gqa-jax: error: ')]
  assert len(lines) == 1, result.err[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def assert_nothing_loads(path):
  """Nothing at `path` (or anything under it) opens as a checkpoint."""
  path = Path(path)
  if not path.exists():
    return
  candidates = [path, *[p for p in path.rglob('*') if p.is_dir()]]
  for candidate in candidates:
    with pytest.raises(checkpoints.CheckpointError):
      checkpoints.open_checkpoint(candidate)
