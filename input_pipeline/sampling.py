"""The official training sampling, as pure functions of (subject, random generator).

One subject visit gives `rep_step` examples sharing one left-right flip; each example draws a
source and a target uniformly and independently among the subject's available sequences (they
may be equal) and a random crop, redrawn while the source crop is all background (the official
loop skips such crops; redrawing keeps batch sizes fixed, see README.md).
"""
from typing import Dict, Sequence, Tuple

import numpy as np

from input_pipeline import geometry

MAX_REDRAWS = 20  # beyond this an all-background crop is kept (a nearly empty volume)


def background_value(normalization: str) -> float:
  return -1.0


def is_background(crop: np.ndarray, normalization: str) -> bool:
  """Official rule: |mean + 1| < 1e-8, i.e. every voxel at the clip floor -1. Other schemes
  have no fixed floor, so there a constant crop counts as background."""
  if normalization == "official":
    return abs(float(crop.mean(dtype=np.float64)) + 1.0) < 1e-8
  return float(crop.max()) == float(crop.min())


def crop_shape(ndims: int, c_in: int, crop_size: Sequence[int]) -> Tuple[int, int, int]:
  """Depth/height/width of the window read from a [t, D, H, W] volume."""
  if ndims == 2:
    if len(crop_size) == 3 and crop_size[0] != 1:
      raise ValueError(f"2D crop_size is [1, H, W] (one slice stack), got {list(crop_size)}")
    h, w = crop_size[-2:]
    return c_in, int(h), int(w)
  if ndims == 3:
    if c_in != 1:
      raise ValueError(f"3D crops take c_in = 1, got {c_in}")
    d, h, w = crop_size
    return int(d), int(h), int(w)
  raise ValueError(f"ndims must be 2 or 3, got {ndims}")


def random_corner(rng, shape: Sequence[int], window: Sequence[int]) -> Tuple[int, ...]:
  """Crop start per axis as the official `randint(0, s - w - 1) if s > w else 0`: the last
  possible start is never drawn (kept for fidelity)."""
  return tuple(int(rng.integers(0, s - w)) if s > w else 0 for s, w in zip(shape, window))


def read_window(vol: np.ndarray, corner, window, value: float,
                scale: float = 1.0) -> np.ndarray:
  """vol[:, corner:corner+window] as float32 times the storage scale (int16 storage), padded
  with `value` where the volume is smaller."""
  sl = tuple(slice(c, c + w) for c, w in zip(corner, window))
  out = np.asarray(vol[(slice(None),) + sl], np.float32)
  if scale != 1.0:
    out *= np.float32(scale)
  short = [(0, w - s) for s, w in zip(out.shape[1:], window)]
  if any(p[1] for p in short):
    out = np.pad(out, [(0, 0)] + short, constant_values=value)
  return out


def to_model_layout(win: np.ndarray, ndims: int) -> np.ndarray:
  """[t, d, h, w] window -> [t, h, w, c_in=d] (2.5D) or [t, d, h, w, 1] (3D)."""
  if ndims == 2:
    return win.transpose(0, 2, 3, 1)
  return win[..., None]


def draw_example(rng, vols: Dict[int, np.ndarray], src: int, tgt: int, flip: bool, ndims: int,
                 window, normalization: str, pad_multiple: int, scale: float = 1.0):
  """One (src, tgt) crop pair from a subject's volumes {seq index: [t, D, H, W]}."""
  value = background_value(normalization)
  vs, vt = vols[src], vols[tgt]
  if flip:  # left-right: the last (x) axis, as the official `x[:, :, ::-1]`
    vs, vt = vs[..., ::-1], vt[..., ::-1]
  for _ in range(MAX_REDRAWS):
    corner = random_corner(rng, vs.shape[1:], window)
    s = read_window(vs, corner, window, value, scale)
    if not is_background(s, normalization):
      break
  t = read_window(vt, corner, window, value, scale)
  s, t = to_model_layout(s, ndims), to_model_layout(t, ndims)
  axes = list(range(1, 1 + ndims))
  s, _ = geometry.pad_to_multiple(s, axes, pad_multiple, value)
  t, _ = geometry.pad_to_multiple(t, axes, pad_multiple, value)
  return s, t
