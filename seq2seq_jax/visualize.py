"""PNG sample grids (source, target, and the output for every target sequence)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image


def to_uint8(img: np.ndarray) -> np.ndarray:
  """[-1, 1] → [0, 255], clipped (as the official grids with clip_range=(-1, 1))."""
  return np.round((np.clip(img, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def central_image(x: np.ndarray) -> np.ndarray:
  """One 2D image from a model-layout example `[t, *spatial, c]`: the first image of the
  sequence, middle channel, central axial slice for 3D."""
  x = np.asarray(x)[0]
  x = x[..., (x.shape[-1] - 1) // 2]
  while x.ndim > 2:
    x = x[x.shape[0] // 2]
  return x


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: str, labels=None) -> str:
  """Writes a grid of equally sized 2D images in [-1, 1] to `path` (PNG), atomically."""
  h = max(img.shape[0] for row in rows for img in row)
  w = max(img.shape[1] for row in rows for img in row)
  ncol = max(len(r) for r in rows)
  pad = 2
  canvas = np.zeros((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad), np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      canvas[y:y + img.shape[0], x:x + img.shape[1]] = to_uint8(img)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp.png"
  Image.fromarray(canvas).save(tmp)
  os.replace(tmp, path)
  return path
