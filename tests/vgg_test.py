"""Tests of the VGG19 perceptual loss against an independent torch computation."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from seq2seq_jax import vgg

torch = pytest.importorskip("torch")
F = torch.nn.functional

# torchvision's VGG19 ("E") configuration; the reference below builds `features` from it the way
# torchvision does and slices [:30], independently of the index bookkeeping in vgg.py.
_TORCHVISION_CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                      512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def _torchvision_features_layout():
  layers = []
  for v in _TORCHVISION_CFG_E:
    layers += ["pool"] if v == "M" else ["conv", "relu"]
  return layers[:30]


def _torch_perceptual(state, pred, target):
  """The official loss in float64 torch, NCHW; pred/target [N, H, W] tensors."""
  mean = torch.tensor(vgg.IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
  std = torch.tensor(vgg.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)

  def features(x):
    h = (x[:, None].repeat(1, 3, 1, 1) - mean) / std
    outs = []
    for i, kind in enumerate(_torchvision_features_layout()):
      if kind == "conv":
        w = torch.from_numpy(state[f"features.{i}.weight"]).double()
        b = torch.from_numpy(state[f"features.{i}.bias"]).double()
        h = F.conv2d(h, w, b, padding=1)
      elif kind == "relu":
        h = F.relu(h)
        outs.append(h)
      else:
        h = F.avg_pool2d(h, 2)  # the official loss swaps every max-pool for this
    return outs

  per_image = sum(((a - b) ** 2).mean(dim=(1, 2, 3)) for a, b in zip(features(pred),
                                                                   features(target)))
  return per_image.mean()


@pytest.fixture(scope="module")
def state():
  return vgg.random_vgg19_state_dict(seed=0, include_classifier=True)


@pytest.fixture(scope="module")
def pth_path(state, tmp_path_factory):
  path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  return path


@pytest.fixture(scope="module")
def params(pth_path):
  return vgg.load_vgg19_params(pth_path)


def test_relu_indices_match_torchvision_layout():
  layout = _torchvision_features_layout()
  relus = tuple(i for i, k in enumerate(layout) if k == "relu")
  assert relus == vgg.RELU_INDICES
  assert tuple(i for i, k in enumerate(layout) if k == "conv") == tuple(
      s[0] for s in vgg.CONV_SPECS)


@pytest.mark.parametrize("shape", [(3, 48, 44), (2, 37, 42)])  # the odd one checks floor pooling
def test_loss_and_grad_match_torch(state, params, shape):
  rng = np.random.default_rng(1)
  pred = rng.uniform(size=shape).astype(np.float32)
  target = np.clip(pred + 0.2 * rng.standard_normal(shape), 0, 1).astype(np.float32)

  loss, grad = jax.jit(jax.value_and_grad(vgg.perceptual_loss, argnums=1))(params, pred, target)

  tpred = torch.from_numpy(pred).double().requires_grad_(True)
  tloss = _torch_perceptual(state, tpred, torch.from_numpy(target).double())
  (tgrad,) = torch.autograd.grad(tloss, tpred)
  tloss, tgrad = tloss.item(), tgrad.numpy()

  loss_rel = abs(float(loss) - tloss) / abs(tloss)
  grad_rel = np.linalg.norm(np.asarray(grad, np.float64) - tgrad) / np.linalg.norm(tgrad)
  print(f"{shape}: loss {float(loss):.6f} vs torch {tloss:.6f}, rel {loss_rel:.2e}; "
        f"grad rel L2 {grad_rel:.2e}")
  assert tloss > 0.1  # random weights must give a non-trivial loss for the check to mean much
  assert loss_rel < 1e-5
  assert grad_rel < 1e-4


def test_features_shapes(params):
  feats = vgg.vgg_features(params, jnp.zeros((1, 48, 44, 3)))
  assert [f.shape for f in feats] == [
      (1, 48, 44, 64), (1, 48, 44, 64), (1, 24, 22, 128), (1, 24, 22, 128)] + [
          (1, 12, 11, 256)] * 4 + [(1, 6, 5, 512)] * 4 + [(1, 3, 2, 512)]


def test_loss_of_identical_images_is_exactly_zero(params):
  x = np.random.default_rng(2).uniform(size=(2, 32, 32)).astype(np.float32)
  assert float(vgg.perceptual_loss(params, x, x)) == 0.0
  assert float(jax.jit(vgg.perceptual_loss)(params, x, x.copy())) == 0.0


def test_channel_axis_input_is_accepted(params):
  rng = np.random.default_rng(3)
  a, b = rng.uniform(size=(2, 2, 32, 32)).astype(np.float32)
  np.testing.assert_allclose(vgg.perceptual_loss(params, a[..., None], b[..., None]),
                             vgg.perceptual_loss(params, a, b), rtol=1e-6)
  with pytest.raises(ValueError, match="differ in shape"):
    vgg.perceptual_loss(params, a, b[:1])


def test_npz_loads_the_same(state, params, tmp_path):
  path = tmp_path / "vgg19.npz"
  np.savez(path, **state)
  npz_params = vgg.load_vgg19_params(path)
  for key, layer in params.items():
    for name, value in layer.items():
      np.testing.assert_array_equal(npz_params[key][name], value)


def _save(state, path):
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  return path


def test_missing_key_is_named(state, tmp_path):
  bad = dict(state)
  del bad["features.28.bias"]
  path = _save(bad, tmp_path / "missing.pth")
  with pytest.raises(ValueError, match=r"features\.28\.bias") as e:
    vgg.load_vgg19_params(path)
  assert str(path) in str(e.value)


def test_wrong_shape_names_key_and_both_shapes(state, tmp_path):
  bad = dict(state)
  bad["features.5.weight"] = np.zeros((128, 32, 3, 3), np.float32)
  path = _save(bad, tmp_path / "shape.pth")
  with pytest.raises(ValueError) as e:
    vgg.load_vgg19_params(path)
  msg = str(e.value)
  assert "features.5.weight" in msg
  assert "(128, 32, 3, 3)" in msg and "(128, 64, 3, 3)" in msg


def test_missing_file_names_path(tmp_path):
  path = tmp_path / "nowhere" / "vgg19.pth"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    vgg.load_vgg19_params(path)


def test_check_vgg_weights(pth_path, tmp_path):
  missing = tmp_path / "absent.pth"
  with pytest.raises(FileNotFoundError, match="absent.pth"):
    vgg.check_vgg_weights(missing, lambda_per=0.01)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="junk.pth"):
    vgg.check_vgg_weights(junk)
  with pytest.raises(ValueError, match="no VGG19 weight file"):
    vgg.check_vgg_weights(None, lambda_per=0.01)
  # Without a perceptual term nothing is needed, so nothing is checked.
  assert vgg.check_vgg_weights(missing, lambda_per=0.0) is None
  assert "features.28" in vgg.check_vgg_weights(pth_path)


_TORCH_FREE_READ = """
import sys
import numpy as np
from seq2seq_jax import vgg
path, out = sys.argv[1], sys.argv[2]
params = vgg.check_vgg_weights(path)
np.savez(out, **{f"{k}/{n}": np.asarray(v) for k, layer in params.items() for n, v in layer.items()})
try:
  vgg.check_vgg_weights(sys.argv[3])
except ValueError as e:
  print("ValueError:", e)
print("torch imported:", "torch" in sys.modules)
"""


def test_pth_is_read_without_importing_torch_into_the_process(pth_path, params, tmp_path):
  """A process that has not imported torch reads a .pth through a child process: the same
  params, the same errors, and torch never in its own modules."""
  import pathlib
  import subprocess
  import sys
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  out = tmp_path / "params.npz"
  repo = pathlib.Path(__file__).resolve().parents[1]
  run = subprocess.run([sys.executable, "-c", _TORCH_FREE_READ, str(pth_path), str(out),
                        str(junk)], cwd=repo, capture_output=True, text=True, check=True)
  assert "torch imported: False" in run.stdout
  assert "ValueError: could not read VGG19 weights from" in run.stdout and "junk.pth" in run.stdout
  with np.load(out) as got:
    want = {f"{k}/{n}": np.asarray(v) for k, layer in params.items() for n, v in layer.items()}
    assert sorted(got.files) == sorted(want)
    for k, v in want.items():
      np.testing.assert_array_equal(got[k], v)
