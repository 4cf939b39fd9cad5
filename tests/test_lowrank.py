"""Low-rank conversion math (gqa_jax.lowrank) against its oracles: exact recovery when a
group has rank <= H, one head per group is lossless, and Eckart-Young against mean
pooling on the calibration data."""

import numpy as np
import pytest

from gqa_jax import lowrank

D, H, R, S = 24, 4, 3, 64


def attention_out(xq, xk, q, k, v, o):
  """Sum over the group's heads of softmax(x_q Q_n (x_k K_n)^T) x_k V_n O_n: [T, D]."""
  total = 0
  for n in range(q.shape[0]):
    logits = (xq @ q[n]) @ (xk @ k[n]).T
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    total = total + w @ (xk @ v[n]) @ o[n]
  return total


@pytest.mark.parametrize('calibrated', [False, True])
def test_heads_made_from_one_head_by_invertible_maps_are_recovered_exactly(calibrated):
  """MHA built from one shared K/V head by invertible per-head maps (the query and out
  compensated) is converted back exactly: the group's stacked kernels have rank H."""
  rng = np.random.default_rng(0)
  k_shared, v_shared = rng.standard_normal((2, D, H))
  rot = rng.standard_normal((R, H, H)) + 2 * np.eye(H)
  mix = rng.standard_normal((R, H, H)) + 2 * np.eye(H)
  k = np.einsum('dh,rhk->rdk', k_shared, rot)  # K_n = K R_n
  v = np.einsum('dh,rhk->rdk', v_shared, mix)  # V_n = V P_n
  q = rng.standard_normal((R, D, H)) / 3
  o = rng.standard_normal((R, H, D)) / 3
  xq, xk = rng.standard_normal((5, D)), rng.standard_normal((S, D))
  calibration = xk.T @ xk / S if calibrated else None
  uk, a = lowrank.svd_group(k, calibration)
  uv, b = lowrank.svd_group(v, calibration)
  np.testing.assert_allclose(np.einsum('dh,rhk->rdk', uk, a), k, atol=1e-9)
  converted = attention_out(xq, xk, lowrank.fold_query(q, a), np.stack([uk] * R),
                            np.stack([uv] * R), lowrank.fold_out(o, b))
  np.testing.assert_allclose(converted, attention_out(xq, xk, q, k, v, o), atol=1e-9)
  # Mean pooling is off on the same model.
  mean_k, mean_v = np.stack([k.mean(0)] * R), np.stack([v.mean(0)] * R)
  assert np.abs(attention_out(xq, xk, q, mean_k, mean_v, o)
                - attention_out(xq, xk, q, k, v, o)).max() > 1e-2


def test_one_head_per_group_is_lossless():
  rng = np.random.default_rng(1)
  k = rng.standard_normal((1, D, H))
  u, a = lowrank.svd_group(k)
  np.testing.assert_allclose(u @ a[0], k[0], atol=1e-12)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_reconstruction_error_on_calibration_data_is_at_most_mean_poolings(seed):
  """Eckart-Young: on the calibration inputs, the SVD head with its maps reproduces the
  group's outputs at least as well as the mean head with the best maps of all (so also
  mean pooling's identity maps)."""
  rng = np.random.default_rng(seed)
  heads = rng.standard_normal((R, D, H))
  x = rng.standard_normal((S, D)) @ rng.standard_normal((D, D))  # correlated inputs
  u, a = lowrank.svd_group(heads, x.T @ x / S)
  svd_error = sum(np.sum((x @ heads[n] - x @ u @ a[n]) ** 2) for n in range(R))
  mean = heads.mean(0)
  mean_error = sum(np.sum((x @ heads[n] - x @ mean) ** 2) for n in range(R))
  best_mean_maps = [np.linalg.lstsq(x @ mean, x @ heads[n], rcond=None)[0] for n in range(R)]
  best_mean_error = sum(np.sum((x @ heads[n] - x @ mean @ best_mean_maps[n]) ** 2)
                        for n in range(R))
  assert svd_error <= best_mean_error * (1 + 1e-9) <= mean_error * (1 + 1e-9)
  assert svd_error < mean_error


def test_calibration_of_the_wrong_size_names_the_expected_shape():
  with pytest.raises(ValueError, match=rf'expected \[{D}, {D}\]'):
    lowrank.svd_group(np.zeros((R, D, H)), np.eye(D + 1))


def rotation(rng, n):
  return np.linalg.qr(rng.standard_normal((n, n)))[0]


