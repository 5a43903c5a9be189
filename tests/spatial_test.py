"""Spatial sharding on 8 CPU devices: same results as one device, memory falls with shards."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = '''
from configs.base import base_config
def get_config():
  c = base_config(ndims=3, c_s=4, c_w=2, c_in=1, c_enc=[8, 16, 16], k_enc=[3, 3, 3],
                  s_enc=[1, 2, 2], nres_enc=1, norm="InstanceNorm", c_lstm=16,
                  c_dec=[8, 8, 1], k_dec=[3, 3, 3], s_dec=[1, 1, 1], nres_dec=1)
  # XLA's default scheduler, as this test was set up with (spatial_scaling now follows the
  # config); with the lean one 8 shards hold 24.9 MB against 125 MB on one device.
  c.train.xla_cpu_lean_scheduler = False
  return c
'''


def test_spatial_sharding_matches_one_device_and_divides_memory(tmp_path):
  cfg = tmp_path / "sp3d.py"
  cfg.write_text(CONFIG)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.spatial_scaling", f"--config={cfg}", "--devices=8",
       "--size=64,32,32", "--float64_reference"], cwd=REPO, capture_output=True, text=True,
      timeout=900, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert [r["spatial_shards"] for r in rows] == [1, 2, 4, 8]
  base = rows[0]["temp_mb"]
  # One device's float32 gradient against the float64 computation: the rounding yardstick
  # (2.5e-5 relative L2 on this model); a sharded step may differ from one device by rounding
  # only, so it is no further from float64 than twice that.
  one = rows[0]["grad_rel_l2_err_vs_float64"]
  assert 0 < one <= 1e-4, rows[0]
  for r in rows[1:]:
    assert r["out_max_abs_err"] <= 1e-5, r
    assert r["loss_abs_err"] <= 1e-5, r
    assert r["grad_rel_l2_err"] <= 1e-4, r
    assert r["grad_rel_l2_err_vs_float64"] <= 2 * one, (r, one)
    # About linear: within 1.6x of base / shards, fixed per-device costs aside. With Eigen's
    # convs (`host_memory.use_eigen_cpu_convs`) one device holds 86.4 MB and 2 / 4 / 8 shards
    # 57.8 / 28.9 / 16.5 MB (1.34 / 1.34 / 1.53x of base / shards).
    assert r["temp_mb"] <= 1.6 * base / r["spatial_shards"], (r, base)


def _four_shards_match_one_device(model, x, cs, ct, forms):
  """The official objective's value, its gradient and the model's output with `x`'s first
  spatial axis split over 4 devices equal one device's up to float32 rounding; returns the
  sharded step's jaxpr (one device's has no `shard_map`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from seq2seq_jax import sharding
  from seq2seq_jax.losses import seq2seq_objective
  from seq2seq_jax.models import conv, sharded_conv

  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x), cs)["params"]
  results, jaxprs = [], []
  for n in (1, 4):
    mesh = sharding.make_mesh({"data": 1, "spatial": n})

    # experiments.spatial_scaling.step_fn's body: that module defines absl flags (--config)
    # at import, as experiments.benchmark does, and both cannot load in one pytest process.
    def f(p, a, mesh=mesh):
      with sharded_conv.spatial_sharding(mesh), conv.forms(forms):
        (loss, _), g = jax.value_and_grad(
            lambda q: seq2seq_objective(model, {"params": q}, a, a, cs, ct), has_aux=True)(p)
        return loss, g, model.apply({"params": p}, a, ct, n_outseq=1)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, None, "spatial")))
    jaxprs.append(str(jax.make_jaxpr(f)(params, xs)))
    loss, g, out = jax.jit(f)(params, xs)
    results.append((float(loss), np.asarray(out),
                    np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(g)])))
  assert "shard_map" not in jaxprs[0]
  (l1, o1, g1), (l4, o4, g4) = results
  assert abs(l4 - l1) <= 1e-5 * abs(l1)
  np.testing.assert_allclose(o4, o1, rtol=0, atol=1e-5)
  assert np.linalg.norm(g4 - g1) <= 1e-4 * np.linalg.norm(g1)
  return jaxprs[1]


