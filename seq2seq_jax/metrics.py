"""Image-quality metrics as the official evaluation computes them (data range 2 on [-1, 1])."""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

DATA_RANGE = 2.0


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = DATA_RANGE) -> float:
  """10·log10(range² / MSE) over the whole array (the official `torch_PSNR`)."""
  mse = np.mean((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2)
  if mse == 0:
    return float("inf")
  return float(10.0 * np.log10(data_range ** 2 / mse))


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = DATA_RANGE) -> float:
  """scikit-image SSIM (7-wide uniform window) on a 2D image or 3D stack, as the official."""
  pred = np.asarray(pred, np.float64)
  target = np.asarray(target, np.float64)
  if pred.shape != target.shape:
    raise ValueError(f"ssim: shapes differ, {pred.shape} vs {target.shape}")
  # scikit-image's default 7-wide window, shrunk (odd) for stacks thinner than 7 slices.
  win = min(7, min(pred.shape))
  win -= 1 - win % 2
  if win < 3:
    raise ValueError(f"ssim: image {pred.shape} too small for a 3-wide window")
  return float(structural_similarity(target, pred, data_range=data_range, win_size=win))


def middle_channel(x: np.ndarray) -> np.ndarray:
  """Model-layout `[n, t, *spatial, c]` → the scored image stack.

  2.5D: the middle channel of each slice stack, stacked over `n` (the slices) → `[n, H, W]`
  (t = 1). 3D: `[t·D, H, W]` of the single channel.
  """
  x = np.asarray(x)
  mid = x[..., (x.shape[-1] - 1) // 2]
  return mid.reshape((-1,) + mid.shape[-2:])
