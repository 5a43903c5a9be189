"""LPIPS v0.1 with AlexNet (richzhang's `lpips` package, `lpips.LPIPS(net='alex')`), channels-last.

The official test script scores each prediction with `lpips(target, pred).sum()` over the
slices of the test crop, every slice a grey image in [-1, 1] of shape [1, H, W] that the
scaling layer broadcasts to 3 channels. Per image pair:

  x -> (x - shift) / scale -> AlexNet features, taps after ReLU 1..5 (torchvision `features`
  0..11: conv11/4 p2, pool 3/2, conv5 p2, pool 3/2, conv3 p1 x3); at each tap the feature
  vectors are unit-normalised over channels (f / (|f| + 1e-10)), the squared difference is
  weighted per channel by the layer's linear head (a 1x1 conv, no bias) and averaged over
  h, w; the 5 layer values are summed.

Weights (not downloadable here) come from one user file, `.pth` (read with torch, weights only)
or `.npz` (no torch needed), holding torchvision's ImageNet AlexNet `features.{0,3,6,8,10}.
{weight,bias}` and the lpips heads `lin{0..4}.model.1.weight` ([1, C, 1, 1]). Build it once
with torch, torchvision and the lpips package's v0.1 heads:

    import torch, torchvision, lpips, os
    alex = torchvision.models.alexnet(weights="IMAGENET1K_V1").state_dict()
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/alex.pth")
    state = {**alex, **torch.load(heads, map_location="cpu", weights_only=True)}
    torch.save(state, "lpips_alex.pth")

`torch.save(lpips.LPIPS(net='alex').state_dict(), "lpips_alex.pth")` works too: its
`net.slice{k}.{i}.*` keys are read as `features.{i}.*`. Extra keys are ignored.
"""
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from seq2seq_jax import weights_file

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

# (torchvision `features` index, lpips slice, in, out, kernel, stride, padding) of each conv;
# a 3x3 stride-2 max-pool precedes the convs at indices 3 and 6.
CONVS = ((0, 1, 3, 64, 11, 4, 2), (3, 2, 64, 192, 5, 1, 2), (6, 3, 192, 384, 3, 1, 1),
         (8, 4, 384, 256, 3, 1, 1), (10, 5, 256, 256, 3, 1, 1))
POOL_BEFORE = (3, 6)
MIN_SIZE = 31  # smaller images leave nothing after the second max-pool (torch raises)


def expected_shapes() -> dict:
  """Returns {key: torch shape} of every tensor LPIPS-alex needs."""
  shapes = {}
  for k, (idx, _, cin, cout, ks, _, _) in enumerate(CONVS):
    shapes[f"features.{idx}.weight"] = (cout, cin, ks, ks)
    shapes[f"features.{idx}.bias"] = (cout,)
    shapes[f"lin{k}.model.1.weight"] = (1, cout, 1, 1)
  return shapes


def _aliases(key: str) -> list:
  """The key itself, then its name in a saved `lpips.LPIPS` state dict."""
  out = [key]
  if key.startswith("features."):
    idx = int(key.split(".")[1])
    sl = next(s for i, s, *_ in CONVS if i == idx)
    out.append(f"net.slice{sl}.{key[len('features.'):]}")
  return out


def read_state_dict(path) -> Mapping[str, Any]:
  """Reads a `.pth` (torch, weights only) or `.npz` state dict; errors name the file."""
  return weights_file.read_state_dict(
      path, "LPIPS", "torchvision alexnet features + lpips v0.1 alex heads, .pth or .npz")


