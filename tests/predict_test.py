"""`--mode=predict`: outputs in the input's geometry and intensity scale; clear input errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from configs import tiny
from input_pipeline import toy
from seq2seq_jax import predict
from seq2seq_jax.train_step import init_state, make_model

SEQS = ["t1", "t1ce", "t2", "flair"]
PHASES = {s: 1 for s in SEQS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("toy"))
  toy.make_toy_dataset(root, 2, 0, size=16)
  c = tiny.get_config()
  model = make_model(c)
  params = jax.jit(lambda x: init_state(model, c, x))(jnp.zeros((1, 1, 8, 8, 3)))["params"]
  return dict(root=root, model=model, variables={"params": jax.device_get(params)})


def _subject_dir(setup, tmp_path, seqs):
  """A new subject's folder with only `seqs` (plus its segmentation, to be skipped)."""
  name = "Toy_00000"
  d = tmp_path / name
  d.mkdir()
  for s in seqs + ["seg"]:
    shutil.copy(os.path.join(setup["root"], name, f"{name}_{s}.nii.gz"), d)
  return str(d)


def test_prediction_has_input_geometry_and_source_intensity_scale(setup, tmp_path):
  d = _subject_dir(setup, tmp_path, ["t1", "t2"])
  out = str(tmp_path / "out")
  res = predict.predict_subject(setup["model"], setup["variables"], SEQS, PHASES, d, out,
                                md=True)
  assert res["subject"] == "Toy_00000" and res["missing"] == ["t1ce", "flair"]
  ref = nib.load(os.path.join(d, "Toy_00000_t1.nii.gz"))
  t1 = np.asarray(ref.dataobj, np.float64)
  a = 2 * np.percentile(t1, 99)  # the official scale of the reference source
  assert res["scale"] == pytest.approx(a)
  for name in ("Toy_00000_t1ce", "Toy_00000_flair", "Toy_00000_md_t1", "Toy_00000_md_t2"):
    img = nib.load(os.path.join(out, f"{name}.nii.gz"))
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine)
  # Intensities: the mean of both sources' predictions mapped back with a = 2·p99(t1).
  from seq2seq_jax.inference import VolumeInference
  inf = VolumeInference(setup["model"], setup["variables"])
  norm = lambda v: np.clip(v, 0, 2 * np.percentile(v, 99)) / (2 * np.percentile(v, 99)) * 2 - 1
  srcs = [norm(np.asarray(nib.load(os.path.join(d, f"Toy_00000_{s}.nii.gz")).dataobj,
                          np.float64).T[None]).astype(np.float32) for s in ("t1", "t2")]
  y = np.mean([inf.predict(x, [(1, 1)])[1] for x in srcs], axis=0)
  got = np.asarray(nib.load(os.path.join(out, "Toy_00000_t1ce.nii.gz")).dataobj)
  np.testing.assert_allclose(got, ((y[0] + 1) / 2 * a).T, rtol=1e-4, atol=1e-3 * a)
  summary = json.load(open(os.path.join(out, "Toy_00000_predict.json")))
  assert summary["intensity_reference"] == "t1"
  assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def _run(setup, tmp_path, inputs):
  return predict.predict_subject(setup["model"], setup["variables"], SEQS, PHASES, inputs,
                                 str(tmp_path / "out"))


def test_error_on_shape_mismatch(setup, tmp_path):
  d = _subject_dir(setup, tmp_path, ["t1"])
  img = nib.load(os.path.join(d, "Toy_00000_t1.nii.gz"))
  nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.int16), img.affine),
           os.path.join(d, "Toy_00000_t2.nii.gz"))
  with pytest.raises(predict.PredictError, match=r"Toy_00000_t2.nii.gz: shape \(16, 16, 12\)"):
    _run(setup, tmp_path, d)


def test_error_on_affine_mismatch(setup, tmp_path):
  d = _subject_dir(setup, tmp_path, ["t1"])
  img = nib.load(os.path.join(d, "Toy_00000_t1.nii.gz"))
  aff = img.affine.copy()
  aff[0, 3] += 5
  nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), os.path.join(d, "Toy_00000_t2.nii.gz"))
  with pytest.raises(predict.PredictError, match="Toy_00000_t2.nii.gz: affine differs"):
    _run(setup, tmp_path, d)


def test_error_when_no_model_sequence_is_present(setup, tmp_path):
  d = _subject_dir(setup, tmp_path, [])  # only the segmentation
  with pytest.raises(predict.PredictError, match="none of the model's sequences"):
    _run(setup, tmp_path, d)


def test_error_on_duplicate_and_unknown_and_missing_inputs(setup, tmp_path):
  d = _subject_dir(setup, tmp_path, ["t1"])
  f = os.path.join(d, "Toy_00000_t1.nii.gz")
  with pytest.raises(predict.PredictError, match="two inputs for sequence 't1'"):
    _run(setup, tmp_path, f"{f},t1={f}")
  with pytest.raises(predict.PredictError, match="'dwi' is not one of"):
    _run(setup, tmp_path, f"dwi={f}")
  with pytest.raises(predict.PredictError, match="not found"):
    _run(setup, tmp_path, "t2=/nonexistent/t2.nii.gz")
