"""A seconds-long config for tests: tiny model, tiny toy volumes."""

from configs.base import base_config


def get_config():
  c = base_config(
      ndims=2, c_s=4, c_w=2, c_in=3, c_enc=[4, 8, 8], k_enc=[3, 3, 3], s_enc=[1, 2, 2],
      nres_enc=1, norm="InstanceNorm", c_lstm=8, c_dec=[8, 4, 3], k_dec=[3, 3, 3],
      s_dec=[1, 1, 1], nres_dec=1)
  c.data.layout = "toy"
  c.data.cache_dir = "/tmp/seq2seq_jax_tiny"
  c.data.toy_subjects = 8
  c.data.toy_size = 16
  c.data.depth = 0
  t = c.train
  t.epochs = 4
  t.total_steps = 8
  t.rep_step = 2
  t.crop_size = (1, 16, 16)
  t.valid_size = (8, 16, 16)
  t.lambda_per = 0.0
  t.batch_size = 4
  t.vis_steps = 4
  t.ckpt_steps = 4
  t.log_steps = 2
  t.eval_steps = 4
  return c
