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

from gqa_jax import cli, train
from gqa_jax.experiments import grid as grid_lib
from gqa_jax.experiments import sweep

pytestmark = pytest.mark.quickstart_output

TASK = 'gqa_builtin_docstring'
# experiments/grids/quickstart.gin: from builtin:t5_mini, alpha 0.05, 250 finetuning steps.
SOURCE = grid_lib.source_step('builtin:t5_mini')
UPTRAIN, FINETUNE = train.uptrain_steps(0.05, SOURCE), 250
VARIANTS = {'MHA': 8, 'GQA-2': 2, 'MQA': 1}


@pytest.fixture(scope='module')
def output() -> Path:
  path = Path(os.environ.get('GQA_QUICKSTART_OUTPUT', 'gqa_quickstart')).resolve()
  if not (path / 'table1.md').is_file():
    pytest.fail(f'no quickstart output at {path}: run `gqa-jax quickstart` first (as '
                '.ci/run does) or set GQA_QUICKSTART_OUTPUT.')
  return path


def test_every_stage_left_its_checkpoint(output):
  assert SOURCE and UPTRAIN > 0
  assert not (output / 'pretrain').exists()  # it starts from the shipped checkpoint
  for name in ('GQA-2', 'MQA'):
    converted = output / 'convert' / 's0' / f'{name}_mean' / f'checkpoint_{SOURCE}'
    uptrained = (output / 'uptrain' / 's0' / f'{name}_mean_a0p05' /
                 f'checkpoint_{SOURCE + UPTRAIN}')
    assert converted.is_dir() and uptrained.is_dir(), name
  for run, step in ((f'MHA_none_a0_s0_{TASK}', SOURCE + FINETUNE),
                    (f'GQA-2_mean_a0p05_s0_{TASK}', SOURCE + UPTRAIN + FINETUNE),
                    (f'MQA_mean_a0p05_s0_{TASK}', SOURCE + UPTRAIN + FINETUNE)):
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
  assert '| best constant output |' in table and 'converted -> uptrained' in table
  bench = json.loads((output / 'bench' / 'decode.json').read_text())
  assert sorted(r['num_kv_heads'] for r in bench) == sorted(VARIANTS.values())
  assert all(r['time_per_sample_s'] > 0 for r in bench)


def test_a_rerun_reuses_every_stage(output, monkeypatch, capsys):
  monkeypatch.chdir(output.parent)
  assert cli.main(['quickstart', '--output', output.name]) == 0
  assert ' 0 stages run, ' in capsys.readouterr().out


def test_every_variant_learned_the_task_and_shows_its_conversion_gap(output):
  """Issue 15: input-dependent outputs (no degenerate warning), the constant floor beside
  the scores, and the conversion gap right after conversion and after uptraining."""
  with open(output / 'results.csv') as f:
    rows = {r['variant']: r for r in csv.DictReader(f)}
  for variant, row in rows.items():
    assert float(row['distinct_predictions']) >= sweep.DEGENERATE_BELOW, row
    assert float(row['gap']) > 0 and float(row['gap_converted']) > 0, row
  # Every run scores the same examples: their floor is computed once (~20 s of ROUGE).
  result = json.loads((output / 'runs' / rows['MHA']['run'] / 'result.json').read_text())
  floor = sweep.constant_floor('rougeL', result['predictions'])
  assert floor is not None and 0 < floor[0] < 100
  mha = float(rows['MHA']['gap'])
  assert float(rows['MHA']['gap_converted']) == mha  # the source itself
  for variant in ('GQA-2', 'MQA'):
    assert float(rows[variant]['gap_converted']) > mha, variant  # conversion costs
