"""Training: sharding-invariant losses, exact resume (also after SIGKILL), two processes."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from seq2seq_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tiny_cache"))


def tiny_config(cache_dir, ndims=2, **train_overrides):
  c = tiny.get_config()
  c.data.cache_dir = cache_dir
  if ndims == 3:
    c.model.ndims = 3
    c.model.c_in = 1
    c.model.c_dec = [8, 4, 1]
    c.train.crop_size = (16, 16, 16)
    c.train.valid_size = (16, 16, 16)
  c.train.log_steps = 1
  c.train.vis_steps = 0
  c.train.eval_steps = -1  # validation has its own tests; here it would only add compiles
  c.train.update(train_overrides)
  return c


def step_losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  by_step = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
  return np.array([by_step[s] for s in sorted(by_step)])


def final_params(workdir, step=None):
  """Params of a checkpoint, read with plain orbax as the README documents."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = ocp.CheckpointManager(ckpt_dir).latest_step() if step is None else step
  path = os.path.join(ckpt_dir, str(step), "state")
  with ocp.StandardCheckpointer() as c:
    meta = c.metadata(path).item_metadata
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    params = c.restore(path, target)["params"]
  return step, jax.tree_util.tree_map(np.asarray, params)


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("ndims", [2, 3])
def test_losses_do_not_depend_on_the_mesh(cache_dir, tmp_path, ndims):
  assert jax.device_count() == 4
  losses = {}
  for data, spatial in ((1, 1), (4, 1), (2, 2)):
    c = tiny_config(cache_dir, ndims, total_steps=4)
    c.mesh.data, c.mesh.spatial = data, spatial
    wd = tmp_path / f"mesh_{data}x{spatial}"
    summary = train.train_and_evaluate(c, str(wd))
    assert summary["step"] == 4
    losses[(data, spatial)] = step_losses(wd)
  ref = losses[(1, 1)]
  assert len(ref) == 4 and np.all(np.isfinite(ref))
  for mesh, got in losses.items():
    np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"mesh {mesh}")


