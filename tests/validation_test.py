"""Validation metrics against direct computations."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from input_pipeline import geometry
from seq2seq_jax import metrics, validation
from seq2seq_jax.convert import load_torch_checkpoint
from tests.reference import paths


def test_psnr_and_ssim_match_definitions():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (9, 20, 20))
  b = np.clip(a + rng.normal(0, 0.1, a.shape), -1, 1)
  mse = np.mean((a - b) ** 2)
  assert metrics.psnr(b, a) == pytest.approx(10 * np.log10(4 / mse), rel=1e-12)
  assert metrics.ssim(b, a) == pytest.approx(structural_similarity(a, b, data_range=2.0))


def test_validate_scores_every_available_pair(fixtures_dir):
  model, variables = load_torch_checkpoint(*paths(fixtures_dir, "seq2seq_2p5d_small")[:2])
  rng = np.random.default_rng(1)
  vols = {i: rng.uniform(-1, 1, (1, 10, 30, 30)).astype(np.float32) for i in (0, 2, 3)}
  views, pads = {}, None
  for i, v in vols.items():
    views[i], pads = geometry.pad_to_multiple(geometry.stack_slices(v, 3), (2, 3), 4)
  subj = {"available": [0, 3], "views": views, "view_pads": pads}
  got = validation.validate(validation.Predictor(model), variables, [subj], model.c_s)
  psnrs, cross = [], []
  eye = np.eye(model.c_s, dtype=np.float32)
  for s in (0, 3):
    for t in (0, 3):
      out = np.asarray(model.apply(variables, views[s], eye[t:t + 1], n_outseq=1))
      out = out[:, :, 1:-1, 1:-1]  # 30 -> 32 was padded by one on each side
      tgt = geometry.unpad(views[t], (2, 3), pads)
      psnrs.append(metrics.psnr(out, tgt))
      if s != t:
        cross.append(psnrs[-1])
  assert got["pairs"] == 4  # sequence 2 is present but not available: not scored
  assert got["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-5)
  assert got["psnr_cross"] == pytest.approx(np.mean(cross), rel=1e-5)
