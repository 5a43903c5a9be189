"""3D + time: a dynamic sequence (several phases) among static ones; toy 4D data by default."""

from configs.base import base_config


def get_config():
  c = base_config(
      ndims=3, c_s=8, c_w=4, c_in=1, c_enc=[8, 16, 32], k_enc=[3, 3, 3], s_enc=[1, 2, 2],
      nres_enc=2, norm="InstanceNorm", c_lstm=32, c_dec=[16, 8, 1], k_dec=[3, 3, 3],
      s_dec=[1, 1, 1], nres_dec=2)
  c.data.layout = "toy"
  c.data.toy_dynamic = True
  c.data.toy_subjects = 40
  c.data.toy_size = 32
  c.data.cache_dir = "~/.cache/seq2seq_jax/dce4d"
  t = c.train
  t.crop_size = (32, 32, 32)
  t.valid_size = (32, 32, 32)
  t.lambda_per = 0.0
  t.batch_size = 2
  t.epochs = 50
  t.total_steps = 2000
  return c
