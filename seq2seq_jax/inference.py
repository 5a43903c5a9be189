"""Whole-volume inference: every slice (2D/2.5D) or overlapping blended windows (3D).

Input and output volumes are in the stored layout `[t, D, H, W]` (SimpleITK order, normalised
as in training). One source volume is encoded once per batch and decoded for every requested
target, so predicting all targets from one source costs one encoder pass.

- 2D / 2.5D: slice j is predicted from the stack centred on it, with the neighbours beyond the
  volume's ends set to -1 (background), as `geometry.stack_slices` builds it for validation;
  the middle channel of each output stack is kept. H and W are padded with -1 to the model's
  total stride and cropped back. Slices run in batches of `batch_size`, the last batch padded
  to full size so that one compiled program serves every batch.
- 3D: windows of `patch` voxels (a multiple of the stride) with `overlap` between neighbours;
  outputs are blended with a Gaussian weight (sigma = patch / 8, as nnU-Net does), which
  hides the seams that the border effects of reflect padding would leave.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import geometry
from seq2seq_jax.models import Generator
from seq2seq_jax.models import ops


def _encode_to_decoder(module: Generator, x: jnp.ndarray, n_outseq: int) -> jnp.ndarray:
  """Encoder + decoder ConvLSTM: the part of G(x, code) that does not depend on the code."""
  h = module.dec_convlstm(module.encode(x), n_outseq)
  return h.reshape((-1,) + h.shape[2:])  # [b·n_outseq, ...], the order `decode` folds


def _decode_codes(module: Generator, h: jnp.ndarray, codes: jnp.ndarray) -> jnp.ndarray:
  """The hyper decoder for each row of `codes` [T, c_s] → [T, b·n_outseq, *spatial, c_in]."""
  outs = []
  for k in range(codes.shape[0]):
    s = ops.leaky_relu(module.style_fc(codes[k:k + 1].astype(jnp.float32)))
    outs.append(module.decoder(h, s).astype(jnp.float32))
  return jnp.stack(outs)


class CodeSharedPredictor:
  """G(x, code_k) for several codes at once; bit-for-bit the ops of `Generator.__call__`.

  The decoder ConvLSTM reads only the latent, so it runs once per input batch rather than
  once per target (it is most of the decoder's cost); the hyper decoder runs per code.
  """

  def __init__(self, model: Generator, sharding=None):
    self.model = model
    self.sharding = sharding
    self._trunk = jax.jit(functools.partial(model.apply, method=_encode_to_decoder),
                          static_argnums=(2,))
    self._heads = jax.jit(functools.partial(model.apply, method=_decode_codes))

  def __call__(self, variables, x: np.ndarray, codes: np.ndarray, n_outseq: int) -> np.ndarray:
    """x `[b, t, *spatial, c_in]`, codes `[T, c_s]` → `[T, b, n_outseq, *spatial, c_in]`."""
    x = jnp.asarray(x)
    if self.sharding is not None:
      x = jax.device_put(x, self.sharding)
    h = self._trunk(variables, x, int(n_outseq))
    y = np.asarray(self._heads(variables, h, jnp.asarray(codes, jnp.float32)))
    return y.reshape((y.shape[0], x.shape[0], n_outseq) + y.shape[2:])


def _gaussian_weight(patch: Sequence[int]) -> np.ndarray:
  w = np.ones(patch, np.float64)
  for ax, n in enumerate(patch):
    x = np.arange(n) - (n - 1) / 2
    g = np.exp(-0.5 * (x / max(n / 8, 1e-3)) ** 2)
    shape = [1] * len(patch)
    shape[ax] = n
    w = w * g.reshape(shape)
  return np.maximum(w / w.max(), 1e-3)  # never 0, so every voxel has a defined blend


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
  """Window starts covering [0, size) with `patch`-wide windows, the last flush to the end."""
  if size <= patch:
    return [0]
  step = max(1, int(round(patch * (1 - overlap))))
  starts = list(range(0, size - patch, step))
  return starts + [size - patch]


class VolumeInference:
  """Predicts whole volumes with one model; jitted (`CodeSharedPredictor`), batched."""

  def __init__(self, model: Generator, variables: Mapping[str, Any], batch_size: int = 16,
               patch: Sequence[int] | None = None, overlap: float = 0.5, mesh=None):
    """`mesh`: a (data, ...) device mesh; batches of slices/windows are split over its `data`
    axis (single process) and the variables replicated. Without one, the default device."""
    self.model = model
    self.n_data = 1
    sharding = None
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec
      self.n_data = int(mesh.shape["data"])
      sharding = NamedSharding(mesh, PartitionSpec("data"))
      variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    self.variables = variables
    self.predictor = CodeSharedPredictor(model, sharding)
    self.stride = int(np.prod(model.s_enc))  # the model's total stride
    self.batch_size = int(batch_size)
    self.overlap = float(overlap)
    if model.ndims == 3:
      patch = tuple(patch or (64, 64, 64))
      if len(patch) != 3 or any(p % self.stride for p in patch):
        raise ValueError(f"3D inference patch {patch} must be 3 sizes, multiples of the "
                         f"model's total stride {self.stride}")
      self.patch = patch
      self.weight = _gaussian_weight(patch)
    self.eye = np.eye(model.c_s, dtype=np.float32)

  def predict(self, vol: np.ndarray, targets: Sequence[tuple[int, int]]) -> dict:
    """Predicts each target from one source volume.

    Args:
      vol: the source, `[t, D, H, W]` float32 in [-1, 1].
      targets: `(code index, n_outseq)` pairs.

    Returns:
      {code index: `[n_outseq, D, H, W]` float32}.
    """
    vol = np.asarray(vol, np.float32)
    if vol.ndim != 4:
      raise ValueError(f"inference: expected a [t, D, H, W] volume, got shape {vol.shape}")
    for idx, _ in targets:
      if not 0 <= idx < self.model.c_s:
        raise ValueError(f"inference: target code {idx} outside [0, {self.model.c_s})")
    if self.model.ndims == 2:
      return self._slicewise(vol, targets)
    return self._windows(vol, targets)

  def _round(self, bs: int) -> int:
    """Up to a multiple of the data-parallel devices (padded batches are cheap)."""
    return -(-bs // self.n_data) * self.n_data

  @staticmethod
  def _by_length(targets) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for idx, n in targets:
      groups.setdefault(int(n), []).append(int(idx))
    return groups

  def _slicewise(self, vol, targets):
    c_in = self.model.c_in
    stacks = geometry.stack_slices(vol, c_in)  # [D, t, H, W, c]
    stacks, pads = geometry.pad_to_multiple(stacks, (2, 3), self.stride)
    d = stacks.shape[0]
    bs = self._round(min(self.batch_size, d))
    out = {idx: np.empty((n, d) + vol.shape[2:], np.float32) for idx, n in targets}
    for b0 in range(0, d, bs):
      x = stacks[b0:b0 + bs]
      k = x.shape[0]
      if k < bs:  # keep one compiled shape
        x = np.concatenate([x, np.full((bs - k,) + x.shape[1:], -1.0, np.float32)])
      for n, idxs in self._by_length(targets).items():
        ys = self.predictor(self.variables, x, self.eye[idxs], n)
        for idx, y in zip(idxs, ys):
          y = geometry.unpad(y[:k], (2, 3), pads)  # [k, n, H, W, c]
          out[idx][:, b0:b0 + k] = geometry.unstack_middle(y)
    return out

  def _windows(self, vol, targets):
    spatial = vol.shape[1:]
    # Pad each axis to at least the patch, then to the stride (the patch is a multiple).
    width = [(0, 0)] + [((max(p, s) - s) // 2, max(p, s) - s - (max(p, s) - s) // 2)
                        for p, s in zip(self.patch, spatial)]
    x = np.pad(vol, width, constant_values=-1.0)
    x, pads = geometry.pad_to_multiple(x, (1, 2, 3), self.stride)
    size = x.shape[1:]
    acc = {idx: np.zeros((n,) + size, np.float64) for idx, n in targets}
    norm = np.zeros(size, np.float64)
    boxes = list(itertools.product(*[window_starts(s, p, self.overlap)
                                     for s, p in zip(size, self.patch)]))
    bs = self._round(max(1, self.batch_size // 8))
    for b0 in range(0, len(boxes), bs):
      group = boxes[b0:b0 + bs]
      crops = [x[:, z:z + self.patch[0], y:y + self.patch[1], w:w + self.patch[2]]
               for z, y, w in group]
      batch = np.stack(crops)[..., None]  # [k, t, pd, ph, pw, 1]
      if len(group) < bs:
        batch = np.concatenate(
            [batch, np.full((bs - len(group),) + batch.shape[1:], -1.0, np.float32)])
      for n, idxs in self._by_length(targets).items():
        ys = self.predictor(self.variables, batch, self.eye[idxs], n)[..., 0]
        for idx, y in zip(idxs, ys):
          for k, (z, yy, w) in enumerate(group):
            sl = (slice(None), slice(z, z + self.patch[0]), slice(yy, yy + self.patch[1]),
                  slice(w, w + self.patch[2]))
            acc[idx][sl] += y[k] * self.weight
      for z, yy, w in group:
        norm[z:z + self.patch[0], yy:yy + self.patch[1], w:w + self.patch[2]] += self.weight
    out = {}
    for idx, a in acc.items():
      a = geometry.unpad((a / norm).astype(np.float32), (1, 2, 3), pads)
      sl = (slice(None),) + tuple(slice(b, b + s) for (b, _), s in zip(width[1:], spatial))
      out[idx] = np.ascontiguousarray(a[sl])
    return out
