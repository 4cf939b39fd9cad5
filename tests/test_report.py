"""experiments/REPORT.md against the sweep output committed beside it: the per-cell table
is what `sweep.summarize` makes of the committed per-run results.csv, and the report
quotes that table as it is."""

import csv
import json
from pathlib import Path

import pytest

from gqa_jax.experiments import grid as grid_lib
from gqa_jax.experiments import sweep

ROOT = Path(__file__).resolve().parents[1] / 'experiments'
REPORT = ROOT / 'REPORT.md'
RESULTS = ROOT / 'report'


def _rows():
  with open(RESULTS / 'results.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  number = lambda v, kind: None if v == '' else kind(v)
  return [{**r, 'kv_heads': int(r['kv_heads']), 'alpha': float(r['alpha']),
           'seed': int(r['seed']), 'score': float(r['score']), 'step': int(r['step']),
           'distinct_predictions': number(r['distinct_predictions'], float),
           'time_per_sample_s': number(r['time_per_sample_s'], float),
           'metrics': json.loads(r['metrics'])} for r in rows]


def test_results_md_is_the_summary_of_results_csv():
  grid = grid_lib.load_grid('experiments/grids/report.gin')
  rows = _rows()
  planned = len(grid_lib.plan(grid, '/tmp/unused'))
  assert len(rows) == planned == 54  # every run of the grid finished
  assert {r['seed'] for r in rows} == {0, 1, 2}
  assert (RESULTS / 'results.md').read_text() == sweep.results_markdown(rows, grid, planned)


def test_report_quotes_the_table_and_shows_the_figures():
  report = REPORT.read_text()
  cells_part = (RESULTS / 'results.md').read_text().split('## Paired contrasts')[0]
  table = [l for l in cells_part.splitlines() if l.startswith('| gqa')]
  assert len(table) == 18
  for line in table:
    assert line in report, line
  assert 'gqa-jax sweep experiments/grids/report.gin' in report
  for name in ('fig3_quality_vs_time.png', 'fig4_conversion_method.png',
               'fig5_uptraining.png', 'decode.png'):
    assert f'report/{name}' in report
    assert (RESULTS / name).read_bytes()[:4] == b'\x89PNG', name


@pytest.mark.parametrize('name', ['decode.md', 'decode.json'])
def test_benchmark_of_the_same_run_is_committed(name):
  assert (RESULTS / name).stat().st_size > 0
