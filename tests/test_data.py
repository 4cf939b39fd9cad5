"""Tests of gqa_jax.data: span corruption, shipped data and vocabulary, metrics,
the paper's tasks on TFDS mock data, and the resumable batch iterator."""

import json

import numpy as np
import pytest

import gqa_jax.data as data  # imports TensorFlow once for the whole module
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from gqa_jax.data import builtin, metrics, paper, preprocessors, vocab

VOCAB = vocab.builtin_vocabulary()
V = VOCAB.vocab_size
SEEDS = [tf.constant([7, 1]), tf.constant([7, 2])]


def _sentinel_positions(ids):
  return [i for i, t in enumerate(ids) if t >= V - vocab.EXTRA_IDS]


def _reconstruct(inputs, targets):
  """Puts each sentinel's span from the targets back into the inputs."""
  spans, current = {}, None
  for t in targets:
    if t >= V - vocab.EXTRA_IDS:
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  return [x for t in inputs for x in (spans[t] if t in spans else [t])]


# ------------------------------------------------------------- span corruption


@pytest.mark.parametrize('length', [2, 10, 100, 568])
def test_span_corruption_on_known_input(length):
  tokens = list(range(3, 3 + length))
  inputs, targets = preprocessors.span_corruption_example(tf.constant(tokens), V, SEEDS)
  inputs, targets = inputs.numpy().tolist(), targets.numpy().tolist()
  num_noise = min(max(round(0.15 * length), 1), length - 1)
  num_spans = max(round(num_noise / 3), 1)
  in_sentinels = [inputs[i] for i in _sentinel_positions(inputs)]
  tgt_sentinels = [targets[i] for i in _sentinel_positions(targets)]
  # One sentinel per noise span, counting down from the last id, in both features.
  assert in_sentinels == tgt_sentinels == [V - 1 - i for i in range(num_spans)]
  assert len(targets) - num_spans == num_noise              # noise fraction exact
  assert len(inputs) - num_spans == length - num_noise
  assert targets[0] == V - 1 and inputs[0] == tokens[0]    # kept span first
  assert _reconstruct(inputs, targets) == tokens


def test_noise_mask_statistics():
  lengths = []
  for s in range(20):
    mask = preprocessors.random_spans_noise_mask(
        200, [tf.constant([s, 1]), tf.constant([s, 2])]).numpy()
    assert mask.sum() == 30 and not mask[0] and mask[-1]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0])))[::2]
    assert len(runs) == 10                                   # round(30 / 3) spans
    lengths += runs.tolist()
  assert np.mean(lengths) == 3.0 and max(lengths) > 3        # random, mean 3


def test_span_corruption_lengths():
  assert preprocessors.span_corruption_lengths(512) == (568, 114)  # T5's C4 setting
  assert preprocessors.span_corruption_lengths(128) == (141, 29)


@pytest.mark.parametrize('name', [builtin.SPAN_CORRUPTION, builtin.SPAN_CORRUPTION_CODE])
def test_builtin_span_corruption_fills_inputs(name):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset({'inputs': 128, 'targets': 29}, split='validation',
                        shuffle=False, seed=0)
  examples = list(ds.take(20).as_numpy_iterator())
  full, texts = 0, []
  for ex in examples:
    inputs, targets = ex['inputs'].tolist(), ex['targets'].tolist()
    assert len(inputs) <= 128 and len(targets) <= 29         # nothing was trimmed
    full += len(inputs) == 128 and len(targets) == 29
    assert inputs[-1] == targets[-1] == 1                    # EOS
    assert inputs[-2] >= V - vocab.EXTRA_IDS                 # the text ends in noise
    text = VOCAB.decode(_reconstruct(inputs[:-1], targets[:-1]))
    assert len(text.split()) > 20 and '<extra_id' not in text  # real text back
    texts.append(text)
  assert full >= 18  # pieces fill the inputs exactly; only a stream's tail is shorter
  # The code task corrupts function sources (of validation functions, here).
  code = sum(t.count('def ') + t.count('return ') for t in texts)
  assert (code > 20) == (name == builtin.SPAN_CORRUPTION_CODE), code


# ------------------------------------------------------------ shipped data, vocab


def test_vocabulary_round_trip_and_extra_ids():
  assert (VOCAB.vocab_size, VOCAB.extra_ids) == (4100, 100)
  assert (VOCAB.pad_id, VOCAB.eos_id, VOCAB.unk_id) == (0, 1, 2)
  text = 'Return the number of items in the sequence, or raise ValueError.'
  ids = VOCAB.encode(text)
  assert max(ids) < 4000 and VOCAB.decode(ids) == text
  assert VOCAB.decode([vocab.sentinel_id(VOCAB, 0)]) == '<extra_id_0>'
  assert vocab.sentinel_id(VOCAB, 99) == 4000
  assert VOCAB.encode('<extra_id_5>') == [V - 6]


