"""Experiment grids and sweeps: planning, resuming, aggregating, and the quickstart run
end to end at a small step count."""

import json
import shlex
import statistics
from pathlib import Path

import pytest

from gqa_jax import cli
from gqa_jax.experiments import grid as grid_lib
from gqa_jax.experiments import sweep

TASK = 'gqa_builtin_docstring'


def _grid(**overrides):
  fields = dict(
      name='t', model_gin='experiments/quickstart/model.gin', kv_heads=[8, 2, 1],
      alphas=[0.0, 0.1], methods=['mean', 'first', 'random'], method_kv_heads=[1],
      seeds=[0, 1], tasks=[TASK], pretrain_gins=['runs/pretrain.gin'], pretrain_steps=100,
      uptrain_gins=['runs/uptrain.gin'], finetune_gins={TASK: ['runs/finetune.gin']},
      finetune_steps={TASK: 30}, eval_gins={TASK: ['runs/eval.gin']},
      metric={TASK: 'rougeL'})
  fields.update(overrides)
  return grid_lib.Grid(**fields)


def _flag(stage, name):
  return next(a.split('=', 1)[1] for a in stage.argv if a.startswith(f'--gin.{name}='))


def test_plan_expands_the_grid_and_shares_stages(tmp_path):
  runs = grid_lib.plan(_grid(), str(tmp_path), num_heads=8)
  # Per seed: MHA at alpha 0; GQA-2 mean x 2 alphas; MQA x 3 methods x 2 alphas.
  assert len(runs) == 2 * (1 + 2 + 6)
  assert len({r.name for r in runs}) == len(runs)
  by_name = {r.name: r for r in runs}
  mha = by_name[f'MHA_none_a0_s0_{TASK}']
  assert [s.kind for s in mha.stages] == ['pretrain', 'finetune', 'eval']
  mqa = by_name[f'MQA_random_a0p1_s1_{TASK}']
  assert [s.kind for s in mqa.stages] == ['pretrain', 'convert', 'uptrain', 'finetune', 'eval']
  assert mqa.stages[1].argv[:6] == ('convert', str(tmp_path / 'pretrain' / 's1'),
                                    str(tmp_path / 'convert' / 's1' / 'MQA_random'),
                                    '--num-kv-heads', '1', '--method')
  # TRAIN_STEPS is absolute: source steps + alpha x source steps + finetuning steps.
  assert _flag(mqa.stages[3], 'TRAIN_STEPS') == str(100 + 10 + 30)
  assert _flag(by_name[f'MQA_mean_a0_s0_{TASK}'].stages[2], 'TRAIN_STEPS') == '130'
  # One pretraining per seed, one conversion per (seed, variant, method).
  stages = {s.key: s for r in runs for s in r.stages}
  assert sum(s.kind == 'pretrain' for s in stages.values()) == 2
  assert sum(s.kind == 'convert' for s in stages.values()) == 2 * (1 + 3)
  assert sum(s.kind == 'uptrain' for s in stages.values()) == 2 * (1 + 3)
  assert stages['pretrain-s0'] is mha.stages[0]


def test_grid_errors_name_the_fix():
  with pytest.raises(ValueError, match='source_checkpoint'):
    _grid(pretrain_gins=[])
  with pytest.raises(ValueError, match='methods'):
    _grid(methods=['median'])
  with pytest.raises(ValueError, match='eval_gins'):
    _grid(eval_gins={})
  with pytest.raises(ValueError, match='does not divide'):
    grid_lib.plan(_grid(kv_heads=[3]), '/tmp/x', num_heads=8)


def test_a_source_checkpoints_step_is_read_from_its_folder_name(tmp_path):
  (tmp_path / 'run' / 'checkpoint_5').mkdir(parents=True)
  (tmp_path / 'run' / 'checkpoint_1200').mkdir()
  (tmp_path / 'plain').mkdir()
  assert grid_lib.source_step(str(tmp_path / 'run' / 'checkpoint_5')) == 5
  assert grid_lib.source_step(str(tmp_path / 'run')) == 1200  # the newest
  assert grid_lib.source_step(str(tmp_path / 'plain')) is None
  assert grid_lib.source_step('builtin:no_such_model') is None
  grid = _grid(source_checkpoint=str(tmp_path / 'run'), pretrain_gins=[], alphas=[0.05])
  runs = grid_lib.plan(grid, str(tmp_path / 'out'), num_heads=8)
  up = next(s for r in runs for s in r.stages if s.kind == 'uptrain')
  assert '--gin.UPTRAIN_SOURCE_STEPS=1200' in up.argv
  with pytest.raises(ValueError, match='set Grid.source_steps'):
    grid_lib.plan(_grid(source_checkpoint=str(tmp_path / 'plain'), pretrain_gins=[]),
                  str(tmp_path / 'out'), num_heads=8)


def test_report_grid_has_every_cell_with_five_seeds_from_the_shipped_checkpoint(tmp_path):
  grid = grid_lib.load_grid('experiments/grids/report.gin')
  runs = grid_lib.plan(grid, str(tmp_path))
  cells = {(r.variant, r.alpha, r.method) for r in runs}
  expected = {('MHA', 0.0, 'none')}
  expected |= {(v, a, 'mean') for v in ('GQA-4', 'GQA-2') for a in (0.0, 0.05, 0.1)}
  expected |= {('MQA', a, m) for a in (0.0, 0.05, 0.1) for m in ('mean', 'first', 'random')}
  assert cells == expected
  assert len(runs) == 5 * len(expected) == 80
  assert not any(s.kind == 'pretrain' for r in runs for s in r.stages)
  # Every G's conversion gap, right after conversion and after each uptraining.
  gaps = {s.output for r in runs for s in r.stages if s.kind == 'gap'}
  assert len(gaps) == 5 * (1 + 5 * 3)
  # The first grid (a model pretrained per seed, MHA uptrained too) is still there.
  v1 = grid_lib.plan(grid_lib.load_grid('experiments/grids/report_v1.gin'), str(tmp_path))
  assert {(r.variant, r.alpha) for r in v1 if r.variant == 'MHA'} == {
      ('MHA', a) for a in (0.0, 0.05, 0.1)}


