"""seqio metric functions `(targets, predictions) -> {name: value}`, scores in [0, 100],
and one score metric `(targets, scores) -> {name: value}`.

- `rouge`: ROUGE-1/2/L F-measure (Google's `rouge-score`, Porter stemming as in T5),
  averaged over examples.
- `bleu`: corpus BLEU from `sacrebleu` with T5's settings (tokenizer 'intl', exp
  smoothing, no lowercasing), one reference per example.
- `trivia_qa`: exact match and token F1 after the official TriviaQA normalisation,
  the maximum over the answer's aliases, averaged over examples.
- `target_nll`: the reference targets' negative log-likelihood under the model (teacher
  forcing), in nats per target token (EOS included), over all examples' tokens. Lower
  is better. A graded measure of quality for models too small to decode well, whose
  greedy outputs barely depend on the input (e.g. the built-in tasks' tiny models).
- `best_constant`: the floor of a prediction metric: the best score of one output
  written for every example.
"""

import collections
import re
import string
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  from rouge_score import rouge_scorer  # imports nltk: keep it off the import path
  _check_lengths(targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  scores = [scorer.score(t, p) for t, p in zip(targets, predictions)]
  return {k: 100 * float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0
          for k in ROUGE_TYPES}


def best_constant(targets: Sequence[str], metric_fn: Callable, key: str,
                  candidates: Optional[Sequence[str]] = None) -> Tuple[float, str]:
  """(score, output): the best `metric_fn(targets, [output] * n)[key]` over `candidates`
  (default: the distinct targets themselves, an optimistic floor since it peeks at the
  references): what a model scores that ignores its input. A model's score is evidence
  of input-dependent output only above it."""
  if not targets:
    raise ValueError('best_constant: no targets')
  pool = sorted(set(targets if candidates is None else candidates))
  scored = [(metric_fn(targets, [c] * len(targets))[key], c) for c in pool]
  return max(scored, key=lambda sc: (sc[0], -len(sc[1])))


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  import sacrebleu
  _check_lengths(targets, predictions)
  score = sacrebleu.corpus_bleu(list(predictions), [list(targets)], smooth_method='exp',
                                lowercase=False, tokenize='intl',
                                use_effective_order=False)
  return {'bleu': float(score.score)}


def target_nll(targets: Sequence, scores: Sequence) -> Dict[str, float]:
  """scores: per example (summed log-likelihood of its target tokens, number of tokens),
  as `gqa_jax.evaluation.score_fn_for` returns them."""
  _check_lengths(targets, scores)
  scores = np.asarray(scores, np.float64).reshape(len(scores), 2)
  tokens = scores[:, 1].sum()
  if tokens <= 0:
    raise ValueError('target_nll: no target tokens were scored')
  return {'nll': float(-scores[:, 0].sum() / tokens)}


# ------------------------------------------------------------------- TriviaQA

_PUNCTUATION = set(string.punctuation) | {'\u2018', '\u2019', '\u00b4', '`'}
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def normalize_trivia_qa(text: str) -> str:
  """Official TriviaQA answer normalisation: underscores to spaces, lowercase,
  punctuation to spaces, articles removed, whitespace collapsed."""
  text = text.replace('_', ' ').lower()
  text = ''.join(' ' if ch in _PUNCTUATION else ch for ch in text)
  return ' '.join(_ARTICLES.sub(' ', text).split())


def _f1(prediction: str, answer: str) -> float:
  pred, gold = prediction.split(), answer.split()
  common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(gold)
  return 2 * precision * recall / (precision + recall)


def trivia_qa(targets: Sequence[Union[str, Sequence[str]]],
              predictions: Sequence[str]) -> Dict[str, float]:
  """targets: per example the answer, or the list of acceptable aliases."""
  _check_lengths(targets, predictions)
  em, f1 = [], []
  for answers, prediction in zip(targets, predictions):
    answers = [answers] if isinstance(answers, (str, bytes)) else list(answers)
    answers = [normalize_trivia_qa(_text(a)) for a in answers]
    prediction = normalize_trivia_qa(_text(prediction))
    em.append(max((float(prediction == a) for a in answers), default=0.0))
    f1.append(max((_f1(prediction, a) for a in answers), default=0.0))
  return {'exact_match': 100 * float(np.mean(em)) if em else 0.0,
          'f1': 100 * float(np.mean(f1)) if f1 else 0.0}


def _text(s) -> str:
  return s.decode('utf-8') if isinstance(s, bytes) else str(s)


def _check_lengths(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')


# The keys each metric function returns, so that a grid's metric name can be checked
# before any run (a typo would otherwise surface after hours of training).
KEYS = {rouge: ROUGE_TYPES, bleu: ('bleu',), trivia_qa: ('exact_match', 'f1'),
        target_nll: ('nll',)}


def metric_names(task_name: str):
  """The metric keys a registered task (or mixture) reports, or None when one of its
  metric functions is not ours (its keys are then unknown)."""
  import seqio
  provider = seqio.get_mixture_or_task(task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  names = set()
  for task in tasks:
    for fn in list(task.predict_metric_fns) + list(task.score_metric_fns):
      fn = getattr(fn, 'func', fn)  # functools.partial
      if fn not in KEYS:
        return None
      names.update(KEYS[fn])
  return names
