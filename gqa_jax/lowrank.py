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


def _factor(calibration: Optional[np.ndarray], d: int, ridge: float) -> np.ndarray:
  """L with C = L L^T (float64); the identity without calibration."""
  if calibration is None:
    return np.eye(d)
  c = np.asarray(calibration, np.float64)
  if c.shape != (d, d):
    raise ValueError(f'calibration is {c.shape}, expected [{d}, {d}] (the input second '
                     'moment of this attention module).')
  c = (c + c.T) / 2 + ridge * np.trace(c) / d * np.eye(d)
  return np.linalg.cholesky(c)


def svd_group(heads: np.ndarray, calibration: Optional[np.ndarray] = None,
              ridge: float = 1e-6) -> Tuple[np.ndarray, np.ndarray]:
  """heads [R, D, H] (one group's kernels) -> (U [D, H], A [R, H, H]) with W_n ~ U A_n,
  optimal in the calibration-weighted norm (see the module docstring); float64."""
  heads = np.asarray(heads, np.float64)
  r, d, h = heads.shape
  lower = _factor(calibration, d, ridge)
  stacked = lower.T @ heads.transpose(1, 0, 2).reshape(d, r * h)  # [D, R*H]
  p = np.linalg.svd(stacked, full_matrices=False)[0][:, :h]  # [D, H]
  shared = np.linalg.solve(lower.T, p)  # U = L^-T P
  maps = np.einsum('dk,rdh->rkh', p, np.einsum('ed,reh->rdh', lower, heads))  # P^T L^T W_n
  return shared, maps


def fold_query(query: np.ndarray, maps: np.ndarray) -> np.ndarray:
  """Query kernels of the group's heads [R, D, H] -> Q_n A_n^T (keys' maps)."""
  return np.einsum('rdh,rkh->rdk', np.asarray(query, np.float64), maps)


def fold_out(out: np.ndarray, maps: np.ndarray) -> np.ndarray:
  """Out-projection rows of the group's heads [R, H, D] -> B_n O_n (values' maps)."""
  return np.einsum('rkh,rhd->rkd', maps, np.asarray(out, np.float64))