class FakeRunner:
  """Records commands; eval stages write the summary a real eval would. Fails on
  demand, to interrupt a sweep."""

  def __init__(self, fail_at=None, examples=False):
    self.calls, self.fail_at, self.examples = [], fail_at, examples

  def __call__(self, argv):
    if self.fail_at is not None and len(self.calls) == self.fail_at:
      self.calls.append(('FAILED', *argv))
      return 1
    self.calls.append(tuple(argv))
    if argv[0] == 'eval':
      out = next(a for a in argv if a.startswith('--gin.EVAL_OUTPUT_DIR=')).split('=', 1)[1]
      out = Path(json.loads(out))
      out.mkdir(parents=True, exist_ok=True)
      if out.parent.parent.name == 'gap':  # gap/s<seed>/<variant>_<method>_<alpha>
        (out / 'summary_100.json').write_text(json.dumps(
            {'step': 100, 'metrics': {'gqa_builtin_span_corruption': {'nll': gap_of(out)}}}))
        if self.examples:  # per-example [log-likelihood, tokens] whose nll is gap_of(out)
          with open(out / 'gqa_builtin_span_corruption-000100.jsonl', 'w') as f:
            for tokens, noise in EXAMPLES:
              nll = gap_of(out) * (tokens + noise)
              f.write(json.dumps({'score': [-nll, tokens]}) + '\n')
        return 0
      score = 10.0 + len(self.calls) % 7
      (out / 'summary_130.json').write_text(json.dumps(
          {'step': 130, 'metrics': {TASK: {'rougeL': score, 'rouge1': score + 1}}}))
    return 0


# (tokens, offset): an example's nll is gap x (tokens + offset); the offsets sum to 0.
EXAMPLES = ((5, 0.5), (3, -0.5), (4, 0.25), (8, -0.25))


def gap_of(gap_dir: Path) -> float:
  """A made-up pretraining loss per gap folder: MHA 3, GQA-2 +0.2, MQA +0.5 (first +0.7,
  random +2), uptraining -0.1 per 0.1 of alpha, seed s adds s / 100."""
  variant, method, alpha = gap_dir.name.split('_')
  value = 3.0 + {'MHA': 0.0, 'GQA-2': 0.2, 'MQA': 0.5}[variant]
  value += {'none': 0.0, 'mean': 0.0, 'first': 0.2, 'random': 1.5}[method.split('-')[0]]
  value -= float(alpha[1:].replace('p', '.'))
  return value + int(gap_dir.parent.name[1:]) / 100


def test_interrupted_sweep_restarts_only_unfinished_stages(tmp_path):
  grid = _grid(seeds=[0], alphas=[0.1], methods=['mean'])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  all_stages = {s.key for r in runs for s in r.stages}
  first = FakeRunner(fail_at=4)
  with pytest.raises(grid_lib.StageFailed, match='status 1'):
    sweep.run_all(grid, runs, str(tmp_path), first, log=lambda m: None)
  done_before = [c for c in first.calls if c[0] != 'FAILED']
  assert len(done_before) == 4
  # MHA (pretrain, finetune, eval) finished before the failure: its result is written and
  # aggregation of the interrupted sweep lists it alone.
  assert [r.variant for r in runs if (tmp_path / 'runs' / r.name / 'result.json').exists()] \
      == ['MHA']
  rows = sweep.aggregate(grid, runs, str(tmp_path))
  assert [r['variant'] for r in rows] == ['MHA']
  assert f'1 of {len(runs)} runs finished' in (tmp_path / 'results.md').read_text()
  second = FakeRunner()
  counts = sweep.run_all(grid, runs, str(tmp_path), second, log=lambda m: None)
  assert counts['ran'] == len(all_stages) - 4 and counts['skipped'] == 4
  assert not set(second.calls) & set(done_before)  # nothing finished runs again
  assert first.calls[4][1:] == second.calls[0]  # the failed stage is retried first
  third = FakeRunner()
  assert sweep.run_all(grid, runs, str(tmp_path), third, log=lambda m: None)['ran'] == 0
  assert third.calls == []
  # Dry run after completion marks every stage done.
  text = sweep.dry_run(grid, runs, str(tmp_path))
  assert '[todo]' not in text and text.count('[done]') == sum(len(r.stages) for r in runs)


def _child(tmp_path, exit_status=0):
  """A stand-in for `gqa-jax sweep --only RUN`: notes when it ran, marks the run's stages
  done (as the real one would), prints a line, exits with `exit_status` for run 'fail'."""
  script = tmp_path / 'child.py'
  script.write_text(
      'import json, sys, time\n'
      'name, log, markers = sys.argv[1], sys.argv[2], sys.argv[3:]\n'
      'start = time.time(); time.sleep(0.3)\n'
      'with open(log, "a") as f: f.write(json.dumps([name, start, time.time()]) + "\\n")\n'
      'print(f"last line of {name}")\n'
      f'if "MQA" in name and {exit_status}: sys.exit({exit_status})\n'
      'for m in markers: open(m, "w").write(json.dumps({"command": None}))\n')
  return script


def test_jobs_run_each_run_in_its_own_process_at_most_n_at_once(tmp_path):
  """`sweep --jobs N`: N processes at a time, each run's output in OUTPUT/logs/RUN.log;
  finished runs are not started again; a failure names the run, its last line and log."""
  import sys
  grid = _grid(seeds=[0, 1], alphas=[0.1], methods=['mean'])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  times = tmp_path / 'times.jsonl'
  script = _child(tmp_path)
  def command(run):
    markers = [str(grid_lib._marker(str(tmp_path), s)) for s in run.stages]
    (tmp_path / '.done').mkdir(exist_ok=True)
    return [sys.executable, str(script), run.name, str(times), *markers]
  counts = sweep.run_parallel(runs, str(tmp_path), command, jobs=2, log=lambda m: None)
  assert counts == {'runs': len(runs), 'ran': len(runs), 'skipped': 0}
  spans = [json.loads(line)[1:] for line in times.read_text().splitlines()]
  assert len(spans) == len(runs) == 6
  most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
  assert most == 2, spans  # two at once, never three
  for run in runs:
    assert (tmp_path / 'logs' / f'{run.name}.log').read_text() == f'last line of {run.name}\n'
  again = sweep.run_parallel(runs, str(tmp_path), command, jobs=2, log=lambda m: None)
  assert again == {'runs': 6, 'ran': 0, 'skipped': 6}
  # A failing run: the others already started finish, nothing new starts, the error
  # names the run, its last line and its log.
  out = tmp_path / 'failing'
  script = _child(tmp_path, exit_status=3)
  runs = grid_lib.plan(grid, str(out), num_heads=8)
  def failing(run):
    (out / '.done').mkdir(parents=True, exist_ok=True)
    return [sys.executable, str(script), run.name, str(times),
            *[str(grid_lib._marker(str(out), s)) for s in run.stages]]
  with pytest.raises(grid_lib.StageFailed,
                     match=r'MQA_mean_a0p1_s0.*status 3: last line of MQA.*logs/MQA'):
    sweep.run_parallel(runs, str(out), failing, jobs=1, log=lambda m: None)
  assert not (out / 'logs' / f'{runs[-1].name}.log').exists()  # seed 1 never started


