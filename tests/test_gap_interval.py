"""The conversion gap's confidence interval (sweep._gap_fields): over seeds and over the
gap eval's examples. Oracles: the nll definition (sum of per-example nll over tokens), the
Student-t interval over seeds where examples are missing, and the coverage of simulated
data whose true gap is known."""
import numpy as np
import pytest

from gqa_jax.experiments import sweep


def _row(examples):
  """A result row whose gap is the nll of its per-example [nll sum, tokens]."""
  examples = np.asarray(examples, dtype=float)
  return {'gap': examples[:, 0].sum() / examples[:, 1].sum(),
          'gap_examples': examples.tolist()}


def _examples(rng, tokens, per_token):
  return np.stack([per_token * tokens, tokens], axis=1)


def test_a_deterministic_conversion_gets_an_interval_over_examples():
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 15, size=64).astype(float)
  mha = _examples(rng, tokens, rng.normal(3.0, 0.5, size=64))
  mqa = mha.copy()
  mqa[:, 0] += tokens * rng.normal(0.5, 0.3, size=64)
  # Five seeds, the same conversion each time (mean pooling at alpha 0).
  pairs = [(_row(mqa), 'gap', _row(mha), 'gap')] * 5
  fields = sweep._gap_fields('d', pairs)
  expected = (mqa[:, 0].sum() - mha[:, 0].sum()) / tokens.sum()
  assert fields['d_mean'] == pytest.approx(expected)
  assert fields['d_std'] == pytest.approx(0.0, abs=1e-12)   # no seed spread...
  assert fields['d_hi'] - fields['d_lo'] > 0.05               # ...but the sample's noise
  assert fields['d_lo'] < expected < fields['d_hi'] and fields['d_examples'] == 64
  assert fields['d_resolved'] is True
  # Equal models: nothing to resolve.
  same = sweep._gap_fields('d', [(_row(mha), 'gap', _row(mha), 'gap')])
  assert same['d_mean'] == 0 and same['d_lo'] == 0 and same['d_hi'] == 0
  assert same['d_resolved'] is False


def test_without_per_example_scores_the_interval_is_over_seeds():
  pairs = [({'gap': g}, 'gap', {'gap': 3.0}, 'gap') for g in (3.5, 3.7, 3.6)]
  fields = sweep._gap_fields('d', pairs)
  expected = sweep._paired_fields('d', [0.5, 0.7, 0.6])
  assert fields['d_resolved'] is expected.pop('d_resolved') is True
  assert {k: fields[k] for k in expected} == pytest.approx(expected)
  assert fields['d_examples'] == 0
  # Examples of different length (not the same eval) are not paired either.
  a, b = _row([[10.0, 5.0], [8.0, 4.0]]), _row([[9.0, 5.0], [7.0, 4.0], [1.0, 1.0]])
  assert sweep._gap_fields('d', [(a, 'gap', b, 'gap')])['d_examples'] == 0


def test_the_interval_covers_the_true_gap_about_95_percent_of_the_time():
  """Simulated gap evals: examples drawn from a population with a known mean difference
  per token, plus a per-seed shift (uptraining noise) of known spread."""
  rng = np.random.default_rng(1)
  true_gap, covered, trials = 0.3, 0, 400
  for _ in range(trials):
    m = 48
    tokens = rng.integers(4, 12, size=m).astype(float)
    base = rng.normal(3.0, 0.6, size=m)
    example_effect = rng.normal(true_gap, 0.8, size=m)   # this sample's examples
    mha = _examples(rng, tokens, base)
    pairs = []
    for seed in range(5):
      shift = rng.normal(0.0, 0.05)                        # this seed's uptraining
      noise = rng.normal(0.0, 0.1, size=m)
      mqa = _examples(rng, tokens, base + example_effect + shift + noise)
      pairs.append((_row(mqa), 'gap', _row(mha), 'gap'))
    fields = sweep._gap_fields('d', pairs)
    covered += fields['d_lo'] <= true_gap <= fields['d_hi']
  # Binomial(400, 0.95) lies in [366, 393] with probability > 0.998.
  assert 366 <= covered <= 396, covered
