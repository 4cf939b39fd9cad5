"""Built-in tasks: offline, from the data shipped in gqa_jax/data/builtin/.

Both corpora come from the CPython 3.11 standard library's source (PSF licence),
extracted once by scripts/build_builtin_data.py (see builtin/README.md):

  gqa_builtin_span_corruption  T5 span corruption (noise 0.15, mean span 3) on the
                               stdlib's docstrings and language-reference topics
                               (train 9886 / validation 1060 documents); scored by
                               the targets' NLL per token (`nll`), no decoding
  gqa_builtin_span_corruption_code  the same on the function sources of the docstring
                               corpus (without their docstrings), each source in the
                               split of its function; also scored by `nll`
  gqa_builtin_pretrain         both span corruption tasks, mixed 1:1: the pretraining
                               data of the shipped checkpoint builtin:t5_mini
  gqa_builtin_docstring        'summarize: <function source without docstring>' ->
                               first sentence of its docstring, ROUGE-1/2/L and
                               the reference's NLL per token (`nll`)
                               (train 6839 / validation 719 functions)
  gqa_builtin_mixture          both, mixed 1:1

All use the shipped 4000-piece SentencePiece vocabulary with 100 extra ids.
"""

import functools
import gzip
import json
from typing import Optional, Sequence, Tuple

import seqio
import tensorflow as tf

from gqa_jax.data import metrics, preprocessors, registry, vocab

SPAN_CORRUPTION = 'gqa_builtin_span_corruption'
SPAN_CORRUPTION_CODE = 'gqa_builtin_span_corruption_code'
PRETRAIN = 'gqa_builtin_pretrain'
DOCSTRING = 'gqa_builtin_docstring'
MIXTURE = 'gqa_builtin_mixture'
SPLITS = ('train', 'validation')
CORPORA = {SPAN_CORRUPTION: 'pretrain', SPAN_CORRUPTION_CODE: 'docstring',
           DOCSTRING: 'docstring'}


@functools.lru_cache(maxsize=None)
def load_split(corpus: str, split: str) -> Tuple[dict, ...]:
  """The records of a shipped corpus ('pretrain' or 'docstring'), in file order."""
  if split not in SPLITS:
    raise ValueError(f'split {split!r} is not one of {SPLITS}')
  with gzip.open(vocab.BUILTIN_DIR / f'{corpus}_{split}.jsonl.gz', 'rt',
                 encoding='utf-8') as f:
    return tuple(json.loads(line) for line in f)


def num_examples(task: str, split: str) -> int:
  """Number of source records (documents or functions) of a built-in task's split."""
  return len(load_split(CORPORA[task], split))


class ShippedSource(seqio.DataSource):
  """A shipped corpus, held in memory. With shuffle, the whole split is shuffled
  (reshuffled every epoch), deterministically for a given seed, and then each host
  keeps its shard: every host must therefore use the same seed."""

  def __init__(self, corpus: str, fields: Sequence[str]):
    super().__init__(splits=SPLITS, caching_permitted=False)
    self.corpus, self.fields = corpus, tuple(fields)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def get_dataset(self, split: str = 'train', shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, **unused) -> tf.data.Dataset:
    records = load_split(self.corpus, split)
    ds = tf.data.Dataset.from_tensor_slices(
        {k: [r[k] for r in records] for k in self.fields})
    if shuffle:
      ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
    if shard_info and shard_info.num_shards > 1:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds


def register(vocabulary: Optional[seqio.Vocabulary] = None) -> None:
  """Registers the built-in tasks and mixture (done on `import gqa_jax.data`)."""
  vocabulary = vocabulary or vocab.builtin_vocabulary()
  features = vocab.output_features(vocabulary)
  for name, field in ((SPAN_CORRUPTION, 'text'), (SPAN_CORRUPTION_CODE, 'inputs')):
    registry.add_task(
        name,
        source=ShippedSource(CORPORA[name], ('id', field)),
        output_features=features,
        preprocessors=preprocessors.span_corruption_preprocessors(field),
        # The pretraining objective on held-out text: the validation loss that conversion
        # raises and uptraining lowers. seqio's Evaluator corrupts with a fixed seed, so
        # every checkpoint is scored on the same corrupted inputs.
        metric_fns=[metrics.target_nll])
  registry.add_task(
      DOCSTRING,
      source=ShippedSource('docstring', ('id', 'inputs', 'targets')),
      output_features=features,
      preprocessors=[
          functools.partial(preprocessors.text_to_text, inputs_key='inputs',
                            targets_key='targets', prefix='summarize: '),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos_after_trim,
      ],
      metric_fns=[metrics.rouge, metrics.target_nll])
  registry.add_mixture(MIXTURE, [(SPAN_CORRUPTION, 1.0), (DOCSTRING, 1.0)])
  registry.add_mixture(PRETRAIN, [(SPAN_CORRUPTION, 1.0), (SPAN_CORRUPTION_CODE, 1.0)])