@pytest.mark.parametrize('status,name', [(130, 'SIGINT'), (143, 'SIGTERM')])
def test_a_stage_stopped_by_a_signal_is_not_done_and_says_rerun(tmp_path, status, name):
  """`gqa-jax train` exits 128 + signal after saving where Ctrl-C or a preemption stopped
  it: the stage is not marked done, and the message says how to resume."""
  stage = grid_lib.plan(_grid(seeds=[0]), str(tmp_path), num_heads=8)[0].stages[0]
  with pytest.raises(grid_lib.StageFailed, match=f'stopped by {name} after saving.*rerun'):
    grid_lib.execute(stage, str(tmp_path), lambda argv: status, log=lambda m: None)
  assert not grid_lib.is_done(str(tmp_path), stage)
  assert grid_lib.execute(stage, str(tmp_path), lambda argv: 0, log=lambda m: None)


def test_aggregate_writes_csv_markdown_and_figures(tmp_path):
  grid = _grid(seeds=[0, 1], alphas=[0.0, 0.1], methods=['mean', 'first'])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  sweep.run_all(grid, runs, str(tmp_path), FakeRunner(), log=lambda m: None)
  (tmp_path / 'bench').mkdir()
  (tmp_path / 'bench' / 'decode.json').write_text(json.dumps(
      [{'num_kv_heads': k, 'time_per_sample_s': 0.001 * k} for k in (8, 2, 1)]))
  rows = sweep.aggregate(grid, runs, str(tmp_path))
  assert len(rows) == len(runs)
  csv_lines = (tmp_path / 'results.csv').read_text().splitlines()
  assert csv_lines[0].split(',') == list(sweep.CSV_FIELDS) and len(csv_lines) == len(runs) + 1
  # results.json holds the rows in full: results.md can be remade from it alone.
  assert sweep.load_rows(str(tmp_path)) == json.loads(json.dumps(rows))
  assert sweep.results_markdown(sweep.load_rows(str(tmp_path)), grid, len(runs)) == (
      tmp_path / 'results.md').read_text()
  cells = sweep.summarize(rows)
  for c in cells:
    scores = [r['score'] for r in rows if (r['kv_heads'], r['alpha'], r['method']) ==
              (c['kv_heads'], c['alpha'], c['method'])]
    assert c['n'] == len(scores) == 2
    assert c['mean'] == pytest.approx(sum(scores) / 2)
    assert c['min'] == min(scores) and c['max'] == max(scores)
  md = (tmp_path / 'results.md').read_text()
  assert f'{len(runs)} of {len(runs)} runs finished' in md
  for name in ('fig3_quality_vs_time.png', 'fig4_conversion_method.png', 'fig5_uptraining.png'):
    assert (tmp_path / name).read_bytes()[:4] == b'\x89PNG', name
  table = sweep.table1(cells)
  for variant in ('MHA', 'GQA-2', 'MQA'):
    assert f'| {variant} |' in table


def test_emit_commands_and_dry_run_via_cli(tmp_path, capsys):
  out = tmp_path / 'out'
  assert cli.main(['sweep', 'experiments/grids/report.gin', '--output', str(out),
                   '--emit-commands', str(tmp_path / 'emit'),
                   '--gin.Grid.seeds=[0]']) == 0
  lines = (tmp_path / 'emit' / 'commands.txt').read_text().splitlines()
  assert len(lines) == 16
  argv = shlex.split(lines[0])
  assert argv[:2] == ['gqa-jax', 'sweep'] and '--only' in argv
  assert '#SBATCH --array=0-15' in (tmp_path / 'emit' / 'array.sbatch').read_text()
  capsys.readouterr()
  assert cli.main(['sweep', 'experiments/grids/report.gin', '--output', str(out),
                   '--dry-run', '--gin.Grid.seeds=[0]', '--only',
                   f'MQA_first_a0p05_s0_{TASK}']) == 0
  text = capsys.readouterr().out
  assert text.count('## ') == 2  # the run, and the decoding benchmark
  assert 'gqa-jax convert' in text and '--method first' in text
  assert cli.main(['sweep', 'experiments/grids/report.gin', '--output', str(out),
                   '--dry-run', '--only', 'nope']) == 2


def test_a_grid_in_the_users_folder_reaches_every_stage_and_emitted_command(
    tmp_path, monkeypatch, capsys):
  # A model gin found only through --gin_search_paths: train, eval AND the benchmark
  # stage get the path, and so do the emitted per-run commands (absolute: a job array's
  # tasks start elsewhere).
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'my_model.gin').write_text("include 'experiments/quickstart/model.gin'\n")
  monkeypatch.chdir(tmp_path)
  base = ['sweep', 'experiments/grids/report.gin', '--output', 'out',
          '--gin_search_paths', 'mine', "--gin.Grid.model_gin='my_model.gin'",
          '--gin.Grid.seeds=[0]']
  assert cli.main([*base, '--dry-run']) == 0
  commands = [l for l in capsys.readouterr().out.splitlines() if 'gqa-jax ' in l]
  gin_commands = [l for l in commands if '--gin_file=my_model.gin' in l]
  assert any(' bench decode ' in l for l in gin_commands)
  assert gin_commands and all('--gin_search_paths=mine' in l for l in gin_commands)
  assert cli.main([*base, '--emit-commands', 'emit']) == 0
  argv = shlex.split((tmp_path / 'emit' / 'commands.txt').read_text().splitlines()[0])
  assert argv[argv.index('--gin_search_paths') + 1] == str(mine)


