"""Times the jitted train step and whole-volume inference of any config; prints one JSON line.

    python -m experiments.benchmark --config=configs/brats2d.py --steps=5
    python -m experiments.benchmark --config=configs/toy.py --steps=20 --codes=shared
    python -m experiments.benchmark --config=configs/brats2d.py --compile_only  # XLA's memory

The step is the official step's work: G(src, cs), G(src, ct), G(G(src, ct), cs), the SmoothL1
terms (the perceptual term only with --perceptual, on random VGG19 weights), backward, Adam;
batch and crop as the config says, one process, random data. Compare with the official PyTorch
step measured by `../shared/tools/reference_train_step.py` with the same model keys, batch and
crop (see experiments/README.md).
"""

from __future__ import annotations

if __name__ == "__main__":  # as main.py: time the step as training runs it (host_memory.py)
  from seq2seq_jax import host_memory as _hm
  _hm.use_malloc_huge_pages()

import functools
import json
import os
import resource
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from seq2seq_jax import host_memory
from seq2seq_jax import sharding
from seq2seq_jax import train_step as ts
from seq2seq_jax import vgg as vgg_lib
from seq2seq_jax.models import conv
from seq2seq_jax.models import gemm_conv
from seq2seq_jax.models import total_stride

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_integer("steps", 5, "Timed steps (after compilation); the median is reported.")
flags.DEFINE_bool("perceptual", False, "Include the perceptual term (random VGG19 weights).")
flags.DEFINE_enum("codes", "config", ["config", "shared", "per_example"],
                  "One target code for the batch (as the official step) or one per example; "
                  "config: as training does (shared with config.train.pair_per_batch or batch 1).")
flags.DEFINE_integer("t", 1, "Images per sequence (phases of a dynamic sequence).")
flags.DEFINE_bool("conv_ref", True, "Also time one 256-channel 3x3 conv on 48^2 (GFLOP/s), "
                  "before and after the step; the higher reading is the reference.")
flags.DEFINE_integer("eval_volumes", 1, "Whole volumes to time inference on (0: skip).")
flags.DEFINE_bool("compile_only", False, "Only compile the step and print XLA's memory plan "
                  "(temporaries, arguments), its FLOP count and the compile time; run nothing.")
flags.DEFINE_float("gflop_per_step", 0.0, "The step's GFLOP, where XLA's cost analysis gives "
                   "none (JAX's CUDA backend counts cuDNN convs as -1 or 0): the count that "
                   "`--compile_only` prints on a CPU for the same config and batch (0: XLA's).")
flags.DEFINE_float("peak_tflops", 0.0, "The device's peak TFLOP/s in the step's dtype, for "
                   "the MFU column (0: from PEAK_TFLOPS by device kind; none on CPU).")
flags.mark_flag_as_required("config")

# Dense tensor-core peaks per chip (TFLOP/s, vendor data sheets), by compute dtype. float32
# convolutions and matmuls run as TF32 on these GPUs under JAX's default precision, so TF32
# is float32's peak (with `jax_default_matmul_precision=highest` pass --peak_tflops).
PEAK_TFLOPS = (
    ("H100 PCIe", {"float32": 378.0, "bfloat16": 756.0}),
    ("H100", {"float32": 494.7, "bfloat16": 989.4}),  # SXM
    ("H200", {"float32": 494.7, "bfloat16": 989.4}),
    ("A100", {"float32": 156.0, "bfloat16": 312.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak for `dtype` from PEAK_TFLOPS (first match), or None."""
  for name, peaks in PEAK_TFLOPS:
    if name in device_kind:
      return peaks.get(dtype)
  return None


def _flops(compiled) -> float | None:
  """XLA's FLOP count of a lowered or compiled computation, or None where it has none.

  JAX's CUDA backend (0.11.2, on an H200) counts its cuDNN convolutions as -1 FLOP or not at
  all, so a step of convs comes out at 0 or below there: None, not a wrong number.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  return flops if flops > 0 else None


def _time(fn, steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


# Calls of the reference conv read right before each timed step: a shared VM's speed drifts
# within minutes, so each step is also set against the reference of its own moment.
PAIRED_REF_RUNS = 5
# 2 FLOP per multiply-add of 256 × 256 channels, at each (output, tap) pair that meets the
# image: (3·48 − 2)² of them per image under SAME padding (XLA CPU's count, checked by
# tests/perf_tools_test.py; JAX's CUDA backend counts the conv as -1).
CONV_REF_FLOPS = 2 * (3 * 48 - 2) ** 2 * 256 * 256


@functools.lru_cache(maxsize=None)
def _conv_ref_call() -> Callable[[], jax.Array]:
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 48, 48, 256)), jnp.float32)
  k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 256, 256)), jnp.float32)
  f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  jax.block_until_ready(f(x, k))
  return lambda: f(x, k)


