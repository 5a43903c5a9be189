"""XLA's memory plan of the train step on a GPU, compiled here without one (deviceless AOT).

    python -m experiments.gpu_plan --config=configs/brats3d.py --card=h200 \
        [--shards=1,2,4,8] [--volume=160,240,240] [--mem_fraction=0.75] \
        [--config.train.dtype=bfloat16] [--config.train.remat=True]

JAX compiles for a described card (`CARDS`) through its CUDA plugin with no GPU or driver
present: the train step (three generator passes, the objective, backward, Adam; the state
donated as in training; the perceptual term off) goes through XLA's whole GPU pipeline down
to machine code, and its buffer assignment gives what each device needs: arguments + outputs
− donated + temporaries. Convs take XLA's own forms (what `conv_forms=auto` gives on a GPU).
For each spatial shard count (the volume's depth over that many cards) it prints one JSON
line per compiled volume, then the largest cube whose step fits `mem_fraction` of the card's
memory (`experiments/fit_search.py`; JAX takes 75% of a GPU's memory by default, more with
XLA_PYTHON_CLIENT_MEM_FRACTION).

What this leaves out: autotuning (on the card, XLA times cuDNN's convolution algorithms and
may pick ones with larger workspaces, which are temporaries), the CUDA context and cuDNN's
handles (outside JAX's pool), and the allocator's fragmentation. So the plan is close to, not
the same as, what a card takes; `experiments/device_check.sh size` runs the step on a lent
card and reads the allocator's peak.

The CUDA plugin at the running JAX's version and the CUDA tools it calls (ptxas, libdevice:
about 250 MB from PyPI) are installed on first use into `--deps_dir` and put on this
process's path only: installed beside the project, the plugin would make every JAX start on
a machine without a GPU try to initialise CUDA and print its failure.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

DEFAULT_DEPS = os.path.join(os.path.expanduser("~"), ".cache", "seq2seq_jax", "gpu_plan")


def deps_dir(argv) -> str:
  for a in argv:
    if a.startswith("--deps_dir="):
      return a.split("=", 1)[1]
  return DEFAULT_DEPS


def ensure_deps(path: str) -> str:
  """Installs the CUDA plugin matching the installed JAX, and the CUDA tools XLA calls, into
  `path/jax-<version>` (once) and returns that folder."""
  version = importlib.metadata.version("jax")
  target = os.path.join(path, f"jax-{version}")
  if os.path.isdir(os.path.join(target, "jax_plugins")):
    return target
  tmp = f"{target}.tmp-{os.getpid()}"
  reqs = [f"jax-cuda13-plugin=={version}", f"jax-cuda13-pjrt=={version}",
          "nvidia-cuda-nvcc>=13,<14", "nvidia-cuda-runtime>=13,<14", "nvidia-nvvm>=13,<14"]
  print(f"installing {' '.join(reqs)} into {target} (first use)", file=sys.stderr)
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                      "--target", tmp, *reqs], capture_output=True, text=True)
  if r.returncode:
    shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"could not install {' '.join(reqs)} into {tmp} (the CUDA plugin "
                       f"for deviceless compilation):\n{r.stderr[-2000:]}")
  try:
    os.rename(tmp, target)  # a half-finished install is never taken for a whole one
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return target


if __name__ == "__main__":
  # Before JAX starts: the plugin on the path, and CPU as the only backend (the plugin is
  # used for its compiler; there is no GPU to run on).
  sys.path.insert(0, ensure_deps(deps_dir(sys.argv)))
  os.environ["JAX_PLATFORMS"] = "cpu"
  from seq2seq_jax import host_memory  # imports no JAX
  # A CPU process's remat setting (e.g. inherited from the tests) would break the GPU compile.
  os.environ["XLA_FLAGS"] = host_memory.without_kept_barriers(os.environ.get("XLA_FLAGS", ""))

import json  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import fit_search  # noqa: E402
from seq2seq_jax import sharding  # noqa: E402
from seq2seq_jax import train_step as ts  # noqa: E402
from seq2seq_jax.models import total_stride  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config with a 3D model.", lock_config=True)
flags.DEFINE_list("shards", ["1"], "Spatial shard counts (cards the depth is split over).")
flags.DEFINE_multi_string("volume", [], "Also plan these D,H,W volumes (e.g. 160,240,240).")
flags.DEFINE_float("mem_fraction", 0.75, "Share of the card's memory the step may use.")
flags.DEFINE_integer("start_edge", 64, "First cube edge of the largest-cube search.")
flags.DEFINE_integer("max_compiles", 6, "Compilations per largest-cube search.")
flags.DEFINE_string("deps_dir", DEFAULT_DEPS, "Where the CUDA plugin is installed.")
flags.mark_flag_as_required("config")

# Device descriptions for XLA's GPU compiler (CUDA's device properties; memory as nvidia-smi
# reports the card's total).
CARDS = {
    "h200": dict(name="NVIDIA H200", major=9, minor=0, sms=132, clock_ghz=1.98,
                 memory_mib=143771, bandwidth=4.8e12, l2=52428800, smem_sm=233472,
                 smem_optin=232448),
    "h100": dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, sms=132, clock_ghz=1.98,
                 memory_mib=81559, bandwidth=3.35e12, l2=52428800, smem_sm=233472,
                 smem_optin=232448),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, sms=108, clock_ghz=1.41,
                 memory_mib=81920, bandwidth=2.04e12, l2=41943040, smem_sm=167936,
                 smem_optin=166912),
}
flags.DEFINE_enum("card", "h200", sorted(CARDS), "The card to compile for.")


def target_config(card: dict) -> str:
  """The card as XLA's `GpuTargetConfigProto` text."""
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {card['smem_sm']}
  threads_per_core_limit: 2048
  core_count: {card['sms']}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(card['bandwidth'])}
  l2_cache_size: {card['l2']}
  clock_rate_ghz: {card['clock_ghz']}
  device_memory_size: {card['memory_mib'] * 2 ** 20}
  shared_memory_per_block_optin: {card['smem_optin']}
  cuda_compute_capability {{ major: {card['major']} minor: {card['minor']} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{card['name']}"
"""


def card_devices(card: dict, n: int):
  """`n` abstract devices of the card, on one host (deviceless: nothing runs on them)."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(card),
                                      topology=f"1x1x{n}")
  return topo.devices


def plan_bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  return {"per_device_bytes": sharding.planned_device_bytes(compiled),
          "temp_bytes": int(m.temp_size_in_bytes),
          "argument_bytes": int(m.argument_size_in_bytes),
          "donated_bytes": int(m.alias_size_in_bytes)}


class StepPlanner:
  """Compiles the config's train step for `n` cards of one kind at any volume."""

  def __init__(self, config, card: dict, n: int):
    self.config, self.n = config, n
    self.model = ts.make_model(config)
    self.mesh = sharding.make_mesh({"data": 1, "spatial": n}, devices=card_devices(card, n))
    stride = total_stride(config.model)
    sample = jax.ShapeDtypeStruct((1, 1) + (stride,) * 3 + (int(config.model.c_in),),
                                  jnp.float32)
    abstract = ts.abstract_state(self.model, config, sample)
    self.state_sh = ts.state_shardings(self.mesh, abstract)
    self.state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_sh)
    schedule = ts.poly_epoch_schedule(float(config.train.lr), float(config.train.min_lr),
                                      int(config.train.epochs), 1000)
    # One jit for every volume: its shardings and batch ranks do not change with the volume.
    self.step = ts.make_train_step(self.model, config, schedule, self.mesh, self.state_sh,
                                   {k: len(s) for k, s in self.shapes((1, 1, 1)).items()})

  def shapes(self, volume) -> dict:
    tc, mc = self.config.train, self.config.model
    b, c_s = int(tc.batch_size), int(mc.c_s)
    image = (b, 1, *volume, int(mc.c_in))
    return {"src": image, "tgt": image, "src_code": (b, c_s), "tgt_code": (b, c_s)}

  def batch(self, volume):
    return {k: jax.ShapeDtypeStruct(s, jnp.float32,
                                    sharding=sharding.batch_sharding(self.mesh, len(s)))
            for k, s in self.shapes(volume).items()}

  def __call__(self, volume) -> dict:
    t0 = time.perf_counter()
    compiled = self.step.lower(self.state, self.batch(volume), None).compile()
    return {**plan_bytes(compiled), "compile_s": round(time.perf_counter() - t0, 1)}