def test_per_shard_convs_in_the_whole_step_match_one_device(monkeypatch):
  """The official objective's value, output and gradient with every stride-1 3D conv counted
  as large, so that on a depth-sharded volume each runs per shard (halo exchange, reflected
  ends, one-slice chunks; the latent layers, one slice per shard, a window of the gathered
  depth): equal to one device's up to float32 rounding."""
  import jax.numpy as jnp
  import numpy as np
  from configs.base import base_config
  from seq2seq_jax import train_step as ts
  from seq2seq_jax.models import conv3d

  monkeypatch.setattr(conv3d, "STACK_BYTES_TO_CHUNK", 0)
  monkeypatch.setattr(conv3d, "MIN_CHUNK_ROWS", 1)
  c = base_config(ndims=3, c_s=4, c_w=2, c_in=1, c_enc=[4, 8, 8], k_enc=[3, 3, 3],
                  s_enc=[1, 2, 2], nres_enc=1, norm="InstanceNorm", c_lstm=8,
                  c_dec=[8, 4, 1], k_dec=[3, 3, 5], s_dec=[1, 1, 1], nres_dec=1)
  model = ts.make_model(c)
  cs, ct = jnp.eye(4)[:1], jnp.eye(4)[1:2]
  x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 16, 12, 12, 1)).astype(np.float32)
  jaxpr = _four_shards_match_one_device(model, x, cs, ct, "auto")
  assert jaxpr.count("shard_map") >= 4 and "ppermute" in jaxpr and "all_gather" in jaxpr


@pytest.mark.parametrize("forms", ["cpu_tuned", "xla"])
def test_a_height_sharded_2d_step_matches_one_device(forms):
  """A 2.5D model's objective, output and gradient on images whose height is split over 4
  devices, one code per example: its reflect convs and hyperconvs run per shard (halo
  exchange, reflected ends; at the latent's one row per shard a window of the gathered
  height), equal to one device's up to float32 rounding, in both conv forms."""
  import jax.numpy as jnp
  import numpy as np
  from configs.base import base_config
  from seq2seq_jax import train_step as ts

  c = base_config(ndims=2, c_s=4, c_w=2, c_in=3, c_enc=[4, 8, 8], k_enc=[7, 3, 3],
                  s_enc=[1, 2, 2], nres_enc=1, norm="InstanceNorm", c_lstm=8,
                  c_dec=[8, 4, 3], k_dec=[3, 3, 7], s_dec=[1, 1, 1], nres_dec=1)
  model = ts.make_model(c)
  cs, ct = jnp.eye(4)[:2], jnp.eye(4)[2:4]
  x = np.random.default_rng(1).uniform(-1, 1, (2, 1, 16, 12, 3)).astype(np.float32)
  jaxpr = _four_shards_match_one_device(model, x, cs, ct, forms)
  assert jaxpr.count("shard_map") >= 8 and "ppermute" in jaxpr and "all_gather" in jaxpr


def test_training_crops_the_spatial_axis_does_not_split_are_refused(caplog):
  """The first spatial extent (depth in 3D, height in 2D) must split evenly over `spatial`;
  one whose downsampled extents do not split is trained but warned about. XLA's conv forms
  split over CPU devices are refused."""
  import logging
  from seq2seq_jax import sharding
  mesh = sharding.make_mesh({"data": 1, "spatial": 4})
  with pytest.raises(ValueError, match=r"crop_size=\(30, 64, 64\).*\(30\).*spatial axis \(4\)"):
    sharding.check_spatial_split((30, 64, 64), 3, 4, mesh)
  with pytest.raises(ValueError, match=r"crop_size=\(1, 30, 32\)"):
    sharding.check_spatial_split((1, 30, 32), 2, 2, mesh)
  with pytest.raises(ValueError, match=r"crop_size=\(30, 32\)"):  # 2D [H, W]: H is split
    sharding.check_spatial_split((30, 32), 2, 2, mesh)
  with caplog.at_level(logging.WARNING):
    sharding.check_spatial_split((32, 30, 30), 3, 4, mesh)  # 32 = 4 shards × stride 4 × 2
    assert "GSPMD" not in caplog.text
    sharding.check_spatial_split((8, 64, 64), 3, 4, mesh)  # 8 / stride 4 = 2 latent slices
    assert "GSPMD" in caplog.text
  sharding.check_spatial_split((30, 64, 64), 3, 4, sharding.make_mesh({"data": 4, "spatial": 1}))
  # XLA's own conv forms split over CPU devices are refused (wrong gradients seen there);
  # unsplit, or with the CPU-tuned forms, they train.
  with pytest.raises(ValueError, match=r"conv_forms='xla'.*spatial axis \(4\).*CPU"):
    sharding.check_spatial_split((32, 64, 64), 3, 4, mesh, "xla")
  sharding.check_spatial_split((32, 64, 64), 3, 4, mesh, "cpu_tuned")
  sharding.check_spatial_split((32, 64, 64), 3, 4, sharding.make_mesh({"data": 4, "spatial": 1}),
                               "xla")