@pytest.mark.parametrize('grid_file', ['experiments/grids/paper_xxl.gin',
                                       'experiments/grids/report.gin',
                                       'experiments/grids/wgqa.gin',
                                       'experiments/grids/conversion.gin'])
def test_every_planned_gin_command_parses_with_nothing_required(grid_file, tmp_path):
  """What a sweep would run is valid: each distinct train/eval stage's flags go through
  the CLI's parser and gin, and leave no %gin.REQUIRED value unset."""
  import gin
  from gqa_jax import evaluation, gin_utils, train
  grid = grid_lib.load_grid(grid_file)
  runs = grid_lib.plan(grid, str(tmp_path))
  seen = set()
  for run in runs:
    for stage in run.stages:
      kind = (stage.kind, run.task if stage.kind in ('finetune', 'eval') else '',
              run.variant == 'MHA')
      if kind in seen:
        continue
      seen.add(kind)
      if stage.kind in ('convert', 'calibrate'):  # no gin: their flags parse
        cli.build_parser().parse_args(list(stage.argv))
        continue
      args = cli.build_parser().parse_args(gin_utils.rewrite_gin_args(list(stage.argv)))
      gin_utils.parse(args.gin_file, args.gin_bindings)
      fn = evaluation.evaluate if stage.argv[0] == 'eval' else train.train
      assert gin.REQUIRED not in gin.get_bindings(fn).values(), stage.command()
      config = gin_utils.call(__import__('gqa_jax.models').models.EncoderDecoderModel)
      cfg = config.module.config
      expected = cfg.num_heads if stage.kind == 'pretrain' else run.kv_heads
      assert cfg.kv_heads('decoder_self') == expected, stage.command()
      assert cfg.kv_heads('decoder_cross') == expected and cfg.kv_heads('encoder') == cfg.num_heads


def test_only_one_run_leaves_the_grid_summary_alone(tmp_path, monkeypatch, capsys):
  """A job-array task (--only RUN) runs its run and prints its result; it does not
  overwrite results.csv with a one-run summary (that is --aggregate-only's job)."""
  runner = FakeRunner()
  monkeypatch.setattr(cli, 'main', lambda argv, _main=cli.main: (
      runner(argv) if argv and argv[0] != 'sweep' else _main(argv)))
  name = f'MHA_none_a0_s0_{TASK}'
  argv = ['sweep', 'experiments/grids/quickstart.gin', '--output', str(tmp_path),
          '--gin.Grid.bench_args=None']
  assert cli.main([*argv, '--only', name]) == 0
  assert json.loads(capsys.readouterr().out.strip())['run'] == name
  # From the shipped checkpoint: its conversion gap, finetuning and evaluation.
  assert [c[0] for c in runner.calls] == ['eval', 'train', 'eval']
  assert not (tmp_path / 'results.csv').exists()
  assert cli.main([*argv, '--aggregate-only']) == 0
  assert '1 of 3 runs finished' in (tmp_path / 'results.md').read_text()


def test_the_conversion_gap_is_scored_where_finetuning_starts(tmp_path):
  """Grid.gap_gins: one gap eval per checkpoint a finetuning starts from (the source
  MHA model, a conversion at alpha 0, an uptraining), before the finetuning; the sweep
  reports it and its paired difference from the source model of the same seed."""
  grid = _grid(gap_gins=['runs/eval.gin', 'experiments/quickstart/eval.gin'])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  for run in runs:
    kinds = [s.kind for s in run.stages]
    assert kinds[-3:] == ['gap', 'finetune', 'eval'], kinds
    gap, finetune = run.stages[-3], run.stages[-2]
    assert _flag(gap, 'CHECKPOINT_PATH') == _flag(finetune, 'INITIAL_CHECKPOINT_PATH')
  by_name = {r.name: r for r in runs}
  assert _flag(by_name[f'MHA_none_a0_s1_{TASK}'].stages[-3], 'CHECKPOINT_PATH') == json.dumps(
      str(tmp_path / 'pretrain' / 's1'))
  stages = {s.key: s for r in runs for s in r.stages}
  assert sum(s.kind == 'gap' for s in stages.values()) == 2 * (1 + 2 + 6)
  sweep.run_all(grid, runs, str(tmp_path), FakeRunner(), log=lambda m: None)
  rows = sweep.aggregate(grid, runs, str(tmp_path))
  by_run = {r['run']: r for r in rows}
  assert by_run[f'MQA_first_a0_s1_{TASK}']['gap'] == pytest.approx(3.0 + 0.5 + 0.2 + 0.01)
  cells = {(c['variant'], c['alpha'], c['method']): c for c in sweep.summarize(rows)}
  # Paired with the source model of the same seed, the seed offsets cancel exactly.
  assert cells[('MQA', 0.0, 'random')]['gap_delta_mean'] == pytest.approx(2.0)
  assert cells[('MQA', 0.0, 'random')]['gap_delta_std'] == pytest.approx(0.0, abs=1e-12)
  assert cells[('MQA', 0.1, 'mean')]['gap_delta_mean'] == pytest.approx(0.4)
  assert cells[('GQA-2', 0.0, 'mean')]['gap_mean'] == pytest.approx(3.2 + 0.005)
  md = (tmp_path / 'results.md').read_text()
  assert 'gap: pretraining nll | gap minus MHA (paired) |' in md
  assert '| 5.005 | +2.000 [+2.000, +2.000] * |' in md  # MQA random at alpha 0
  assert '| 3.205 | +0.200 [+0.200, +0.200] * |' in md  # GQA-2 mean at alpha 0
  # Uptrained runs also score the conversion itself, before uptraining (a shared stage).
  up_run = by_name[f'MQA_mean_a0p1_s1_{TASK}']
  assert [s.kind for s in up_run.stages] == ['pretrain', 'convert', 'gap', 'uptrain', 'gap',
                                             'finetune', 'eval']
  assert _flag(up_run.stages[2], 'CHECKPOINT_PATH') == json.dumps(up_run.stages[1].output)
  assert up_run.stages[2] is by_name[f'MQA_mean_a0_s1_{TASK}'].stages[-3]
  assert by_run[f'MQA_mean_a0p1_s1_{TASK}']['gap_converted'] == pytest.approx(3.51)
  assert cells[('MQA', 0.1, 'mean')]['gap_converted_delta_mean'] == pytest.approx(0.5)
  assert 'gap at conversion minus MHA (paired) |' in md
  table = sweep.table1(list(cells.values()), alpha=0.1)
  assert 'converted -> uptrained' in table
  assert '| 3.505 (+0.500) -> 3.405 (+0.400) |' in table
  # With the gap eval's per-example scores, the interval covers the evaluation sample
  # too: a conversion that is the same every seed no longer gets a zero width.
  out = tmp_path / 'examples'
  runs = grid_lib.plan(grid, str(out), num_heads=8)
  sweep.run_all(grid, runs, str(out), FakeRunner(examples=True), log=lambda m: None)
  rows = sweep.aggregate(grid, runs, str(out))
  row = next(r for r in rows if r['run'] == f'MQA_random_a0_s1_{TASK}')
  assert row['gap_examples'] == [[pytest.approx(row['gap'] * (t + e)), t] for t, e in EXAMPLES]
  cell = next(c for c in sweep.summarize(rows)
              if (c['variant'], c['alpha'], c['method']) == ('MQA', 0.0, 'random'))
  assert cell['gap_delta_mean'] == pytest.approx(2.0) and cell['gap_delta_examples'] == 4
  assert cell['gap_delta_lo'] < 2.0 - 0.01 and cell['gap_delta_hi'] > 2.0 + 0.01
  # Without gap_gins nothing changes: no gap stage, no gap column.
  plain = grid_lib.plan(_grid(), str(tmp_path / 'plain'), num_heads=8)
  assert not any(s.kind == 'gap' for r in plain for s in r.stages)


