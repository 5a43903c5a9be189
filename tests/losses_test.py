"""The objective's terms against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from seq2seq_jax import vgg as vgg_lib
from seq2seq_jax.convert import load_torch_checkpoint
from seq2seq_jax.losses import seq2seq_objective, smooth_l1
from tests.reference import paths, to_model_layout, to_torch_layout


def test_smooth_l1_matches_torch():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 2, 7, 5, 1)).astype(np.float32) * 2
  b = rng.normal(size=a.shape).astype(np.float32)
  want = torch.nn.SmoothL1Loss()(torch.from_numpy(a), torch.from_numpy(b)).item()
  np.testing.assert_allclose(float(smooth_l1(a, b)), want, rtol=1e-6)


def test_perceptual_term_follows_the_official_definition(fixtures_dir):
  """per = P(out_t, tgt) + P(out_s, src) on batch element 0, every (t, channel) image taken
  as one grey image x/2 + 0.5, built here from the torch layout as the official step does."""
  pth, yml, npz = paths(fixtures_dir, "seq2seq_2p5d_small")
  model, variables = load_torch_checkpoint(pth, yml)
  z = np.load(npz)
  src, tgt = to_model_layout(z["train_src"]), to_model_layout(z["train_tgt"])
  cs, ct = z["train_src_code"], z["train_tgt_code"]
  vgg = vgg_lib.vgg19_params_from_state_dict(vgg_lib.random_vgg19_state_dict(0))
  total, terms = seq2seq_objective(model, variables, src, tgt, cs, ct, lambda_rec=10.0,
                                   lambda_cyc=10.0, lambda_per=0.01, vgg=vgg)
  out_s = to_torch_layout(np.asarray(model.apply(variables, src, cs, n_outseq=1)))
  out_t = to_torch_layout(np.asarray(model.apply(variables, src, ct, n_outseq=1)))
  h, w = out_t.shape[-2:]
  grey = lambda a: a[0].reshape(-1, h, w) / 2 + 0.5  # official: x[0].reshape(-1, 1, H, W)
  want = (vgg_lib.perceptual_loss(vgg, grey(out_t), grey(z["train_tgt"])) +
          vgg_lib.perceptual_loss(vgg, grey(out_s), grey(z["train_src"])))
  np.testing.assert_allclose(float(terms["per"]), float(want), rtol=1e-5)
  assert float(terms["per"]) > 0
  np.testing.assert_allclose(
      float(total), 10 * float(terms["rec"]) + 10 * float(terms["cyc"]) + 0.01 * float(want),
      rtol=1e-6)
  # and it is differentiable in the params with the perceptual term on
  grads = jax.grad(lambda p: seq2seq_objective(model, {"params": p}, src, tgt, cs, ct,
                                               lambda_per=0.01, vgg=vgg)[0])(variables["params"])
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("per_example", [False, True])
def test_objective_terms_are_the_three_generator_calls(fixtures_dir, per_example):
  """rec and cyc from G(src, ct), G(src, cs) and G(G(src, ct), cs) run as separate calls: the
  objective renders the two source-code outputs of a 2D model as one decoder call."""
  pth, yml, npz = paths(fixtures_dir, "seq2seq_2p5d_small")
  model, variables = load_torch_checkpoint(pth, yml)
  z = np.load(npz)
  src, tgt = to_model_layout(z["train_src"]), to_model_layout(z["train_tgt"])
  cs, ct = z["train_src_code"], z["train_tgt_code"]
  if per_example:  # one code per example, different in each
    cs, ct = np.concatenate([cs, ct]), np.concatenate([ct, cs])
  _, terms = seq2seq_objective(model, variables, src, tgt, cs, ct)
  g = lambda x, c: model.apply(variables, x, c, n_outseq=1)
  out_t = g(src, ct)
  want_rec = smooth_l1(out_t, tgt) + smooth_l1(g(src, cs), src)
  want_cyc = smooth_l1(g(out_t, cs), src)
  np.testing.assert_allclose(float(terms["rec"]), float(want_rec), rtol=1e-5)
  np.testing.assert_allclose(float(terms["cyc"]), float(want_cyc), rtol=1e-5)


def test_perceptual_without_weights_is_a_clear_error(fixtures_dir):
  pth, yml, npz = paths(fixtures_dir, "seq2seq_nonorm_small")
  model, variables = load_torch_checkpoint(pth, yml)
  x = jnp.zeros((1, 1, 24, 24, 1))
  with pytest.raises(ValueError, match="lambda_per > 0 needs VGG19 weights"):
    seq2seq_objective(model, variables, x, x, jnp.eye(8)[:1], jnp.eye(8)[1:2], lambda_per=0.01)
