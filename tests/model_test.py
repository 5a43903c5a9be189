"""Generator parity with the official model (fixtures), per-example codes, config checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seq2seq_jax.convert import load_torch_checkpoint, variables_to_state_dict
from seq2seq_jax.losses import seq2seq_objective
from seq2seq_jax.models import conv
from seq2seq_jax.models import (Generator, make_model_config, model_config_from_yaml,
                                paper_model_config)
from tests.reference import FORWARD, TRAINING, paths, to_model_layout, to_torch_layout


@functools.lru_cache(maxsize=None)
def _apply_fn(model):
  return jax.jit(model.apply, static_argnames=("n_outseq",))


@pytest.mark.parametrize("forms", ["auto", "xla"])
@pytest.mark.parametrize("name", FORWARD)
def test_forward_matches_official(fixtures_dir, name, forms):
  """On CPU, `auto` is the CPU-tuned conv forms; `xla` is what GPUs and TPUs run."""
  pth, yml, npz = paths(fixtures_dir, name)
  model, variables = load_torch_checkpoint(pth, yml)
  z = np.load(npz)
  # A new jit per forms: a jitted function's traces are cached without regard to them.
  apply = _apply_fn(model) if forms == "auto" else jax.jit(model.apply,
                                                           static_argnames=("n_outseq",))
  with conv.forms(forms):
    y = apply(variables, to_model_layout(z["x"]), z["code"], n_outseq=int(z["n_outseq"]))
  y = to_torch_layout(np.asarray(y))
  assert y.shape == z["y"].shape
  err = np.abs(y - z["y"]).max()
  assert err <= 2e-4, f"{name}: max abs error {err}"


# XLA's forms on the 2.5D and 3D models (the 4D model's convs are the 3D model's).
@pytest.mark.parametrize("name,forms", [(n, "auto") for n in TRAINING] + [
    ("seq2seq_2p5d_small", "xla"), ("seq2seq_3d_small", "xla")])
def test_training_matches_official(fixtures_dir, name, forms):
  pth, yml, npz = paths(fixtures_dir, name)
  model, variables = load_torch_checkpoint(pth, yml)
  cfg = model_config_from_yaml(yml)
  z = np.load(npz)
  src, tgt = to_model_layout(z["train_src"]), to_model_layout(z["train_tgt"])
  opt = optax.adam(2e-4)

  @jax.jit
  def step(params, opt_state):
    loss_fn = lambda p: seq2seq_objective(model, {"params": p}, src, tgt, z["train_src_code"],
                                          z["train_tgt_code"], lambda_per=0.0)
    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, total, terms

  params, opt_state = variables["params"], opt.init(variables["params"])
  for i, ref in enumerate(z["train_losses"]):
    with conv.forms(forms):
      params, opt_state, total, terms = step(params, opt_state)
    for got, want, what in ((total, ref[0], "total"), (terms["rec"], ref[1], "rec"),
                            (terms["cyc"], ref[2], "cyc")):
      assert abs(float(got) - want) <= 2e-4 * abs(want), f"{name} step {i} {what}: {got} vs {want}"
    assert float(terms["per"]) == 0.0

  before = variables_to_state_dict(variables, cfg)
  after = variables_to_state_dict({"params": params}, cfg)
  ours = np.concatenate([(after[k] - before[k]).ravel() for k in before])
  theirs = np.concatenate([(z[f"after/{k}"] - before[k]).ravel() for k in before])
  rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
  off = np.mean(np.abs(ours - theirs) > 2e-5)
  assert rel <= 0.1, f"{name}: update relative L2 error {rel}"
  assert off < 0.01, f"{name}: {off:.2%} of elements off by > 2e-5"
  assert np.linalg.norm(theirs) > 0


@pytest.mark.parametrize("forms", ["auto", "xla"])
@pytest.mark.parametrize("name", ["seq2seq_2p5d_small", "seq2seq_4d_small"])
def test_per_example_codes_equal_running_each_alone(fixtures_dir, name, forms):
  """Per-example kernels as GEMMs over patches (CPU-tuned) or as one grouped conv (xla)."""
  pth, yml, npz = paths(fixtures_dir, name)
  model, variables = load_torch_checkpoint(pth, yml)
  z = np.load(npz)
  x = to_model_layout(z["x"])
  rng = np.random.default_rng(0)
  x = np.concatenate([x, rng.uniform(-1, 1, x.shape).astype(np.float32)])  # b >= 2
  b, n_out = x.shape[0], int(z["n_outseq"])
  codes = np.eye(model.c_s)[np.arange(b) % model.c_s][::-1].copy()
  assert len({tuple(c) for c in codes}) == b  # really different targets
  # float64, so that the grouped conv and the plain conv agree to rounding, not to float32
  # noise amplified by the net's depth (~5e-5 here)
  with jax.enable_x64(True), conv.forms(forms):
    model64 = model.clone(dtype=jnp.float64)
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    apply = jax.jit(model64.apply, static_argnames=("n_outseq",))
    batched = np.asarray(apply(v64, x.astype(np.float64), codes, n_outseq=n_out))
    for i in range(b):
      alone = np.asarray(apply(v64, x[i:i + 1].astype(np.float64), codes[i:i + 1],
                               n_outseq=n_out))
      np.testing.assert_allclose(batched[i:i + 1], alone, atol=1e-6, rtol=0)
    # and the targets really differ, so a model ignoring the code would fail
    same = np.asarray(apply(v64, x.astype(np.float64), codes[:1], n_outseq=n_out))
  assert np.abs(same[1:] - batched[1:]).max() > 1e-3


def test_yaml_reads_exact_official_keys(fixtures_dir):
  cfg = model_config_from_yaml(fixtures_dir / "seq2seq_nonorm_small.yaml")
  assert cfg.norm is None and tuple(cfg.c_enc) == (8, 16, 16) and cfg.ndims == 2
  assert sorted(cfg.keys()) == sorted(make_model_config(**cfg.to_dict()).keys())
  cfg.norm = "InstanceNorm"  # overridable after a null
  assert paper_model_config().c_lstm == 256


@pytest.mark.parametrize("change,key", [
    (dict(c_lstm=128), "c_lstm"),
    (dict(c_dec=[128, 64, 1]), "c_dec[-1]"),
    (dict(c_dec=[128, 3], k_dec=[3, 7], s_dec=[1, 1]), "stride-2"),
    (dict(k_enc=[7, 3]), "k_enc"),
    (dict(norm="BatchNorm"), "norm"),
    (dict(ndims=4), "ndims"),
])
def test_config_validation_names_the_key(change, key):
  kw = paper_model_config().to_dict()
  kw.update(change)
  with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
    make_model_config(**kw)


def test_unknown_or_missing_yaml_key(tmp_path):
  kw = paper_model_config().to_dict()
  with pytest.raises(KeyError, match="c_foo"):
    make_model_config(**kw, c_foo=1)
  del kw["c_w"]
  p = tmp_path / "m.yaml"
  import yaml
  p.write_text(yaml.safe_dump({"seq2seq": kw}))
  with pytest.raises(KeyError, match=r"m\.yaml.*c_w"):
    model_config_from_yaml(p)


def test_bad_input_shapes_are_rejected(fixtures_dir):
  model, variables = load_torch_checkpoint(*paths(fixtures_dir, "seq2seq_nonorm_small")[:2])
  with pytest.raises(ValueError, match="multiple of the model's total stride 4"):
    model.apply(variables, jnp.zeros((1, 1, 22, 24, 1)), jnp.zeros((1, 8)))
  with pytest.raises(ValueError, match="channels"):
    model.apply(variables, jnp.zeros((1, 1, 24, 24, 3)), jnp.zeros((1, 8)))
  with pytest.raises(ValueError, match="code must be"):
    model.apply(variables, jnp.zeros((2, 1, 24, 24, 1)), jnp.zeros((3, 8)))


def test_official_init_scales():
  """Fresh params follow the official init: kaiming-normal fan-in gain sqrt(2) on 2D convs and
  hyperconv params (fan-in in·k^nd·c_w), U(±1/sqrt(fan_in)) on 3D convs, zero biases."""
  for ndims in (2, 3):
    cfg = make_model_config(ndims=ndims, c_s=8, c_w=16, c_in=1, c_enc=[32, 64, 64],
                            k_enc=[3, 3, 3], s_enc=[1, 2, 2], nres_enc=1, norm="InstanceNorm",
                            c_lstm=64, c_dec=[32, 16, 1], k_dec=[3, 3, 3], s_dec=[1, 1, 1],
                            nres_dec=1)
    model = Generator.from_config(cfg)
    x = jax.ShapeDtypeStruct((1, 1) + (8,) * ndims + (1,), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x, jnp.zeros((1, 8)))["params"]
    hp = np.asarray(params["decoder"]["res_0"]["conv1"]["param"])  # [*k, in, out, c_w]
    np.testing.assert_allclose(hp.std(), np.sqrt(2 / (64 * 3 ** ndims * 16)), rtol=0.02)
    w = np.asarray(params["encoder"]["res_0"]["conv1"]["kernel"])
    fan_in = 64 * 3 ** ndims
    if ndims == 2:
      np.testing.assert_allclose(w.std(), np.sqrt(2 / fan_in), rtol=0.05)
    else:
      assert np.abs(w).max() <= 1 / np.sqrt(fan_in)
      np.testing.assert_allclose(w.std(), 1 / np.sqrt(3 * fan_in), rtol=0.05)
    for bias in (params["encoder"]["conv_0"]["bias"], params["style_fc"]["bias"],
                 params["decoder"]["conv_last"]["b"], params["enc_convlstm"]["cell_0_bias"]):
      assert not np.any(np.asarray(bias))


def test_remat_and_bf16_compute(fixtures_dir):
  """remat and recompute_elementwise recompute in the backward pass: same loss and grads.
  bf16 compute with float32 params stays close to float32."""
  pth, yml, npz = paths(fixtures_dir, "seq2seq_4d_small")
  model, variables = load_torch_checkpoint(pth, yml)
  z = np.load(npz)
  src, tgt = to_model_layout(z["train_src"]), to_model_layout(z["train_tgt"])

  def loss_and_grads(m):
    f = lambda p: seq2seq_objective(m, {"params": p}, src, tgt, z["train_src_code"],
                                    z["train_tgt_code"])[0]
    return jax.jit(jax.value_and_grad(f))(variables["params"])

  l0, g0 = loss_and_grads(model)
  for kw in ({"remat": True}, {"recompute_elementwise": True}):
    l1, g1 = loss_and_grads(model.clone(**kw))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  l2, g2 = loss_and_grads(model.clone(dtype=jnp.bfloat16))
  assert abs(float(l2) - float(l0)) < 0.02 * float(l0)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g2))
  # What accelerators run by default: XLA's own convs, here in bf16 with recompute_elementwise.
  with conv.forms("xla"):
    l3, g3 = loss_and_grads(model.clone(dtype=jnp.bfloat16, recompute_elementwise=True))
  assert abs(float(l3) - float(l0)) < 0.02 * float(l0)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(g3))
  cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  flat = lambda g: np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(g)])
  # bf16's gradient direction against float32's: 0.991 in either form without
  # recompute_elementwise (measured); a conv wrong in one form would be far off.
  for g in (g2, g3):
    assert cos(flat(g), flat(g0)) > 0.98, cos(flat(g), flat(g0))


def test_remat_keeps_less_for_the_backward_pass():
  """With remat, the compiled gradient's temporaries fall (a 3D model on 32³): XLA CPU must
  not merge the recomputation into the forward pass (conftest sets what main.py sets,
  `host_memory.keep_remat_barriers`; without it remat left them at 107 vs 103 MB)."""
  cfg = make_model_config(
      ndims=3, c_s=4, c_w=4, c_in=1, c_enc=[8, 16, 32], k_enc=[5, 3, 3], s_enc=[1, 2, 2],
      nres_enc=2, norm="InstanceNorm", c_lstm=32, c_dec=[16, 8, 1], k_dec=[3, 3, 5],
      s_dec=[1, 1, 1], nres_dec=2)
  x = jnp.zeros((1, 1, 32, 32, 32, 1))
  code = jnp.eye(4)[:1]
  temps = []
  for kw in ({}, {"remat": True}, {"recompute_elementwise": True}):
    m = Generator.from_config(cfg, **kw)
    params = m.init(jax.random.PRNGKey(0), x, code)["params"]
    f = lambda p, m=m: seq2seq_objective(m, {"params": p}, x, x, code, code[:, ::-1])[0]
    compiled = jax.jit(jax.value_and_grad(f)).lower(params).compile()
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
  assert temps[1] < 0.6 * temps[0], temps  # measured: 40 vs 103 MB
  # Conv outputs only: one volume per layer where norm, activation and padding kept three.
  assert temps[2] < 0.6 * temps[0], temps  # measured: 45 vs 103 MB