def test_a_grid_without_tasks_scores_the_conversion_gap_alone(tmp_path):
  """No tasks, gap_gins set: each run ends with its gap eval, which is its score (paired
  with the source model of its seed); a method_options entry with kv_heads runs only for
  those G. Without gap_gins an empty task list is refused."""
  grid = _grid(tasks=[], finetune_gins={}, finetune_steps={}, eval_gins={}, metric={},
               methods=['mean', 'first', 'mean-sim'], method_kv_heads=None,
               method_options={'mean-sim': {'convert': ['--method', 'mean', '--grouping',
                                                        'similarity'], 'kv_heads': [2]}},
               gap_gins=['runs/eval.gin', 'experiments/quickstart/eval.gin'])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  by_name = {r.name: r for r in runs}
  assert len(runs) == 2 * (1 + 3 * 2 + 2 * 2)  # MHA; GQA-2 x 3 methods; MQA x 2
  assert 'MQA_mean-sim_a0_s0' not in by_name and 'GQA-2_mean-sim_a0p1_s1' in by_name
  assert [s.kind for s in by_name['GQA-2_mean_a0p1_s0'].stages] == [
      'pretrain', 'convert', 'gap', 'uptrain', 'gap']
  assert [s.kind for s in by_name['MHA_none_a0_s0'].stages] == ['pretrain', 'gap']
  assert by_name['GQA-2_mean-sim_a0_s0'].stages[1].argv[6:9] == ('mean', '--grouping',
                                                                 'similarity')
  sweep.run_all(grid, runs, str(tmp_path), FakeRunner(), log=lambda m: None)
  rows = {r['run']: r for r in sweep.aggregate(grid, runs, str(tmp_path))}
  assert len(rows) == len(runs)
  row = rows['MQA_first_a0p1_s1']
  assert row['metric'] == 'nll' and row['score'] == row['gap'] == pytest.approx(3.61)
  assert row['gap_converted'] == pytest.approx(3.71)
  assert (tmp_path / 'runs' / 'MQA_first_a0p1_s1' / 'result.json').exists()
  cells = {(c['variant'], c['alpha'], c['method']): c for c in sweep.summarize(rows.values())}
  assert cells[('MQA', 0.1, 'first')]['gap_delta_mean'] == pytest.approx(0.6)
  assert 'gap minus MHA (paired)' in (tmp_path / 'results.md').read_text()
  with pytest.raises(ValueError, match='gap_gins for a grid that only scores'):
    _grid(tasks=[], finetune_gins={}, finetune_steps={}, eval_gins={}, metric={})


def test_stage_times_count_each_finished_stage_once_per_kind_and_method(tmp_path):
  grid = _grid(seeds=[0, 1], alphas=[0.0, 0.1], methods=['mean', 'first'])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  sweep.run_all(grid, runs, str(tmp_path), FakeRunner(), log=lambda m: None)
  stages = {s.key: s for run in runs for s in run.stages}
  seconds = {}
  for i, (key, stage) in enumerate(sorted(stages.items())):  # known, distinct times
    seconds[key] = float(i + 1)
    marker = grid_lib._marker(str(tmp_path), stage)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), 'seconds': i + 1.0}))
  unfinished = sorted(stages)[0]  # a stage without a marker is left out
  grid_lib._marker(str(tmp_path), stages[unfinished]).unlink()
  del seconds[unfinished]
  sweep.aggregate(grid, runs, str(tmp_path))
  table = (tmp_path / 'stage_times.md').read_text()
  rows = [l.split('|')[1:-1] for l in table.splitlines() if l.startswith('| ') and
          not l.startswith('| stage')]
  got = {(k.strip(), m.strip()): (int(n), float(total)) for k, m, n, _, total in rows}
  want = {}
  for key, t in seconds.items():
    methods = {r.method for r in runs if key in {s.key for s in r.stages}}
    group = (stages[key].kind, methods.pop() if len(methods) == 1 else 'shared')
    n, total = want.get(group, (0, 0.0))
    want[group] = (n + 1, total + t)
  assert got == {g: (n, float(f'{total:.0f}')) for g, (n, total) in want.items()}
  assert ('pretrain', 'shared') in got and ('convert', 'first') in got
  assert f'{len(seconds)} finished stages, {sum(seconds.values()):.0f} s' in table


