"""Registering our seqio tasks and mixtures, and checking a task name and split.

Re-registering a name replaces it, so a module reload or a second call with another
vocabulary never trips seqio's duplicate check. A task may carry a `check(split)`
that looks at its data before any work (e.g. that MediaSum's files exist).
"""

import contextlib
import difflib
import re
from typing import Callable, Dict, Optional

import seqio

from gqa_jax.errors import ConfigError

# A data source's generator cannot raise through tf.data (it becomes a tf.errors.OpError
# holding the text); messages carrying this prefix are turned back into a ConfigError.
DATA_ERROR = 'gqa_jax data error: '
_CHECKS: Dict[str, Callable[[str], None]] = {}


def add_task(name: str, check: Optional[Callable[[str], None]] = None,
             **kwargs) -> seqio.Task:
  seqio.TaskRegistry.remove(name)
  if check is None:
    _CHECKS.pop(name, None)
  else:
    _CHECKS[name] = check
  return seqio.TaskRegistry.add(name, **kwargs)


def add_mixture(name: str, tasks, **kwargs) -> seqio.Mixture:
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks, **kwargs)


def check_task(name, split: Optional[str] = None, what: str = 'MIXTURE_OR_TASK_NAME',
               split_what: str = 'split', check_data: bool = True):
  """Raises ConfigError unless `name` is a registered task or mixture with `split`.

  Cheap (nothing is read but what a task's own check looks at, e.g. that MediaSum's
  JSONL files exist and start with the expected keys), so that a misspelt task or split
  fails before any model is built: an unknown split would otherwise evaluate zero
  examples and report empty metrics as a success.

  Args:
    name: MIXTURE_OR_TASK_NAME as bound.
    split: a split to require (None: any).
    what, split_what: how the user names the two settings, for the messages.
    check_data: also run the task's own check of its data (False: names only, e.g.
      when planning a sweep on a machine without the data).
  """
  names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if not isinstance(name, str) or name not in names:
    ours = [n for n in names if n.startswith('gqa_')] or names
    # A truncated name first ('gqa_builtin_span' -> ..._span_corruption), then lookalikes.
    close = [n for n in names if n.startswith(str(name))][:3]
    close += [n for n in difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
              if n not in close][:3 - len(close)]
    rest = [n for n in ours if n not in close]
    hint = (f'did you mean {" or ".join(close)}? ' if close else '')
    raise ConfigError(f'{what} {name!r} is not a registered task or mixture: {hint}'
                      f'registered: {", ".join(close + rest)}.')
  provider = seqio.get_mixture_or_task(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  if split is not None:
    try:
      splits = tuple(provider.splits)
    except Exception:  # a TFDS source lists its splits only once prepared: its read says
      splits = None
    if splits is not None and split not in splits:
      close = difflib.get_close_matches(str(split), splits, n=1)
      hint = f'did you mean {close[0]!r}? ' if close else ''
      raise ConfigError(f'{split_what} {split!r} of {name} does not exist: {hint}its splits are '
                        f'{", ".join(sorted(splits))}.')
  for task in tasks if check_data else ():
    check = _CHECKS.get(task.name)
    if check is not None:
      for one in ([split] if split is not None else task.splits):
        if one in task.splits:
          check(one)



def check_vocabulary(name: str, model_vocab_size: int, what: str = 'the model') -> None:
  """Raises ConfigError when the task's token ids can reach `model_vocab_size` or beyond.

  A model whose embedding has fewer rows than the task's vocabulary has ids would read
  past the table (NaN losses, all-NaN statistics, meaningless scores). T5.1.1 pads its
  table above the vocabulary (32128 rows for 32100 ids), so only larger vocabularies
  are refused. Call after `check_task(name)`.
  """
  provider = seqio.get_mixture_or_task(name)
  for key, feature in provider.output_features.items():
    path = getattr(feature.vocabulary, 'sentencepiece_model_file', '')
    if '://' in str(path):
      continue  # a remote model is read by the pipeline itself, which reports its errors
    size = feature.vocabulary.vocab_size
    if size > model_vocab_size:
      raise ConfigError(
          f'{name} has a vocabulary of {size} ids ({key!r}), but {what} embeds only '
          f'{model_vocab_size}: token ids {model_vocab_size}..{size - 1} would read past its '
          f'embedding table. Use a checkpoint and model config with vocab_size >= {size} '
          '(e.g. T5.1.1\'s 32128 for T5\'s vocabulary), or a task with this model\'s '
          'vocabulary.')

def data_error(message: str) -> ValueError:
  """An error raised inside a data generator, recognised by `data_errors` outside."""
  return ValueError(DATA_ERROR + message)


@contextlib.contextmanager
def data_errors():
  """Turns a `data_error` that tf.data wrapped into an OpError back into one line."""
  import tensorflow as tf
  try:
    yield
  except tf.errors.OpError as e:
    match = re.search(re.escape(DATA_ERROR) + r'([^\n]*)', str(e))
    if match is None:
      raise
    raise ConfigError(match.group(1)) from e
