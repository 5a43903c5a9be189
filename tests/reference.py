"""Helpers to read the official fixtures (torch layout) into the model layout (channels-last)."""

import numpy as np

FORWARD = ("seq2seq_2p5d_small", "seq2seq_3d_small", "seq2seq_4d_small", "seq2seq_nonorm_small")
TRAINING = ("seq2seq_2p5d_small", "seq2seq_3d_small", "seq2seq_4d_small")


def to_model_layout(x: np.ndarray) -> np.ndarray:
  """`[b, t, c, *spatial]` → `[b, t, *spatial, c]`."""
  return np.moveaxis(x, 2, -1)


def to_torch_layout(x: np.ndarray) -> np.ndarray:
  return np.moveaxis(x, -1, 2)


def paths(fixtures_dir, name):
  return (fixtures_dir / f"{name}.pth", fixtures_dir / f"{name}.yaml",
          fixtures_dir / f"{name}.npz")
