"""seqio preprocessors: T5 span corruption and the tasks' text formatting.

Span corruption follows the T5 paper (Raffel et al. 2020, JMLR, sections 3.1.4, 3.3):
a fraction `noise_density` (0.15) of the tokens is dropped in spans of mean
length `mean_noise_span_length` (3); each dropped span is replaced in the inputs
by one sentinel, and the targets are the dropped spans, each after its sentinel.
Sentinels are the vocabulary's extra ids counted down from the last id. As in
T5's released pipeline, documents are first concatenated and cut into pieces whose
corrupted inputs fill `sequence_length['inputs']` exactly (with EOS).

Layout (spans alternate, starting with kept tokens, so there are as many kept
spans as noise spans and the sequence ends in noise):
  tokens   k0 n0 k1 n1 ... k_{m-1} n_{m-1}
  inputs   k0 S0 k1 S1 ... k_{m-1} S_{m-1} EOS
  targets  S0 n0 S1 n1 ... S_{m-1} n_{m-1} EOS      with S_i = vocab_size - 1 - i
"""

import functools
from typing import Mapping, Optional, Tuple

import seqio
import tensorflow as tf

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
DEFAULT_INPUTS_LENGTH = 512  # when a caller gives no sequence_length (T5's C4 default)


# ---------------------------------------------------------------- span corruption


def _noise_counts(length, noise_density, mean_noise_span_length):
  """(num_noise_tokens, num_noise_spans) for a sequence of `length` tokens (>= 2)."""
  length_f = tf.cast(length, tf.float32)
  num_noise = tf.cast(tf.round(length_f * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length),
                      tf.int32)
  return num_noise, tf.maximum(num_spans, 1)


def _random_segmentation(num_items, num_segments, seed):
  """Lengths of a uniformly random split of `num_items` into `num_segments` non-empty
  segments: choose num_segments - 1 distinct cut points among the num_items - 1 gaps."""
  gaps = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed=seed))
  cuts = tf.sort(gaps[:num_segments - 1]) + 1                          # [num_segments - 1]
  bounds = tf.concat([[0], cuts, [num_items]], axis=0)                  # [num_segments + 1]
  return bounds[1:] - bounds[:-1]                                       # [num_segments]