def test_conversions_that_read_calibration_statistics_run_after_one_calibrate_stage(
    tmp_path):
  options = {'svd-cal': {'convert': ['--method', 'svd', '--calibration', '{calibration}']}}
  grid = _grid(methods=['mean', 'svd-cal'], method_options=options, method_kv_heads=None,
               calibrate_args=['--task', 'gqa_builtin_span_corruption', '--num-examples', '64'])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  by_name = {r.name: r for r in runs}
  stats = str(tmp_path / 'calibrate' / 's1' / 'stats.npz')
  cal = by_name[f'MQA_svd-cal_a0p1_s1_{TASK}']
  assert [s.kind for s in cal.stages][:3] == ['pretrain', 'calibrate', 'convert']
  assert cal.stages[1].argv == ('calibrate', str(tmp_path / 'pretrain' / 's1'), '--task',
                                'gqa_builtin_span_corruption', '--num-examples', '64',
                                '--output', stats, '--quiet')
  assert cal.stages[2].argv[5:9] == ('--method', 'svd', '--calibration', stats)
  assert by_name[f'GQA-2_svd-cal_a0_s1_{TASK}'].stages[1] is cal.stages[1]  # one per source
  assert 'calibrate' not in [s.kind for s in by_name[f'MQA_mean_a0_s1_{TASK}'].stages]
  with pytest.raises(ValueError, match='set calibrate_args'):
    _grid(methods=['mean', 'svd-cal'], method_options=options)


def test_summarize_pairs_each_run_with_the_mha_runs_of_its_seed():
  def row(variant, k, seed, score, alpha=0.0, method='mean'):
    return {'task': 't', 'variant': variant, 'kv_heads': k, 'alpha': alpha, 'method': method,
            'seed': seed, 'metric': 'rougeL', 'score': score, 'time_per_sample_s': None}
  rows = [row('MHA', 8, 0, 10.0, method='none'), row('MHA', 8, 1, 20.0, method='none'),
          row('MQA', 1, 0, 9.0), row('MQA', 1, 1, 18.0), row('MQA', 1, 2, 5.0),
          row('GQA-2', 2, 2, 7.0)]  # seed 2 has no MHA run: not paired
  cells = {c['variant']: c for c in sweep.summarize(rows)}
  mqa = cells['MQA']
  assert mqa['n'] == 3 and mqa['mean'] == pytest.approx(32.0 / 3)
  # Pairs (9 - 10, 18 - 20): mean -1.5, sample std of (-1, -2) = sqrt(0.5).
  assert mqa['delta_n'] == 2
  assert mqa['delta_mean'] == pytest.approx(-1.5)
  assert mqa['delta_std'] == pytest.approx(0.5 ** 0.5)
  assert cells['GQA-2']['delta_mean'] is None and cells['GQA-2']['delta_n'] == 0
  assert cells['MHA']['delta_mean'] == 0.0
  # 95% interval, Student t with 1 degree of freedom (t = 12.7062 from a t table):
  # -1.5 +- 12.7062 * sqrt(0.5) / sqrt(2) = -1.5 +- 6.3531: not resolved.
  assert mqa['delta_lo'] == pytest.approx(-7.8531, abs=1e-4)
  assert mqa['delta_hi'] == pytest.approx(4.8531, abs=1e-4)
  assert mqa['delta_resolved'] is False
  md = sweep.format_cells(sweep.summarize(rows), _grid(), 6, 6)
  assert '| -1.500 [-7.853, +4.853] |' in md and 'same alpha' not in md
  # An uptrained MHA (alpha 0.1, seed 0 only) is the compute-matched reference of the
  # alpha-0.1 runs; the alpha-0 reference stays the source model.
  rows += [row('MHA', 8, 0, 12.0, alpha=0.1, method='none'), row('MQA', 1, 0, 11.5, alpha=0.1),
           row('MQA', 1, 1, 19.0, alpha=0.1)]
  cells = {(c['variant'], c['alpha']): c for c in sweep.summarize(rows)}
  up = cells[('MQA', 0.1)]
  assert up['delta_mean'] == pytest.approx(((11.5 - 10) + (19 - 20)) / 2) and up['delta_n'] == 2
  assert up['matched_delta_mean'] == pytest.approx(-0.5) and up['matched_delta_n'] == 1
  assert cells[('MQA', 0.0)]['matched_delta_mean'] == pytest.approx(-1.5)
  md = sweep.format_cells(sweep.summarize(rows), _grid(), 9, 9)
  # (1.5, -1): 0.25 +- 12.7062 * 1.76777 / sqrt(2) = 0.25 +- 15.883; one matched pair: no
  # interval.
  assert 'minus MHA at same alpha' in md and '| +0.250 [-15.633, +16.133] | -0.500 (n=1) |' in md


