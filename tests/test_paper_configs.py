"""The paper's experiment files (gin_configs/experiments/paper/): the command line in each
header is valid for the CLI, parses with the functions the CLI uses, and binds the task,
feature lengths and hyperparameters that the header and the paper (DESIGN.md section 2)
state. Parsing only: nothing is trained, decoded or read from disk."""

import re
import shlex
from pathlib import Path

import gin
import pytest

from gqa_jax import cli, evaluation, gin_utils, network, optimizers, train
from gqa_jax import convert as convert_lib

PAPER_DIR = Path(__file__).resolve().parents[1] / 'gin_configs' / 'experiments' / 'paper'
MODEL, GQA = 'models/t5_1_1/xxl.gin', 'attention/gqa.gin'
LAYERING = ['NUM_KV_HEADS = 8']

# What DESIGN.md section 2 (the paper, section 3.1) fixes per task: task name, input/output
# lengths, and the metric of the paper's Table 1 (R1, BLEU, F1) with the key our metric
# functions return; then our choices: finetuning steps and the eval period.
TASKS = {
    'cnn_dailymail': ('gqa_cnn_dailymail', 512, 256, 'rouge1', 20_000, 2_000),
    'arxiv': ('gqa_arxiv', 2048, 512, 'rouge1', 15_000, 1_000),
    'pubmed': ('gqa_pubmed', 2048, 512, 'rouge1', 10_000, 1_000),
    'mediasum': ('gqa_mediasum', 2048, 512, 'rouge1', 35_000, 2_500),
    'multi_news': ('gqa_multi_news', 2048, 512, 'rouge1', 5_000, 500),
    'wmt14_en_de': ('gqa_wmt14_en_de', 512, 256, 'bleu', 100_000, 5_000),
    'trivia_qa': ('gqa_trivia_qa', 2048, 32, 'f1', 10_000, 1_000),
}
FILES = (['uptrain_c4.gin'] + [f'finetune_{t}.gin' for t in TASKS]
         + [f'eval_{t}.gin' for t in TASKS])
# The uptraining run at scale, whole (model, attention, layout): file -> (model file, the
# scale options it binds, the command the header checks it with).
SCALE_FILES = {
    'xxl_uptrain_v4_128.gin': ('models/t5_1_1/xxl.gin',
                               dict(SCAN_LAYERS=True, REMAT_POLICY='minimal',
                                    NUM_MICROBATCHES=16, MESH_MODEL=8)),
    'large_uptrain_gpu80.gin': ('models/t5_1_1/large.gin',
                                dict(SCAN_LAYERS=True, REMAT_POLICY='minimal',
                                     NUM_MICROBATCHES=32, MESH_MODEL=1)),
}


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def header(name: str) -> str:
  """The leading comment block, without the '#'s."""
  lines = []
  for line in (PAPER_DIR / name).read_text().splitlines():
    if not line.startswith('#'):
      break
    lines.append(line[1:])
  return '\n'.join(lines)


def header_commands(name: str):
  """argv lists of the `gqa-jax ...` commands in the header, continuation lines joined and
  split as bash would."""
  joined = header(name).replace('\\\n', ' ')
  return [shlex.split(line)[1:] for line in joined.splitlines()
          if line.strip().startswith('gqa-jax ')]


def parse_header_command(name: str, command: str):
  """Parses the header's `gqa-jax COMMAND` with the CLI's parser and its gin functions."""
  [argv] = [a for a in header_commands(name) if a[0] == command]
  args = cli.build_parser().parse_args(gin_utils.rewrite_gin_args(argv))
  gin_utils.parse(args.gin_file, args.gin_bindings)
  return args


def macro(name: str):
  return gin.query_parameter(f'%{name}')


def is_required(name: str) -> bool:
  """Whether macro `name` is still %gin.REQUIRED (query_parameter returns the reference)."""
  return repr(macro(name)) == '%gin.REQUIRED'


def claimed_lengths(name: str) -> dict:
  [(inputs, targets)] = set(re.findall(r'inputs (\d+) / targets (\d+)', header(name)))
  return {'inputs': int(inputs), 'targets': int(targets)}