def _main_cmd(workdir, cache_dir, *extra):
  return [sys.executable, str(REPO / "main.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
          f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
          "--config.train.vis_steps=0", "--config.train.log_steps=1",
          "--config.train.eval_steps=-1", *extra]


def test_exact_resume_after_stop_and_after_sigkill(cache_dir, tmp_path):
  full = tmp_path / "full"
  train.train_and_evaluate(tiny_config(cache_dir, total_steps=8), str(full))

  stopped = tmp_path / "stopped"
  train.train_and_evaluate(tiny_config(cache_dir, total_steps=4), str(stopped))
  train.train_and_evaluate(tiny_config(cache_dir, total_steps=8), str(stopped))

  killed = tmp_path / "killed"
  env = dict(os.environ, SEQ2SEQ_JAX_SIGKILL_AFTER_CKPT="4")
  proc = subprocess.run(_main_cmd(killed, cache_dir, "--config.train.total_steps=8"), env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert final_params(killed)[0] == 4
  proc = subprocess.run(_main_cmd(killed, cache_dir, "--config.train.total_steps=8"),
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  step, ref = final_params(full)
  assert step == 8
  for wd in (stopped, killed):
    got_step, got = final_params(wd)
    assert got_step == 8
    assert_trees_equal(got, ref)
  # the same data too: the resumed runs logged the same losses for steps 5..8
  np.testing.assert_array_equal(step_losses(stopped)[-4:], step_losses(full)[-4:])
  _, mid = final_params(full, 4)
  assert any(np.any(a != b) for a, b in zip(jax.tree_util.tree_leaves(mid),
                                            jax.tree_util.tree_leaves(ref)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(cache_dir, tmp_path):
  one = tmp_path / "one"
  train.train_and_evaluate(tiny_config(cache_dir, total_steps=4, data_shards=2), str(one))

  two = tmp_path / "two"
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      _main_cmd(two, cache_dir, "--config.train.total_steps=4", "--config.train.data_shards=2",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={i}"),
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p in procs:  # both tails: the error is often in the other process's log
    assert p.returncode == 0, "\n".join(f"--- process {i}:\n{o[-3000:]}"
                                         for i, o in enumerate(outs))
  np.testing.assert_allclose(step_losses(two), step_losses(one), rtol=1e-5)
  # Params agree globally; per element they need not: conv biases feeding an InstanceNorm
  # have an exactly-zero true gradient, so Adam turns rounding noise into ±lr steps there.
  a = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(final_params(one)[1])])
  b = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(final_params(two)[1])])
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3


def test_nonfinite_steps_are_skipped_and_stop_the_run(cache_dir, tmp_path):
  c = tiny_config(cache_dir, total_steps=6, lr=float("nan"), max_nonfinite=3, ckpt_steps=2)
  with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
    train.train_and_evaluate(c, str(tmp_path / "nan"))
  step, params = final_params(tmp_path / "nan")
  assert step == 2  # saved before the streak reached the limit, with the update skipped
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_pair_per_batch_step_equals_the_per_example_step():
  """The shared-kernel path (row 0's code for the batch) against per-example kernels, on a
  batch whose rows all carry the same pair: the same loss and update."""
  from seq2seq_jax import sharding
  from seq2seq_jax import train_step as ts
  c = tiny.get_config()
  c.train.lambda_per = 0.0
  model = ts.make_model(c)
  mesh = sharding.make_mesh({"data": 1, "spatial": 1})
  rng = np.random.default_rng(0)
  b = 4
  eye = np.eye(int(c.model.c_s), dtype=np.float32)
  batch = {"src": rng.uniform(-1, 1, (b, 1, 16, 16, 3)).astype(np.float32),
           "tgt": rng.uniform(-1, 1, (b, 1, 16, 16, 3)).astype(np.float32),
           "src_code": eye[[2] * b], "tgt_code": eye[[1] * b]}
  sample = np.zeros((1, 1, 16, 16, 3), np.float32)
  state_sh = ts.state_shardings(mesh, ts.abstract_state(model, c, sample))
  schedule = ts.poly_epoch_schedule(1e-3, 1e-6, 10, 100)
  out = {}
  for shared in (False, True):
    c.train.pair_per_batch = shared
    state = jax.jit(lambda x: ts.init_state(model, c, x), out_shardings=state_sh)(sample)
    step = ts.make_train_step(model, c, schedule, mesh, state_sh,
                              {k: v.ndim for k, v in batch.items()})
    out[shared] = step(state, sharding.global_batch(mesh, batch), None)
  (s0, m0), (s1, m1) = out[False], out[True]
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5)
  # Adam's first moment after one step is 0.1·gradient. (The params themselves move by ±lr
  # on step 1 whatever |g|, so near-zero gradients would make them differ by 2·lr.)
  mu0, mu1 = s0["opt_state"].inner_state[0].mu, s1["opt_state"].inner_state[0].mu
  leaves = jax.tree_util.tree_leaves_with_path(mu0)
  # Gradients that vanish in exact arithmetic (biases before an InstanceNorm; fc_bias, whose
  # bank `b` starts at zero) are rounding noise: judged against the largest gradient.
  floor = 1e-4 * max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(mu0))
  for (path, g0), g1 in zip(leaves, jax.tree_util.tree_leaves(mu1)):
    scale = float(np.abs(g0).max())
    # Bias gradients are sums over every position that largely cancel (one LSTM bias comes out
    # 1.5e-3 off relative to its largest entry); kernels agree to < 4e-6.
    tol = 5e-3 if g0.ndim == 1 else 1e-4
    np.testing.assert_allclose(g1, g0, rtol=0, atol=tol * scale + floor,
                               err_msg=jax.tree_util.keystr(path))