def test_builtin_corpora_sizes_and_disjoint_splits():
  manifest = json.loads((vocab.BUILTIN_DIR / 'manifest.json').read_text())
  for task, corpus in builtin.CORPORA.items():
    train, valid = builtin.load_split(corpus, 'train'), builtin.load_split(corpus, 'validation')
    assert len(train) == manifest[f'{corpus}_train_examples']
    assert not {r['id'] for r in train} & {r['id'] for r in valid}
    text = 'inputs' if corpus == 'docstring' else 'text'
    assert not {r[text] for r in train} & {r[text] for r in valid}
  assert builtin.num_examples(builtin.DOCSTRING, 'train') >= 5000
  assert builtin.num_examples(builtin.DOCSTRING, 'validation') >= 500
  total = sum(f['bytes'] for f in manifest['files'].values())
  assert total < 4e6


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_builtin_docstring_examples(split):
  task = seqio.get_mixture_or_task(builtin.DOCSTRING)
  for ex in task.get_dataset({'inputs': 256, 'targets': 32}, split=split,
                             shuffle=True, seed=1).take(5).as_numpy_iterator():
    assert ex['inputs_pretokenized'].startswith(b'summarize: ')
    assert len(ex['inputs']) > 3 and len(ex['targets']) > 2
    assert ex['inputs'][-1] == ex['targets'][-1] == 1
  assert task.metric_fns == [metrics.rouge, metrics.target_nll]


# ------------------------------------------------------------------- metrics


def test_target_nll_pools_tokens_over_examples():
  # (-6 over 3 tokens), (-4 over 1): 10 nats / 4 tokens, not the mean of 2 and 4.
  assert metrics.target_nll(['a', 'b'], [(-6.0, 3), (-4.0, 1)]) == {'nll': 2.5}
  with pytest.raises(ValueError, match='2 targets but 1'):
    metrics.target_nll(['a', 'b'], [(-1.0, 1)])
  with pytest.raises(ValueError, match='no target tokens'):
    metrics.target_nll(['a'], [(0.0, 0)])


def test_rouge_hand_computed():
  # 'the cat sat' vs 'the cat sat down': R1 P=1 R=3/4 -> F=6/7; R2 P=1 R=2/3 -> 0.8;
  # LCS 3 -> as R1. Second pair identical: 100. Mean over the two examples.
  m = metrics.rouge(['the cat sat down', 'a dog barks'], ['the cat sat', 'a dog barks'])
  assert m['rouge1'] == pytest.approx((600 / 7 + 100) / 2)
  assert m['rouge2'] == pytest.approx((80 + 100) / 2)
  assert m['rougeL'] == pytest.approx(m['rouge1'])


def test_bleu_hand_computed():
  # 'the cat sat on the mat' vs 'the cat sat on a mat': n-gram precisions 5/6, 3/5,
  # 2/4, 1/3, equal lengths (no brevity penalty): BLEU = (5/6*3/5*2/4*1/3)^(1/4).
  m = metrics.bleu(['the cat sat on a mat'], ['the cat sat on the mat'])
  assert m['bleu'] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-4)
  assert metrics.bleu(['ein kleiner Test .'], ['ein kleiner Test .'])['bleu'] == pytest.approx(100)


def test_trivia_qa_hand_computed():
  assert metrics.normalize_trivia_qa('The  Eiffel_Tower’s!') == 'eiffel tower s'
  # 1: matches the second alias exactly. 2: tokens {tower, in, paris} vs {eiffel, tower}:
  # P=1/3, R=1/2, F1=0.4. 3: no overlap.
  m = metrics.trivia_qa([['Paris Tower', 'the Eiffel Tower'], 'Eiffel Tower', ['London']],
                        ['Eiffel tower.', 'tower in Paris', 'Rome'])
  assert m['exact_match'] == pytest.approx(100 / 3)
  assert m['f1'] == pytest.approx(100 * (1 + 0.4 + 0) / 3)


# ------------------------------------------------------- paper tasks, mock data


@pytest.fixture(scope='module')
def paper_tasks(tmp_path_factory):
  root = tmp_path_factory.mktemp('mediasum')
  for split in ('train', 'validation', 'test'):
    with open(root / f'{split}.jsonl', 'w') as f:
      for i in range(3):
        f.write(json.dumps({'id': f'NPR-{i}', 'summary': f'A talk about plants {i}.',
                            'utt': ['Hello there.', f'Plants are kin {i}.'],
                            'speaker': ['HOST', 'GUEST']}) + '\n')
  paper.register_paper_tasks(VOCAB, suffix='_mock', mediasum_dir=str(root))
  yield [name + '_mock' for name in paper.PAPER_TASKS]
  for name in paper.PAPER_TASKS:
    seqio.TaskRegistry.remove(name + '_mock')


