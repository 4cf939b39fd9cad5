"""The GQA paper's tasks (Ainslie et al. 2023), for real runs on data you prepare.

  gqa_c4_span_corruption   c4/en:3.*.*, T5 span corruption (uptraining)
  gqa_cnn_dailymail        cnn_dailymail:3.*.*           article -> highlights, ROUGE
  gqa_arxiv, gqa_pubmed    scientific_papers/{arxiv,pubmed}:1.1.*  article -> abstract, ROUGE
  gqa_multi_news           multi_news:2.*.*              document -> summary, ROUGE
  gqa_mediasum             JSONL files (below)           transcript -> summary, ROUGE
  gqa_wmt14_en_de          wmt14_translate/de-en:1.*.*   English -> German, BLEU
  gqa_trivia_qa            trivia_qa/rc:1.*.*            question + evidence -> answer, F1/EM
  gqa_trivia_qa_nocontext  trivia_qa/rc.nocontext:1.*.*  question -> answer, F1/EM

TFDS datasets are read from TFDS's data dir ($TFDS_DATA_DIR, ~/tensorflow_datasets,
or `tfds_data_dir`); a version wildcard takes the newest prepared version with that
major version (so T5's c4/en:3.0.1 works). TriviaQA's test split has no answers and
is not registered. Input/output lengths are the run's business, not the task's.

MediaSum reads `{dir}/{split}*.jsonl` (split: train, validation, test) from
$GQA_MEDIASUM_DIR or `mediasum_dir`: one JSON object per line with the release's
fields 'summary', 'utt' (utterances) and 'speaker' (one per utterance); the input is
'summarize: ' + one 'SPEAKER: utterance' line per turn. `mediasum_to_jsonl` writes
these files from the release (news_dialogue.json + train_val_test_split.json).

The vocabulary defaults to T5's public SentencePiece model (vocab.t5_vocabulary:
$GQA_T5_VOCAB or gs://t5-data/vocabs/cc_all.32000/sentencepiece.model), loaded only
when a dataset is built; pass another (e.g. the built-in one) with a name suffix.
"""

import functools
import json
import os
from typing import Optional

import numpy as np
import seqio
import tensorflow as tf

from gqa_jax.data import metrics, preprocessors, registry, vocab
from gqa_jax.errors import ConfigError

MEDIASUM_ENV = 'GQA_MEDIASUM_DIR'
C4 = 'c4/en:3.*.*'
SUMMARIZATION = {  # task: (tfds name, input key, target key)
    'gqa_cnn_dailymail': ('cnn_dailymail:3.*.*', 'article', 'highlights'),
    'gqa_arxiv': ('scientific_papers/arxiv:1.1.*', 'article', 'abstract'),
    'gqa_pubmed': ('scientific_papers/pubmed:1.1.*', 'article', 'abstract'),
    'gqa_multi_news': ('multi_news:2.*.*', 'document', 'summary'),
}
WMT14 = 'wmt14_translate/de-en:1.*.*'
TRIVIA_QA = {'gqa_trivia_qa': ('trivia_qa/rc:1.*.*', True),
             'gqa_trivia_qa_nocontext': ('trivia_qa/rc.nocontext:1.*.*', False)}
SPLITS = ('train', 'validation', 'test')


def _tokenize_and_eos():
  return [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]


def _text_to_text(inputs_key, targets_key, prefix):
  return functools.partial(preprocessors.text_to_text, inputs_key=inputs_key,
                           targets_key=targets_key, prefix=prefix)


def trivia_qa_postprocess(output, example=None, is_target=False):
  """Targets become the list of acceptable answers (value + aliases)."""
  if is_target and example is not None and 'answers' in example:
    return [a.decode('utf-8') if isinstance(a, bytes) else str(a)
            for a in np.asarray(example['answers']).reshape(-1)]
  return output


def format_transcript(speakers, utterances) -> str:
  return '\n'.join(f'{s}: {u}' for s, u in zip(speakers, utterances))


MEDIASUM_KEYS = ('summary', 'utt', 'speaker')


def _mediasum_files(mediasum_dir: Optional[str], split: str):
  """The split's JSONL files; ConfigError naming the folder when there are none."""
  root = mediasum_dir or os.environ.get(MEDIASUM_ENV)
  if not root:
    raise ConfigError(f'gqa_mediasum needs its JSONL files: set ${MEDIASUM_ENV} to the '
                      'folder holding train.jsonl, validation.jsonl and test.jsonl '
                      '(see gqa_jax.data.paper.mediasum_to_jsonl).')
  root = os.path.expanduser(root)
  if not tf.io.gfile.isdir(root):
    raise ConfigError(f'gqa_mediasum: ${MEDIASUM_ENV}={root} is not a folder: point it at '
                      'the folder holding train.jsonl, validation.jsonl and test.jsonl.')
  files = sorted(tf.io.gfile.glob(os.path.join(root, f'{split}*.jsonl')))
  if not files:
    raise ConfigError(f'gqa_mediasum: no {split}*.jsonl in {root}: write them with '
                      'gqa_jax.data.paper.mediasum_to_jsonl.')
  return files


