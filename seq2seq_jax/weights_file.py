"""Reading the user-supplied network weights (VGG19 for the perceptual loss, AlexNet + LPIPS
heads for evaluation): a torch `.pth` state dict, loaded weights-only, or an `.npz`."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np


def to_numpy(value, dtype=np.float32) -> np.ndarray:
  """A torch tensor (torch was imported by the reader already) or array as numpy `dtype`."""
  if hasattr(value, "detach"):
    return value.detach().cpu().double().numpy().astype(dtype)  # via float64: bf16 too
  return np.asarray(value, dtype=dtype)


def read_state_dict(path, what: str, expected: str) -> Mapping[str, Any]:
  """Reads a `.pth` (torch, `weights_only=True`) or `.npz` state dict.

  Args:
    path: the file.
    what: names the weights in errors, e.g. "VGG19".
    expected: what the file should hold, for the file-not-found message.

  Raises:
    FileNotFoundError, ValueError, ImportError: naming the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} weight file not found: {path!r} (expected {expected})")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except Exception as e:
      raise ValueError(f"could not read {what} weights from {path!r}: {e}") from e
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs torch; without torch, convert it to an .npz "
                      "with the same keys") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"could not read {what} weights from {path!r}: {e}") from e
  # Some checkpoints wrap the state dict; accept that common case rather than fail on it.
  if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict of {what} "
                     "weights")
  return state
