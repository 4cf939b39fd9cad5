"""The real `gqa-jax quickstart` output, checked where it was made.

The quickstart takes about ten minutes on two cores, so the suite does not run it;
`.ci/run` runs it verbatim as the README's first command (default output
./gqa_quickstart, from the clone's root) and then runs these tests on what it
wrote (`pytest -m quickstart_output`; GQA_QUICKSTART_OUTPUT names another folder).
They are deselected from a plain `pytest` (pyproject's addopts).
"""

import csv
import json
import os
from pathlib import Path

import pytest

from gqa_jax import cli

pytestmark = pytest.mark.quickstart_output

TASK = 'gqa_builtin_docstring'
PRETRAIN, UPTRAIN, FINETUNE = 400, 40, 200  # experiments/grids/quickstart.gin: 400 x 0.1
VARIANTS = {'MHA': 8, 'GQA-2': 2, 'MQA': 1}


@pytest.fixture(scope='module')
def output() -> Path:
  path = Path(os.environ.get('GQA_QUICKSTART_OUTPUT', 'gqa_quickstart')).resolve()
  if not (path / 'table1.md').is_file():
    pytest.fail(f'no quickstart output at {path}: run `gqa-jax quickstart` first (as '
                '.ci/run does) or set GQA_QUICKSTART_OUTPUT.')
  return path


def test_every_stage_left_its_checkpoint(output):
  assert (output / 'pretrain' / 's0' / f'checkpoint_{PRETRAIN}').is_dir()
  for name in ('GQA-2', 'MQA'):
    converted = list((output / 'convert' / 's0').glob(f'{name}_mean/checkpoint_{PRETRAIN}'))
    uptrained = list((output / 'uptrain' / 's0').glob(
        f'{name}_mean_a0p1/checkpoint_{PRETRAIN + UPTRAIN}'))
    assert converted and uptrained, name
  for run, step in ((f'MHA_none_a0_s0_{TASK}', PRETRAIN + FINETUNE),
                    (f'GQA-2_mean_a0p1_s0_{TASK}', PRETRAIN + UPTRAIN + FINETUNE),
                    (f'MQA_mean_a0p1_s0_{TASK}', PRETRAIN + UPTRAIN + FINETUNE)):
    assert (output / 'runs' / run / 'finetune' / f'checkpoint_{step}').is_dir(), run
    summary = json.loads((output / 'runs' / run / 'eval' / f'summary_{step}.json').read_text())
    assert 0 <= summary['metrics'][TASK]['rougeL'] <= 100
    assert json.loads((output / 'runs' / run / 'result.json').read_text())['step'] == step


def test_results_table_and_benchmark_cover_every_variant(output):
  with open(output / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(VARIANTS)
  table = (output / 'table1.md').read_text()
  for variant in VARIANTS:
    assert f'| {variant} | {TASK} |' in table, table
  bench = json.loads((output / 'bench' / 'decode.json').read_text())
  assert sorted(r['num_kv_heads'] for r in bench) == sorted(VARIANTS.values())
  assert all(r['time_per_sample_s'] > 0 for r in bench)


def test_a_rerun_reuses_every_stage(output, monkeypatch, capsys):
  monkeypatch.chdir(output.parent)
  assert cli.main(['quickstart', '--output', output.name]) == 0
  assert ' 0 stages run, ' in capsys.readouterr().out
