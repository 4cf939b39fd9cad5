"""Low-rank (SVD) conversion of a group of K/V heads into one (Yu et al. 2024, "Effectively
Compress KV Heads for LLM", arXiv 2406.07056), the math alone; `convert` applies it.

A group of R source heads has kernels W_n [D, H] (n = 1..R) for its keys (or values). One
shared head U [D, H] with a per-head map A_n [H, H] reproduces head n as x U A_n. With the
input's second moment C = E[x^T x] (calibration; identity for weights only) and C = L L^T,
the error sum_n E|x W_n - x U A_n|^2 = |L^T [W_1 .. W_R] - L^T U [A_1 .. A_R]|_F^2 is
smallest (Eckart-Young) for L^T U = P, the top-H left singular vectors of
L^T [W_1 .. W_R], and A_n = P^T L^T W_n. The maps fold into the neighbouring kernels, so
nothing is added at run time:

  keys:   logits_n = (x_q Q_n)(x_k U A_n)^T = (x_q Q_n A_n^T)(x_k U)^T: Q_n <- Q_n A_n^T;
  values: out = sum_n (x U B_n) O_n = sum_n (x U)(B_n O_n):            O_n <- B_n O_n.

T5's relative position bias is added to the logits and is unchanged. When the group's
stacked kernels have rank <= H the fold is exact; otherwise the truncation is the only
approximation.
"""

from typing import Optional, Tuple

import numpy as np
import scipy.linalg


def calibration_factor(calibration: Optional[np.ndarray], d: int,
                       ridge: float = 1e-6) -> Optional[np.ndarray]:
  """L with C = L L^T (float64); None (the identity) without calibration. The groups of
  one kernel share it: pass it to `svd_group` / `procrustes_group` as `lower`."""
  if calibration is None:
    return None
  c = np.asarray(calibration, np.float64)
  if c.shape != (d, d):
    raise ValueError(f'calibration is {c.shape}, expected [{d}, {d}] (the input second '
                     'moment of this attention module).')
  c = (c + c.T) / 2 + ridge * np.trace(c) / d * np.eye(d)
  return np.linalg.cholesky(c)


def _whiten(lower: Optional[np.ndarray], heads: np.ndarray) -> np.ndarray:
  """L^T W for each head of heads [R, D, H] (W itself without calibration)."""
  return heads if lower is None else np.matmul(lower.T, heads)


def top_left_singular_vectors(m: np.ndarray, k: int) -> np.ndarray:
  """The k leading left singular vectors of m [D, C] (float64), columns in order.

  Only those k are computed: from the eigenvectors of the smaller Gram matrix (LAPACK's
  subset eigensolver; at T5-XXL's D = 4096 with C = 4096 a few times faster than the full
  SVD). With C < D, P = m V / s from the C x C Gram m^T m; when the kept singular values
  are too spread for that division to keep P orthonormal (the k-th below 1e-4 of the
  first), the SVD itself."""
  d, c = m.shape
  if c < d:
    w, v = scipy.linalg.eigh(m.T @ m, subset_by_index=[c - k, c - 1])
    w, v = w[::-1], v[:, ::-1]
    if w[-1] > 1e-8 * w[0]:
      return (m @ v) / np.sqrt(w)
    return np.linalg.svd(m, full_matrices=False)[0][:, :k]
  w, v = scipy.linalg.eigh(m @ m.T, subset_by_index=[d - k, d - 1])
  return v[:, ::-1]


def svd_group(heads: np.ndarray, calibration: Optional[np.ndarray] = None,
              ridge: float = 1e-6, lower: Optional[np.ndarray] = None
              ) -> Tuple[np.ndarray, np.ndarray]:
  """heads [R, D, H] (one group's kernels) -> (U [D, H], A [R, H, H]) with W_n ~ U A_n,
  optimal in the calibration-weighted norm (see the module docstring); float64. `lower`:
  the calibration's factor from `calibration_factor`, instead of `calibration`."""
  heads = np.asarray(heads, np.float64)
  r, d, h = heads.shape
  if lower is None:
    lower = calibration_factor(calibration, d, ridge)
  white = _whiten(lower, heads)  # L^T W_n
  stacked = white.transpose(1, 0, 2).reshape(d, r * h)  # [D, R*H]
  p = top_left_singular_vectors(stacked, h)  # [D, H]
  shared = p if lower is None else np.linalg.solve(lower.T, p)  # U = L^-T P
  maps = np.matmul(p.T, white)  # P^T L^T W_n
  return shared, maps


def fold_query(query: np.ndarray, maps: np.ndarray) -> np.ndarray:
  """Query kernels of the group's heads [R, D, H] -> Q_n A_n^T (keys' maps)."""
  return np.matmul(np.asarray(query, np.float64), maps.transpose(0, 2, 1))


def fold_out(out: np.ndarray, maps: np.ndarray) -> np.ndarray:
  """Out-projection rows of the group's heads [R, H, D] -> B_n O_n (values' maps)."""
  return np.matmul(maps, np.asarray(out, np.float64))


# ---------------------------------------------------------- aligned merging ----
# Jin et al. 2024 (arXiv 2412.20677): heads of a group are first rotated onto each other,
# then averaged. An orthogonal R_n with W_n R_n ~ M turns head n into W_n = (W_n R_n) R_n^T;
# with the shared head U = mean_n W_n R_n the map is A_n = R_n^T, folded exactly as the
# SVD's maps are (a rotation of a head's keys and queries together leaves its logits as
# they were, and so does one of its values with the rows of its out projection).

