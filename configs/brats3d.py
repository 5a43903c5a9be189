"""A 3D generator on BraTS volume patches (same data fields as brats2d)."""

from configs.base import base_config


def get_config():
  c = base_config(
      ndims=3, c_s=64, c_w=8, c_in=1, c_enc=[16, 32, 64], k_enc=[5, 3, 3], s_enc=[1, 2, 2],
      nres_enc=3, norm="InstanceNorm", c_lstm=64, c_dec=[32, 16, 1], k_dec=[3, 3, 5],
      s_dec=[1, 1, 1], nres_dec=3)
  c.data.layout = "brats"
  c.data.sequences = ("t1", "t1ce", "t2", "flair")
  c.data.cache_dir = "~/.cache/seq2seq_jax/brats"
  c.data.depth = 128
  t = c.train
  t.crop_size = (64, 64, 64)
  t.valid_size = (128, 192, 192)
  t.lambda_per = 0.0  # the official perceptual loss is 2D; on for 3D it uses axial slices
  t.batch_size = 1
  # Keep only conv outputs for the backward pass: XLA temporaries 994 -> 679 MB at the same
  # step time (experiments/README.md, "Performance").
  t.recompute_elementwise = True
  return c
