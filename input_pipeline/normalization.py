"""Intensity normalisation schemes, and their inverses for writing predictions back.

The official scheme (Han et al., BraTS loader) maps each volume v, as read in its native dtype,
with a = 2 * percentile(v, 99) to clip(v, 0, a) / a * 2 - 1. numpy promotes integer volumes to
float64 for the percentile, so the recipe runs in float64 and is cast to float32 once at the
end; we do the same so that our output is bit-equal to that direct computation.

Every scheme returns (normalised float32 array, scale, offset) with
  original ~= (normalised + 1) / 2 * scale + offset   for 'official' (inside the clip range),
  original  =  normalised * scale + offset            for 'zscore'.
Add a scheme by decorating a function with `@register('name')`.
"""
from typing import Callable, Dict, Tuple

import numpy as np

Normalizer = Callable[[np.ndarray], Tuple[np.ndarray, float, float]]
_SCHEMES: Dict[str, Normalizer] = {}
_INVERSES: Dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {}


class NormalizationError(ValueError):
  """A volume cannot be normalised (e.g. its 99th percentile is 0)."""


def register(name: str, inverse: Callable[[np.ndarray, float, float], np.ndarray]):
  def deco(fn: Normalizer) -> Normalizer:
    _SCHEMES[name] = fn
    _INVERSES[name] = inverse
    return fn
  return deco


def _official_inverse(x, scale, offset):
  return (np.asarray(x, np.float64) + 1.0) / 2.0 * scale + offset


def _zscore_inverse(x, scale, offset):
  return np.asarray(x, np.float64) * scale + offset


@register("official", _official_inverse)
def official(v: np.ndarray) -> Tuple[np.ndarray, float, float]:
  """a = 2 * p99; clip(v, 0, a) / a * 2 - 1, computed as numpy does it on `v`'s dtype."""
  amax = np.percentile(v, 99) * 2
  if not np.isfinite(amax) or amax <= 0:
    raise NormalizationError(f"99th percentile is {amax / 2} (need > 0): empty or negative volume")
  out = np.clip(v, 0, amax) / amax * 2 - 1
  return out.astype(np.float32), float(amax), 0.0


@register("zscore", _zscore_inverse)
def zscore(v: np.ndarray) -> Tuple[np.ndarray, float, float]:
  """(v - mean) / std over the foreground (v > 0), background set to the foreground minimum."""
  v = np.asarray(v, np.float64)
  fg = v[v > 0]
  if fg.size == 0:
    raise NormalizationError("no voxel > 0: empty volume")
  mean, std = float(fg.mean()), float(fg.std())
  if std == 0:
    raise NormalizationError("foreground has zero variance")
  out = (v - mean) / std
  out[v <= 0] = (fg.min() - mean) / std
  return out.astype(np.float32), std, mean


def normalize(v: np.ndarray, scheme: str = "official") -> Tuple[np.ndarray, float, float]:
  if scheme not in _SCHEMES:
    raise ValueError(f"unknown normalization {scheme!r}; known: {sorted(_SCHEMES)}")
  return _SCHEMES[scheme](v)


def denormalize(x: np.ndarray, scale: float, offset: float = 0.0,
                scheme: str = "official") -> np.ndarray:
  """Maps normalised values back to the input's intensity scale (float64)."""
  if scheme not in _INVERSES:
    raise ValueError(f"unknown normalization {scheme!r}; known: {sorted(_INVERSES)}")
  return _INVERSES[scheme](x, scale, offset)