def test_the_directory_holds_exactly_the_papers_files_and_the_readme_lists_them():
  assert sorted(p.name for p in PAPER_DIR.glob('*.gin')) == sorted(FILES + list(SCALE_FILES))
  readme = (PAPER_DIR / 'README.md').read_text()
  for name in FILES + list(SCALE_FILES):
    assert name in readme


@pytest.mark.parametrize('name', sorted(SCALE_FILES))
def test_the_runs_at_scale_are_the_papers_uptraining_laid_out(name):
  model, options = SCALE_FILES[name]
  text = (PAPER_DIR / name).read_text()
  assert re.findall(r"^include '([^']+)'", text, flags=re.M) == [
      model, 'experiments/paper/uptrain_c4.gin', GQA]
  for command in ('compile', 'train'):
    args = parse_header_command(name, command)
    assert args.gin_file == [f'experiments/paper/{name}']
    for key, value in options.items():
      assert macro(key) == value, key
    assert macro('NUM_KV_HEADS') == 8 and macro('BATCH_SIZE') == 2048
    assert macro('TASK_FEATURE_LENGTHS') == {'inputs': 512, 'targets': 114}
    assert macro('MIXTURE_OR_TASK_NAME') == 'gqa_c4_span_corruption'
    gin.clear_config()


@pytest.mark.parametrize('name', FILES)
def test_no_model_or_attention_file_inside_and_the_caller_passes_them(name):
  text = (PAPER_DIR / name).read_text()
  includes = re.findall(r"^include '([^']+)'", text, flags=re.M)
  kind = name.split('_')[0]
  assert includes == {'uptrain': ['runs/pretrain.gin', 'runs/uptrain.gin'],
                      'finetune': ['runs/pretrain.gin', 'runs/finetune.gin'],
                      'eval': ['runs/eval.gin']}[kind]
  args = parse_header_command(name, 'eval' if kind == 'eval' else 'train')
  assert args.gin_file == [MODEL, f'experiments/paper/{name}', GQA]
  assert 'NUM_KV_HEADS = 8' in args.gin_bindings


def test_uptrain_c4():
  name = 'uptrain_c4.gin'
  [convert] = [a for a in header_commands(name) if a[0] == 'convert']
  args = cli.build_parser().parse_args(convert)
  assert args.src.endswith('t5_1_1_xxl/checkpoint_1000000') and args.num_kv_heads == 8
  # The paper's conversion: mean pooling, given or by default.
  assert (args.method or convert_lib.DEFAULTS['method']) == 'mean'
  assert 'gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000' in header(name)

  parse_header_command(name, 'train')
  bindings = gin.get_bindings(train.train)
  assert gin.REQUIRED not in bindings.values()  # the header sets every required value
  assert bindings['initial_checkpoint_path'].startswith(args.dst)
  assert macro('MIXTURE_OR_TASK_NAME') == 'gqa_c4_span_corruption'
  assert macro('TASK_FEATURE_LENGTHS') == claimed_lengths(name) == {'inputs': 512,
                                                                    'targets': 114}
  data = bindings['train_dataset_cfg']
  assert (data.batch_size, data.pack, data.split) == (2048, True, 'train')
  assert bindings['uptrain_alpha'] == 0.05 and bindings['total_steps'] is None
  assert train.uptrain_steps(0.05, 1_000_000) == 50_000
  # T5.1.1's rsqrt schedule continues on the absolute step: 1e-3 at the checkpoint's step.
  lr = bindings['learning_rate_schedule']
  assert float(lr(1_000_000)) == pytest.approx(1e-3)
  assert float(lr(1_050_000)) == pytest.approx(1_050_000 ** -0.5)
  assert gin.get_bindings(optimizers.adafactor)['decay_rate'] == 0.8

  # Without the caller's values, they stay required.
  gin_utils.parse([MODEL, f'experiments/paper/{name}', GQA], LAYERING)
  assert is_required('MODEL_DIR') and is_required('INITIAL_CHECKPOINT_PATH')

  config = gin_utils.load_config([MODEL, f'experiments/paper/{name}', GQA], LAYERING)
  assert (config.decoder_self_kv_heads, config.decoder_cross_kv_heads) == (8, 8)
  assert config.kv_heads('encoder') == config.num_heads == 64  # the paper: encoder MHA
  assert config.dropout_rate == 0.0


