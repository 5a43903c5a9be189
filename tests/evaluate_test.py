"""Whole-volume inference and `--mode=evaluate` outputs, checked against direct model calls."""

import csv
import os
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from configs import tiny
from input_pipeline import dataset as dataset_lib
from seq2seq_jax import analysis
from seq2seq_jax import data as data_lib
from seq2seq_jax import evaluate
from seq2seq_jax import lpips
from seq2seq_jax.checkpoint import Checkpointer
from seq2seq_jax.inference import VolumeInference
from seq2seq_jax.sharding import make_mesh
from seq2seq_jax.train_step import init_state, make_model


def tiny_config(cache_dir, ndims=2):
  c = tiny.get_config()
  c.data.cache_dir = cache_dir
  if ndims == 3:
    c.model.ndims, c.model.c_in, c.model.c_dec = 3, 1, [8, 4, 1]
    c.train.valid_size = (16, 16, 16)
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A prepared tiny toy set and a random-init model saved as a checkpoint."""
  cache = str(tmp_path_factory.mktemp("tiny_cache"))
  c = tiny_config(cache)
  dataset_dir = data_lib.prepare_data(c)
  model = make_model(c)
  state = jax.jit(lambda x: init_state(model, c, x))(jnp.zeros((1, 1, 8, 8, 3)))
  workdir = str(tmp_path_factory.mktemp("work"))
  ckpt = Checkpointer(workdir, async_save=False)
  ckpt.save(3, state, {})
  ckpt.close()
  recs = [dataset_lib.decode_record(r) for r in dataset_lib.split_source(dataset_dir, "test")]
  toy_root = os.path.join(cache, "toy", "toy-n8-s16-seed0")
  return dict(config=c, dataset_dir=dataset_dir, model=model,
              variables={"params": jax.device_get(state["params"])}, workdir=workdir,
              recs=recs, toy_root=toy_root)


def direct_predict(model, variables, vol, code_idx):
  """Slice by slice, the 2.5D stack built here with np.pad (-1 beyond the volume's ends)."""
  t, d, h, w = vol.shape
  c_in = model.c_in
  padded = np.pad(vol, [(0, 0), (c_in // 2, c_in - 1 - c_in // 2), (0, 0), (0, 0)],
                  constant_values=-1)
  code = np.eye(model.c_s, dtype=np.float32)[[code_idx]]
  out = np.zeros((1, d, h, w), np.float32)
  apply = jax.jit(model.apply)
  for j in range(d):
    x = padded[:, j:j + c_in].transpose(0, 2, 3, 1)[None]  # [1, t, H, W, c]
    y = np.asarray(apply(variables, x, code))
    out[0, j] = y[0, 0, ..., c_in // 2]
  return out


def test_slicewise_inference_matches_direct_calls(setup):
  model, variables = setup["model"], setup["variables"]
  vol = setup["recs"][0]["volumes"]["t2"]
  inf = VolumeInference(model, variables, batch_size=5)  # 16 slices: the last batch is padded
  out = inf.predict(vol, [(0, 1), (3, 1)])
  for idx in (0, 3):
    # Batched and one-slice convolutions differ in float32 rounding only.
    np.testing.assert_allclose(out[idx], direct_predict(model, variables, vol, idx), atol=1e-3)


def test_3d_windows_match_direct_call_and_cover_the_volume(setup):
  c = tiny_config(setup["config"].data.cache_dir, ndims=3)
  model = make_model(c)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 8, 8, 8, 1)),
                      jnp.zeros((1, c.model.c_s)))
  vol = setup["recs"][0]["volumes"]["t1ce"][:, :, :12]  # H = 12: padded to the stride
  one = VolumeInference(model, params, patch=(16, 16, 16)).predict(vol, [(1, 1)])[1]
  code = np.eye(c.model.c_s, dtype=np.float32)[[1]]
  x = np.pad(vol, [(0, 0), (0, 0), (2, 2), (0, 0)], constant_values=-1)[None, ..., None]
  direct = np.asarray(model.apply(params, x, code))[0, :, :, 2:14, :, 0]
  np.testing.assert_allclose(one, direct, atol=1e-3)
  # Overlapping 8^3 windows: the blend of each voxel's windows, close to the one-window result.
  many = VolumeInference(model, params, patch=(8, 8, 8)).predict(vol, [(1, 1)])[1]
  assert many.shape == vol.shape and np.all(np.isfinite(many))
  assert np.abs(many - one).mean() < 0.5 * np.abs(one - vol).mean() + 0.2


def test_evaluate_writes_official_rows_metrics_md_and_predictions(setup):
  c, model, variables = setup["config"], setup["model"], setup["variables"]
  res = evaluate.evaluate(c, setup["workdir"], save_predictions=True)
  out = os.path.join(setup["workdir"], "eval")
  assert res["step"] == 3
  with open(os.path.join(out, "result_metrics.csv")) as f:
    assert f.readline().strip() == "name,src,tgt,psnr,ssim,lpips"
  rows = list(csv.DictReader(open(os.path.join(out, "result_metrics.csv"))))
  expected = set()
  for r in setup["recs"]:
    seqs = r["sequences"]
    for t, a in enumerate(r["available"]):
      if not a and seqs[t] in r["volumes"]:
        expected |= {(r["name"], seqs[s], seqs[t]) for s, av in enumerate(r["available"]) if av}
  assert expected and {(r["name"], r["src"], r["tgt"]) for r in rows} == expected
  assert all(r["lpips"] == "" for r in rows)

  # One row recomputed independently: direct slice-by-slice prediction, scikit-image metrics.
  row = rows[0]
  rec = next(r for r in setup["recs"] if r["name"] == row["name"])
  seqs = rec["sequences"]
  pred = direct_predict(model, variables, rec["volumes"][row["src"]], seqs.index(row["tgt"]))
  tgt = rec["volumes"][row["tgt"]]
  assert float(row["psnr"]) == pytest.approx(
      peak_signal_noise_ratio(tgt, pred, data_range=2), abs=1e-3)
  assert float(row["ssim"]) == pytest.approx(structural_similarity(
      tgt[0].astype(np.float64), pred[0].astype(np.float64), data_range=2), abs=1e-4)

  # M_d NIfTI: the input's geometry, and the mean over every present source of |G - x|.
  t = row["tgt"]
  src_nii = nib.load(os.path.join(setup["toy_root"], rec["name"], f"{rec['name']}_{t}.nii.gz"))
  md_nii = nib.load(os.path.join(out, "md", f"{rec['name']}_md_{t}.nii.gz"))
  assert md_nii.shape == src_nii.shape
  np.testing.assert_allclose(md_nii.affine, src_nii.affine)
  direct_md = np.mean([np.abs(direct_predict(model, variables, rec["volumes"][s],
                                             seqs.index(t)) - tgt)
                       for s in rec["volumes"]], axis=0)
  np.testing.assert_allclose(np.asarray(md_nii.dataobj), direct_md[0].T, atol=1e-4)
  assert os.path.isfile(os.path.join(out, "md", f"{rec['name']}_md.png"))

  # The saved prediction: input geometry and the target's own intensity scale.
  p_nii = nib.load(os.path.join(out, "pred", f"{rec['name']}_{t}_from_{row['src']}.nii.gz"))
  assert p_nii.shape == src_nii.shape
  np.testing.assert_allclose(p_nii.affine, src_nii.affine)
  np.testing.assert_allclose(np.asarray(p_nii.dataobj),
                             ((pred[0] + 1) / 2 * rec["scale"][t]).T, rtol=1e-4, atol=1e-2)

  # contribution.csv is the analysis of the rows written beside it.
  table = list(csv.DictReader(open(os.path.join(out, "contribution.csv"))))
  assert {r["variant"] for r in table} == {"official", "official_all_pairs",
                                           "robust_all_pairs", "md"}
  cont = analysis.contribution(
      [{**r, "lpips": None} for r in rows], list(seqs))
  official = [r for r in table if r["variant"] == "official"]
  np.testing.assert_allclose([float(r["C_d"]) for r in official], cont["C_d"], atol=1e-6)
  np.testing.assert_allclose([float(r["C_t"]) for r in official], cont["C_t"], atol=1e-6)
  for name in ("summary.csv", "all_pairs_metrics.csv", "md_summary.csv", "contribution.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_evaluate_fills_lpips_with_weights(setup, tmp_path):
  # AlexNet needs >= 31 pixels a side: the same checkpoint (the model is fully convolutional)
  # on 32^3 phantoms, and random LPIPS weights in the user-facing one-file layout.
  c = tiny_config(setup["config"].data.cache_dir)
  c.data.toy_size = 32
  c.train.valid_size = (8, 32, 32)
  weights = tmp_path / "lpips_alex.npz"
  np.savez(weights, **lpips.random_state_dict(seed=0))
  c.eval.lpips_weights = str(weights)
  workdir = tmp_path / "work"
  shutil.copytree(setup["workdir"], workdir, ignore=shutil.ignore_patterns("eval"))
  res = evaluate.evaluate(c, str(workdir))
  rows = list(csv.DictReader(open(workdir / "eval" / "result_metrics.csv")))
  assert rows and all(float(r["lpips"]) > 0 for r in rows)
  assert res["lpips"] == pytest.approx(np.mean([float(r["lpips"]) for r in rows]), rel=1e-6)
  official = [r for r in csv.DictReader(open(workdir / "eval" / "contribution.csv"))
              if r["variant"] == "official"]
  assert official[0]["metrics"] == "psnr+ssim+lpips"

  # One row recomputed: the slice-wise prediction (tested above) on the test crop, summed.
  # Predicted as evaluate does, split over the local devices: a background-only slice has
  # near-zero variance after each conv, so instance norm (eps 1e-5) scales rounding by up to
  # ~300x per layer, and the last slice of this phantom predicted in a batch of 4 instead of
  # 16 differs by 0.32 (AMD EPYC, no AVX-512), which moved this sum by 0.16%.
  row = rows[0]
  dataset_dir = data_lib.prepare_data(c)
  recs = map(dataset_lib.decode_record, dataset_lib.split_source(dataset_dir, "test"))
  rec = next(r for r in recs if r["name"] == row["name"])
  seqs = rec["sequences"]
  vol = rec["volumes"][row["src"]]
  mesh = make_mesh({"data": -1, "spatial": 1})
  pred = VolumeInference(setup["model"], setup["variables"], mesh=mesh).predict(
      vol, [(seqs.index(row["tgt"]), 1)])[seqs.index(row["tgt"])]
  box = (slice(None),) + evaluate.test_box(vol.shape[1:], c.train.valid_size)
  fn = lpips.SliceLpips(lpips.load_lpips_params(weights))
  want = sum(fn(p, t) for p, t in zip(pred[box], rec["volumes"][row["tgt"]][box]))
  assert float(row["lpips"]) == pytest.approx(want, rel=1e-4)
