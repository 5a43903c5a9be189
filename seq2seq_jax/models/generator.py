"""The Seq2Seq generator: encoder → ConvLSTM → mean over time → ConvLSTM → hyper decoder."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from seq2seq_jax.models import hyperconv
from seq2seq_jax.models import ops
from seq2seq_jax.models.config import norm_of, total_stride, validate_model_config
from seq2seq_jax.models.conv import CONV_OUT, HYPER_KERNELS, linear_init, zeros
from seq2seq_jax.models.convlstm import ConvLSTM
from seq2seq_jax.models.decoder import HyperDecoder
from seq2seq_jax.models.encoder import Encoder
from seq2seq_jax.models.hyperconv import NORM_PROBES


class Generator(nn.Module):
  """One generator for every source → target sequence pair.

  Call as `model.apply(variables, x, code, n_outseq=n)`:
    x: `[b, t, *spatial, c_in]` float32 in [-1, 1] (t images of the source sequence).
    code: `[1, c_s]` (one target code for the batch, as the official model) or `[b, c_s]`
      (one target per example).
    returns `[b, n_outseq, *spatial, c_in]` float32 in [-1, 1].

  `encode`, `decode`, and decode's two halves `decode_hidden` (the code-independent decoder
  ConvLSTM) and `render` (the hyper decoder) are exposed (`method=`), so that several targets
  can be decoded from one encoding and one decoder-LSTM pass; `hyper_kernels` builds the
  hyper decoder's kernels for several codes at once, for `render` to take (the training
  objective's use). Attributes are the official
  config keys (see `models/config.py`), plus the compute `dtype` (params are always float32)
  and two ways of keeping less for the backward pass: `remat` (recompute blocks and
  full-resolution stages, convolutions included) and `recompute_elementwise` (keep only each
  layer's conv output and hyperconv kernels, recompute norms, activations, padding,
  upsampling and LSTM gates from them).
  """
  ndims: int
  c_s: int
  c_w: int
  c_in: int
  c_enc: Sequence[int]
  k_enc: Sequence[int]
  s_enc: Sequence[int]
  nres_enc: int
  norm: str | None
  c_lstm: int
  c_dec: Sequence[int]
  k_dec: Sequence[int]
  s_dec: Sequence[int]
  nres_dec: int
  dtype: Any = jnp.float32
  remat: bool = False
  recompute_elementwise: bool = False

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], dtype: Any = jnp.float32,
                  remat: bool = False, recompute_elementwise: bool = False) -> "Generator":
    validate_model_config(cfg)
    tup = lambda k: tuple(int(v) for v in cfg[k])
    return cls(ndims=int(cfg["ndims"]), c_s=int(cfg["c_s"]), c_w=int(cfg["c_w"]),
               c_in=int(cfg["c_in"]), c_enc=tup("c_enc"), k_enc=tup("k_enc"),
               s_enc=tup("s_enc"), nres_enc=int(cfg["nres_enc"]), norm=norm_of(cfg),
               c_lstm=int(cfg["c_lstm"]), c_dec=tup("c_dec"), k_dec=tup("k_dec"),
               s_dec=tup("s_dec"), nres_dec=int(cfg["nres_dec"]), dtype=dtype, remat=remat,
               recompute_elementwise=recompute_elementwise)

  def setup(self):
    common = dict(ndims=self.ndims, norm=self.norm, dtype=self.dtype, remat=self.remat)
    encoder, decoder, lstm = Encoder, HyperDecoder, ConvLSTM
    if self.recompute_elementwise:
      # Without it a layer keeps its conv output, the normalised or activated copies its
      # backward reads and the padded input of the next conv (brats3d's 64³ × 16 stages:
      # three or four volumes where one suffices).
      keep = jax.checkpoint_policies.save_only_these_names(CONV_OUT, HYPER_KERNELS)
      encoder = nn.remat(Encoder, policy=keep)
      decoder = nn.remat(HyperDecoder, policy=keep)
      lstm = nn.remat(ConvLSTM, static_argnums=(2,), policy=keep)
    if self.remat:
      lstm = nn.remat(ConvLSTM, static_argnums=(2,))
    self.encoder = encoder(self.c_enc, self.k_enc, self.s_enc, self.nres_enc, **common)
    self.enc_convlstm = lstm(self.c_lstm, ndims=self.ndims, dtype=self.dtype)
    self.dec_convlstm = lstm(self.c_lstm, ndims=self.ndims, dtype=self.dtype)
    self.style_fc = nn.Dense(self.c_s, kernel_init=linear_init, bias_init=zeros)
    self.decoder = decoder(self.c_dec, self.k_dec, self.s_dec, self.nres_dec, self.c_w,
                                **common)

  def _check_input(self, x: jnp.ndarray) -> None:
    if x.ndim != self.ndims + 3:
      raise ValueError(f"x must be [b, t, *spatial({self.ndims}), c_in], got shape {x.shape}")
    if x.shape[-1] != self.c_in:
      raise ValueError(f"x has {x.shape[-1]} channels (last axis), the model c_in={self.c_in}")
    stride = total_stride({"s_enc": self.s_enc})
    if any(n % stride for n in x.shape[2:-1]):
      raise ValueError(f"spatial shape {x.shape[2:-1]} must be a multiple of the model's total "
                       f"stride {stride}; pad the input (see input_pipeline)")

  def encode(self, x: jnp.ndarray) -> jnp.ndarray:
    """`[b, t, *spatial, c_in]` → latent `[b, *spatial/stride, c_lstm]` (mean over t)."""
    self._check_input(x)
    b, t = x.shape[:2]
    h = self.encoder(x.reshape((b * t,) + x.shape[2:]))
    # n_steps passed positionally (None): nn.remat's static_argnums needs it present.
    h = self.enc_convlstm(h.reshape((b, t) + h.shape[1:]), None)
    return jnp.mean(h, axis=1)

  def decode(self, latent: jnp.ndarray, code: jnp.ndarray, n_outseq: int = 1) -> jnp.ndarray:
    """latent `[b, ...]`, code `[1 or b, c_s]` → `[b, n_outseq, *spatial, c_in]`."""
    return self.render(self.decode_hidden(latent, n_outseq), code)

  def decode_hidden(self, latent: jnp.ndarray, n_outseq: int = 1) -> jnp.ndarray:
    """latent `[b, ...]` → the decoder ConvLSTM's `[b, n_outseq, ..., c_lstm]`, which does not
    depend on the target code."""
    return self.dec_convlstm(latent, n_outseq)

  def style(self, code: jnp.ndarray, rows: int = 1) -> jnp.ndarray:
    """code `[1 or rows, c_s]` → the style `[1 or rows, c_s]` that every HyperConv reads."""
    if code.ndim != 2 or code.shape[-1] != self.c_s or code.shape[0] not in (1, rows):
      raise ValueError(f"code must be [1, {self.c_s}] or [{rows}, {self.c_s}], got {code.shape}")
    return ops.leaky_relu(self.style_fc(code.astype(jnp.float32)))

  def hyper_kernels(self, codes: jnp.ndarray) -> dict:
    """Every HyperConv's kernels and biases for each row of `codes` `[n, c_s]`, as the
    `hyperconv.KERNELS` collection.

    Passed to `apply` beside the params (rows `start:stop` by `hyperconv.take_codes`),
    `render` uses them instead of building its own: the objective builds the kernels of all
    its codes in one pass over each bank, a GEMM for n codes where each render ran a GEMV
    (and the backward one GEMM where each render ran its own). With the `NORM_PROBES`
    collection present, each probe's gradient is then the exact norm of its bank's gradient.
    """
    s = self.style(codes, codes.shape[0])
    probes = self.variables.get(NORM_PROBES, {})
    return hyperconv.map_hyperconvs(
        lambda p, q: hyperconv.code_kernels(p, s, q.get("param")),
        self.variables["params"], probes)

  def render(self, h: jnp.ndarray, code: jnp.ndarray) -> jnp.ndarray:
    """`decode_hidden`'s output, code `[1 or b, c_s]` → `[b, n_outseq, *spatial, c_in]`."""
    b, n_outseq = h.shape[:2]
    s = self.style(code, b)
    h = h.reshape((b * n_outseq,) + h.shape[2:])
    if s.shape[0] > 1:
      s = jnp.repeat(s, n_outseq, axis=0)  # rows follow the [b, n_outseq] fold
    y = self.decoder(h, s)
    return y.reshape((b, n_outseq) + y.shape[1:]).astype(jnp.float32)

  def __call__(self, x: jnp.ndarray, code: jnp.ndarray, n_outseq: int = 1) -> jnp.ndarray:
    return self.decode(self.encode(x), code, n_outseq)
