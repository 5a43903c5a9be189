"""The Seq2Seq training objective: reconstruction, cycle and perceptual terms.

    total = λ_rec·(SmoothL1(G(src, ct), tgt) + SmoothL1(G(src, cs), src))
          + λ_cyc·SmoothL1(G(G(src, ct), cs), src)
          + λ_per·(P(G(src, ct), tgt) + P(G(src, cs), src))

as the official training step computes it (reference page, "Training objective"). The source is
encoded once, and its decoder ConvLSTM (which does not see the code) run once, for both codes:
the official code runs both twice on the same input, which gives the same numbers for twice
the work. Every hyper kernel is built for both codes in one pass over its bank
(`Generator.hyper_kernels`) and handed to the renders. In 2D the two outputs for the source
code, G(src, cs) and the cycle's G(G(src, ct), cs), are rendered in one decoder call.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from seq2seq_jax import vgg as vgg_lib
from seq2seq_jax.models import hyperconv


def smooth_l1(pred: jnp.ndarray, target: jnp.ndarray, beta: float = 1.0) -> jnp.ndarray:
  """torch.nn.SmoothL1Loss (mean over all elements)."""
  d = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta))


def as_grey_images(x: jnp.ndarray) -> jnp.ndarray:
  """Batch element 0 of `[b, t, *spatial, c]` in [-1, 1] → grey images `[n, H, W]` in [0, 1].

  2D: every (t, channel) image, as the official loss. 3D (which the official code never
  trains with this loss): every axial slice of every (t, channel) volume.
  """
  x0 = x[0]  # [t, *spatial, c]
  x0 = jnp.moveaxis(x0, -1, 1)  # [t, c, *spatial]
  return x0.reshape((-1,) + x0.shape[-2:]) / 2 + 0.5


def seq2seq_objective(model, variables: Mapping[str, Any], src: jnp.ndarray,
                      tgt: jnp.ndarray, src_code: jnp.ndarray, tgt_code: jnp.ndarray, *,
                      lambda_rec: float = 10.0, lambda_cyc: float = 10.0,
                      lambda_per: float = 0.0, vgg: Mapping[str, Any] | None = None):
  """The whole objective of one official training step.

  Args:
    model: the linen `Generator`.
    variables: its Flax variables (`{'params': ...}`); the loss is differentiable in them.
    src: `[b, t_src, *spatial, c_in]` in [-1, 1].
    tgt: `[b, t_tgt, *spatial, c_in]` in [-1, 1].
    src_code, tgt_code: one-hot codes, `[1, c_s]` or `[b, c_s]`.
    lambda_rec, lambda_cyc, lambda_per: term weights (official 10, 10, 0.01).
    vgg: VGG19 params from `vgg.load_vgg19_params`; required when `lambda_per > 0`.

  Returns:
    `(total, {'rec': ..., 'cyc': ..., 'per': ...})`, float32 scalars.
  """
  if lambda_per > 0 and vgg is None:
    raise ValueError("lambda_per > 0 needs VGG19 weights: pass vgg=load_vgg19_params(path)")
  if src_code.shape != tgt_code.shape:
    raise ValueError(f"src_code {src_code.shape} and tgt_code {tgt_code.shape} must have the "
                     "same shape, [1, c_s] or [b, c_s]")
  t_src, t_tgt = src.shape[1], tgt.shape[1]
  # Both codes' hyper kernels in one pass over each bank (`Generator.hyper_kernels`).
  n = src_code.shape[0]
  kernels = model.apply(variables, jnp.concatenate([src_code, tgt_code]),
                        method="hyper_kernels")
  with_s = {**variables, hyperconv.KERNELS: hyperconv.take_codes(kernels, 0, n)}
  with_t = {**variables, hyperconv.KERNELS: hyperconv.take_codes(kernels, n, 2 * n)}
  latent = model.apply(variables, src, method="encode")
  h_s = model.apply(variables, latent, t_src, method="decode_hidden")
  h_t = h_s if t_tgt == t_src else model.apply(variables, latent, t_tgt, method="decode_hidden")
  if src.ndim == 5:
    # 2D: G(src, cs) and the cycle's G(out_t, cs) rendered as one call, their frames side by
    # side on the time axis (the decoder runs each frame alone, and the batch axis keeps its
    # sharding): brats2d 4.37/4.35/4.50 against 4.58/4.53/4.54 s a step, toy 0.110/0.108
    # against 0.116/0.117 (measured when each render still built its own kernels). In 3D the
    # doubled render batch costs more than it saves: brats3d 2.91/2.78 against 2.67/2.77 s,
    # XLA temporaries 456 against 377 MB.
    out_t = model.apply(with_t, h_t, tgt_code, method="render")
    h_c = model.apply(variables, model.apply(variables, out_t, method="encode"), t_src,
                      method="decode_hidden")
    out_sc = model.apply(with_s, jnp.concatenate([h_s, h_c], axis=1), src_code,
                         method="render")
    out_s, out_c = out_sc[:, :t_src], out_sc[:, t_src:]
  else:
    out_s = model.apply(with_s, h_s, src_code, method="render")
    out_t = model.apply(with_t, h_t, tgt_code, method="render")
    out_c = model.apply(with_s, out_t, src_code, n_outseq=t_src)
  rec = smooth_l1(out_t, tgt) + smooth_l1(out_s, src)
  cyc = smooth_l1(out_c, src)
  if lambda_per > 0:
    per = (vgg_lib.perceptual_loss(vgg, as_grey_images(out_t), as_grey_images(tgt)) +
           vgg_lib.perceptual_loss(vgg, as_grey_images(out_s), as_grey_images(src)))
  else:
    per = jnp.zeros((), jnp.float32)
  total = lambda_rec * rec + lambda_cyc * cyc + lambda_per * per
  return total, {"rec": rec, "cyc": cyc, "per": per}