def test_contrasts_pair_methods_neighbouring_g_and_alphas_by_seed():
  def row(variant, k, seed, score, alpha=0.0, method='mean', gap=None):
    return {'task': 't', 'variant': variant, 'kv_heads': k, 'alpha': alpha, 'method': method,
            'seed': seed, 'metric': 'rougeL', 'score': score, 'gap': gap}
  rows = [row('MHA', 8, s, 20.0, method='none') for s in range(3)]
  rows += [row('MQA', 1, s, 10.0 + s, method='first', gap=5.0) for s in range(3)]
  # mean beats first by 1, 2, 3 (seed 3 has no first run: left out of the pair)
  rows += [row('MQA', 1, s, 11.0 + 2 * s, gap=4.0 + s) for s in range(4)]
  rows += [row('GQA-2', 2, s, 15.0, gap=3.0) for s in range(3)]
  rows += [row('MQA', 1, s, 14.0 + 2 * s, alpha=0.1) for s in range(4)]
  entries = {(e['a'], e['b']): e for e in sweep.contrasts(rows)}
  assert set(entries) == {('MQA mean alpha 0', 'MQA first alpha 0'),
                          ('GQA-2 mean alpha 0', 'MQA mean alpha 0'),
                          ('MQA mean alpha 0.1', 'MQA mean alpha 0')}
  method = entries[('MQA mean alpha 0', 'MQA first alpha 0')]
  # (1, 2, 3): mean 2, sd 1; t(0.975, 2) = 4.3027 (t table): 2 +- 4.3027 / sqrt(3).
  assert (method['kind'], method['score_n']) == ('method', 3)
  assert method['score_lo'] == pytest.approx(2 - 2.4841, abs=1e-4)
  assert method['score_hi'] == pytest.approx(2 + 2.4841, abs=1e-4)
  assert method['score_resolved'] is False
  assert method['gap_mean'] == pytest.approx(-0.0)  # gaps (-1, 0, 1)
  # Four seeds of +3 each: no spread, a zero-width interval excluding 0.
  alpha = entries[('MQA mean alpha 0.1', 'MQA mean alpha 0')]
  assert alpha['score_n'] == 4 and alpha['score_resolved'] is True
  assert alpha['gap_n'] == 0 and alpha['gap_mean'] is None
  md = sweep.format_contrasts(sweep.contrasts(rows))
  assert '| t | method | MQA mean alpha 0 | MQA first alpha 0 | +2.000 [-0.484, +4.484] |' in md
  assert '| t | alpha | MQA mean alpha 0.1 | MQA mean alpha 0 | +3.000 [+3.000, +3.000] * |' in md
  assert sweep.format_contrasts([]) == ''
  # A method of Grid.method_options (WGQA) is compared with mean pooling at its G.
  rows += [row('MQA', 1, s, 12.0 + 2 * s, method='wgqa-col') for s in range(4)]
  entries = {(e['a'], e['b']): e for e in sweep.contrasts(rows)}
  wgqa = entries[('MQA wgqa-col alpha 0', 'MQA mean alpha 0')]
  assert (wgqa['kind'], wgqa['score_n'], wgqa['score_mean']) == ('method', 4, 1.0)


def test_paired_intervals_match_t_tables_and_flag_resolved_differences():
  # t(0.975, 4) = 2.7764 (t table): 3 +- 2.7764 * 1.58114 / sqrt(5) = 3 +- 1.9632.
  mean, lo, hi = sweep.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  assert (mean, lo, hi) == (pytest.approx(3.0), pytest.approx(1.0368, abs=1e-4),
                            pytest.approx(4.9632, abs=1e-4))
  # t(0.975, 9) = 2.2622: differences straddling 0 are not resolved.
  values = [0.5, -0.4, 0.3, -0.2, 0.1, 0.0, 0.2, -0.3, 0.4, -0.1]
  _, lo, hi = sweep.mean_interval(values)
  half = 2.2622 * statistics.stdev(values) / 10 ** 0.5
  assert lo == pytest.approx(0.05 - half, abs=1e-4) and hi == pytest.approx(0.05 + half, abs=1e-4)
  assert sweep.mean_interval([2.0]) == (2.0, None, None)

  def row(variant, k, seed, score):
    return {'task': 't', 'variant': variant, 'kv_heads': k, 'alpha': 0.0,
            'method': 'none' if k == 8 else 'mean', 'seed': seed, 'metric': 'nll',
            'score': score, 'time_per_sample_s': None}
  rows = [row('MHA', 8, s, 5.0 + 0.1 * s) for s in range(5)]
  rows += [row('MQA', 1, s, 5.3 + 0.1 * s + 0.01 * (-1) ** s) for s in range(5)]   # clear
  rows += [row('GQA-2', 2, s, 5.0 + 0.1 * s + 0.05 * (-1) ** s) for s in range(5)]  # noise
  cells = {c['variant']: c for c in sweep.summarize(rows)}
  assert cells['MQA']['delta_resolved'] is True and cells['GQA-2']['delta_resolved'] is False
  md = sweep.format_cells(list(cells.values()), _grid(), 15, 15)
  (mqa_line,) = [l for l in md.splitlines() if '| MQA |' in l]
  (gqa_line,) = [l for l in md.splitlines() if '| GQA-2 |' in l]
  assert '] * |' in mqa_line and '] * |' not in gqa_line
  assert 'excludes 0' in md


def test_cells_carry_the_means_of_the_tasks_other_metrics():
  def row(seed, nll, rouge):
    return {'task': 't', 'variant': 'MQA', 'kv_heads': 1, 'alpha': 0.0, 'method': 'mean',
            'seed': seed, 'metric': 'nll', 'score': nll, 'time_per_sample_s': 0.002,
            'metrics': {'nll': nll, 'rougeL': rouge, 'rouge1': 2 * rouge}}
  rows = [row(0, 5.0, 10.0), row(1, 6.0, 13.0)]
  rows[1]['metrics'].pop('rouge1')  # only in one run: no mean
  (cell,) = sweep.summarize(rows)
  assert cell['mean'] == pytest.approx(5.5)
  assert cell['others'] == {'rougeL': pytest.approx(11.5)}
  md = sweep.format_cells([cell], _grid(), 2, 2)
  assert '| 2.00 | rougeL 11.50 |' in md and 'nll: the references' in md
  assert '| MQA | t | 2.00 |  | 5.50 +- 0.71 | 2 | rougeL 11.50 |' in sweep.table1([cell])
  assert '| nll | n |' in sweep.table1([cell])


def test_a_changed_grid_is_refused_in_an_old_output_folder(tmp_path, capsys):
  grid = _grid(seeds=[0], alphas=[0.1], methods=['mean'], kv_heads=[8])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  sweep.run_all(grid, runs, str(tmp_path), FakeRunner(), log=lambda m: None)
  # Same stage names, different finetuning length: the old outputs must not be reused.
  changed = _grid(seeds=[0], alphas=[0.1], methods=['mean'], kv_heads=[8],
                  finetune_steps={TASK: 31})
  new_runs = grid_lib.plan(changed, str(tmp_path), num_heads=8)
  runner = FakeRunner()
  with pytest.raises(grid_lib.StageChanged, match='different command.*new --output'):
    sweep.run_all(changed, new_runs, str(tmp_path), runner, log=lambda m: None)
  assert runner.calls == []
  text = sweep.dry_run(changed, new_runs, str(tmp_path))
  assert '[changed]' in text and '[done] gqa-jax train' in text  # pretraining unchanged
  with pytest.raises(grid_lib.StageChanged):
    sweep.aggregate(changed, new_runs, str(tmp_path))
  # Through the command line: one line naming the fix, exit status 2.
  assert cli.main(['sweep', 'experiments/grids/quickstart.gin', '--output', str(tmp_path / 'q'),
                   '--dry-run']) == 0
  marker = tmp_path / 'q' / '.done' / 'convert-s0-MQA-mean.json'
  marker.parent.mkdir(parents=True)
  marker.write_text(json.dumps({'command': 'gqa-jax train --something-else'}))
  capsys.readouterr()
  assert cli.main(['sweep', 'experiments/grids/quickstart.gin', '--output', str(tmp_path / 'q'),
                   '--aggregate-only']) == 2
  assert 'different command' in capsys.readouterr().err


