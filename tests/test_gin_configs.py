"""Every gin file in gin_configs/ parses, in the layering it is meant for, and builds its model."""

from pathlib import Path

import gin
import pytest

from gqa_jax import gin_utils, models, network, train

GIN_DIR = Path(__file__).resolve().parents[1] / 'gin_configs'
ALL = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob('*.gin'))
REQUIRED = ['MODEL_DIR = "/tmp/unused"', 'MIXTURE_OR_TASK_NAME = "gqa_builtin_docstring"',
            "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", 'TRAIN_STEPS = 10',
            'INITIAL_CHECKPOINT_PATH = "/tmp/unused"', 'NUM_KV_HEADS = 2']


QUICK = 'experiments/quickstart/model.gin'


def layering(name):
  """The files a user passes before `name` (see each file's header)."""
  if name.startswith('experiments/paper/'):
    return ['models/t5_1_1/tiny.gin']  # the caller passes the model first (their headers)
  if name == 'experiments/quickstart/pretrain.gin':
    return [QUICK, 'runs/pretrain.gin']
  if name == 'experiments/quickstart/finetune.gin':
    return [QUICK, 'runs/pretrain.gin', 'runs/finetune.gin']
  if name == 'experiments/quickstart/eval.gin':
    return [QUICK, 'runs/eval.gin']
  if name == 'experiments/pretrained/t5_mini.gin':
    return ['models/builtin/t5_mini.gin', 'runs/pretrain.gin']
  if name in ('experiments/pretrained/gap.gin', 'experiments/pretrained/docstring_eval.gin'):
    return ['models/builtin/t5_mini.gin', 'runs/eval.gin']
  if name == 'experiments/pretrained/docstring.gin':
    return ['models/builtin/t5_mini.gin', 'runs/pretrain.gin', 'runs/finetune.gin']
  if name.startswith('models/') or name.startswith('experiments/'):
    return []
  if name.startswith('attention/'):
    return ['models/t5_1_1/tiny.gin']
  if name == 'runs/pretrain.gin':
    return ['models/t5_1_1/tiny.gin']
  return ['models/t5_1_1/tiny.gin', 'runs/pretrain.gin']  # uptrain, finetune: deltas


def test_the_repository_has_the_expected_gin_files():
  for name in ('runs/pretrain.gin', 'runs/uptrain.gin', 'runs/finetune.gin',
               'experiments/tiny_pretrain.gin', 'attention/gqa.gin', 'models/t5_1_1/xxl.gin'):
    assert name in ALL


def _trains(name):
  if name.startswith('runs/'):
    return True  # eval/infer files are layered after runs/pretrain.gin here
  return (name.startswith('experiments/') and '/eval' not in name
          and name not in (QUICK, 'experiments/pretrained/gap.gin',
                           'experiments/pretrained/docstring_eval.gin'))


@pytest.mark.parametrize('name', [n for n in ALL if not n.startswith('experiments/grids/')])
def test_gin_file_parses_and_builds_its_model(name):
  # REQUIRED binds every kind of run's macros; files that use only some are fine here.
  config = gin_utils.load_config(layering(name) + [name], REQUIRED, check_macros=False)
  assert isinstance(config, network.T5Config)
  model = gin.query_parameter('%MODEL')  # every layering includes a model file
  assert model.selector.endswith('EncoderDecoderModel')
  built = gin_utils.call(models.EncoderDecoderModel)
  assert built.module.config == config
  if _trains(name):
    bindings = gin.get_bindings(train.train)
    assert {'model', 'model_dir', 'train_dataset_cfg', 'optimizer'} <= set(bindings)
  if name == 'runs/uptrain.gin':
    assert gin.get_bindings(train.train)['uptrain_alpha'] == 0.05
  if name == 'runs/finetune.gin':
    assert config.dropout_rate == 0.1


@pytest.mark.parametrize('name', [n for n in ALL if n.startswith('experiments/grids/')])
def test_grid_file_plans_runs(name, tmp_path):
  from gqa_jax.experiments import grid as grid_lib
  grid = grid_lib.load_grid(name)
  runs = grid_lib.plan(grid, str(tmp_path))
  last = 'eval' if grid.tasks else 'gap'  # a grid without tasks scores the gap alone
  assert runs and all(r.stages[-1].kind == last for r in runs)