def params_from_state_dict(state: Mapping[str, Any], source: str = "state dict") -> dict:
  """Converts a merged torchvision-alexnet + lpips-heads state dict to the params pytree.

  Args:
    state: {key: array or torch tensor} with the keys of `expected_shapes` (or their
      `net.slice{k}.{i}.*` names from a saved `lpips.LPIPS`); other keys are ignored.
    source: names the origin in error messages (the file path).

  Returns:
    {"conv{k}": {"kernel": [kh, kw, in, out], "bias": [out]}, "lin{k}": [C]} for k = 0..4,
    float32 jax arrays.

  Raises:
    ValueError: a needed key is absent or has the wrong shape.
  """
  arrays = {}
  for key, want in expected_shapes().items():
    found = next((a for a in _aliases(key) if a in state), None)
    if found is None:
      raise ValueError(f"LPIPS weights in {source}: missing key {key}")
    value = weights_file.to_numpy(state[found], np.float64)
    if tuple(value.shape) != want:
      raise ValueError(f"LPIPS weights in {source}: key {found} has shape "
                       f"{tuple(value.shape)}, expected {want}")
    arrays[key] = value
  params = {}
  for k, (idx, *_) in enumerate(CONVS):
    kernel = arrays[f"features.{idx}.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
    params[f"conv{k}"] = {"kernel": jnp.asarray(kernel, jnp.float32),
                          "bias": jnp.asarray(arrays[f"features.{idx}.bias"], jnp.float32)}
    params[f"lin{k}"] = jnp.asarray(arrays[f"lin{k}.model.1.weight"].reshape(-1), jnp.float32)
  return params


def load_lpips_params(path) -> dict:
  """Params pytree (`params_from_state_dict`) from a `.pth` or `.npz` weight file.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file cannot be read, or a needed key is absent or misshapen.
  """
  return params_from_state_dict(read_state_dict(path), source=repr(os.fspath(path)))


def _max_pool(x: jax.Array) -> jax.Array:
  # torch's max_pool2d(3, 2): no padding, floor mode, i.e. VALID.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def alexnet_taps(params: Mapping[str, Any], x: jax.Array, precision=None) -> list:
  """The 5 ReLU outputs of AlexNet `features[:12]` for scaled [N, H, W, 3] images."""
  taps, h = [], x
  for k, (idx, _, _, _, _, stride, pad) in enumerate(CONVS):
    if idx in POOL_BEFORE:
      h = _max_pool(h)
    p = params[f"conv{k}"]
    h = jax.lax.conv_general_dilated(
        h, p["kernel"], (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    h = jax.nn.relu(h + p["bias"])
    taps.append(h)
  return taps


def _scale(x: jax.Array) -> jax.Array:
  """[N, H, W] / [N, H, W, 1] grey or [N, H, W, 3] in [-1, 1] -> scaled [N, H, W, 3]."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"expected images [N, H, W], [N, H, W, 1] or [N, H, W, 3], got {x.shape}")
  # A grey channel broadcasts against the 3-channel shift/scale, as in the official call.
  return (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)


def lpips(params: Mapping[str, Any], x0: jax.Array, x1: jax.Array, precision=None) -> jax.Array:
  """LPIPS-alex v0.1 distance of each image pair.

  Args:
    params: the pytree of `load_lpips_params`.
    x0: [N, H, W] (grey), [N, H, W, 1] or [N, H, W, 3] images in [-1, 1]; H, W >= 31.
    x1: same shape as `x0`.
    precision: passed to the convolutions (`jax.lax.Precision.HIGHEST` avoids TF32 on GPUs).

  Returns:
    [N] float32 distances.
  """
  if jnp.shape(x0) != jnp.shape(x1):
    raise ValueError(f"x0 {jnp.shape(x0)} and x1 {jnp.shape(x1)} differ in shape")
  if min(jnp.shape(x0)[1:3]) < MIN_SIZE:
    raise ValueError(f"LPIPS-alex needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got "
                     f"{tuple(jnp.shape(x0)[1:3])}")
  # Two passes rather than one concatenated batch: identical inputs then give (op by op
  # bit-identical, jitted near-identical) features, so LPIPS(x, x) is 0 up to rounding.
  f0 = alexnet_taps(params, _scale(x0), precision)
  f1 = alexnet_taps(params, _scale(x1), precision)
  unit = lambda f: f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)
  total = 0.0
  for k, (a, b) in enumerate(zip(f0, f1)):
    # The 1x1 head as a weighted channel sum: a matmul could run in TF32/bf16 on accelerators.
    d = jnp.sum(jnp.square(unit(a) - unit(b)) * params[f"lin{k}"], axis=-1)
    total = total + jnp.mean(d, axis=(1, 2))
  return total


class SliceLpips:
  """`lpips_fn` of `evaluate`: LPIPS summed over the slices of a stack, as the official test.

  Slices run in jitted chunks of at most `chunk` (the last one padded and masked), so memory
  stays bounded whatever the stack's depth.
  """

  def __init__(self, params: Mapping[str, Any], chunk: int = 32,
               precision=jax.lax.Precision.HIGHEST):
    self.params = params
    self.chunk = int(chunk)
    self._fn = jax.jit(lambda p, a, b: lpips(p, a, b, precision))

  def per_slice(self, pred: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """[N] distances of [N, H, W] stacks (grey, in [-1, 1])."""
    pred, tgt = np.asarray(pred, np.float32), np.asarray(tgt, np.float32)
    if pred.shape != tgt.shape or pred.ndim != 3:
      raise ValueError(f"expected two [N, H, W] stacks, got {pred.shape} and {tgt.shape}")
    n = pred.shape[0]
    b = max(1, min(self.chunk, n))
    out = []
    for s in range(0, n, b):
      a, t = pred[s:s + b], tgt[s:s + b]
      pad = [(0, b - a.shape[0]), (0, 0), (0, 0)]  # one compiled shape per stack size
      out.append(np.asarray(self._fn(self.params, np.pad(a, pad), np.pad(t, pad)))[:a.shape[0]])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def __call__(self, pred: np.ndarray, tgt: np.ndarray) -> float:
    """The official value: the sum over slices."""
    return float(np.sum(self.per_slice(pred, tgt), dtype=np.float64))


def make_lpips_fn(path, chunk: int = 32) -> Callable | None:
  """`SliceLpips` for a weight file, or None for an empty path (no LPIPS column)."""
  if path is None or not os.fspath(path):
    return None
  return SliceLpips(load_lpips_params(path), chunk=chunk)


def random_state_dict(seed: int = 0) -> dict:
  """Random weights in the file layout (`expected_shapes`), for tests (no real weights here).

  He-normal kernels keep the activations O(1) through the 5 convs; small random biases make a
  mishandled bias visible; the heads are non-negative, as lpips's trained ones are.

  Returns:
    {key: float32 numpy array} with torch shapes.
  """
  rng = np.random.default_rng(seed)
  state = {}
  for k, (idx, _, cin, cout, ks, _, _) in enumerate(CONVS):
    std = np.float32(np.sqrt(2.0 / (cin * ks * ks)))
    state[f"features.{idx}.weight"] = rng.standard_normal((cout, cin, ks, ks), np.float32) * std
    state[f"features.{idx}.bias"] = rng.standard_normal(cout, np.float32) * np.float32(0.1)
    state[f"lin{k}.model.1.weight"] = np.abs(rng.standard_normal((1, cout, 1, 1), np.float32))
  return state