def test_paper_tasks_registered_with_t5_vocabulary():
  for name in paper.PAPER_TASKS:
    task = seqio.get_mixture_or_task(name)
    assert task.output_features['targets'].vocabulary is vocab.t5_vocabulary()
  assert vocab.T5_SPM_PATH == 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'


def test_paper_tasks_on_mock_data(paper_tasks):
  expected = {'rouge': {'rouge1', 'rouge2', 'rougeL'}, 'bleu': {'bleu'},
              'trivia_qa': {'exact_match', 'f1'}}
  with tfds.testing.mock_data(num_examples=3):
    for name in paper_tasks:
      task = seqio.get_mixture_or_task(name)
      # try_in_mem_cache=False: mock datasets have no split sizes to look up.
      examples = list(task.get_dataset({'inputs': 64, 'targets': 32}, split='validation',
                                       shuffle=False, seed=0,
                                       try_in_mem_cache=False).as_numpy_iterator())
      assert examples, name
      for ex in examples:
        assert 0 < len(ex['inputs']) <= 64 and 0 < len(ex['targets']) <= 32, name
      if name.startswith('gqa_c4'):
        assert any(t >= V - vocab.EXTRA_IDS for t in examples[0]['inputs'])
        continue
      if 'mediasum' in name:
        assert examples[0]['inputs_pretokenized'].decode().startswith(
            'summarize: HOST: Hello there.\nGUEST: Plants are kin')
      targets = [task.postprocess_fn(ex['targets_pretokenized'].decode(), example=ex,
                                     is_target=True) for ex in examples]
      predictions = [task.postprocess_fn(ex['targets_pretokenized'].decode())
                     for ex in examples]
      (metric_fn,) = task.metric_fns
      scores = metric_fn(targets, predictions)
      assert set(scores) == expected[metric_fn.__name__], name
      if 'trivia' in name:
        assert isinstance(targets[0], list) and scores['exact_match'] == 100
      elif metric_fn is metrics.rouge:
        assert scores['rouge1'] == 100, name


# -------------------------------------------------- get_dataset, exact resume


LENGTHS = {'inputs': 64, 'targets': 16}


def test_get_dataset_keys_and_shapes():
  packed = next(data.get_dataset(builtin.MIXTURE, 'train', LENGTHS, 4))
  assert set(packed) == {'encoder_input_tokens', 'decoder_input_tokens',
                         'decoder_target_tokens', 'decoder_loss_weights',
                         'encoder_segment_ids', 'decoder_segment_ids',
                         'encoder_positions', 'decoder_positions'}
  for k, v in packed.items():
    assert isinstance(v, np.ndarray) and v.shape == (4, LENGTHS[
        'inputs' if k.startswith('encoder') else 'targets']), k
  plain = next(data.get_dataset(builtin.DOCSTRING, 'validation', LENGTHS, 4, pack=False,
                                shuffle=False))
  assert set(plain) == {'encoder_input_tokens', 'decoder_input_tokens',
                        'decoder_target_tokens', 'decoder_loss_weights'}
  # Teacher forcing: decoder inputs are the targets shifted right, starting at 0.
  np.testing.assert_array_equal(plain['decoder_input_tokens'][:, 1:],
                                plain['decoder_target_tokens'][:, :-1])


def test_resume_at_batch_k_continues_exactly():
  kwargs = dict(shuffle=True, seed=3, pack=True)
  run = data.get_dataset(builtin.MIXTURE, 'train', LENGTHS, 4, **kwargs)
  for _ in range(5):
    next(run)
  state = json.loads(json.dumps(run.get_state()))  # as saved in a checkpoint
  assert state['batches'] == 5
  uninterrupted = [next(run) for _ in range(4)]     # batches 5..8 of the same run
  resumed = data.get_dataset(builtin.MIXTURE, 'train', LENGTHS, 4, state=state, **kwargs)
  for expected in uninterrupted:
    got = next(resumed)
    assert set(got) == set(expected)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  assert resumed.get_state()['batches'] == 9
  with pytest.raises(ValueError, match='batch_size'):
    resumed.set_state(dict(state, batch_size=8))
  resumed.set_state(dict(state, shard_id=1))  # hosts share one position
  by_count = data.get_dataset(builtin.MIXTURE, 'train', LENGTHS, 4, start_batch=7, **kwargs)
  np.testing.assert_array_equal(next(by_count)['encoder_input_tokens'],
                                uninterrupted[2]['encoder_input_tokens'])