def random_spans_noise_mask(length, seeds, noise_density=NOISE_DENSITY,
                            mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Boolean [length] mask, True on noise; kept and noise spans alternate, kept first.

  seeds: two stateless seeds ([2] int32 each), for the noise and the kept spans.
  """
  length = tf.convert_to_tensor(length, tf.int32)
  padded = tf.maximum(length, 2)  # a 1-token piece: mask its 2-token extension, trim
  num_noise, num_spans = _noise_counts(padded, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  kept_lengths = _random_segmentation(padded - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
  is_noise = tf.tile([False, True], [num_spans])                        # [2 * num_spans]
  return tf.repeat(is_noise, span_lengths)[:length]                     # [length]


def _spans_to_sentinels(tokens, mask, vocab_size):
  """Replaces each run of True in `mask` by one sentinel (the i-th run by S_i)."""
  previous = tf.concat([[False], mask[:-1]], axis=0)
  starts = tf.logical_and(mask, tf.logical_not(previous))
  sentinels = vocab_size - tf.cumsum(tf.cast(starts, tokens.dtype))     # S_i = V - 1 - i
  tokens = tf.where(starts, sentinels, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(tf.logical_and(mask, previous)))


def span_corruption_example(tokens, vocab_size, seeds, noise_density=NOISE_DENSITY,
                            mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """(inputs, targets) of one 1-D token sequence, without EOS."""
  mask = random_spans_noise_mask(tf.size(tokens), seeds, noise_density,
                                 mean_noise_span_length)
  return (_spans_to_sentinels(tokens, mask, vocab_size),
          _spans_to_sentinels(tokens, tf.logical_not(mask), vocab_size))


def span_corruption_lengths(inputs_length: int, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                            ) -> Tuple[int, int]:
  """(tokens per piece, targets length) whose corrupted inputs, EOS included, are
  exactly `inputs_length` long; e.g. 512 -> (568, 114), T5's C4 setting."""

  def lengths(n):
    noise = min(max(round(n * noise_density), 1), n - 1)
    spans = max(round(noise / mean_noise_span_length), 1)
    return n - noise + spans + 1, noise + spans + 1

  n = 2
  while lengths(n + 1)[0] <= inputs_length:
    n += 1
  return n, lengths(n)[1]


def _inputs_length(sequence_length: Optional[Mapping[str, int]]) -> int:
  return (sequence_length or {}).get('inputs') or DEFAULT_INPUTS_LENGTH


def concat_and_split(dataset: tf.data.Dataset, sequence_length=None,
                     batch_size: int = 128) -> tf.data.Dataset:
  """Concatenates the tokenized 'targets' of `batch_size` documents and cuts the stream
  into pieces of `span_corruption_lengths(inputs length)[0]` tokens (the last shorter)."""
  piece = span_corruption_lengths(_inputs_length(sequence_length))[0]

  def cut(batch):
    stream = batch['targets'].flat_values                               # [total]
    return tf.RaggedTensor.from_uniform_row_length(
        tf.pad(stream, [[0, -tf.size(stream) % piece]]), piece)         # [pieces, piece]

  def strip(row):
    return {'targets': tf.boolean_mask(row, row > 0)}  # pad id 0 never comes from text

  dataset = dataset.map(lambda x: {'targets': x['targets']})
  dataset = dataset.ragged_batch(batch_size).map(cut, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.unbatch().map(strip).filter(lambda x: tf.size(x['targets']) > 0)


@seqio.map_over_dataset(num_seeds=2)
def span_corruption(features, seeds, sequence_length=None, output_features=None,
                    noise_density=NOISE_DENSITY,
                    mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """seqio preprocessor: 'targets' tokens -> span-corrupted 'inputs' and 'targets'."""
  del sequence_length
  vocab_size = output_features['targets'].vocabulary.vocab_size
  inputs, targets = span_corruption_example(features['targets'], vocab_size, seeds,
                                            noise_density, mean_noise_span_length)
  return {'inputs': inputs, 'targets': targets}


def span_corruption_preprocessors(text_key: str = 'text'):
  """The full T5-style pipeline from raw text to span-corrupted, EOS-ended examples."""
  return [
      functools.partial(seqio.preprocessors.rekey, key_map={'targets': text_key}),
      seqio.preprocessors.tokenize,
      concat_and_split,
      span_corruption,
      seqio.preprocessors.append_eos_after_trim,
  ]


# ---------------------------------------------------------------- text formatting


@seqio.map_over_dataset
def text_to_text(x, inputs_key: str, targets_key: str, prefix: str = ''):
  """{'inputs': prefix + x[inputs_key], 'targets': x[targets_key]}."""
  return {'inputs': tf.strings.join([prefix, x[inputs_key]]), 'targets': x[targets_key]}


@seqio.map_over_dataset
def trivia_qa(x, with_context: bool = True):
  """'question: Q context: wiki pages, then search results' -> answer value; the
  answer's aliases ride along in 'answers' for the F1/EM metric."""
  parts = ['question:', x['question']]
  if with_context:
    parts += ['context:',
              tf.strings.reduce_join(x['entity_pages']['wiki_context'], separator=' '),
              tf.strings.reduce_join(x['search_results']['search_context'], separator=' ')]
  inputs = tf.strings.strip(tf.strings.reduce_join(tf.stack(parts), separator=' '))
  answers = tf.concat([[x['answer']['value']], x['answer']['aliases']], axis=0)
  return {'inputs': inputs, 'targets': x['answer']['value'], 'answers': answers}
