"""VGG19 perceptual loss of the official Seq2Seq training objective, channels-last.

P(input, target) on grey images in [0, 1]: ImageNet-normalise (the grey image broadcast to 3
channels), run torchvision's VGG19 `features[:30]` with every max-pool replaced by 2x2 average
pooling, take the per-image MSE at each of the 13 ReLU outputs, sum over layers, mean over images.

Weights are torchvision's ImageNet VGG19 `state_dict` (keys `features.{i}.weight` [out, in, 3, 3]
and `features.{i}.bias`), saved by the user to a `.pth` (read with torch) or `.npz` (no torch
needed). The params pytree is `{"features.{i}": {"kernel": [3, 3, in, out], "bias": [out]}}`
keyed by the torchvision conv index, float32 jax arrays.
"""
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from seq2seq_jax import weights_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's VGG19 ("E") features up to index 29: conv output channels, "P" for a pooling
# layer (a max-pool in torchvision, average pooling here as in the official loss).
_CFG = (64, 64, "P", 128, 128, "P", 256, 256, 256, 256, "P", 512, 512, 512, 512, "P", 512)


def _conv_specs():
  specs, idx, cin = [], 0, 3
  for v in _CFG:
    if v == "P":
      idx += 1
    else:
      specs.append((idx, cin, v))
      cin, idx = v, idx + 2  # each conv is followed by its ReLU
  return tuple(specs)


# (torchvision index, in channels, out channels) of every conv of features[:30].
CONV_SPECS = _conv_specs()
RELU_INDICES = tuple(i + 1 for i, _, _ in CONV_SPECS)
assert RELU_INDICES == (1, 3, 6, 8, 11, 13, 15, 17, 20, 22, 24, 26, 29), RELU_INDICES


def expected_shapes() -> dict:
  """Returns {state_dict key: torch shape} for every tensor features[:30] needs."""
  shapes = {}
  for idx, cin, cout in CONV_SPECS:
    shapes[f"features.{idx}.weight"] = (cout, cin, 3, 3)
    shapes[f"features.{idx}.bias"] = (cout,)
  return shapes


def _read_state_dict(path) -> Mapping[str, Any]:
  return weights_file.read_state_dict(
      path, "VGG19", "torchvision's ImageNet vgg19 state_dict saved with torch.save, or an "
      ".npz with the same keys", prefixes=("features.",))


def vgg19_params_from_state_dict(state: Mapping[str, Any], source: str = "state dict") -> dict:
  """Converts a torchvision VGG19 state dict to the HWIO params pytree.

  Args:
    state: maps `features.{i}.weight` ([out, in, 3, 3]) and `features.{i}.bias` to arrays or
      torch tensors; other keys (e.g. `classifier.*`) are ignored.
    source: names the origin in error messages (the file path).

  Returns:
    `{"features.{i}": {"kernel": [3, 3, in, out], "bias": [out]}}`, float32 jax arrays (device
    arrays, so a jitted step does not copy ~80 MB from host on every call).

  Raises:
    ValueError: a needed key is absent or has the wrong shape.
  """
  shapes = expected_shapes()
  missing = [k for k in shapes if k not in state]
  if missing:
    raise ValueError(f"VGG19 weights in {source}: missing key(s) {', '.join(missing)}")
  arrays = {}
  for key, want in shapes.items():
    value = weights_file.to_numpy(state[key])
    if tuple(value.shape) != want:
      raise ValueError(f"VGG19 weights in {source}: key {key} has shape {tuple(value.shape)}, "
                       f"expected {want}")
    arrays[key] = value
  params = {}
  for idx, _, _ in CONV_SPECS:
    kernel = arrays[f"features.{idx}.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
    params[f"features.{idx}"] = {
        "kernel": jnp.asarray(np.ascontiguousarray(kernel)),
        "bias": jnp.asarray(arrays[f"features.{idx}.bias"]),
    }
  return params


def load_vgg19_params(path) -> dict:
  """Loads torchvision's VGG19 weights from a `.pth` (torch.save of the state dict) or `.npz`.

  Args:
    path: the weight file. A full vgg19 state dict is fine (`classifier.*` keys are ignored).

  Returns:
    The params pytree of `vgg19_params_from_state_dict`.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file cannot be read, or a needed key is absent or misshapen.
  """
  return vgg19_params_from_state_dict(_read_state_dict(path), source=repr(os.fspath(path)))


def check_vgg_weights(path, lambda_per: float = 1.0) -> Optional[dict]:
  """Start-up check: fails early, naming the path, when the perceptual loss cannot run.

  Args:
    path: the VGG19 weight file (may be None or empty when `lambda_per` <= 0).
    lambda_per: the perceptual loss weight; nothing is checked when it is <= 0.

  Returns:
    The loaded params when checked (so the caller need not read the file twice), else None.

  Raises:
    FileNotFoundError: `lambda_per` > 0 and the file is absent.
    ValueError: `lambda_per` > 0 and no path is given, or the file is not valid VGG19 weights.
  """
  if lambda_per <= 0:
    return None
  if path is None or not os.fspath(path):
    raise ValueError(f"the perceptual loss weight is {lambda_per} but no VGG19 weight file was "
                     "given (torchvision's ImageNet vgg19 state_dict, .pth or .npz)")
  return load_vgg19_params(path)


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
  # VALID drops an odd last row/column, as torch's avg_pool2d(2) does. A concrete numpy init
  # value lets lax recognise a windowed sum, which (unlike a general reduce_window) has a VJP.
  summed = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, (1, 2, 2, 1),
                                 (1, 2, 2, 1), "VALID")
  return summed * jnp.asarray(0.25, x.dtype)


