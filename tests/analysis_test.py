"""Contribution (C_t, C_d), M_d, ROC AUC and the robust metrics against hand/direct results."""

import itertools

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from seq2seq_jax import analysis
from seq2seq_jax import metrics

Z = np.sqrt(1.5)  # z-scores of three equally spaced values: -Z, 0, +Z


def test_contribution_hand_computed():
  # psnr 30/20/10 and ssim .9/.8/.7 z-score to (+Z, 0, -Z) each; lpips 1/2/3 enters as -z.
  rows = [{"src": "a", "tgt": "b", "psnr": 30, "ssim": .9, "lpips": 1},
          {"src": "a", "tgt": "b", "psnr": 20, "ssim": .8, "lpips": 2},
          {"src": "b", "tgt": "a", "psnr": 10, "ssim": .7, "lpips": 3}]
  c = analysis.contribution(rows, ["a", "b", "c"])
  a_ab = (3 * Z + 0) / 2   # mean of the two a->b rows' totals
  a_ba = -3 * Z
  np.testing.assert_allclose(c["A"], [[0, a_ab, 0], [a_ba, 0, 0], [0, 0, 0]], atol=1e-6)
  np.testing.assert_allclose(c["C_t"], [a_ab / 3, a_ba / 3, 0], atol=1e-6)
  np.testing.assert_allclose(c["C_d"], [-a_ba / 3, -a_ab / 3, 0], atol=1e-6)
  assert list(c["rank_d"]) == [1, 3, 2] and list(c["rank_t"]) == [1, 3, 2]
  assert c["metrics"] == ["psnr", "ssim", "lpips"]


def test_contribution_without_lpips_ignores_empty_column():
  rows = [{"src": "a", "tgt": "b", "psnr": 30, "ssim": .9, "lpips": None},
          {"src": "b", "tgt": "a", "psnr": 10, "ssim": .7, "lpips": None}]
  c = analysis.contribution(rows, ["a", "b"])
  assert c["metrics"] == ["psnr", "ssim"]
  # Two values z-score to +-1 each: A[a][b] = 2, A[b][a] = -2; means over N = 2.
  np.testing.assert_allclose(c["C_t"], [1, -1], atol=1e-6)
  np.testing.assert_allclose(c["C_d"], [1, -1], atol=1e-6)


def test_contribution_rejects_unknown_sequence():
  with pytest.raises(ValueError, match="'x'"):
    analysis.contribution([{"src": "x", "tgt": "a", "psnr": 1, "ssim": 1}], ["a", "b"])


def test_md_map_matches_direct_loop():
  rng = np.random.default_rng(0)
  target = rng.uniform(-1, 1, (2, 3, 4)).astype(np.float32)
  preds = [rng.uniform(-1, 1, target.shape).astype(np.float32) for _ in range(3)]
  md = analysis.md_map(preds, target)
  for idx in itertools.product(*[range(n) for n in target.shape]):
    direct = sum(abs(float(p[idx]) - float(target[idx])) for p in preds) / 3
    assert md[idx] == pytest.approx(direct, abs=1e-6)


def test_roc_auc_matches_pair_count():
  rng = np.random.default_rng(1)
  scores = np.round(rng.normal(size=200), 1)  # rounding makes ties
  labels = rng.uniform(size=200) < 0.3
  pos, neg = scores[labels], scores[~labels]
  direct = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
  assert analysis.roc_auc(scores, labels) == pytest.approx(direct, abs=1e-12)
  assert analysis.roc_auc(labels.astype(float), labels) == 1.0
  with pytest.raises(ValueError, match="both classes"):
    analysis.roc_auc(scores, np.zeros(200, bool))


def test_metrics_match_scikit_image_on_random_volumes():
  rng = np.random.default_rng(2)
  a = rng.uniform(-1, 1, (9, 20, 24)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.2, a.shape), -1, 1).astype(np.float32)
  assert metrics.psnr(b, a) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=2),
                                             rel=1e-9)
  assert metrics.ssim(b, a) == pytest.approx(structural_similarity(
      a.astype(np.float64), b.astype(np.float64), data_range=2), rel=1e-9)


def test_robust_metrics_ignore_gain_and_offset():
  rng = np.random.default_rng(3)
  tgt = rng.uniform(-1, 1, (8, 16, 16))
  mask = np.zeros(tgt.shape, bool)
  mask[:, 2:14, 2:14] = True
  scaled = 0.5 * tgt + 0.2  # the same content on another intensity scale
  r = analysis.robust_metrics(scaled, tgt, mask)
  assert r["zpsnr"] > 150 and r["zssim"] == pytest.approx(1.0, abs=1e-9)
  assert metrics.psnr(scaled, tgt) < 20  # the official PSNR penalises the scale
  noisy = analysis.robust_metrics(tgt + rng.normal(0, 0.3, tgt.shape), tgt, mask)
  assert noisy["zpsnr"] < 30 and noisy["zssim"] < 0.9


def test_robust_metrics_scale_is_not_set_by_a_small_bright_lesion():
  # A twin pair: `lesioned` = `plain` + a bright blob in 0.5% of the brain. Predicting the plain
  # image for the lesioned target must score worse than the other way round would for a
  # lesion-free pair; with a mean/std z-score or a max-min range the lesion would shrink the
  # whole image's errors instead.
  rng = np.random.default_rng(4)
  plain = rng.normal(0, 1, (16, 32, 32))
  mask = np.ones(plain.shape, bool)
  lesioned = plain.copy()
  lesioned.flat[rng.choice(plain.size, plain.size // 200, replace=False)] += 20.0
  noisy = plain + rng.normal(0, 0.3, plain.shape)
  to_lesioned = analysis.robust_metrics(noisy, lesioned, mask)["zpsnr"]
  to_plain = analysis.robust_metrics(noisy, plain, mask)["zpsnr"]
  assert to_lesioned < to_plain - 3  # the missed lesion costs, as its content says
  # The tissue's standardisation barely moves (median/IQR), unlike mean/std.
  z = analysis._standardize_in(lesioned, mask)[lesioned == plain]
  np.testing.assert_allclose(z, analysis._standardize_in(plain, mask)[lesioned == plain],
                             atol=0.05)
