"""experiments.gpu_plan: the 3D train step compiled for an H200 with no GPU here (XLA's CUDA
compiler through JAX's plugin), its memory plan against closed-form sizes."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
# The tiny config's model in 3D, as tests/train_test.py's tiny_config(ndims=3) builds it.
TINY_3D = ["--config.model.ndims=3", "--config.model.c_in=1", "--config.model.c_dec=[8,4,1]",
           "--config.train.batch_size=1"]
H200_MIB = 143771
BUDGET_MB = 16.0  # between the tiny step's 32³ and 40³ plans


def plan_rows(*flags: str) -> list[dict]:
  """The JSON rows that `experiments.gpu_plan` prints for the tiny 3D model on an H200, one
  depth-split count per `--shards` entry and the 32³ volume."""
  out = subprocess.run(
      [sys.executable, "-m", "experiments.gpu_plan", f"--config={REPO / 'configs/tiny.py'}",
       *TINY_3D, "--card=h200", "--shards=1,2", "--volume=32,32,32", "--start_edge=32",
       *flags], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def test_gpu_plan_compiles_the_3d_step_for_an_h200_and_plans_its_memory():
  from tests.train_test import tiny_config
  from seq2seq_jax import train_step as ts
  rows = plan_rows("--max_compiles=3", f"--mem_fraction={BUDGET_MB / H200_MIB!r}")
  plans = {(r["shards"], tuple(r["volume"])): r for r in rows if "volume" in r}
  best = {r["shards"]: r for r in rows if "largest_cube" in r}
  assert sorted(best) == [1, 2] and all(r["card"] == "NVIDIA H200" for r in rows)
  assert all(r["conv_forms"] == "xla" for r in rows)  # what `auto` gives on a GPU

  # Arguments per device: the replicated train state, this device's depth slab of src and
  # tgt, the two [1, c_s] codes; the state is donated (its outputs reuse its buffers). The
  # state's learning rate is not an argument: the step sets it from the schedule before any
  # use, so JAX prunes the input.
  c = tiny_config("/tmp/unused", ndims=3)
  model = ts.make_model(c)
  state = ts.abstract_state(model, c, jax.ShapeDtypeStruct((1, 1, 4, 4, 4, 1), np.float32))
  state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(state))
  state_bytes -= state["opt_state"].hyperparams["learning_rate"].dtype.itemsize
  codes_bytes = 2 * int(c.model.c_s) * 4
  for n in (1, 2):
    p = plans[(n, (32, 32, 32))]
    assert p["argument_mb"] * 2 ** 20 == state_bytes + 2 * 32 ** 3 * 4 // n + codes_bytes, n
    assert p["donated_mb"] * 2 ** 20 == state_bytes, n
    assert p["per_device_mb"] > p["temp_mb"] > 0
  # Splitting the depth over two cards shrinks each card's activations.
  assert plans[(2, (32,) * 3)]["temp_mb"] < 0.75 * plans[(1, (32,) * 3)]["temp_mb"]

  # The largest cube: its plan fits the budget, the next edge's does not.
  for n, r in best.items():
    assert abs(r["budget_mb"] - BUDGET_MB) < 1e-6 and r["exact"], r
    edge, over = r["largest_cube"], r["first_cube_over"]
    assert edge > 0 and over == edge + 4 * n  # the tiny model's stride is 4
    assert plans[(n, (edge,) * 3)]["per_device_mb"] == r["largest_cube_per_device_mb"]
    assert r["largest_cube_per_device_mb"] <= BUDGET_MB < plans[(n, (over,) * 3)]["per_device_mb"]


def test_two_gpus_split_the_checkpointed_step():
  """With `recompute_elementwise` (brats3d's default) each conv's two gradients are computed
  together (`conv.xla_conv`); left to XLA's GPU scheduler, the kernel gradients waited for the
  end of the backward pass with their halo-extended inputs alive, and 2 cards planned 82% of
  one card's temporaries at 32³ (55% with the barrier)."""
  rows = plan_rows("--config.train.recompute_elementwise=True", "--max_compiles=0")
  temp = {r["shards"]: r["temp_mb"] for r in rows if r.get("volume") == [32, 32, 32]}
  assert temp[1] > 0 and temp[2] < 0.7 * temp[1], temp
