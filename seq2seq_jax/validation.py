"""Validation during training: PSNR (official) and SSIM over every available src → tgt pair.

Each validation subject's centre crop (`train.valid_size`) is encoded once per source and
decoded for every target, as the official validation loop scores it (PSNR with data range 2
on the whole output; SSIM from scikit-image on the scored middle-channel stack).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import geometry
from seq2seq_jax import metrics
from seq2seq_jax.models import Generator


class Predictor:
  """Jitted encode/decode of one model; compiled once per input shape and output length."""

  def __init__(self, model: Generator, sharding=None):
    self.model = model
    self.sharding = sharding
    self._encode = jax.jit(functools.partial(model.apply, method="encode"))
    self._decode = jax.jit(functools.partial(model.apply, method="decode"),
                           static_argnums=(3,))

  def _put(self, x):
    x = jnp.asarray(x)
    return jax.device_put(x, self.sharding) if self.sharding is not None else x

  def encode(self, variables, x):
    return self._encode(variables, self._put(x))

  def decode(self, variables, latent, code, n_outseq: int) -> np.ndarray:
    return np.asarray(self._decode(variables, latent, self._put(code), int(n_outseq)))

  def __call__(self, variables, x, code, n_outseq: int) -> np.ndarray:
    return self.decode(variables, self.encode(variables, x), code, n_outseq)


def view_axes(ndims: int) -> tuple[int, ...]:
  """Padded spatial axes of an eval view (`[n, t, H, W, c]` 2.5D, `[1, t, D, H, W, 1]` 3D)."""
  return (2, 3) if ndims == 2 else (2, 3, 4)


def validate(predictor: Predictor, variables: Mapping[str, Any], views: Sequence[dict],
             num_codes: int) -> dict[str, float]:
  """Mean PSNR and SSIM over every subject and every available (src, tgt) pair (official),
  and over the pairs with src != tgt only (`psnr_cross`, `ssim_cross`: synthesis proper, the
  figures to set against `identity_baseline`)."""
  psnrs, ssims, cross = [], [], []
  axes = view_axes(predictor.model.ndims)
  eye = np.eye(num_codes, dtype=np.float32)
  for subj in views:
    avail = subj["available"]
    crops = {i: geometry.unpad(subj["views"][i], axes, subj["view_pads"]) for i in avail}
    for s in avail:
      latent = predictor.encode(variables, subj["views"][s])
      for t in avail:
        tgt = crops[t]
        out = predictor.decode(variables, latent, eye[t:t + 1], tgt.shape[1])
        out = geometry.unpad(out, axes, subj["view_pads"])
        psnrs.append(metrics.psnr(out, tgt))
        ssims.append(metrics.ssim(metrics.middle_channel(out), metrics.middle_channel(tgt)))
        cross.append(s != t)
  mean = lambda v, m: float(np.mean(np.asarray(v)[m])) if np.any(m) else float("nan")
  every, cross = np.ones(len(psnrs), bool), np.asarray(cross, bool)
  return {"psnr": mean(psnrs, every), "ssim": mean(ssims, every),
          "psnr_cross": mean(psnrs, cross), "ssim_cross": mean(ssims, cross),
          "pairs": len(psnrs)}


def identity_baseline(views: Sequence[dict], ndims: int) -> dict[str, float]:
  """The copy-the-source baseline: PSNR/SSIM of the source itself against each other target."""
  psnrs, ssims = [], []
  axes = view_axes(ndims)
  for subj in views:
    crops = {i: geometry.unpad(subj["views"][i], axes, subj["view_pads"])
             for i in subj["available"]}
    for s in crops:
      for t in crops:
        if s != t and crops[s].shape == crops[t].shape:
          psnrs.append(metrics.psnr(crops[s], crops[t]))
          ssims.append(metrics.ssim(metrics.middle_channel(crops[s]),
                                    metrics.middle_channel(crops[t])))
  return {"psnr": float(np.mean(psnrs)) if psnrs else float("nan"),
          "ssim": float(np.mean(ssims)) if ssims else float("nan")}


def sample_rows(predictor: Predictor, variables, subj: dict, num_codes: int,
                sequences: Sequence[str]) -> list[list[np.ndarray]]:
  """Sample grid for one validation subject (central slice of the crop).

  Row 1: every available sequence (ground truth). Following rows, one per available source:
  the output for every target sequence of the dataset (the official visualisation's
  'every target code' row).
  """
  from seq2seq_jax.visualize import central_image
  ndims = predictor.model.ndims
  views = subj["views"]
  mid = lambda v: v[v.shape[0] // 2:v.shape[0] // 2 + 1] if ndims == 2 else v
  eye = np.eye(num_codes, dtype=np.float32)
  rows = [[central_image(mid(views[i])[0]) for i in subj["available"]]]
  for s in subj["available"]:
    x = mid(views[s])
    latent = predictor.encode(variables, x)
    rows.append([central_image(predictor.decode(variables, latent, eye[t:t + 1], 1)[0])
                 for t in range(len(sequences))])
  return rows
