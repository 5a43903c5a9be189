"""Spatial sharding of 3D volumes: correctness against one device, and memory per device.

    python -m experiments.spatial_scaling --config=configs/brats3d.py --devices=8 \
        --size=32,64,64 --budget_gb=2

Runs on `--devices` host CPU devices (set before JAX starts). For spatial shards n = 1, 2, 4,
… ≤ devices, the train-step gradient (the official objective, perceptual off) is compiled with
the volume's depth sharded over a `spatial` mesh axis (GSPMD: the input is sharded, XLA
propagates the sharding through every layer and inserts the halo exchanges and the norm
statistics' reductions; convs run per shard with an explicit halo exchange where
`sharded_conv.sharded_reflect_conv` takes them: with the CPU-tuned forms the large stride-1
convs, with `--config.train.conv_forms=xla`, what accelerators run, every conv whose slabs
line up). Prints one JSON line per n: per-device temp memory from XLA's
`memory_analysis()`, the loss and output error against n = 1, and the largest cubic volume
whose step fits `--budget_gb` per device (`experiments/fit_search.py`: memory modelled as
fixed + per voxel from the compiled sizes, each guess checked by compiling it, up to 4;
`edge_exact` says whether the next edge was shown not to fit). With `--time_steps=N` each row's step
is also timed (the median of N runs after a first one); all simulated devices share the
host's cores, so this compares code, not hardware. With `--float64_reference` each row's
gradient is also compared with one device's computed in float64 (the model's compute dtype
float64, `jax.enable_x64`): the float32 gradient's own rounding error is the yardstick for
the differences between shard counts (`--config=configs/brats3d.py --size=32,32,32
--float64_reference`, 6 min: one device 1.9e-3 relative L2 from float64, 2 / 4 / 8 shards
1.4e-3 / 2.8e-3 / 3.3e-3; they differ from one device by 2.1e-3 / 3.1e-3 / 3.1e-3).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _set_devices(argv):
  for a in argv:
    if a.startswith("--devices="):
      n = int(a.split("=", 1)[1])
      os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
      os.environ.setdefault("JAX_PLATFORMS", "cpu")


_set_devices(sys.argv)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import fit_search  # noqa: E402
from seq2seq_jax import host_memory  # noqa: E402
from seq2seq_jax import sharding  # noqa: E402
from seq2seq_jax import train_step as ts  # noqa: E402
from seq2seq_jax.losses import seq2seq_objective  # noqa: E402
from seq2seq_jax.models import total_stride  # noqa: E402
from seq2seq_jax.models import conv  # noqa: E402
from seq2seq_jax.models import sharded_conv  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config with a 3D model.", lock_config=True)
flags.DEFINE_integer("devices", 8, "Host CPU devices to simulate.")
flags.DEFINE_list("size", ["32", "32", "32"], "Measured volume D,H,W.")
flags.DEFINE_float("budget_gb", 0.0, "Per-device memory budget for the largest-volume column.")
flags.DEFINE_bool("float64_reference", False,
                  "Also compare every row's gradient with one device's in float64.")
flags.DEFINE_integer("time_steps", 0,
                     "Also time this many runs of each row's step (after a first, untimed one); "
                     "the host's cores are shared by all simulated devices.")
flags.mark_flag_as_required("config")


def step_fn(model, c_s, mesh=None, forms="auto"):
  cs = jnp.eye(c_s, dtype=jnp.float32)[:1]
  ct = jnp.eye(c_s, dtype=jnp.float32)[1:2]

  def f(params, x):
    # As the train step: the CPU-tuned forms run large 3D convs per depth shard.
    with sharded_conv.spatial_sharding(mesh), conv.forms(forms):
      (loss, _), grads = jax.value_and_grad(
          lambda p: seq2seq_objective(model, {"params": p}, x, x, cs, ct),
          has_aux=True)(params)
      out = model.apply({"params": params}, x, ct, n_outseq=1)
    return loss, grads, out
  return jax.jit(f)


def compiled_for(model, params, shape, n, c_s):
  mesh = sharding.make_mesh({"data": 1, "spatial": n})
  x = jax.ShapeDtypeStruct(shape, jnp.float32,
                           sharding=NamedSharding(mesh, P(None, None, "spatial")))
  p = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
      params)
  return step_fn(model, c_s, mesh, _forms()).lower(p, x).compile(), mesh


def _forms() -> str:
  return str(FLAGS.config.train.conv_forms)


def float64_gradient(model, params, x, c_s) -> np.ndarray:
  """`step_fn`'s gradient on one device with the model computed in float64, flattened."""
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    _, grads, _ = step_fn(model.clone(dtype=jnp.float64), c_s, forms=_forms())(p64,
                                                                jnp.asarray(x, jnp.float64))
    return np.concatenate([np.asarray(a).ravel() for a in jax.tree_util.tree_leaves(grads)])