def main(argv):
  del argv
  config = FLAGS.config
  if int(config.model.ndims) != 3:
    raise ValueError("the GPU plan is for 3D models: config.model.ndims must be 3")
  if config.train.conv_forms == "auto":
    config.train.conv_forms = "xla"  # what `auto` is on a GPU; here the backend is the CPU
  config.train.lambda_per = 0.0
  card = CARDS[FLAGS.card]
  budget = FLAGS.mem_fraction * card["memory_mib"] * 2 ** 20
  stride = total_stride(config.model)
  common = {"card": card["name"], "dtype": str(config.train.dtype),
            "remat": bool(config.train.remat),
            "recompute_elementwise": bool(config.train.recompute_elementwise),
            "conv_forms": str(config.train.conv_forms)}
  mb = lambda b: b / 2 ** 20  # noqa: E731
  for n in (int(s) for s in FLAGS.shards):
    planner = StepPlanner(config, card, n)

    def row(volume):
      r = planner(volume)
      print(json.dumps({**common, "shards": n, "volume": list(volume),
                        "per_device_mb": mb(r["per_device_bytes"]),
                        "temp_mb": mb(r["temp_bytes"]), "argument_mb": mb(r["argument_bytes"]),
                        "donated_mb": mb(r["donated_bytes"]), "compile_s": r["compile_s"]}),
            flush=True)
      return r["per_device_bytes"]

    unit = n * stride
    volumes = [tuple(int(s) for s in v.split(",")) for v in FLAGS.volume]
    measured = {v: row(v) for v in volumes}  # cubes among them are not compiled again
    start = max(unit, FLAGS.start_edge - FLAGS.start_edge % unit)
    r = fit_search.largest_fitting_edge(lambda e: row((e, e, e)), budget, unit, start=start,
                                        measured=measured, max_evals=FLAGS.max_compiles)
    print(json.dumps({**common, "shards": n, "budget_mb": mb(budget),
                      "largest_cube": r["edge"],
                      "largest_cube_per_device_mb": mb(r["edge_bytes"] or 0),
                      "first_cube_over": r["first_over"], "exact": r["exact"]}), flush=True)


if __name__ == "__main__":
  app.run(main)
