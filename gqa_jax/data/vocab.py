"""Vocabularies: the shipped built-in SentencePiece model and T5's public one.

Both are `seqio.SentencePieceVocabulary(path, extra_ids=100)`, so the 100
sentinels of span corruption exist as in T5: sentinel i is id
`vocab_size - 1 - i` (counting down from the last id). seqio loads the model
lazily, on first use, so naming a `gs://` path costs nothing at import.
"""

import functools
import os
from pathlib import Path
from typing import Mapping, Optional

import seqio

EXTRA_IDS = 100
BUILTIN_DIR = Path(__file__).resolve().parent / 'builtin'
# Unigram SentencePiece, 4000 pieces, trained by scripts/build_builtin_data.py on the
# built-in corpus; T5 conventions: pad=0, eos=1, unk=2, no bos.
BUILTIN_SPM_PATH = str(BUILTIN_DIR / 'sentencepiece.model')
# T5's public vocabulary (32000 pieces + 100 extra ids = 32100; T5.1.1 pads to 32128).
T5_SPM_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
T5_SPM_ENV = 'GQA_T5_VOCAB'  # set to a local copy of T5's model where gs:// is out of reach


@functools.lru_cache(maxsize=None)
def builtin_vocabulary() -> seqio.SentencePieceVocabulary:
  """The shipped vocabulary: 4000 pieces + 100 extra ids, vocab_size 4100."""
  return seqio.SentencePieceVocabulary(BUILTIN_SPM_PATH, extra_ids=EXTRA_IDS)


@functools.lru_cache(maxsize=None)
def t5_vocabulary(path: Optional[str] = None) -> seqio.SentencePieceVocabulary:
  """T5's vocabulary: `path`, else $GQA_T5_VOCAB, else T5's public gs:// path."""
  path = path or os.environ.get(T5_SPM_ENV) or T5_SPM_PATH
  return seqio.SentencePieceVocabulary(path, extra_ids=EXTRA_IDS)


def output_features(vocabulary: seqio.Vocabulary) -> Mapping[str, seqio.Feature]:
  """T5's 'inputs' and 'targets' features, both ending in EOS."""
  return {
      'inputs': seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
      'targets': seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def sentinel_id(vocabulary: seqio.Vocabulary, i: int) -> int:
  """Id of the i-th sentinel (<extra_id_i>): the last id is sentinel 0."""
  if not 0 <= i < EXTRA_IDS:
    raise ValueError(f'sentinel index {i} outside [0, {EXTRA_IDS})')
  return vocabulary.vocab_size - 1 - i