def test_a_closed_iterator_stops_its_pipeline_and_continues_where_it_was():
  """`close()` (train calls it when a run ends) drops the tf.data iterator; a later
  `next` rebuilds it at the same batch."""
  kwargs = dict(shuffle=True, seed=3, pack=True)
  run = data.get_dataset(builtin.MIXTURE, 'train', LENGTHS, 4, **kwargs)
  reference = data.get_dataset(builtin.MIXTURE, 'train', LENGTHS, 4, **kwargs)
  expected = [next(reference) for _ in range(4)]
  next(run), next(run)
  run.close()
  assert run._iterator is None and run.get_state()['batches'] == 2
  for want in expected[2:]:
    np.testing.assert_array_equal(next(run)['encoder_input_tokens'],
                                  want['encoder_input_tokens'])
  run.set_state(dict(run.get_state(), batches=1))  # back, on an iterator already used
  np.testing.assert_array_equal(next(run)['encoder_input_tokens'],
                                expected[1]['encoder_input_tokens'])


def test_hosts_read_disjoint_shards():
  def rows(shard_id):
    it = data.get_dataset(builtin.DOCSTRING, 'validation', {'inputs': 512, 'targets': 64},
                          1, shuffle=True, seed=5, pack=False, num_epochs=1,
                          shard_id=shard_id, num_shards=2, drop_remainder=False)
    return [r.tobytes() for b in it for r in b['encoder_input_tokens']]

  a, b = rows(0), rows(1)
  assert len(a) + len(b) == builtin.num_examples(builtin.DOCSTRING, 'validation')
  assert len(set(a) & set(b)) <= 2  # only functions whose first 512 tokens coincide


# ------------------------------------------------ TensorFlow's start-up noise ----

def test_importing_the_data_package_prints_no_tensorflow_noise():
  """A fresh interpreter: TensorFlow's C++ start-up notices (oneDNN, CUDA stub, cuInit on
  machines without a GPU) do not reach the user; the first tf.data op adds none either."""
  import subprocess
  import sys
  code = ('import gqa_jax.data, tensorflow as tf; '
          'print(list(tf.data.Dataset.range(2).as_numpy_iterator()))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  for noise in ('absl::InitializeLog', 'cuInit', 'cudart_stub', 'oneDNN', 'cpu_feature_guard'):
    assert noise not in result.stderr, result.stderr


def test_quiet_tf_filter_keeps_real_messages():
  from gqa_jax.data import quiet_tf
  assert quiet_tf.is_noise('I0000 00:00:1796198526.209878    3596 cudart_stub.cc:31] Could '
                           'not find cuda drivers on your machine, GPU will not be used.')
  assert quiet_tf.is_noise('E0000 00:00:1796198531.255096    3596 cuda_platform.cc:52] failed '
                           'call to cuInit: INTERNAL: CUDA error: Failed call to cuInit')
  assert quiet_tf.is_noise('WARNING: All log messages before absl::InitializeLog() is called '
                           'are written to STDERR')
  assert not quiet_tf.is_noise('E0000 00:00:1796198531.255096    3596 op.cc:52] Could not '
                               'open file: permission denied')
  assert not quiet_tf.is_noise('Traceback (most recent call last):')


def test_best_constant_output_is_the_floor_of_a_prediction_metric():
  from gqa_jax.data import metrics
  targets = ['add an element', 'add an element', 'remove an element', 'open a file']
  score, output = metrics.best_constant(targets, metrics.rouge, 'rouge1')
  # 'add an element' vs each: 1, 1, 2/3 (an element), 0 -> mean 2/3 in percent.
  assert output == 'add an element' and score == pytest.approx(100 * (1 + 1 + 2 / 3) / 4)
  score, output = metrics.best_constant(targets, metrics.rouge, 'rouge1',
                                        candidates=['open a file', 'xyz'])
  assert output == 'open a file' and score == pytest.approx(25.0)
  with pytest.raises(ValueError, match='no targets'):
    metrics.best_constant([], metrics.rouge, 'rouge1')


def test_a_model_smaller_than_the_task_vocabulary_is_refused():
  from gqa_jax.errors import ConfigError
  size = vocab.builtin_vocabulary().vocab_size
  data.check_vocabulary('gqa_builtin_span_corruption', size)  # exactly enough
  data.check_vocabulary('gqa_builtin_span_corruption', 4224)  # padded, as T5.1.1's
  with pytest.raises(ConfigError, match=f'vocabulary of {size} ids.*embeds only 128.*'
                     f'vocab_size >= {size}'):
    data.check_vocabulary('gqa_builtin_span_corruption', 128, what='the checkpoint')
