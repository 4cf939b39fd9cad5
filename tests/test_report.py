"""experiments/REPORT.md against the sweep output committed beside it: results.md is what
`sweep.results_markdown` makes of the committed per-run rows (results.json; results.csv is
their flat view), and the report quotes its table as it is."""

import csv
import json
from pathlib import Path

import pytest

from gqa_jax.experiments import grid as grid_lib
from gqa_jax.experiments import sweep

ROOT = Path(__file__).resolve().parents[1] / 'experiments'
REPORT = ROOT / 'REPORT.md'
RESULTS = ROOT / 'report'


def test_results_md_is_the_summary_of_the_committed_rows():
  grid = grid_lib.load_grid('experiments/grids/report.gin')
  rows = sweep.load_rows(str(RESULTS))
  planned = len(grid_lib.plan(grid, '/tmp/unused'))
  assert len(rows) == planned == 80  # every run of the grid finished
  assert {r['seed'] for r in rows} == {0, 1, 2, 3, 4}
  assert (RESULTS / 'results.md').read_text() == sweep.results_markdown(rows, grid, planned)
  # results.csv is those rows' flat view.
  with open(RESULTS / 'results.csv', newline='') as f:
    assert f.read() == sweep.csv_text(rows)
  # The acceptance of the grid: every run writes input-dependent output.
  assert min(r['distinct_predictions'] for r in rows) >= 0.5
  with open(RESULTS / 'results.csv', newline='') as f:
    assert len(list(csv.DictReader(f))) == 80


def test_report_quotes_the_table_and_shows_the_figures():
  report = REPORT.read_text()
  cells_part = (RESULTS / 'results.md').read_text().split('## Paired contrasts')[0]
  table = [l for l in cells_part.splitlines() if l.startswith('| gqa')]
  assert len(table) == 16
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


def assert_grid_results_quoted(grid_file, bindings, folder, report, runs, cells,
                               prefix='| gqa'):
  """FOLDER/results.md is what the sweep makes of its committed rows (every planned run
  finished) and REPORT quotes each of its cell lines (those starting with `prefix`: the
  task's name, 'gap' in a gap-only grid) as they are."""
  grid = grid_lib.load_grid(grid_file, bindings)
  rows = sweep.load_rows(str(ROOT / folder))
  planned = len(grid_lib.plan(grid, '/tmp/unused'))
  assert len(rows) == planned == runs
  results = (ROOT / folder / 'results.md').read_text()
  assert results == sweep.results_markdown(rows, grid, planned)
  quoted = (ROOT / report).read_text()
  table = [l for l in results.split('## Paired contrasts')[0].splitlines()
           if l.startswith(prefix)]
  assert len(table) == cells
  for line in table:
    assert line in quoted, line


def test_wgqa_results_are_the_summary_of_their_rows_and_quoted():
  # The WGQA grid ran with two of its three seeds (--gin.Grid.seeds=[0,1]).
  assert_grid_results_quoted('experiments/grids/wgqa.gin', ['Grid.seeds = [0, 1]'], 'wgqa',
                             'WGQA.md', runs=30, cells=15)


def test_cla_results_are_the_summary_of_their_rows_and_quoted():
  # Every run of the grid, 3 seeds.
  assert_grid_results_quoted('experiments/grids/cla.gin', [], 'cla', 'CLA.md', runs=39,
                             cells=13)
  # The figure places every cell at its own model's cache: CLA-2 halves the bytes per
  # token of the same G (2 decoder layers, one producer), as the benchmark measured.
  records = {r['name']: r for r in json.loads((ROOT / 'cla' / 'decode.json').read_text())}
  for name in ('MHA', 'GQA-4', 'GQA-2', 'MQA'):
    assert records[f'{name}-CLA2']['kv_bytes_per_token'] * 2 == records[name]['kv_bytes_per_token']
  assert (ROOT / 'cla' / 'quality_vs_kv_bytes.png').read_bytes()[:4] == b'\x89PNG'


def test_conversion_results_are_the_summary_of_their_rows_and_quoted():
  # Every run of the grid (12 methods, two seeds): a gap-only grid, its cell lines start
  # with the task name 'gap'.
  assert_grid_results_quoted('experiments/grids/conversion.gin', [], 'conversion',
                             'CONVERSION.md', runs=126, cells=63, prefix='| gap')
  rows = sweep.load_rows(str(ROOT / 'conversion'))
  methods = {r['method'] for r in rows}
  assert {'mean', 'first', 'random', 'svd', 'procrustes', 'mean-sim', 'svd-cal',
          'procrustes-cal', 'svd-cal-sim'} <= methods
  assert {r['seed'] for r in rows} == {0, 1}
