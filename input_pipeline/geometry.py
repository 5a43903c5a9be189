"""Array geometry: padding to the model's stride, slice stacking, and the way back to NIfTI.

Stored volumes are [t, D, H, W] in SimpleITK order (z, y, x), depth-cropped to the central
slices; `to_nifti_array` undoes both so a prediction can be saved with the input's affine.
"""
from typing import List, Sequence, Tuple

import numpy as np

Pads = List[Tuple[int, int]]


def pad_to_multiple(x: np.ndarray, axes: Sequence[int], multiple: int,
                    value: float = -1.0) -> Tuple[np.ndarray, Pads]:
  """Pads `axes` of x up to a multiple of `multiple` with a constant, split evenly (the extra
  voxel after). Constant -1 is the official background, so padding looks like air to the
  model. Returns (padded, [(before, after)] per axis) for `unpad`."""
  pads = []
  width = [(0, 0)] * x.ndim
  for a in axes:
    total = (-x.shape[a]) % multiple if multiple > 1 else 0
    pads.append((total // 2, total - total // 2))
    width[a] = pads[-1]
  if not any(p != (0, 0) for p in pads):
    return x, pads
  return np.pad(x, width, mode="constant", constant_values=value), pads


def unpad(x: np.ndarray, axes: Sequence[int], pads: Pads) -> np.ndarray:
  """Crops back what `pad_to_multiple` added."""
  sl = [slice(None)] * x.ndim
  for a, (b, e) in zip(axes, pads):
    sl[a] = slice(b, x.shape[a] - e)
  return x[tuple(sl)]


def stack_slices(vol: np.ndarray, c_in: int, start: int = 0, count: int = None,
                 value: float = -1.0) -> np.ndarray:
  """2.5D stacks centred on slices start..start+count-1 of vol [t, D, H, W] -> [n, t, H, W, c_in].

  Stack j holds slices m - c_in//2 .. m - c_in//2 + c_in - 1 around m = start + j, the same
  'sample j holds slices j..j+c_in-1' as training, shifted so that its middle channel is slice
  m; neighbours beyond the volume are the constant `value` (background).
  """
  d = vol.shape[1]
  count = d - start if count is None else count
  lo = c_in // 2
  padded = np.pad(vol, [(0, 0), (lo, c_in - 1 - lo), (0, 0), (0, 0)], constant_values=value)
  idx = start + np.arange(count)[:, None] + np.arange(c_in)[None, :]  # into padded depth
  out = padded[:, idx]  # [t, n, c_in, H, W]
  return np.ascontiguousarray(out.transpose(1, 0, 3, 4, 2))


def unstack_middle(stacks: np.ndarray) -> np.ndarray:
  """[n, t, H, W, c_in] -> [t, n, H, W], the middle channel of each stack (what is scored)."""
  return np.ascontiguousarray(stacks[..., stacks.shape[-1] // 2].transpose(1, 0, 2, 3))


def to_nifti_array(vol: np.ndarray, original_shape: Sequence[int], depth_start: int,
                   fill: float = 0.0) -> np.ndarray:
  """[t, D, H, W] (or [D, H, W]) in stored order -> nibabel order at the original size.

  Slices removed by the central depth crop are set to `fill`. A static volume (t == 1) comes
  back 3D (x, y, z); a dynamic one 4D (x, y, z, t).
  """
  v = vol if vol.ndim == 4 else vol[None]
  x, y, z = (int(s) for s in original_shape[:3])
  full = np.full((v.shape[0], z, y, x), fill, dtype=v.dtype)
  full[:, depth_start:depth_start + v.shape[1]] = v
  return full[0].T if full.shape[0] == 1 else full.T
