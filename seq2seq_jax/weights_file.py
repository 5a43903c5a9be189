"""Reading the user-supplied network weights (VGG19 for the perceptual loss, AlexNet + LPIPS
heads for evaluation): a torch `.pth` state dict, loaded weights-only, or an `.npz`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any, Mapping

import numpy as np


def to_numpy(value, dtype=np.float32) -> np.ndarray:
  """A torch tensor (torch was imported by the reader already) or array as numpy `dtype`."""
  if hasattr(value, "detach"):
    return value.detach().cpu().double().numpy().astype(dtype)  # via float64: bf16 too
  return np.asarray(value, dtype=dtype)


def read_state_dict(path, what: str, expected: str,
                    prefixes: tuple[str, ...] = ()) -> Mapping[str, Any]:
  """Reads a `.pth` (torch, `weights_only=True`) or `.npz` state dict.

  A `.pth` is read in a child process unless this one has imported torch already; its
  tensors then come back as numpy arrays (bfloat16 as float32, which holds it exactly).

  Args:
    path: the file.
    what: names the weights in errors, e.g. "VGG19".
    expected: what the file should hold, for the file-not-found message.
    prefixes: when given, only keys starting with one of them are returned (and, from a
      child process, written: VGG19's `features.` skip 470 MB of `classifier.`).

  Raises:
    FileNotFoundError, ValueError, ImportError: naming the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} weight file not found: {path!r} (expected {expected})")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k.startswith(prefixes or "")}
    except Exception as e:
      raise ValueError(f"could not read {what} weights from {path!r}: {e}") from e
  if "torch" in sys.modules:
    state = _torch_read(path, what)
    return {k: v for k, v in state.items() if k.startswith(prefixes or "")}
  # Read in a child process, so that torch is never imported into this one: once imported it
  # stays, +186 MB of RSS for a whole training run (experiments/README.md, "ninth session").
  with tempfile.TemporaryDirectory(prefix="seq2seq_weights_") as tmp:
    out, err = os.path.join(tmp, "state.npz"), os.path.join(tmp, "error.txt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [_PACKAGE_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    child = subprocess.run([sys.executable, "-c", _CHILD, path, what, out, err,
                            "\n".join(prefixes)], env=env,
                           capture_output=True, text=True)
    if child.returncode != 0:
      if os.path.exists(err):
        with open(err) as f:
          message = f.read()
      else:  # it died another way
        message = (f"could not read {what} weights from {path!r}: the reading process exited "
                   f"with status {child.returncode}: {child.stderr.strip()[-2000:]}")
      raise (ImportError if child.returncode == _NO_TORCH else ValueError)(message)
    with np.load(out, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NO_TORCH = 3
# The child: torch's weights-only read, its tensors written as arrays (.npz, no pickle), or
# the error's message to a file, its kind in the exit status.
_CHILD = f"""
import sys
import numpy as np
from seq2seq_jax import weights_file
try:
  state = weights_file._torch_read(sys.argv[1], sys.argv[2])
except (ImportError, ValueError) as e:
  with open(sys.argv[4], "w") as f:
    f.write(str(e))
  sys.exit({_NO_TORCH} if isinstance(e, ImportError) else 2)
arrays = {{}}
prefixes = tuple(p for p in sys.argv[5].split("\\n") if p) or ("",)
for k, v in state.items():
  if hasattr(v, "detach") and k.startswith(prefixes):
    v = v.detach().cpu()
    arrays[k] = (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
np.savez(sys.argv[3], **arrays)
"""


def _torch_read(path: str, what: str) -> Mapping[str, Any]:
  """torch's weights-only read of a `.pth` state dict (imports torch)."""
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