def test_runs_with_near_constant_predictions_are_flagged(tmp_path):
  grid = _grid(seeds=[0, 1], alphas=[0.1], methods=['mean'], kv_heads=[8, 1])
  runs = grid_lib.plan(grid, str(tmp_path), num_heads=8)
  sweep.run_all(grid, runs, str(tmp_path), FakeRunner(), log=lambda m: None)
  by = {(r.variant, r.seed): r for r in runs}

  def predictions(run, outputs):  # what seqio's JSONLogger writes, one line per example
    path = Path(run.stages[-1].output) / f'{TASK}-000130.jsonl'
    path.write_text(''.join(json.dumps({'prediction': o, 'target': 't'}) + '\n'
                            for o in outputs))
    return path

  # 10 examples: 1 distinct output (degenerate), 10 distinct (fine), 6 of 10 (fine).
  assert grid_lib.distinct_fraction(predictions(by[('MQA', 0)], ['a'] * 9 + ['b'])) == pytest.approx(0.2)
  predictions(by[('MQA', 0)], ['a'] * 10)
  predictions(by[('MQA', 1)], [str(i) for i in range(10)])
  assert grid_lib.distinct_fraction(
      predictions(by[('MHA', 0)], list('uvwxyz') + ['x'] * 4)) == pytest.approx(0.6)
  rows = sweep.aggregate(grid, runs, str(tmp_path))
  distinct = {(r['variant'], r['seed']): r['distinct_predictions'] for r in rows}
  assert distinct == {('MHA', 0): pytest.approx(0.6), ('MHA', 1): None,
                      ('MQA', 0): 0.1, ('MQA', 1): 1.0}
  cells = {c['variant']: c for c in sweep.summarize(rows)}
  assert cells['MQA']['degenerate'] == 1 and cells['MHA']['degenerate'] == 0
  md = (tmp_path / 'results.md').read_text()
  (warning,) = [l for l in md.splitlines() if 'WARNING' in l]
  assert 'MQA alpha 0.1 mean (1/2)' in warning and 'MHA alpha' not in warning
  # Every reference is 't': the constant output 't' scores 100, the floor.
  assert rows[0]['floor'] == pytest.approx(100.0) and rows[0]['floor_output'] == 't'
  assert "scores rougeL 100.00 on gqa_builtin_docstring (the best of its references, 't')" in md
  assert 'At or below the floor: MHA alpha 0 none' in md  # every fake score is under 100
  assert '| best constant output | gqa_builtin_docstring | | | 100.00 |' in sweep.table1(
      sweep.summarize(rows))


def test_method_options_convert_and_configure_every_later_stage(tmp_path):
  """Grid.method_options: a named conversion beyond mean/first/random (WGQA, CLA) gets its
  convert flags, and every later stage of its runs its gin, so that each builds the model
  the conversion made."""
  from gqa_jax import evaluation, gin_utils, models, train  # noqa: F401 (gin configurables)

  def model_config(stage):
    args = cli.build_parser().parse_args(gin_utils.rewrite_gin_args(list(stage.argv)))
    gin_utils.parse(args.gin_file, args.gin_bindings)
    return gin_utils.call(models.EncoderDecoderModel).module.config
  options = {'wgqa-col': {'convert': ['--method', 'wgqa', '--wgqa-weights', 'col'],
                          'gin': ['attention/wgqa.gin', "WGQA_WEIGHTS='col'"]},
             'cla2': {'convert': ['--method', 'mean', '--kv-layers', 'cla2'],
                      'gin': ['attention/cla.gin', "KV_LAYERS='cla2'"]}}
  grid = _grid(seeds=[0], alphas=[0.1], methods=['mean', 'wgqa-col', 'cla2'],
               method_options=options, kv_heads=[8, 2], method_kv_heads=None,
               gap_gins=['runs/eval.gin', 'experiments/quickstart/eval.gin'])
  runs = {r.name: r for r in grid_lib.plan(grid, str(tmp_path), num_heads=8)}
  run = runs[f'GQA-2_wgqa-col_a0p1_s0_{TASK}']
  convert = run.stages[1]
  assert convert.argv[-7:] == ('2', '--method', 'wgqa', '--wgqa-weights', 'col', '--overwrite',
                               '--quiet')  # no --seed: a WGQA 'mean' init draws nothing
  for stage in run.stages[2:]:  # gap, uptrain, gap, finetune, eval
    argv = list(stage.argv)
    assert argv.index('--gin_file=attention/wgqa.gin') > argv.index(
        '--gin_file=attention/gqa.gin') and "--gin.WGQA_WEIGHTS='col'" in argv
    if stage.kind in ('gap', 'eval'):  # complete setups (this grid's train files are deltas)
      config = model_config(stage)
      assert config.decoder_self_kv_weights == 'col' and config.kv_heads('decoder_self') == 2
  config = model_config(runs[f'GQA-2_cla2_a0p1_s0_{TASK}'].stages[-1])
  assert config.decoder_cross_kv_layers == (0,)  # the quickstart model has 2 layers
  assert '--kv-layers' in runs[f'GQA-2_cla2_a0p1_s0_{TASK}'].stages[1].argv
  with pytest.raises(ValueError, match='no underscore'):
    _grid(methods=['w_1'], method_options={'w_1': {'convert': []}})
  with pytest.raises(ValueError, match='unknown'):
    _grid(methods=['svd'])