def test_train_step_takes_the_configured_conv_forms(cache_dir, tmp_path, monkeypatch):
  """`config.train.conv_forms`: 'xla' (what GPUs and TPUs get by default) traces the 3D step
  with XLA's own 3D convs, 'cpu_tuned' with none (2D convs of depth slices; the values of
  both against the official code: model_test). The 'xla' step, in float32 and bf16, lowers
  for CUDA and TPU (cross-platform lowering, no device needed) as plain StableHLO with its
  convs in bf16 where asked: no custom call (a host callback in the step fails to lower for
  CUDA here; a library kernel would be a custom call). A name neither is refused before the
  data are prepared."""
  from seq2seq_jax import sharding
  from seq2seq_jax import train_step as ts
  from tests.conv_test import hlo_conv_ranks
  c = tiny_config(cache_dir, ndims=3)
  c.train.lambda_per = 0.0
  model = ts.make_model(c)
  mesh = sharding.make_mesh({"data": 1, "spatial": 1})
  rng = np.random.default_rng(0)
  eye = np.eye(int(c.model.c_s), dtype=np.float32)
  batch = {"src": rng.uniform(-1, 1, (1, 1, 16, 16, 16, 1)).astype(np.float32),
           "tgt": rng.uniform(-1, 1, (1, 1, 16, 16, 16, 1)).astype(np.float32),
           "src_code": eye[[2]], "tgt_code": eye[[1]]}
  sample = np.zeros((1, 1, 16, 16, 16, 1), np.float32)
  state_sh = ts.state_shardings(mesh, ts.abstract_state(model, c, sample))
  schedule = ts.poly_epoch_schedule(1e-3, 1e-6, 10, 100)
  for forms, dtype in (("cpu_tuned", "float32"), ("xla", "float32"), ("xla", "bfloat16")):
    c.train.conv_forms, c.train.dtype = forms, dtype
    model = ts.make_model(c)
    state = jax.eval_shape(lambda x: ts.init_state(model, c, x), sample)
    step = ts.make_train_step(model, c, schedule, mesh, state_sh,
                              {k: v.ndim for k, v in batch.items()})
    traced = step.trace(state, sharding.global_batch(mesh, batch), None)
    ranks = hlo_conv_ranks(traced.lower().as_text())
    assert (3 in ranks) == (forms == "xla"), (forms, ranks)
    if forms == "xla":
      for platform in ("cuda", "tpu"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert 3 in hlo_conv_ranks(text), (platform, dtype)
        assert "custom_call" not in text, (platform, dtype)
        bf16_conv = re.search(r"stablehlo.convolution[^\n]*bf16", text)
        assert bool(bf16_conv) == (dtype == "bfloat16"), (platform, dtype)
  prepared = []
  monkeypatch.setattr(train.data_lib, "prepare_data", prepared.append)
  with pytest.raises(ValueError, match="config.train.conv_forms.*'cudnn'"):
    train.train_and_evaluate(tiny_config(cache_dir, conv_forms="cudnn"), str(tmp_path))
  assert not prepared


def test_guarded_adam_is_optax_adam_when_finite_and_a_no_op_when_not():
  import jax.numpy as jnp
  import optax
  from seq2seq_jax import train_step as ts

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  tx = ts.make_optimizer()
  ours, ref = (params, tx.init(params)), (params, tx.init(params))
  step = jax.jit(ts.guarded_adam, static_argnums=0)
  for lr in (1e-2, 3e-3, 1e-3):  # a few steps, so bias correction and moments matter
    grads = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    p, opt = ours
    opt.hyperparams["learning_rate"] = jnp.float32(lr)
    ours = step(tx, grads, opt, p, jnp.bool_(True))
    p, opt = ref
    opt.hyperparams["learning_rate"] = jnp.float32(lr)
    updates, opt = tx.update(grads, opt, p)
    ref = (optax.apply_updates(p, updates), opt)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
      # atol: a param that crosses zero keeps the rounding of its larger terms (~1e-9).
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert int(ours[1].inner_state[0].count) == 3

  p, opt = ours
  bad = jax.tree_util.tree_map(lambda q: jnp.full_like(q, jnp.nan), p)
  kept = step(tx, bad, opt, p, jnp.bool_(False))
  for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(ours)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _event_scalars(logdir) -> dict:
  """(tag, step) -> value from the TensorBoard event files in `logdir` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = {}
  for path in pathlib.Path(logdir).glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      n = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4  # length, its CRC, the record, its CRC
      for v in event.summary.value:
        out[(v.tag, event.step)] = v.simple_value
  return out


def test_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
  # tensorboardX imports torch when it is installed (it is, for the tests): the logger must not.
  probe = (
      "import sys\n"
      "from seq2seq_jax import train\n"
      f"log = train._Logger({str(tmp_path)!r})\n"
      "log.scalars(10, {'train_loss': 0.25, 'lr': 2e-4})\n"
      "log.scalars(20, {'train_loss': 0.125})\n"
      "log.close()\n"
      "print('torch' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert out.stdout.split()[-1] == "False"
  scalars = _event_scalars(tmp_path / "tensorboard")
  assert scalars == {("train_loss", 10): 0.25, ("lr", 10): np.float32(2e-4),
                     ("train_loss", 20): 0.125}
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 10, "train_loss": 0.25, "lr": 2e-4}, {"step": 20, "train_loss": 0.125}]
