"""The benchmark and profiler scripts run on the tiny config and print what they promise."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np

from experiments import profile_step

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args):
  out = subprocess.run([sys.executable, "-m", module, f"--config={REPO / 'configs/tiny.py'}",
                        *args], cwd=REPO, capture_output=True, text=True, check=True)
  return out.stdout


def test_benchmark_prints_one_json_line_with_the_step_figures():
  row = json.loads(_run("experiments.benchmark", "--steps=2", "--codes=shared",
                        "--config.train.cpu_heap_reuse=True").strip().splitlines()[-1])
  assert row["codes"] == "shared" and row["batch"] == [4, 1, 16, 16, 3]
  assert row["inline_steps"] is True  # heap reuse runs the steps as training does
  assert row["amx_bf16_forms"] is False  # float32: never the AMX forms, on any CPU
  assert row["sec_per_step"] > 0 and row["gflop_per_step"] > 0 and row["eval_volumes_per_s"] > 0
  assert row["xla_temp_mb"] > 0 and row["peak_rss_mb"] > 0
  # The conv reference is read before and after the step; the higher reading counts.
  assert len(row["conv_ref_readings"]) == 2
  assert row["conv_ref_gflops"] == max(row["conv_ref_readings"]) > 0
  assert abs(row["fraction_of_conv_ref"] - row["achieved_gflops"] / row["conv_ref_gflops"]) < 1e-9
  # and again right before each timed step; each step against its own reading, the median.
  assert len(row["step_times"]) == len(row["conv_ref_paired_readings"]) == 2
  assert row["sec_per_step"] == np.median(row["step_times"])
  per_step = [row["gflop_per_step"] / t / r
              for t, r in zip(row["step_times"], row["conv_ref_paired_readings"])]
  assert min(per_step) <= row["fraction_paired"] <= max(per_step) and min(per_step) > 0
  # Compiling alone gives the same step's memory plan, and runs nothing.
  plan = json.loads(_run("experiments.benchmark", "--compile_only", "--codes=shared",
                         "--config.train.cpu_heap_reuse=True").strip().splitlines()[-1])
  assert plan["xla_temp_mb"] == row["xla_temp_mb"] and plan["xla_args_mb"] == row["xla_args_mb"]
  assert "sec_per_step" not in plan and plan["compile_s"] > 0
  # and the step's FLOP count, which a GPU run takes as --gflop_per_step (its own is none).
  assert plan["gflop_per_step"] == row["gflop_per_step"] and plan["batch"] == row["batch"]


def test_conv_reference_flops_are_xlas_count():
  import jax
  import jax.numpy as jnp
  from experiments import benchmark
  f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  lowered = f.lower(jnp.zeros((1, 48, 48, 256)), jnp.zeros((3, 3, 256, 256)))
  assert benchmark._flops(lowered.compile()) == benchmark.CONV_REF_FLOPS


def test_profiler_attributes_kernels_to_layers(tmp_path):
  text = _run("experiments.profile_step", "--steps=1", "--top=200",
              f"--trace_dir={tmp_path}", f"--hlo_out={tmp_path / 'step.hlo'}")
  assert "ms/step in XLA's executor" in text
  # At least a second of untraced steps, so /proc's 10 ms ticks see the busy threads.
  assert re.search(r"# CPU time / wall time over \d+ untraced steps: \S+ \d+%", text), text
  layers = [l.split(None, 2)[2] for l in text.splitlines() if "%  " in l]
  # Forward and backward kernels of named layers, e.g. the decoder's output conv.
  assert any(l.startswith("forward  decoder/conv_last") for l in layers), layers
  assert any(l.startswith("backward") for l in layers)
  trace = re.search(r"^# trace: (\S+)$", text, re.M).group(1)
  assert trace in map(str, tmp_path.glob("*/plugins/profile/*/perfetto_trace.json.gz"))
  # The kept trace and HLO text, summed up again without running anything (as for a trace
  # taken on a GPU machine), give the same table.
  again = _run("experiments.profile_step", "--steps=1", "--top=200",
               f"--analyze={trace},{tmp_path / 'step.hlo'}")
  assert again.split("\nms/step  share")[1] == text.split("\nms/step  share")[1]


def test_gpu_kernel_events_are_matched_by_their_hlo_op(tmp_path):
  """A GPU trace names a kernel after its CUDA function and carries the HLO instruction as
  `args.hlo_op`, or, inside a CUDA graph, the graph's name: there an XLA kernel shared by
  several instructions is placed by launch order, a library kernel by its kind alone. The
  host's spans named after instructions (its launches) are not kernel time."""
  import gzip
  conv = "jit(step)/jvp(Generator)/encoder/conv_0/conv_general_dilated"
  norm = "jit(step)/jvp(Generator)/encoder/res_{}/reduce_sum"
  names = {"custom-call.7": (conv, "custom-call"),
           "input_reduce_fusion.5": (norm.format(0), "fusion"),
           "input_reduce_fusion.2": (norm.format(1), "fusion"),
           "input_reduce_fusion.9": (norm.format(2), "fusion"),
           "loop_add_fusion.8": ("jit(step)/transpose(jvp(Generator))/decoder/add", "fusion"),
           "loop_add_fusion.11": ("jit(step)/jvp(Generator)/decoder/add", "fusion")}
  hlo = "\n".join([
      "ENTRY %main (p: f32[4]) -> f32[] {",
      '  %input_reduce_fusion.5 = f32[2]{0} fusion(%p), kind=kInput, calls=%r',
      '  %input_reduce_fusion.2 = f32[2]{0} fusion(%p), kind=kInput, calls=%r, '
      'metadata={deduplicated_name="input_reduce_fusion.5"}',
      '  %custom-call.7 = f32[2]{0} custom-call(%p)',
      '  %input_reduce_fusion.9 = f32[2]{0} fusion(%p), kind=kInput, calls=%r, '
      'metadata={deduplicated_name="input_reduce_fusion.5"}',
      '  %loop_add_fusion.8 = f32[2]{0} fusion(%p), kind=kLoop, calls=%a',
      '  %loop_add_fusion.11 = f32[2]{0} fusion(%p), kind=kLoop, calls=%a, '
      'metadata={deduplicated_name="loop_add_fusion.8"}', "}"])
  groups = profile_step.kernel_groups(hlo)
  shared = ["input_reduce_fusion.5", "input_reduce_fusion.2", "input_reduce_fusion.9"]
  assert groups == {**dict.fromkeys(shared, shared),
                    **dict.fromkeys(["loop_add_fusion.8", "loop_add_fusion.11"],
                                    ["loop_add_fusion.8", "loop_add_fusion.11"])}
  graph = {"hlo_op": "command_buffer_1"}
  events, t = [], 0
  for step in range(2):
    for name, dur, args in [
        ("sm90_xmma_fprop_implicit_gemm", 15, {"hlo_op": "custom-call.7"}),
        ("input_reduce_fusion_5", 4, graph),                    # .5, first in the group
        ("input_reduce_fusion_5", 7, {"hlo_op": "input_reduce_fusion.2"}),  # outside
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<float>", 2, graph),
        ("input_reduce_fusion_5", 6, graph)]:                   # .9
      events.append({"ph": "X", "name": name, "ts": t, "dur": dur, "args": args})
      t += dur
  # Three launches of a kernel two instructions share, over two steps: not placeable.
  events += [{"ph": "X", "name": "loop_add_fusion_8", "ts": t + 3 * i, "dur": 3, "args": graph}
             for i in range(3)]
  events.append({"ph": "X", "name": "input_reduce_fusion.9", "ts": 1000, "dur": 50})  # host
  trace = tmp_path / "t.json.gz"
  with gzip.open(trace, "wt") as f:
    json.dump({"traceEvents": events}, f)
  by_layer, by_kind, covered, _, launches = profile_step.summarize(str(trace), names, 2, groups)
  assert by_layer == {"forward  encoder/conv_0 conv_general_dilated": 30,
                      "forward  encoder/res_0 reduce_sum": 8,
                      "forward  encoder/res_1 reduce_sum": 14,
                      "forward  encoder/res_2 reduce_sum": 12,
                      "(CUDA graph) cuDNN layout transpose": 4,
                      "backward decoder add": 9}
  assert by_kind == {"cuDNN conv forward": 30, "input_reduce_fusion": 34,
                     "cuDNN layout transpose": 4, "loop_add_fusion": 9}
  assert covered == 77 and launches == 13  # the host's span is not a kernel
  # Without the groups, a graph's shared kernel stays with the instruction it is named after.
  by_layer, _, _, _, _ = profile_step.summarize(str(trace), names, 2)
  assert by_layer["forward  encoder/res_0 reduce_sum"] == 20


