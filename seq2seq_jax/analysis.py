"""The paper's analyses: sequence contribution (C_t, C_d), imaging-differentiation maps (M_d),
a scale-robust metric variant, and ROC AUC of a map against a ground-truth mask.

Contribution (paper Table 3, official script): every metric is z-scored over all rows
(eps 1e-9); A[i][j] = mean z(psnr) + mean z(ssim) - mean z(lpips) over the rows with source i
and target j (0 where there is none); C_t(i) = mean_j A[i][j] (how well sequence i serves as a
source), C_d(i) = -mean_j A[j][i] (how hard sequence i is to synthesise: the larger, the more
content of its own). Means run over all N sequences, empty cells included.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from skimage.metrics import structural_similarity

EPS = 1e-9


def zscore(v: Sequence[float]) -> np.ndarray:
  """(v - mean) / (std + eps) over every row (population std, as numpy's default)."""
  v = np.asarray(v, np.float64)
  return (v - v.mean()) / (v.std() + EPS)


def contribution(rows: Sequence[Mapping], sequences: Sequence[str],
                 metrics: Sequence[str] = ("psnr", "ssim", "lpips")) -> dict:
  """C_t and C_d per sequence from metric rows.

  Args:
    rows: dicts with `src`, `tgt` (sequence names) and the metric keys. A metric missing from
      every row (e.g. lpips without weights) is left out; `lpips` (lower is better) enters
      with a minus sign, every other metric with a plus.
    sequences: the N sequences, in code order.
    metrics: metric keys to combine.

  Returns:
    {'A': [N, N] array, 'C_t', 'C_d': [N] arrays, 'rank_t', 'rank_d': [N] int (1 = largest),
     'metrics': the metrics used}.
  """
  n = len(sequences)
  index = {s: i for i, s in enumerate(sequences)}
  for r in rows:
    for k in ("src", "tgt"):
      if r[k] not in index:
        raise ValueError(f"contribution: row {dict(r)} names {k}={r[k]!r}, not one of "
                         f"{list(sequences)}")
  used = [m for m in metrics
          if rows and all(r.get(m) is not None and np.isfinite(float(r[m])) for r in rows)]
  a = np.zeros((n, n))
  if rows:
    total = np.zeros(len(rows))
    for m in used:
      sign = -1.0 if m == "lpips" else 1.0
      total += sign * zscore([float(r[m]) for r in rows])
    src = np.array([index[r["src"]] for r in rows])
    tgt = np.array([index[r["tgt"]] for r in rows])
    for i in range(n):
      for j in range(n):
        sel = (src == i) & (tgt == j)
        if sel.any():
          a[i, j] = total[sel].mean()
  c_t = a.mean(axis=1)
  c_d = -a.mean(axis=0)
  return {"A": a, "C_t": c_t, "C_d": c_d, "rank_t": ranks(c_t), "rank_d": ranks(c_d),
          "metrics": used}


def ranks(v: np.ndarray) -> np.ndarray:
  """1 for the largest value, 2 for the next, ... (ties broken by order)."""
  order = np.argsort(-np.asarray(v), kind="stable")
  out = np.empty(len(order), int)
  out[order] = np.arange(1, len(order) + 1)
  return out


def md_map(predictions: Sequence[np.ndarray], target: np.ndarray) -> np.ndarray:
  """M_d for one target: the mean over sources of |G(x_i, code_j) - x_j|.

  Args:
    predictions: one array per source i (the target j itself included), each shaped as
      `target`.
    target: the ground-truth x_j.
  """
  if not len(predictions):
    raise ValueError("md_map: no source predictions")
  target = np.asarray(target, np.float32)
  acc = np.zeros(target.shape, np.float64)
  for p in predictions:
    if p.shape != target.shape:
      raise ValueError(f"md_map: prediction shape {p.shape} differs from target {target.shape}")
    acc += np.abs(np.asarray(p, np.float64) - target)
  return (acc / len(predictions)).astype(np.float32)


def foreground(*volumes: np.ndarray, background: float = -1.0, tol: float = 1e-3) -> np.ndarray:
  """Voxels above the background in any of the volumes (the official scheme maps air to -1)."""
  mask = np.zeros(np.shape(volumes[0]), bool)
  for v in volumes:
    mask |= np.asarray(v) > background + tol
  return mask


ROBUST_RANGE = 8.0  # fixed data range for the standardised images (±4 robust SDs)


def _standardize_in(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """(x - median) / (IQR / 1.349) over `mask`: a z-score that a few bright voxels (lesions)
  do not move, so the scale reflects the tissue rather than what is unique in the image."""
  x = np.asarray(x, np.float64)
  q1, med, q3 = np.percentile(x[mask], [25, 50, 75])
  return (x - med) / ((q3 - q1) / 1.349 + EPS)


def robust_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict:
  """Scale-robust PSNR/SSIM: both images robustly standardised within `mask` (the brain) and
  scored there.

  The official PSNR depends on each volume's normalisation scale (2·p99 of the whole
  volume), which differs between sequences for reasons unrelated to content. Here each image
  is standardised in the brain with its median and interquartile range (robust to the few
  voxels of a lesion, which a mean/std z-score or a max-min range would let rescale the whole
  image), so a gain or offset costs nothing. Both metrics use the fixed data range
  `ROBUST_RANGE`, the same for every sequence: `zpsnr` = 10·log10(range² / MSE) over the
  mask, `zssim` = the mean of scikit-image's SSIM map over the mask.
  """
  mask = np.asarray(mask, bool)
  if mask.shape != np.shape(target) or not mask.any():
    raise ValueError(f"robust_metrics: mask {mask.shape} (sum {int(mask.sum())}) does not fit "
                     f"target {np.shape(target)}")
  zp, zt = _standardize_in(pred, mask), _standardize_in(target, mask)
  mse = float(np.mean((zp[mask] - zt[mask]) ** 2))
  zpsnr = float("inf") if mse == 0 else float(10 * np.log10(ROBUST_RANGE ** 2 / mse))
  # Outside the mask both are set to 0 (the standardised median) so that air does not matter.
  zp[~mask] = 0.0
  zt[~mask] = 0.0
  win = min(7, min(zt.shape))
  win -= 1 - win % 2
  _, smap = structural_similarity(zt, zp, data_range=ROBUST_RANGE, win_size=win, full=True)
  return {"zpsnr": zpsnr, "zssim": float(smap[mask].mean())}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve of `scores` for binary `labels` (Mann-Whitney U, ties count ½)."""
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels, bool).ravel()
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"roc_auc: need both classes, got {n_pos} positive and {n_neg} negative")
  order = np.argsort(scores, kind="mergesort")
  sorted_ranks = np.arange(1, len(scores) + 1, dtype=np.float64)
  _, start, counts = np.unique(scores[order], return_index=True, return_counts=True)
  for st, c in zip(start, counts):
    if c > 1:  # tied scores share their average rank
      sorted_ranks[st:st + c] = sorted_ranks[st:st + c].mean()
  rank = np.empty(len(scores))
  rank[order] = sorted_ranks
  u = rank[labels].sum() - n_pos * (n_pos + 1) / 2
  return float(u / (n_pos * n_neg))