@pytest.mark.parametrize('calibrated', [False, True])
def test_procrustes_recovers_rotated_copies_exactly(calibrated):
  """Heads that are rotated copies of one kernel (W_n = W Q_n) are aligned onto each other:
  the shared head times each orthogonal map gives every head back, and the folded group
  computes what the original did; mean pooling of the same heads is off."""
  rng = np.random.default_rng(3)
  k = np.einsum('dh,rhk->rdk', rng.standard_normal((D, H)),
                np.stack([rotation(rng, H) for _ in range(R)]))
  v = np.einsum('dh,rhk->rdk', rng.standard_normal((D, H)),
                np.stack([rotation(rng, H) for _ in range(R)]))
  q, o = rng.standard_normal((R, D, H)) / 3, rng.standard_normal((R, H, D)) / 3
  xq, xk = rng.standard_normal((5, D)), rng.standard_normal((S, D))
  calibration = xk.T @ xk / S if calibrated else None
  uk, a = lowrank.procrustes_group(k, calibration)
  uv, b = lowrank.procrustes_group(v, calibration)
  np.testing.assert_allclose(np.einsum('rhk,rjk->rhj', a, a), np.stack([np.eye(H)] * R),
                             atol=1e-12)  # orthogonal maps
  np.testing.assert_allclose(np.einsum('dh,rhk->rdk', uk, a), k, atol=1e-9)
  reference = attention_out(xq, xk, q, k, v, o)
  converted = attention_out(xq, xk, lowrank.fold_query(q, a), np.stack([uk] * R),
                            np.stack([uv] * R), lowrank.fold_out(o, b))
  np.testing.assert_allclose(converted, reference, atol=1e-9)
  mean = attention_out(xq, xk, q, np.stack([k.mean(0)] * R), np.stack([v.mean(0)] * R), o)
  assert np.abs(mean - reference).max() > 1e-2


def within(affinity, perm, size):
  groups = np.asarray(perm).reshape(-1, size)
  return sum(affinity[np.ix_(g, g)].sum() for g in groups)


@pytest.mark.parametrize('seed', range(5))
def test_searched_groups_are_never_worse_than_contiguous_and_find_planted_ones(seed):
  rng = np.random.default_rng(seed)
  k, groups = 12, [2, 3, 4, 6][seed % 4]
  size = k // groups
  noise = rng.standard_normal((k, k))
  affinity = noise + noise.T
  perm = lowrank.search_groups(affinity, groups)
  assert sorted(perm) == list(range(k))
  assert within(affinity, perm, size) >= within(affinity, np.arange(k), size) - 1e-9
  # Planted: heads of one hidden group are near copies; the search recovers the groups.
  hidden = rng.permutation(k).reshape(groups, size)
  heads = np.empty((k, D, H))
  for members in hidden:
    heads[members] = rng.standard_normal((D, H)) + 0.05 * rng.standard_normal((size, D, H))
  found = lowrank.search_groups(lowrank.affinity(heads), groups).reshape(groups, size)
  assert sorted(map(sorted, found.tolist())) == sorted(map(sorted, hidden.tolist()))


def test_a_grouping_that_is_already_best_is_kept_in_order():
  rng = np.random.default_rng(0)
  heads = np.repeat(rng.standard_normal((4, D, H)), 2, axis=0)  # pairs 0-1, 2-3, ...
  for kind in lowrank.AFFINITIES:
    np.testing.assert_array_equal(
        lowrank.search_groups(lowrank.affinity(heads, kind=kind), 4), np.arange(8))


@pytest.mark.parametrize('shape,rank', [((64, 24), 24), ((24, 64), 24), ((64, 24), 5)])
def test_top_left_singular_vectors_span_what_the_svd_spans(shape, rank):
  """Both Gram branches (C < D, C >= D) and the SVD fallback (rank below k: singular
  values that vanish) give orthonormal columns spanning the SVD's leading k."""
  rng = np.random.default_rng(0)
  m = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
  m *= np.exp(-np.arange(shape[1]) / 8)  # distinct, decaying singular values
  k = 6
  got = lowrank.top_left_singular_vectors(m, k)
  want = np.linalg.svd(m, full_matrices=False)[0][:, :k]
  np.testing.assert_allclose(got.T @ got, np.eye(k), atol=1e-10)
  # The same subspace: the projection of one onto the other keeps every column.
  np.testing.assert_allclose(np.abs(np.sum(got * want, axis=0)), 1.0, atol=1e-9)