def _polar(m: np.ndarray) -> np.ndarray:
  """The orthogonal matrix nearest to m (orthogonal Procrustes: argmax_R tr(R^T m))."""
  u, _, vt = np.linalg.svd(m)
  return u @ vt


def procrustes_group(heads: np.ndarray, calibration: Optional[np.ndarray] = None,
                     iterations: int = 20, ridge: float = 1e-6,
                     lower: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
  """heads [R, D, H] -> (U [D, H], A [R, H, H]) with W_n ~ U A_n, A_n orthogonal.

  Generalised Procrustes in the calibration-weighted norm |L^T (.)|_F: the reference M
  starts as the first head; each head is rotated onto it (R_n = polar(W_n^T C M)), M
  becomes the mean of the rotated heads, until M stops changing. U = M: the mean of the
  aligned heads (mean pooling after alignment). Heads that are rotated copies of one
  kernel are recovered exactly. `lower`: as in `svd_group`."""
  heads = np.asarray(heads, np.float64)
  r, d, h = heads.shape
  if lower is None:
    lower = calibration_factor(calibration, d, ridge)
  white = _whiten(lower, heads)  # L^T W_n
  ref = white[0]
  rots = np.broadcast_to(np.eye(h), (r, h, h))
  for _ in range(max(1, iterations)):
    rots = np.stack([_polar(w.T @ ref) for w in white])  # [R, H, H]
    new = np.matmul(white, rots).sum(0) / r
    done = np.linalg.norm(new - ref) <= 1e-12 * max(1.0, np.linalg.norm(ref))
    ref = new
    if done:
      break
  shared = np.matmul(heads, rots).sum(0) / r  # mean of the aligned heads
  return shared, np.ascontiguousarray(rots.transpose(0, 2, 1))


# ---------------------------------------------------------- searched grouping ----
# AsymGQA (arXiv 2406.14963) and QCQA (arXiv 2406.10247) choose which heads share a KV
# head by similarity. Here: an affinity between every two heads (summed over K and V, and
# over the layers that must share one grouping), and a pair-swap local search from the
# contiguous grouping that maximises the affinity within groups, so the result is never
# worse than contiguous on that criterion.

AFFINITIES = ('inner', 'aligned', 'subspace')


def affinity(heads: np.ndarray, calibration: Optional[np.ndarray] = None,
             kind: str = 'inner', ridge: float = 1e-6) -> np.ndarray:
  """heads [K, D, H] -> [K, K] affinity, each term from M_ij = (L^T W_i)^T (L^T W_j):
  'inner' tr(M_ij) (mean pooling's error is the scatter this lowers), 'aligned' the
  nuclear norm of M_ij (the inner product after the best rotation: Procrustes), 'subspace'
  |M_ij|_F^2 (how much the heads' column spaces overlap: SVD)."""
  heads = np.asarray(heads, np.float64)
  lower = calibration_factor(calibration, heads.shape[1], ridge)
  white = _whiten(lower, heads)
  k, d, h = white.shape
  flat = white.transpose(1, 0, 2).reshape(d, k * h)  # one matmul: [K*H, K*H]
  m = (flat.T @ flat).reshape(k, h, k, h).transpose(0, 2, 1, 3)  # [K, K, H, H]
  if kind == 'inner':
    return np.einsum('ijhh->ij', m)
  if kind == 'aligned':
    return np.linalg.svd(m, compute_uv=False).sum(-1)
  if kind == 'subspace':
    return (m ** 2).sum((-1, -2))
  raise ValueError(f'unknown affinity {kind!r}; use one of {AFFINITIES}.')


def search_groups(affinity_matrix: np.ndarray, num_groups: int,
                  max_passes: int = 100) -> np.ndarray:
  """A permutation of the K heads (position p holds head perm[p]) whose contiguous groups
  of K // num_groups have a large total within-group affinity: pair swaps between groups
  from the contiguous grouping, the best swap of each pass, until none helps. Groups are
  ordered by their first head and heads ascending within a group, so that a grouping
  already best returns the identity."""
  a = np.asarray(affinity_matrix, np.float64)
  a = (a + a.T) / 2
  k = a.shape[0]
  if k % num_groups:
    raise ValueError(f'{num_groups} groups do not divide {k} heads.')
  size = k // num_groups
  group = np.arange(k) // size
  for _ in range(max_passes):
    # to[i, g]: head i's affinity to the members of group g (itself excluded).
    to = np.stack([a[:, group == g].sum(1) for g in range(num_groups)], 1)
    to[np.arange(k), group] -= np.diag(a)
    own = to[np.arange(k), group]
    # Swapping i (group gi) and j (group gj): gain = to[i, gj] - own_i + to[j, gi] - own_j
    # - 2 a_ij (i and j are counted in each other's new group before the swap).
    gain = (to[:, group] - own[:, None]) + (to[:, group].T - own[None, :]) - 2 * a
    gain[group[:, None] == group[None, :]] = -np.inf
    i, j = np.unravel_index(np.argmax(gain), gain.shape)
    if not gain[i, j] > 1e-12 * max(1.0, np.abs(a).max()):
      break
    group[i], group[j] = group[j], group[i]
  members = sorted((sorted(np.flatnonzero(group == g).tolist()) for g in range(num_groups)),
                   key=lambda m: m[0])
  return np.array([i for m in members for i in m])
