"""Tests of LPIPS-alex v0.1 against an independent float64 torch computation, and its loading."""
import numpy as np
import pytest

import jax

from seq2seq_jax import lpips

torch = pytest.importorskip("torch")
F = torch.nn.functional

# torchvision's alexnet `features`, written out independently of the tables in lpips.py:
# (kind, index, stride, padding).
_ALEXNET = [("conv", 0, 4, 2), ("relu",), ("pool",), ("conv", 3, 1, 2), ("relu",), ("pool",),
            ("conv", 6, 1, 1), ("relu",), ("conv", 8, 1, 1), ("relu",), ("conv", 10, 1, 1),
            ("relu",)]


def _torch_lpips(state, x0, x1):
  """lpips.LPIPS(net='alex', version='0.1') forward in float64; x0/x1 [N, H, W] numpy grey."""
  shift = torch.tensor([-.030, -.088, -.188], dtype=torch.float64).view(1, 3, 1, 1)
  scale = torch.tensor([.458, .448, .450], dtype=torch.float64).view(1, 3, 1, 1)
  t = lambda k: torch.from_numpy(np.asarray(state[k])).double()

  def taps(x):
    # [N, 1, H, W] as the official script passes it; the scaling layer broadcasts to 3 channels.
    h = (torch.from_numpy(x).double()[:, None] - shift) / scale
    out = []
    for layer in _ALEXNET:
      if layer[0] == "conv":
        _, i, s, p = layer
        h = F.conv2d(h, t(f"features.{i}.weight"), t(f"features.{i}.bias"), stride=s, padding=p)
      elif layer[0] == "relu":
        h = F.relu(h)
        out.append(h)
      else:
        h = F.max_pool2d(h, kernel_size=3, stride=2)
    return out

  def unit(f):
    return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)

  val = 0
  for k, (a, b) in enumerate(zip(taps(x0), taps(x1))):
    d = (unit(a) - unit(b)) ** 2
    val = val + F.conv2d(d, t(f"lin{k}.model.1.weight")).mean(dim=(2, 3), keepdim=True)
  return val.reshape(-1).numpy()


@pytest.fixture(scope="module")
def state():
  return lpips.random_state_dict(seed=0)


@pytest.fixture(scope="module")
def params(state):
  return lpips.params_from_state_dict(state)


def _pair(n, h, w, seed=1):
  """Smooth-ish grey images in [-1, 1] and a perturbed copy."""
  rng = np.random.default_rng(seed)
  x = np.tanh(np.cumsum(rng.standard_normal((n, h, w)), axis=2) / 4).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal((n, h, w)), -1, 1).astype(np.float32)
  return x, y


@pytest.mark.parametrize("h,w", [(64, 64), (47, 63), (31, 35)])
def test_matches_torch_float64(state, params, h, w):
  x, y = _pair(3, h, w)
  want = _torch_lpips(state, x, y)
  got = np.asarray(lpips.lpips(params, x, y))
  assert got.shape == (3,) and np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  # Channels-last grey and 3-channel inputs are the same images.
  np.testing.assert_allclose(np.asarray(lpips.lpips(params, x[..., None], y[..., None])), got,
                             rtol=1e-6)
  rgb = lambda a: np.repeat(a[..., None], 3, axis=-1)
  np.testing.assert_allclose(np.asarray(lpips.lpips(params, rgb(x), rgb(y))), got, rtol=1e-6)


def test_identity_symmetry_nonnegative(params):
  x, y = _pair(4, 40, 48, seed=2)
  assert np.all(np.asarray(lpips.lpips(params, x, x)) == 0)
  a, b = np.asarray(lpips.lpips(params, x, y)), np.asarray(lpips.lpips(params, y, x))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert np.all(a > 0)
  # Non-negative for any inputs, also outside [-1, 1].
  rng = np.random.default_rng(3)
  u, v = (rng.standard_normal((4, 33, 33)).astype(np.float32) * 3 for _ in range(2))
  assert np.all(np.asarray(lpips.lpips(params, u, v)) >= 0)


def test_slice_sum_chunks_and_pads(state, params):
  x, y = _pair(5, 32, 32, seed=4)
  fn = lpips.SliceLpips(params, chunk=2)  # chunks 2, 2, 1 (padded)
  per = fn.per_slice(x, y)
  np.testing.assert_allclose(per, _torch_lpips(state, x, y), rtol=2e-6)
  assert fn(x, y) == pytest.approx(float(_torch_lpips(state, x, y).sum()), rel=2e-6)
  assert abs(fn(x, x)) < 1e-9  # compiled as one program, the two passes may round apart


def test_too_small_images_raise(params):
  x = np.zeros((1, 30, 64), np.float32)
  with pytest.raises(ValueError, match="at least 31x31"):
    lpips.lpips(params, x, x)
  with pytest.raises(ValueError, match="differ in shape"):
    lpips.lpips(params, x, x[:, :, :40])


def test_pth_and_npz_round_trip(state, params, tmp_path, monkeypatch):
  x, y = _pair(2, 40, 40, seed=5)
  want = np.asarray(lpips.lpips(params, x, y))
  extra = {"classifier.1.weight": np.zeros((4, 8), np.float32)}  # ignored, as in a full dict
  pth = tmp_path / "lpips_alex.pth"
  torch.save({k: torch.from_numpy(v) for k, v in {**state, **extra}.items()}, pth)
  seen = []
  load = torch.load
  monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw) or load(*a, **kw))
  fn = lpips.make_lpips_fn(str(pth))
  assert seen and all(kw.get("weights_only") is True for kw in seen)
  np.testing.assert_allclose(fn.per_slice(x, y), want, rtol=1e-6)
  npz = tmp_path / "lpips_alex.npz"
  np.savez(npz, **state)
  np.testing.assert_allclose(lpips.make_lpips_fn(npz).per_slice(x, y), want, rtol=1e-6)
  assert lpips.make_lpips_fn("") is None and lpips.make_lpips_fn(None) is None


def test_saved_lpips_module_layout_is_read(state, params):
  # `torch.save(lpips.LPIPS(net='alex').state_dict())`: features under net.slice{k}.{i}.
  slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
  renamed = {}
  for k, v in state.items():
    if k.startswith("features."):
      i = int(k.split(".")[1])
      k = f"net.slice{slices[i]}.{k[len('features.'):]}"
    renamed[k] = v
  renamed["scaling_layer.shift"] = np.asarray(lpips.SHIFT, np.float32).reshape(1, 3, 1, 1)
  got = lpips.params_from_state_dict(renamed)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)


def test_missing_or_misshapen_key_names_file_and_key(state, tmp_path):
  bad = dict(state)
  del bad["lin3.model.1.weight"]
  path = tmp_path / "no_lin3.npz"
  np.savez(path, **bad)
  with pytest.raises(ValueError, match=r"no_lin3\.npz.*missing key lin3\.model\.1\.weight"):
    lpips.load_lpips_params(path)
  bad = dict(state)
  bad["features.6.weight"] = np.zeros((384, 192, 5, 5), np.float32)
  path = tmp_path / "bad_shape.pth"
  torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, path)
  with pytest.raises(ValueError, match=r"bad_shape\.pth.*features\.6\.weight.*\(384, 192, 5, 5\)"):
    lpips.make_lpips_fn(path)
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    lpips.make_lpips_fn(tmp_path / "nowhere.pth")
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="junk.pth"):
    lpips.load_lpips_params(junk)