def vgg_features(params: Mapping[str, Any], x: jax.Array, precision=None) -> list:
  """Runs VGG19 features[:30] (average pooling) and returns the 13 ReLU outputs.

  Args:
    params: the pytree of `load_vgg19_params`.
    x: [N, H, W, 3] images, already ImageNet-normalised.
    precision: passed to the convolutions (e.g. `jax.lax.Precision.HIGHEST` to avoid TF32 on
      GPUs).

  Returns:
    The outputs of ReLUs 1, 3, 6, ..., 29, each [N, h, w, C] (channels 64 ... 512).
  """
  feats, conv = [], 0
  h = x
  for v in _CFG:
    if v == "P":
      h = _avg_pool_2x2(h)
      continue
    p = params[f"features.{CONV_SPECS[conv][0]}"]
    h = jax.lax.conv_general_dilated(
        h.astype(p["kernel"].dtype), p["kernel"], window_strides=(1, 1),
        padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision)
    h = jax.nn.relu(h + p["bias"])
    feats.append(h)
    conv += 1
  return feats


def _normalise(x: jax.Array) -> jax.Array:
  """[N, H, W] or [N, H, W, 1] grey in [0, 1] -> [N, H, W, 3] ImageNet-normalised."""
  x = jnp.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f"expected grey images [N, H, W] or [N, H, W, 1], got {x.shape}")
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x.astype(jnp.float32) - mean) / std


def perceptual_loss(params: Mapping[str, Any], pred: jax.Array, target: jax.Array,
                    precision=None) -> jax.Array:
  """The official perceptual loss P(pred, target).

  Args:
    params: the pytree of `load_vgg19_params`.
    pred: [N, H, W] (or [N, H, W, 1]) grey images in [0, 1].
    target: same shape as `pred`.
    precision: passed to the convolutions.

  Returns:
    Scalar float32: mean over the N images of the sum over the 13 ReLU layers of the MSE
    (mean over h, w, C) between the two feature maps.
  """
  if jnp.shape(pred) != jnp.shape(target):
    raise ValueError(f"pred {jnp.shape(pred)} and target {jnp.shape(target)} differ in shape")
  # Separate passes rather than one concatenated batch: identical inputs then give bit-identical
  # features, so P(x, x) is exactly 0.
  fp = vgg_features(params, _normalise(pred), precision)
  ft = vgg_features(params, _normalise(target), precision)
  per_image = sum(jnp.mean(jnp.square(a - b), axis=(1, 2, 3)) for a, b in zip(fp, ft))
  return jnp.mean(per_image)


def random_vgg19_state_dict(seed: int = 0, include_classifier: bool = False) -> dict:
  """Random torchvision-layout VGG19 features[:30] weights, for tests (no ImageNet weights here).

  He-normal kernels keep the ReLU activations O(1) through all 13 layers; small random biases
  make a mishandled bias visible.

  Args:
    seed: numpy random seed.
    include_classifier: also add a small stand-in `classifier.0.*`, as in a full state dict.

  Returns:
    {key: float32 numpy array} with torch shapes ([out, in, 3, 3] kernels).
  """
  rng = np.random.default_rng(seed)
  state = {}
  for idx, cin, cout in CONV_SPECS:
    std = np.sqrt(2.0 / (cin * 9))
    state[f"features.{idx}.weight"] = (
        rng.standard_normal((cout, cin, 3, 3), dtype=np.float32) * np.float32(std))
    state[f"features.{idx}.bias"] = rng.standard_normal(cout, dtype=np.float32) * np.float32(0.1)
  if include_classifier:
    state["classifier.0.weight"] = rng.standard_normal((8, 16), dtype=np.float32)
    state["classifier.0.bias"] = np.zeros(8, np.float32)
  return state