def test_gpu_kernel_kinds():
  kinds = {"sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16": "cuDNN conv kernel gradient",
           "sm80_xmma_dgrad_implicit_gemm_tf32f32": "cuDNN conv input gradient",
           "void cudnn::engines_precompiled::nhwcToNchwKernel<float, float>":
               "cuDNN layout transpose",
           "void convolve_common_engine_float_NHWC<__nv_bfloat16>(int)": "cuDNN conv other",
           "std::enable_if<!(false), void>::type internal::gemvx::kernel<int>": "GEMV",
           "Memset 3": "memcpy/memset", "input_reduce_fusion_948": "input_reduce_fusion",
           "loop_select_fusion": "loop_select_fusion", "void my_kernel<int>(int)": "my_kernel"}
  assert {k: profile_step.gpu_kind(k) for k in kinds} == kinds


def test_layer_names():
  assert profile_step.layer_of(
      "jit(step)/transpose(jvp(Generator.decode))/decoder/conv_last/dot_general") == (
          "backward decoder/conv_last dot_general")
  assert profile_step.layer_of("jit(step)/jvp(Generator)/Generator.encode/encoder/conv_0/"
                               "conv_general_dilated") == "forward  encoder/conv_0 "\
      "conv_general_dilated"


def test_thread_cpu_time_counts_a_busy_loop():
  import threading
  import time

  stop = threading.Event()

  def spin():
    while not stop.is_set():
      pass

  before, t0 = profile_step.thread_cpu_seconds(), time.perf_counter()
  worker = threading.Thread(target=spin)
  worker.start()
  time.sleep(0.6)
  after = profile_step.thread_cpu_seconds()  # while it still runs: an ended thread is gone
  wall = time.perf_counter() - t0
  stop.set()
  worker.join()
  busy = profile_step.busy_threads(before, after, wall)
  # The spinning thread (a new tid, so all its CPU time counts) used most of the interval.
  assert busy and busy[0][1] > 0.5, busy
  assert profile_step.busy_threads({"1 a": 5.0}, {"1 a": 6.0, "2 b": 0.01}, 2.0) == [("a", 0.5)]