def conv_reference(runs: int = 20) -> float:
  """GFLOP/s of one 256→256-channel 3×3 conv on a 48² image (batch 1), the machine's conv
  peak that the whole step is measured against (median of `runs` calls)."""
  flops = CONV_REF_FLOPS  # XLA's CPU count is the same; its CUDA backend gives -1
  return flops / np.median(_time(_conv_ref_call(), runs)) / 1e9


def batch_for(config, t: int, codes: str) -> dict:
  tc, mc = config.train, config.model
  stride = total_stride(mc)
  crop = [int(c) for c in tc.crop_size]
  spatial = crop[1:] if int(mc.ndims) == 2 else crop
  spatial = [-(-s // stride) * stride for s in spatial]
  b, c_s = int(tc.batch_size), int(mc.c_s)
  rng = np.random.default_rng(0)
  shape = (b, t, *spatial, int(mc.c_in))
  src = rng.uniform(-1, 1, shape).astype(np.float32)
  tgt = rng.uniform(-1, 1, shape).astype(np.float32)
  eye = np.eye(c_s, dtype=np.float32)
  # shared: one [1, c_s] code for the batch (the official step); per_example: [b, c_s].
  idx = np.arange(b) if codes == "per_example" else np.zeros(1, int)
  return {"src": src, "tgt": tgt, "src_code": eye[idx % c_s], "tgt_code": eye[(idx + 1) % c_s]}


def eval_throughput(model, params, config, n_volumes: int) -> float:
  """Volumes/s of inference on whole volumes of the config's validation size (one target).

  2D/2.5D: every slice of a `valid_size` volume as a batch of slice stacks; 3D: the volume.
  """
  mc, tc = config.model, config.train
  stride = total_stride(mc)
  d, h, w = [-(-int(s) // stride) * stride for s in tc.valid_size]
  if int(mc.ndims) == 2:
    x = jnp.zeros((int(tc.valid_size[0]), 1, h, w, int(mc.c_in)), jnp.float32)
  else:
    x = jnp.zeros((1, 1, d, h, w, 1), jnp.float32)
  code = jnp.eye(int(mc.c_s), dtype=jnp.float32)[:1]
  f = jax.jit(lambda p, x: model.apply({"params": p}, x, code, n_outseq=1))
  jax.block_until_ready(f(params, x))
  times = _time(lambda: f(params, x), n_volumes)
  return 1.0 / float(np.median(times))


def build_step(config, codes: str, t: int = 1):
  """The jitted train step on one device, a fresh state and a random batch.

  `codes`: 'shared', 'per_example', or 'config' (shared with `train.pair_per_batch` or batch 1).
  Returns `(model, state, global batch, step, codes)`.
  """
  if codes == "config":
    # With batch 1 a code per example is the batch's one code (brats2d trains so).
    shared = config.train.pair_per_batch or int(config.train.batch_size) == 1
    codes = "shared" if shared else "per_example"
  # The step itself must see the codes it is given, [1, c_s] or [b, c_s].
  config.train.pair_per_batch = False
  model = ts.make_model(config)
  mesh = sharding.make_mesh({"data": 1, "spatial": 1})
  batch = batch_for(config, t, codes)
  sample = jnp.zeros((1, 1) + batch["src"].shape[2:], jnp.float32)
  state_sh = ts.state_shardings(mesh, ts.abstract_state(model, config, sample))
  state = ts.create_state(model, config, sample, state_sh)
  step = _make_step(model, config, mesh, state_sh, batch)
  return model, state, sharding.global_batch(mesh, batch), step, codes


def _make_step(model, config, mesh, state_sh, batch):
  schedule = ts.poly_epoch_schedule(float(config.train.lr), float(config.train.min_lr),
                                    int(config.train.epochs), 1000)
  return ts.make_train_step(model, config, schedule, mesh, state_sh,
                            {k: v.ndim for k, v in batch.items()})


def count_flops(model, config, state, gbatch, vgg) -> float | None:
  """XLA's FLOP count of the benchmark's step, with its conv tile/chunk loops unrolled.

  XLA's cost analysis counts a while loop's body once, so the compiled step's own count
  leaves out all but one tile of every tiled or chunked conv (brats2d: 658 of 928 GFLOP).
  This compiles a new jit of the same step without those loops (a new one: traces are
  cached per function); it is not run, so its larger temporaries do not matter.
  """
  mesh = sharding.make_mesh({"data": 1, "spatial": 1})
  state_sh = jax.tree_util.tree_map(lambda a: a.sharding, state)
  with gemm_conv.loops(False):
    step = _make_step(model, config, mesh, state_sh, gbatch)
    return _flops(step.lower(state, gbatch, vgg).compile())


def step_flops(model, config, state, gbatch, vgg, step) -> float | None:
  """The step's FLOP count: with the CPU-tuned forms `count_flops`; otherwise XLA's count of
  the lowered step (no conv loops to unroll; counted before XLA turns convs into library
  calls). None where the backend counts none (see `_flops`)."""
  with conv.forms(config.train.conv_forms):
    cpu_tuned = conv.cpu_tuned()
  if cpu_tuned:
    return count_flops(model, config, state, gbatch, vgg)
  return _flops(step.lower(state, gbatch, vgg))


def _config_name() -> str:
  value = FLAGS["config"].value
  return value if isinstance(value, str) else str(FLAGS["config"].config_filename)


def _xla_memory(compiled) -> dict:
  """XLA's own buffer plan: live temporaries at the step's peak, and its arguments (MB)."""
  mem = compiled.memory_analysis()
  return {"xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
          "xla_args_mb": getattr(mem, "argument_size_in_bytes", 0) / 2**20}


def main(argv):
  del argv
  config = FLAGS.config
  host_memory.configure_cpu_host(config.train)  # as main.py, before XLA's backend starts
  vgg = None
  if FLAGS.perceptual:
    vgg = vgg_lib.vgg19_params_from_state_dict(vgg_lib.random_vgg19_state_dict(0))
    config.train.lambda_per = config.train.lambda_per or 0.01
  else:
    config.train.lambda_per = 0.0
  # The reference is read before the step and again at the end, and the higher reading kept:
  # on a shared VM one reading can come out at half the other (98 vs 167 GFLOP/s).
  conv_refs = [conv_reference()] if FLAGS.conv_ref and not FLAGS.compile_only else []
  model, state, gbatch, step, codes = build_step(config, FLAGS.codes, FLAGS.t)
  host_memory.release_after_compile()  # as train.py does after initialising the state

  t0 = time.perf_counter()
  compiled = ts.compile_step(step, state, gbatch, vgg)
  compile_s = time.perf_counter() - t0
  host_memory.release_after_compile()  # as train.py does between compiling and the first step
  rss_after_compile = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if FLAGS.compile_only:  # a minute on brats2d, where the full benchmark takes several
    flops = step_flops(model, config, state, gbatch, vgg, step)
    print(json.dumps({"config": _config_name(), "remat": bool(config.train.remat),
                      "recompute_elementwise": bool(config.train.recompute_elementwise),
                      "batch": list(gbatch["src"].shape),
                      "gflop_per_step": flops / 1e9 if flops else None,
                      "compile_s": compile_s, "peak_rss_compile_mb": rss_after_compile,
                      **_xla_memory(compiled)}))
    return
  state, m = compiled(state, gbatch, vgg)
  jax.block_until_ready(m)
  times, paired_refs = [], []
  for _ in range(FLAGS.steps):
    if FLAGS.conv_ref:  # the reference again right before each step (`fraction_paired`)
      paired_refs.append(conv_reference(PAIRED_REF_RUNS))
    t1 = time.perf_counter()
    state, m = compiled(state, gbatch, vgg)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t1)
  sec = float(np.median(times))
  with conv.forms(config.train.conv_forms):
    cpu_tuned = conv.cpu_tuned()
  out = {
      "config": _config_name(),
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
      "dtype": str(config.train.dtype), "remat": bool(config.train.remat),
      "conv_forms": str(config.train.conv_forms), "cpu_tuned_convs": cpu_tuned,
      # Whether bf16 convs took the AMX forms (`gemm_conv.amx_forms`; an AMX CPU, bf16).
      "amx_bf16_forms": bool(cpu_tuned and gemm_conv.amx_bf16()
                             and jnp.dtype(config.train.dtype) == jnp.bfloat16),
      "recompute_elementwise": bool(config.train.recompute_elementwise),
      # Whether steps ran on the calling thread (`train.cpu_heap_reuse`, host_memory.py).
      "inline_steps": not jax.config.values["jax_cpu_enable_async_dispatch"],
      "codes": codes, "batch": list(gbatch["src"].shape),
      # What XLA ran under (set by the user, and by `host_memory` on a CPU): A/B runs of a
      # flag, e.g. `--xla_gpu_force_conv_nhwc`, tell their rows apart by it.
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "sec_per_step": sec, "steps_per_s": 1.0 / sec, "step_times": times,
      "voxels_per_s": float(np.prod(gbatch["src"].shape)) / sec,
      "compile_s": compile_s,
      "peak_rss_compile_mb": rss_after_compile,
  }
  # Peak RSS of the training step alone (ru_maxrss is a lifetime peak: read it before eval,
  # and before `memory_analysis`, which training never calls: it holds 112 MB more on brats3d).
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  out["device_peak_mb"] = sharding.device_peak_mb()
  out.update(_xla_memory(compiled))
  flops = FLAGS.gflop_per_step * 1e9 or step_flops(model, config, state, gbatch, vgg, step)
  out["gflop_per_step"] = flops / 1e9 if flops else None
  out["achieved_gflops"] = flops / 1e9 / sec if flops else None
  peak = FLAGS.peak_tflops or peak_tflops(jax.devices()[0].device_kind, str(config.train.dtype))
  out["peak_tflops"] = peak
  out["mfu"] = flops / sec / (peak * 1e12) if peak and flops else None
  if FLAGS.eval_volumes > 0:
    out["eval_volumes_per_s"] = eval_throughput(model, state["params"], config,
                                                FLAGS.eval_volumes)
  if FLAGS.conv_ref:
    conv_refs.append(conv_reference())
    out["conv_ref_readings"] = conv_refs
    out["conv_ref_gflops"] = max(conv_refs)
    out["fraction_of_conv_ref"] = (out["achieved_gflops"] / out["conv_ref_gflops"]
                                   if flops else None)
    out["conv_ref_paired_readings"] = paired_refs
    out["fraction_paired"] = (float(np.median([flops / 1e9 / t / r for t, r in
                                               zip(times, paired_refs)])) if flops else None)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