@pytest.mark.parametrize('task', TASKS)
def test_finetune(task):
  name = f'finetune_{task}.gin'
  task_name, inputs, targets, metric, steps, period = TASKS[task]
  parse_header_command(name, 'train')
  bindings = gin.get_bindings(train.train)
  assert gin.REQUIRED not in bindings.values()
  assert macro('MIXTURE_OR_TASK_NAME') == task_name
  assert macro('TASK_FEATURE_LENGTHS') == claimed_lengths(name) == {'inputs': inputs,
                                                                    'targets': targets}
  # The paper: constant lr 1e-3, batch 128, dropout 0.1, best dev checkpoint (greedy).
  lr = bindings['learning_rate_schedule']
  assert float(lr(1_050_000)) == float(lr(1_050_000 + steps)) == pytest.approx(1e-3)
  assert bindings['train_dataset_cfg'].batch_size == 128
  assert gin.get_bindings(network.T5Config)['dropout_rate'] == 0.1
  assert bindings['best_metric'] == f'{task_name}/{metric}' and bindings['best_mode'] == 'max'
  assert bindings['eval_period'] == period == bindings['checkpoint_period']
  assert bindings['infer_eval_dataset_cfg'].split == 'validation'
  assert macro('FINETUNE_STEPS') == steps and f'FINETUNE_STEPS = {steps}' in (
      PAPER_DIR / name).read_text()
  # The header's example: TRAIN_STEPS = the uptrained checkpoint's step + FINETUNE_STEPS.
  start = int(re.search(r'checkpoint_(\d+)', bindings['initial_checkpoint_path']).group(1))
  assert bindings['total_steps'] == start + steps
  assert 10_000 % period == 0  # evals on the same finetuning steps for any ALPHA

  gin_utils.parse([MODEL, f'experiments/paper/{name}', GQA], LAYERING)
  assert is_required('TRAIN_STEPS')  # absolute: the caller sets it
  assert is_required('MODEL_DIR') and is_required('INITIAL_CHECKPOINT_PATH')
  config = gin_utils.load_config([MODEL, f'experiments/paper/{name}', GQA], LAYERING)
  assert config.dropout_rate == 0.1 and config.decoder_self_kv_heads == 8


@pytest.mark.parametrize('task', TASKS)
def test_eval(task):
  name = f'eval_{task}.gin'
  task_name, inputs, targets, _, _, _ = TASKS[task]
  parse_header_command(name, 'eval')
  bindings = gin.get_bindings(evaluation.evaluate)
  assert gin.REQUIRED not in bindings.values()
  assert bindings['mixture_or_task_name'] == task_name
  assert bindings['task_feature_lengths'] == claimed_lengths(name) == {'inputs': inputs,
                                                                       'targets': targets}
  assert (bindings['decode_method'], bindings['num_decodes']) == ('greedy', 1)
  assert bindings['split'] == ('validation' if task == 'trivia_qa' else 'test')

  gin_utils.parse([MODEL, f'experiments/paper/{name}'])
  assert is_required('CHECKPOINT_PATH') and is_required('EVAL_OUTPUT_DIR')


def test_best_metric_names_are_keys_that_the_tasks_metrics_return():
  seqio = pytest.importorskip('seqio')
  from gqa_jax.data import paper  # noqa: F401  (registers the tasks)
  for task_name, _, _, metric, _, _ in TASKS.values():
    task = seqio.get_mixture_or_task(task_name)
    keys = set()
    for fn in task.predict_metric_fns:
      keys |= set(fn(['the cat sat on the mat'], ['the cat sat on the mat']))
    assert metric in keys, (task_name, keys)