def _brute_force_edge(used, budget, unit, top=4096):
  return max((e for e in range(unit, top, unit) if used(e) <= budget), default=0)


def test_fit_search_finds_the_boundary_of_memory_models_in_few_compilations():
  """`fit_search.largest_fitting_edge` against brute force on closed-form memory models
  (fixed + per-voxel, with surface and edge terms that its linear model lacks)."""
  import itertools
  from experiments import fit_search
  models = [lambda e: 3e8 + 2600.0 * e ** 3,
            lambda e: 1e8 + 3000.0 * e ** 3 + 2e5 * e ** 2,
            lambda e: 5e9 + 900.0 * e ** 3 + 4e6 * e,
            lambda e: 2e6 * e ** 2 + 50.0 * e ** 3]
  for used, budget, unit, start in itertools.product(models, (2 * 2 ** 30, 120 * 2 ** 30),
                                                     (4, 32), (64, 256)):
    calls = []
    r = fit_search.largest_fitting_edge(lambda e: calls.append(e) or used(e), budget, unit,
                                        start=start)
    truth = _brute_force_edge(used, budget, unit)
    assert r["exact"] and r["edge"] == truth, (r, truth)
    assert r["first_over"] == truth + unit and len(calls) <= 6
    assert set(calls) == set(r["evaluated"]) and len(calls) == len(set(calls))
    if truth:
      assert r["edge_bytes"] == used(truth)
  # Sizes already compiled are not compiled again, and non-cubic ones only guide the guess.
  used = models[1]
  truth = _brute_force_edge(used, 2 * 2 ** 30, 8)
  calls = []
  r = fit_search.largest_fitting_edge(lambda e: calls.append(e) or used(e), 2 * 2 ** 30, 8,
                                      measured={(64, 64, 64): used(64)})
  assert r["edge"] == truth and r["exact"] and 64 not in calls
  r = fit_search.largest_fitting_edge(used, 2 * 2 ** 30, 8, measured={(32, 64, 64): 4e8})
  assert r["edge"] == truth and r["exact"]
  # Out of evaluations before the boundary: a fitting edge, flagged as not exact.
  r = fit_search.largest_fitting_edge(used, 120 * 2 ** 30, 4, start=8, max_evals=1)
  assert r["edge"] == 8 and not r["exact"] and r["first_over"] is None
