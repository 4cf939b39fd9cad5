"""Bad inputs to gin, eval/infer, the data layer, sweep, quickstart and bench (issue 13):
each is one line `gqa-jax: error: ...` naming the value and the fix, exit status 2,
before any work, and nothing written where the command would have written.

Every case runs the command line as a user types it, from a working folder, with
relative paths. Eval cases share one tiny checkpoint (trained for one step by the CLI)
and a baseline command that succeeds (`test_eval_baseline_succeeds`), so that each
case differs from a working command only by its bad value.
"""

import json
import os
from pathlib import Path

import pytest

from conftest import assert_user_error
from gqa_jax import data, gin_utils
from gqa_jax.data import paper, vocab
from gqa_jax.errors import ConfigError

TINY = ['--gin_file=experiments/tiny_pretrain.gin',
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", '--gin.BATCH_SIZE=2']
EVAL = ['--gin_file=models/t5_1_1/tiny.gin', '--gin_file=runs/eval.gin',
        '--gin.network.T5Config.vocab_size=4224', '--gin.CHECKPOINT_PATH="run"',
        '--gin.MIXTURE_OR_TASK_NAME="gqa_builtin_docstring"',
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
        '--gin.EVAL_NUM_EXAMPLES=2', '--gin.EVAL_BATCH_SIZE=2']
INFER = [a.replace('runs/eval.gin', 'runs/infer.gin').replace('EVAL_', 'INFER_') for a in EVAL]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A working folder holding `run/`, a tiny checkpoint trained for one step by the CLI
  (the built-in vocabulary's 4224 ids, as the eval commands bind)."""
  import gin
  from gqa_jax import cli
  path = tmp_path_factory.mktemp('bad_inputs')
  previous = Path.cwd()
  os.chdir(path)  # monkeypatch is function-scoped
  try:
    status = cli.main(['train', *TINY, '--gin.TRAIN_STEPS=1', '--gin.MODEL_DIR="run"'])
  finally:
    os.chdir(previous)
    gin.clear_config()
  assert status == 0 and (path / 'run' / 'checkpoint_1').is_dir()
  return path


def test_eval_baseline_succeeds(gqa, workdir, monkeypatch):
  """The commands the cases below break, unbroken: eval and infer write their output."""
  monkeypatch.chdir(workdir)
  r = gqa('eval', *EVAL, '--gin.EVAL_OUTPUT_DIR="ok_eval"')
  assert r.status == 0, r.err[-2000:]
  assert (workdir / 'ok_eval' / 'summary_1.json').is_file()
  r = gqa('infer', *INFER, '--gin.INFER_OUTPUT_DIR="ok_infer"')
  assert r.status == 0, r.err[-2000:]
  assert (workdir / 'ok_infer' / 'gqa_builtin_docstring-000001.jsonl').is_file()


def _file(path, text=''):
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


# (id, command, extra argv, fragments of the one error line, setup(cwd) or None)
EVAL_CASES = [
    ('eval-split-typo', 'eval', ['--gin.EVAL_SPLIT="tset"'],
     ["EVAL_SPLIT 'tset' of gqa_builtin_docstring does not exist", 'train, validation'], None),
    ('infer-split-typo', 'infer', ['--gin.INFER_SPLIT="valid"'],
     ["INFER_SPLIT 'valid'", "did you mean 'validation'"], None),
    ('eval-unknown-task', 'eval', ['--gin.MIXTURE_OR_TASK_NAME="gqa_builtin_docstrin"'],
     ["MIXTURE_OR_TASK_NAME 'gqa_builtin_docstrin' is not a registered task",
      'did you mean gqa_builtin_docstring'], None),
    ('eval-decode-method', 'eval', ['--gin.DECODE_METHOD="bogus"'],
     ["DECODE_METHOD='bogus' is unknown", "'greedy', 'beam', 'sample'"], None),
    ('eval-batch-size-0', 'eval', ['--gin.EVAL_BATCH_SIZE=0'],
     ['EVAL_BATCH_SIZE=0 must be a positive integer'], None),
    ('eval-batch-size-negative', 'eval', ['--gin.EVAL_BATCH_SIZE=-4'],
     ['EVAL_BATCH_SIZE=-4 must be a positive integer'], None),
    ('infer-batch-size-0', 'infer', ['--gin.INFER_BATCH_SIZE=0'],
     ['INFER_BATCH_SIZE=0 must be a positive integer'], None),
    ('eval-num-examples-0', 'eval', ['--gin.EVAL_NUM_EXAMPLES=0'],
     ['EVAL_NUM_EXAMPLES=0', 'or None for the whole split'], None),
    ('eval-num-decodes-0', 'eval', ['--gin.NUM_DECODES=0'], ['NUM_DECODES=0'], None),
    ('eval-temperature-negative', 'eval', ['--gin.TEMPERATURE=-1.0'],
     ['TEMPERATURE=-1.0 must be >= 0'], None),
    ('eval-topk-and-topp', 'eval', ['--gin.TOPK=5', '--gin.TOPP=0.9'],
     ['TOPK=5 and TOPP=0.9: set at most one'], None),
    ('eval-topp-above-1', 'eval', ['--gin.TOPP=1.5'], ['TOPP=1.5 must be in [0, 1]'], None),
    ('eval-max-decode-steps-too-long', 'eval', ['--gin.MAX_DECODE_STEPS=100'],
     ['MAX_DECODE_STEPS=100 must be in [1, 8]'], None),
    ('eval-feature-lengths-no-targets', 'eval', ["--gin.TASK_FEATURE_LENGTHS={'inputs': 32}"],
     ['TASK_FEATURE_LENGTHS=', "{'inputs': 512, 'targets': 128}"], None),
    ('eval-output-is-a-file', 'eval', [],
     ['EVAL_OUTPUT_DIR', 'is a file, not a folder'], lambda out: _file(out, 'mine\n')),
    ('eval-output-under-a-file', 'eval', ['--gin.EVAL_OUTPUT_DIR="blocker/eval"'],
     ['EVAL_OUTPUT_DIR blocker/eval is under', 'which is a file'],
     lambda out: _file(Path(out).parent / 'blocker', 'mine\n')),
    ('eval-checkpoint-missing', 'eval', ['--gin.CHECKPOINT_PATH="no_such_run"'],
     ['CHECKPOINT_PATH no_such_run does not exist', 'checkpoint_<step>'], None),
    ('eval-checkpoint-not-a-checkpoint', 'eval', ['--gin.CHECKPOINT_PATH="notes"'],
     ['notes', 'not a checkpoint'],
     lambda out: _file(Path(out).parent / 'notes' / 'readme.txt', 'hello\n')),
    ('eval-checkpoint-other-kv-heads', 'eval', ['--gin_file=attention/mqa.gin'],
     ['initial checkpoint run', 'gqa-jax convert'], None),
    ('eval-unquoted-output', 'eval', ['--gin.EVAL_OUTPUT_DIR=out/x'],
     ['a string value must be quoted', '--gin.EVAL_OUTPUT_DIR=\\"out/x\\"',
      "EVAL_OUTPUT_DIR = 'out/x'"], None),
    ('eval-misspelt-macro', 'eval', ['--gin.EVAL_SPLITS="test"'],
     ['EVAL_SPLITS is bound but no gin file uses it', 'did you mean EVAL_SPLIT'], None),
    ('infer-eval-macro', 'infer', ['--gin.EVAL_BATCH_SIZE=2'],
     ['EVAL_BATCH_SIZE is bound but no gin file uses it', 'INFER_BATCH_SIZE'], None),
]


@pytest.mark.parametrize('command, extra, fragments, setup',
                         [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_eval_and_infer_bad_input(gqa, workdir, monkeypatch, request, command, extra,
                                  fragments, setup):
  monkeypatch.chdir(workdir)
  out = request.node.callspec.id  # a fresh output folder per case
  if setup:
    setup(workdir / out)
  flag = 'EVAL_OUTPUT_DIR' if command == 'eval' else 'INFER_OUTPUT_DIR'
  argv = [*(EVAL if command == 'eval' else INFER), f'--gin.{flag}="{out}"', *extra]
  assert_user_error(gqa(command, *argv), *fragments)
  if setup is None:  # nothing written: no output folder, so no summary or predictions
    assert not (workdir / out).exists()
  elif (workdir / out).is_dir():
    assert not list((workdir / out).glob('summary_*.json'))


# ---------------------------------------------------------------- MediaSum ----

def _mediasum(kind, root: Path):
  """$GQA_MEDIASUM_DIR for each broken layout (None: unset)."""
  if kind == 'unset':
    return None
  if kind == 'missing':
    return str(root / 'no_such_folder')
  folder = root / kind
  folder.mkdir()
  lines = {'no-files': None, 'empty-file': '', 'not-jsonl': 'summary,utt,speaker\n',
           'missing-key': json.dumps({'summary': 's', 'utt': ['hi']}) + '\n'}[kind]
  if lines is not None:
    (folder / 'validation.jsonl').write_text(lines)
  return str(folder)


MEDIASUM_CASES = [
    ('unset', ['set $GQA_MEDIASUM_DIR']),
    ('missing', ['no_such_folder is not a folder']),
    ('no-files', ['no validation*.jsonl in', 'mediasum_to_jsonl']),
    ('empty-file', ['every validation*.jsonl file is empty']),
    ('not-jsonl', ['validation.jsonl line 1 is not JSON', 'summary, utt, speaker']),
    ('missing-key', ['validation.jsonl line 1 has no speaker', 'summary, utt, speaker']),
]


@pytest.mark.parametrize('kind, fragments', MEDIASUM_CASES, ids=[c[0] for c in MEDIASUM_CASES])
def test_eval_mediasum_data_problems(gqa, workdir, tmp_path, monkeypatch, kind, fragments):
  monkeypatch.chdir(workdir)
  folder = _mediasum(kind, tmp_path)
  if folder is None:
    monkeypatch.delenv(paper.MEDIASUM_ENV, raising=False)
  else:
    monkeypatch.setenv(paper.MEDIASUM_ENV, folder)
  out = f'mediasum_{kind}'
  r = gqa('eval', *EVAL, '--gin.MIXTURE_OR_TASK_NAME="gqa_mediasum"',
          f'--gin.EVAL_OUTPUT_DIR="{out}"')
  assert_user_error(r, 'gqa_mediasum', *fragments)
  assert not (workdir / out).exists()


def test_mediasum_bad_line_after_good_ones_names_file_and_line(tmp_path):
  """A broken record deep in a file is found as it is read: one line naming it."""
  good = json.dumps({'summary': 's', 'utt': ['hello there'], 'speaker': ['A']})
  (tmp_path / 'validation.jsonl').write_text(f'{good}\n{good}\n{{"summary": "s"}}\n')
  paper.register_paper_tasks(vocab.builtin_vocabulary(), suffix='_badline',
                             mediasum_dir=str(tmp_path))
  data.check_task('gqa_mediasum_badline', 'validation')  # the first line is fine
  batches = data.get_dataset('gqa_mediasum_badline', 'validation',
                             {'inputs': 32, 'targets': 8}, 1, shuffle=False, num_epochs=1,
                             pack=False, drop_remainder=False)
  with pytest.raises(ConfigError, match=r'validation.jsonl line 3 has no utt, speaker'):
    list(batches)


# -------------------------------------------------------------------- gin ----

GIN_CASES = [
    ('train-misspelt-macro', ['train', *TINY, '--gin.TRAIN_STEP=2', '--gin.MODEL_DIR="m"'],
     ['TRAIN_STEP is bound but no gin file uses it: did you mean TRAIN_STEPS?']),
    ('train-misspelt-macro-gin-bindings',
     ['train', *TINY, '--gin_bindings=BATCH_SIZES = 4', '--gin.MODEL_DIR="m"'],
     ['BATCH_SIZES is bound but no gin file uses it', 'BATCH_SIZE']),
    ('train-unknown-parameter', ['train', *TINY, '--gin.train.train.bogus=1',
                                 '--gin.MODEL_DIR="m"'], ['bogus']),
    ('train-unquoted-path', ['train', *TINY, '--gin.MODEL_DIR=/x'],
     ['MODEL_DIR = /x: a string value must be quoted', '--gin.MODEL_DIR=\\"/x\\"',
      "MODEL_DIR = '/x'"]),
    ('train-unquoted-tilde', ['train', *TINY, '--gin.MODEL_DIR=~/runs/a'],
     ['--gin.MODEL_DIR=\\"~/runs/a\\"']),
    ('train-unknown-task', ['train', *TINY, '--gin.MIXTURE_OR_TASK_NAME="gqa_builtin_span"',
                            '--gin.MODEL_DIR="m"'],
     ["'gqa_builtin_span' is not a registered task",
      'did you mean gqa_builtin_span_corruption']),
    ('train-split-typo', ['train', *TINY, '--gin.train/train_utils.DatasetConfig.split="tarin"',
                          '--gin.MODEL_DIR="m"'],
     ["'tarin' of gqa_builtin_span_corruption does not exist", "did you mean 'train'"]),
    ('train-macro-nothing-binds',
     ['train', '--gin_file=mine.gin', '--gin.MODEL_DIR="m"', '--gin.TRAIN_STEPS=1'],
     ['the gin files use %UNDEFINED_PERIOD but nothing binds it',
      '--gin.UNDEFINED_PERIOD=VALUE']),
    ('info-macro-without-its-file', ['info', '--size', 'tiny', '--gin.NUM_KV_HEADS=2'],
     ['NUM_KV_HEADS is bound but no gin file uses it']),
    ('info-mha-after-gqa', ['info', '--size', 'tiny', '--gin_file=attention/gqa.gin',
                            '--gin_file=attention/mha.gin', '--gin.NUM_KV_HEADS=2'],
     ['NUM_KV_HEADS is bound but no gin file uses it']),
]


@pytest.mark.parametrize('argv, fragments', [c[1:] for c in GIN_CASES],
                         ids=[c[0] for c in GIN_CASES])
def test_gin_bad_input(gqa, tmp_path, monkeypatch, argv, fragments):
  monkeypatch.chdir(tmp_path)
  _file(tmp_path / 'mine.gin', "include 'experiments/tiny_pretrain.gin'\n"
                               'train.train.checkpoint_period = %UNDEFINED_PERIOD\n')
  assert_user_error(gqa(*argv), *fragments)
  assert not (tmp_path / 'm').exists()


HOSTILE = """from __gin__ import dynamic_registration
import os
from gqa_jax import network
network.T5Config.emb_dim = @os.system()
os.system.command = 'touch HIJACKED'
"""


def test_gin_files_in_the_working_folder_cannot_replace_shipped_includes(gqa, tmp_path,
                                                                          monkeypatch):
  """A models/t5_1_1/tiny.gin in the working folder, which would run a command, is not
  what a shipped file's `include` loads (issue 13, item 8)."""
  monkeypatch.chdir(tmp_path)
  _file(tmp_path / 'models' / 't5_1_1' / 'tiny.gin', HOSTILE)
  r = gqa('info', '--size', 'tiny', '--gin_file=attention/mqa.gin', '--json')
  assert r.status == 0, r.err
  assert json.loads(r.out)[0]['params_total'] > 0
  r = gqa('train', '--gin_file=experiments/tiny_pretrain.gin')  # stops: MODEL_DIR unset
  assert_user_error(r, 'MODEL_DIR')
  assert not (tmp_path / 'HIJACKED').exists()
  # The file does run when the user asks for the working folder first: the test would
  # notice a search order that reached it.
  gqa('info', '--size', 'tiny', '--gin_search_paths=.', '--gin_file=attention/mqa.gin')
  assert (tmp_path / 'HIJACKED').exists()


def test_own_gin_file_in_the_working_folder_is_found(gqa, tmp_path, monkeypatch):
  """The user's own files are still found in '.'; a copy that has a shipped file's name
  is used when named as a path ('./attention/mqa.gin'), not by the bare name."""
  monkeypatch.chdir(tmp_path)
  _file(tmp_path / 'mine.gin', "include 'models/t5_1_1/tiny.gin'\n"
                               "include 'attention/mqa.gin'\n")
  _file(tmp_path / 'attention' / 'mqa.gin', "include 'models/t5_1_1/tiny.gin'\n")  # MHA
  configured = lambda r: [v['variant'] for v in json.loads(r.out) if v['configured']]
  r = gqa('info', '--gin_file=mine.gin', '--json')
  assert r.status == 0, r.err
  assert configured(r) == ['MQA']
  r = gqa('info', '--gin_file=attention/mqa.gin', '--size', 'tiny', '--json')
  assert r.status == 0 and configured(r) == ['MQA'], r.err
  r = gqa('info', '--gin_file=./attention/mqa.gin', '--json')
  assert r.status == 0 and configured(r) == ['MHA'], r.err


# ---------------------------------------------------------- sweep, bench ----

QUICK = 'experiments/grids/quickstart.gin'
SWEEP_CASES = [
    ('sweep-metric-typo', ['sweep', QUICK, '--output', 'out', '--dry-run',
                           "--gin.Grid.metric={'gqa_builtin_docstring': 'rougel'}"],
     ["Grid.metric['gqa_builtin_docstring'] = 'rougel' is not a metric",
      "did you mean 'rougeL'"]),
    ('sweep-misspelt-gin-file', ['sweep', QUICK, '--output', 'out', '--dry-run',
                                 "--gin.Grid.eval_gins={'gqa_builtin_docstring': "
                                 "['runs/eval.gin', 'experiments/quickstart/evl.gin']}"],
     ['eval stage', "gin file 'experiments/quickstart/evl.gin' not found"]),
    ('sweep-misspelt-binding', ['sweep', QUICK, '--output', 'out',
                                "--gin.Grid.finetune_bindings=['BATCH_SIZ=4']"],
     ['finetune stage', 'BATCH_SIZ is bound but no gin file uses it']),
    ('sweep-unknown-task-in-stage', ['sweep', QUICK, '--output', 'out', '--dry-run',
                                     "--gin.Grid.uptrain_bindings="
                                     "['MIXTURE_OR_TASK_NAME=\"gqa_builtin_span\"']"],
     ['uptrain stage', "'gqa_builtin_span' is not a registered task"]),
    ('sweep-bad-bench-flag', ['sweep', QUICK, '--output', 'out',
                              "--gin.Grid.bench_args=['--rounds', '-3']"],
     ['bench stage', '--rounds']),
    ('sweep-output-is-a-file', ['sweep', QUICK, '--output', 'taken', '--dry-run'],
     ['--output taken is a file']),
    ('sweep-emit-under-a-file', ['sweep', QUICK, '--output', 'out',
                                 '--emit-commands', 'taken/jobs'],
     ['--emit-commands taken/jobs is under']),
    ('sweep-missing-source', ['sweep', QUICK, '--output', 'out',
                              "--gin.Grid.source_checkpoint='no_such_ckpt'",
                              '--gin.Grid.source_steps=10', '--gin.Grid.pretrain_gins=[]'],
     ['source_checkpoint no_such_ckpt does not exist']),
    ('sweep-unknown-builtin-source', ['sweep', QUICK, '--output', 'out',
                                      "--gin.Grid.source_checkpoint='builtin:nope'",
                                      '--gin.Grid.source_steps=10',
                                      '--gin.Grid.pretrain_gins=[]'],
     ['source_checkpoint builtin:nope: no such built-in checkpoint', 'available:']),
    ('quickstart-output-is-a-file', ['quickstart', '--output', 'taken'],
     ['--output taken is a file']),
    ('bench-rounds-negative', ['bench', 'decode', '--size', 'tiny', '--rounds', '-3'],
     ['--rounds', 'must be an integer >= 0']),
    ('bench-output-is-a-file', ['bench', 'decode', '--size', 'tiny', '--output', 'taken'],
     ['--output taken is a file']),
    ('bench-output-under-a-file', ['bench', 'decode', '--size', 'tiny', '--output',
                                   'taken/bench'], ['--output taken/bench is under']),
]


def test_a_grid_written_for_the_old_module_name_is_told_the_new_one(gqa, tmp_path,
                                                                    monkeypatch):
  """Grid files imported `gqa_jax.experiment` before the experiment wing moved into
  gqa_jax/experiments/: such a file gets the two lines to change, not a bare ImportError."""
  monkeypatch.chdir(tmp_path)
  shipped = Path(gin_utils.default_gin_search_paths()[0]) / QUICK
  old = shipped.read_text().replace('from gqa_jax.experiments import grid',
                                    'from gqa_jax import experiment')
  _file(tmp_path / 'old.gin', old.replace('\ngrid.Grid:', '\nexperiment.Grid:'))
  r = gqa('sweep', 'old.gin', '--output', 'out', '--dry-run')
  assert_user_error(r, 'imports gqa_jax.experiment',
                    '`from gqa_jax.experiments import grid` and `grid.Grid:`')
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('argv, fragments', [c[1:] for c in SWEEP_CASES],
                         ids=[c[0] for c in SWEEP_CASES])
def test_sweep_and_bench_bad_input(gqa, tmp_path, monkeypatch, argv, fragments):
  """Refused before the first stage or timing: nothing runs, nothing is written."""
  monkeypatch.chdir(tmp_path)
  _file(tmp_path / 'taken', 'a file of the user\n')
  r = gqa(*argv)
  assert_user_error(r, *fragments)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['taken']
  assert (tmp_path / 'taken').read_text() == 'a file of the user\n'