def _mediasum_record(line: str, path: str, number: int) -> dict:
  """One line as {'inputs', 'targets'}; a data_error naming the file and line if it is
  not a JSON object with MEDIASUM_KEYS."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise registry.data_error(f'gqa_mediasum: {path} line {number} is not JSON ({e.msg}): '
                              f'each line must be an object with keys '
                              f'{", ".join(MEDIASUM_KEYS)}.') from None
  missing = [k for k in MEDIASUM_KEYS if not isinstance(record, dict) or k not in record]
  if missing:
    raise registry.data_error(f'gqa_mediasum: {path} line {number} has no '
                              f'{", ".join(missing)}: each line must be an object with keys '
                              f'{", ".join(MEDIASUM_KEYS)}.')
  return {'inputs': format_transcript(record['speaker'], record['utt']),
          'targets': record['summary']}


def _mediasum_check(mediasum_dir: Optional[str]):
  """check(split) for registry.check_task: the files exist, not all are empty, and each
  file's first line is a record (cheap; later lines are checked as they are read)."""

  def check(split: str):
    nonempty = 0
    for path in _mediasum_files(mediasum_dir, split):
      with tf.io.gfile.GFile(path) as f:
        for number, line in enumerate(f, 1):
          if line.strip():
            try:
              _mediasum_record(line, path, number)
            except ValueError as e:
              raise ConfigError(str(e)[len(registry.DATA_ERROR):]) from None
            nonempty += 1
            break
    if not nonempty:
      raise ConfigError(f'gqa_mediasum: every {split}*.jsonl file is empty: write them with '
                        'gqa_jax.data.paper.mediasum_to_jsonl.')

  return check


def _mediasum_dataset_fn(mediasum_dir: Optional[str]):

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    files = _mediasum_files(mediasum_dir, split)
    if shuffle_files:
      files = [files[i] for i in np.random.RandomState(seed).permutation(len(files))]

    def generate():
      for path in files:
        with tf.io.gfile.GFile(path) as f:
          for number, line in enumerate(f, 1):
            if line.strip():  # blank lines (a trailing newline) are not records
              yield _mediasum_record(line, path, number)

    spec = tf.TensorSpec([], tf.string)
    return tf.data.Dataset.from_generator(
        generate, output_signature={'inputs': spec, 'targets': spec})

  return dataset_fn


def mediasum_to_jsonl(release_dir: str, out_dir: str) -> None:
  """Writes {train,validation,test}.jsonl from MediaSum's news_dialogue.json and
  train_val_test_split.json (keys 'train', 'val', 'test')."""
  with open(os.path.join(release_dir, 'train_val_test_split.json')) as f:
    ids = json.load(f)
  with open(os.path.join(release_dir, 'news_dialogue.json')) as f:
    dialogues = json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  for split, key in (('train', 'train'), ('validation', 'val'), ('test', 'test')):
    wanted = set(ids[key])
    with open(os.path.join(out_dir, f'{split}.jsonl'), 'w') as f:
      for d in dialogues:
        if d['id'] in wanted:
          f.write(json.dumps({k: d[k] for k in ('id', 'summary', 'utt', 'speaker')}) + '\n')


def register_paper_tasks(vocabulary: Optional[seqio.Vocabulary] = None, suffix: str = '',
                         mediasum_dir: Optional[str] = None,
                         tfds_data_dir: Optional[str] = None) -> None:
  """Registers the paper's tasks as 'gqa_<task><suffix>' (done on import with T5's
  vocabulary and no suffix)."""
  features = vocab.output_features(vocabulary or vocab.t5_vocabulary())

  def tfds_source(name, splits=SPLITS):
    return seqio.TfdsDataSource(tfds_name=name, splits=splits, tfds_data_dir=tfds_data_dir)

  registry.add_task(
      'gqa_c4_span_corruption' + suffix, source=tfds_source(C4, ('train', 'validation')),
      output_features=features,
      preprocessors=preprocessors.span_corruption_preprocessors('text'), metric_fns=[])
  for name, (tfds_name, inputs_key, targets_key) in SUMMARIZATION.items():
    registry.add_task(
        name + suffix, source=tfds_source(tfds_name), output_features=features,
        preprocessors=[_text_to_text(inputs_key, targets_key, 'summarize: '),
                       *_tokenize_and_eos()],
        metric_fns=[metrics.rouge])
  registry.add_task(
      'gqa_mediasum' + suffix, check=_mediasum_check(mediasum_dir),
      source=seqio.FunctionDataSource(_mediasum_dataset_fn(mediasum_dir), SPLITS),
      output_features=features,
      preprocessors=[_text_to_text('inputs', 'targets', 'summarize: '),
                     *_tokenize_and_eos()],
      metric_fns=[metrics.rouge])
  registry.add_task(
      'gqa_wmt14_en_de' + suffix, source=tfds_source(WMT14), output_features=features,
      preprocessors=[_text_to_text('en', 'de', 'translate English to German: '),
                     *_tokenize_and_eos()],
      metric_fns=[metrics.bleu])
  for name, (tfds_name, with_context) in TRIVIA_QA.items():
    registry.add_task(
        name + suffix, source=tfds_source(tfds_name, ('train', 'validation')),
        output_features=features,
        preprocessors=[functools.partial(preprocessors.trivia_qa,
                                         with_context=with_context),
                       *_tokenize_and_eos()],
        postprocess_fn=trivia_qa_postprocess, metric_fns=[metrics.trivia_qa])


PAPER_TASKS = ('gqa_c4_span_corruption', *SUMMARIZATION, 'gqa_mediasum',
               'gqa_wmt14_en_de', *TRIVIA_QA)