def per_device_bytes(compiled) -> int:
  return sharding.planned_device_bytes(compiled)


def largest_cube(model, params, c_s, n, stride, shape, used0):
  """Largest cubic edge (a multiple of n · stride) whose step fits `--budget_gb` per device:
  `fit_search` from the measured `--size`, up to 4 more compilations."""
  unit = n * stride

  def used(edge):
    big, _ = compiled_for(model, params, (1, 1, edge, edge, edge, shape[-1]), n, c_s)
    return per_device_bytes(big)

  size = tuple(shape[2:5])
  r = fit_search.largest_fitting_edge(used, FLAGS.budget_gb * 2 ** 30, unit,
                                      measured={size: used0}, max_evals=4)
  return {"max_cubic_edge": r["edge"],
          "max_edge_per_device_mb": r["edge_bytes"] / 2 ** 20 if r["edge_bytes"] else None,
          "first_edge_over": r["first_over"], "edge_exact": r["exact"],
          "compiled_edges": [e for e in r["evaluated"] if (e, e, e) != size]}


def _progress(t_start, what):
  # On stderr as it happens: a run killed by its time limit still says how far it got.
  print(f"[{time.perf_counter() - t_start:7.1f} s] {what}", file=sys.stderr, flush=True)


def main(argv):
  del argv
  config = FLAGS.config
  if int(config.model.ndims) != 3:
    raise ValueError("spatial sharding is for 3D models: config.model.ndims must be 3")
  # The host settings training uses (before the backend starts): the folded 3D convs need the
  # lean scheduler (brats3d at 64³ on one device: 1,890 MB with the other, 1,191 lean), and
  # `recompute_elementwise` needs the remat barriers kept, or XLA CPU undoes part of it.
  host_memory.configure_cpu_host(config.train)
  model = ts.make_model(config)
  c_s = int(config.model.c_s)
  stride = total_stride(config.model)
  shape = (1, 1) + tuple(int(s) for s in FLAGS.size) + (int(config.model.c_in),)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1) + (stride,) * 3 + (1,)),
                               jnp.eye(c_s)[:1])["params"]
  g64 = float64_gradient(model, params, x, c_s) if FLAGS.float64_reference else None
  ref = None
  n = 1
  while n <= jax.device_count() and shape[2] % (n * stride) == 0:
    t_start = time.perf_counter()
    compiled, mesh = compiled_for(model, params, shape, n, c_s)
    planned = per_device_bytes(compiled)
    _progress(t_start, f"{n} shard(s) of {shape[2:5]}: compiled, XLA plans "
              f"{planned / 2 ** 20:.0f} MB per device")
    args = (jax.device_put(params, NamedSharding(mesh, P())),
            jax.device_put(x, NamedSharding(mesh, P(None, None, "spatial"))))
    loss, grads, out = jax.block_until_ready(compiled(*args))
    _progress(t_start, "first step done")
    times = []
    for _ in range(FLAGS.time_steps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
      _progress(t_start, f"timed step {times[-1]:.3f} s")
    out = np.asarray(out)
    g = np.concatenate([np.asarray(a).ravel() for a in jax.tree_util.tree_leaves(grads)])
    if ref is None:
      ref = (float(loss), out, g)
    row = {"spatial_shards": n, "volume": list(shape[2:5]), "conv_forms": _forms(),
           "per_device_mb": planned / 2 ** 20,
           "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20,
           "loss_abs_err": abs(float(loss) - ref[0]),
           "out_max_abs_err": float(np.max(np.abs(out - ref[1]))),
           "grad_rel_l2_err": float(np.linalg.norm(g - ref[2]) / np.linalg.norm(ref[2]))}
    if times:
      row["sec_per_step"] = float(np.median(times))
    peak = sharding.device_peak_mb()  # an accelerator's allocator; none on CPU
    if peak is not None:
      row["device_peak_mb"] = peak
    if g64 is not None:
      row["grad_rel_l2_err_vs_float64"] = float(np.linalg.norm(g - g64) / np.linalg.norm(g64))
    if FLAGS.budget_gb > 0:
      row.update(largest_cube(model, params, c_s, n, stride, shape, planned))
    print(json.dumps(row), flush=True)
    n *= 2


if __name__ == "__main__":
  app.run(main)
