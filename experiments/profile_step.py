"""Where a train step's time goes: a `jax.profiler` trace, summed per layer and per kernel kind.

    python -m experiments.profile_step --config=configs/toy.py --steps=10
    python -m experiments.profile_step --config=configs/brats2d.py --steps=2 --top=30

Runs the benchmark's step (`experiments.benchmark`: same batch, codes and flags) under
`jax.profiler.trace`, keeps the trace (TensorBoard/Perfetto) under `--trace_dir`, and prints
milliseconds per step for the top layers (each XLA kernel is attributed to the JAX op it came
from, via the compiled HLO's `op_name`; `jvp(...)` is the forward pass, `transpose(...)` the
backward) and per kernel kind (XNNPACK/YNNPACK convolution fusions, XLA loop fusions,
copies, ...). Times are kernel spans summed over threads, so with two cores they may add up
to more than the step's wall time; the printed coverage says how much of the wall time had
some kernel running on the thread that started it. Work a library (YNNPACK, Eigen) hands to
the other threads is not in the trace, so the script also prints each busy thread's CPU time
over as many untraced steps, and at least a second of them (`brats2d`: coverage 57%, both
workers 91-92% busy). A GPU trace counts the GPU's kernels only, its kinds from their CUDA
names (cuDNN's conv phases and layout transposes, GEMV/GEMM, XLA's fusions); inside CUDA
graphs library kernels are known by kind alone (an H200's `brats2d` bf16 step: 14.6 ms of
kernels, 25% of them cuDNN's; experiments/README.md, twenty-fifth session).
"""

from __future__ import annotations

if __name__ == "__main__":  # as main.py: time the step as training runs it (host_memory.py)
  from seq2seq_jax import host_memory as _hm
  _hm.use_malloc_huge_pages()

import collections
import glob
import gzip
import json
import os
import re
import time

from absl import app
from absl import flags
import jax

from experiments import benchmark
from seq2seq_jax import host_memory
from seq2seq_jax import train_step as ts

# --config, --steps (traced, after 3 warm-up steps) and --codes are experiments.benchmark's.
FLAGS = flags.FLAGS
flags.DEFINE_integer("top", 25, "Layers to list.")
flags.DEFINE_string("trace_dir", "/tmp/seq2seq_profile", "Where the trace is written.")
flags.DEFINE_string("hlo_out", None, "Also write the compiled step's HLO text there, so that "
                    "the trace can be summed up elsewhere (--analyze).")
flags.DEFINE_list("analyze", None, "TRACE,HLO: only sum up a kept perfetto trace of --steps "
                  "steps with its --hlo_out text (e.g. one taken on a GPU machine); run nothing.")


# One HLO instruction line: '%name = shape opcode(' (its name, result shape and opcode).
_INSTRUCTION = re.compile(r"\s*%?([\w.\-]+) = (\S+) (\w+)\(")


def hlo_op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (JAX op_name or a description, opcode) from compiled HLO text.

  A fusion without an op_name of its own takes the first one inside it; one with none at all
  (XLA's derived kernel-gradient convolutions, layout copies) is described by the root op of
  its body and its output shape, e.g. 'unnamed convolution -> f32[32,3,3,32]'.
  """
  first: dict[str, str] = {}  # computation -> first op_name in its body
  root: dict[str, str] = {}   # computation -> opcode of its ROOT
  comp = None
  for line in hlo_text.splitlines():
    head = re.match(r"^%?([\w.\-]+) .*\{$", line)
    if head:
      comp = head.group(1)
      continue
    op = re.search(r'op_name="([^"]+)"', line)
    if comp and op and comp not in first:
      first[comp] = op.group(1)
    r = re.match(r"\s*ROOT %?[\w.\-]+ = \S+ (\w+)\(", line)
    if comp and r:
      root[comp] = r.group(1)
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]+)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    callee = calls.group(1) if calls else ""
    name = op.group(1) if op else first.get(callee, "")
    if not name:
      shape = re.sub(r"\{.*\}", "", m.group(2))
      name = f"unnamed {root.get(callee, m.group(3))} -> {shape}"
    out[m.group(1)] = (name, m.group(3))
  return out


def kernel_groups(hlo_text: str) -> dict[str, list[str]]:
  """Instruction -> the instructions sharing its GPU kernel, in the HLO's (schedule) order.

  XLA GPU compiles identical fusions once (`deduplicated_name`); a CUDA graph's trace names
  only the shared kernel, whose launches in a step follow the schedule.
  """
  group, members = {}, collections.defaultdict(list)
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      d = re.search(r'deduplicated_name="([^"]+)"', line)
      group[m.group(1)] = d.group(1) if d else m.group(1)
      members[group[m.group(1)]].append(m.group(1))
  return {i: members[g] for i, g in group.items() if len(members[g]) > 1}


def layer_of(op_name: str) -> str:
  """'jit(step)/transpose(jvp(Generator.decode))/decoder/conv_last/dot_general' ->
  'backward decoder/conv_last dot_general' (module path, pass, primitive)."""
  if op_name.startswith("unnamed "):
    return op_name
  parts = [p for p in op_name.split("/") if p and not p.startswith("jit(step)")]
  if not parts:
    return "(no op name)"
  direction = "backward" if any(p.startswith("transpose(") for p in parts) else "forward"
  mods = [p for p in parts[:-1] if not re.match(r"^(transpose|jvp|jit|vmap)\(", p)]
  mods = [p for p in mods if not p.startswith("Generator")]
  return f"{direction:8s} {'/'.join(mods) or '-'} {parts[-1]}"


def _instruction(event: dict, names: dict) -> str | None:
  """The HLO instruction a trace event ran: its name on the CPU. A GPU kernel event is named
  by its CUDA function and carries the instruction as `args.hlo_op`, except inside a CUDA
  graph (XLA's command buffers), where `hlo_op` names the graph and an XLA kernel's name is
  its fusion's, '_' for '.' ('input_reduce_fusion_555' ran 'input_reduce_fusion.555')."""
  if event.get("name") in names:
    return event["name"]
  op = (event.get("args") or {}).get("hlo_op")
  if op in names:
    return op
  dotted = re.sub(r"_(\d+)$", r".\1", event.get("name", ""))
  return dotted if op and dotted in names else None


def _is_gpu_kernel(event: dict) -> bool:
  op = (event.get("args") or {}).get("hlo_op")
  return bool(op) and op != event.get("name")


def gpu_kind(kernel: str) -> str:
  """A GPU kernel's kind from its CUDA function's name: cuDNN's convolution phases and its
  own layout transposes (channels-first tensors into the NHWC its kernels read), GEMMs,
  copies, else the XLA fusion it is ('loop_add_fusion_15' -> 'loop_add_fusion')."""
  k = kernel.lower()
  for part, kind in (("tonhwc", "cuDNN layout transpose"), ("tonchw", "cuDNN layout transpose"),
                     ("fprop", "cuDNN conv forward"), ("dgrad", "cuDNN conv input gradient"),
                     ("wgrad", "cuDNN conv kernel gradient"), ("gemv", "GEMV"), ("gemm", "GEMM"),
                     ("cudnn", "cuDNN other"), ("xmma", "cuDNN other"),
                     ("convolve", "cuDNN conv other"), ("memcpy", "memcpy/memset"),
                     ("memset", "memcpy/memset")):
    if part in k:
      return kind
  return re.sub(r"_\d+$", "", re.split(r"[<(]", kernel)[0].removeprefix("void "))


def _by_launch_order(kernels: list, groups: dict[str, list[str]], steps: int) -> None:
  """Gives each launch of a shared kernel named only by its name (inside a CUDA graph) the
  instruction it ran: the i-th launch in a step is the group's i-th instruction (of those
  not launched outside a graph), where the launches number exactly `steps` times those
  (else they stay with the named one)."""
  launches = collections.defaultdict(list)
  exact = set()  # launched outside any graph, so named by the trace itself
  for j, (e, i) in enumerate(kernels):
    if i and (e.get("args") or {}).get("hlo_op") == i:
      exact.add(i)
    elif i in groups:
      launches[e["name"]].append(j)
  for js in launches.values():
    members = [m for m in groups[kernels[js[0]][1]] if m not in exact]
    if len(js) == steps * len(members):
      js.sort(key=lambda j: kernels[j][0]["ts"])
      for n, j in enumerate(js):
        kernels[j] = (kernels[j][0], members[n % len(members)])


def summarize(trace_file: str, names: dict[str, tuple[str, str]], steps: int,
              groups: dict[str, list[str]] | None = None):
  """Kernel time per layer and per kind (microseconds over the trace's `steps` steps), the
  time some kernel was running, XLA CPU's executor wall time (0 for a GPU trace) and the
  number of kernels run (a GPU's launches: short kernels make a step launch-bound).

  A GPU kernel whose instruction the trace does not say (a library kernel inside a CUDA
  graph) is counted under '(CUDA graph)' and its kind, so that the totals are all the GPU's;
  `groups` (`kernel_groups`) places a shared XLA kernel's launches inside one.
  """
  events = json.load(gzip.open(trace_file))
  events = events["traceEvents"] if isinstance(events, dict) else events
  complete = [e for e in events if e.get("ph") == "X"]
  gpu = any(_is_gpu_kernel(e) for e in complete)
  if gpu:
    # Only the GPU's kernels: the host's spans named after an instruction are its launches.
    kernels = [(e, _instruction(e, names)) for e in complete if _is_gpu_kernel(e)]
    _by_launch_order(kernels, groups or {}, steps)
  else:
    kernels = [(e, i) for e in complete if (i := _instruction(e, names))]
  walls = [e["dur"] for e in complete
           if e.get("name") == "ThunkExecutor::Execute (wait for completion)"]
  by_layer, by_kind = collections.Counter(), collections.Counter()
  for e, instruction in kernels:
    op, kind = names[instruction] if instruction else ("", "")
    if gpu:
      kind = gpu_kind(e["name"])
    elif kind == "fusion":
      kind = re.sub(r"[.\d]+$", "", e["name"])
    by_layer[layer_of(op) if instruction else f"(CUDA graph) {kind}"] += e["dur"]
    by_kind[kind] += e["dur"]
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e, _ in kernels)
  covered, end = 0.0, -1.0
  for a, b in spans:
    covered += max(0.0, b - max(a, end))
    end = max(end, b)
  return by_layer, by_kind, covered, sum(walls[-steps:]), len(kernels)


def thread_cpu_seconds() -> dict[str, float]:
  """CPU seconds (user + system) so far of each thread of this process, keyed 'tid name'.

  From /proc (Linux); elsewhere empty.
  """
  if not os.path.isdir("/proc/self/task"):
    return {}
  tick = os.sysconf("SC_CLK_TCK")
  out = {}
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        stat = f.read()
    except OSError:  # the thread ended meanwhile
      continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()  # fields 14 and 15 of proc(5), from 3 on
    out[f"{tid} {name}"] = (int(fields[11]) + int(fields[12])) / tick
  return out


def busy_threads(before: dict[str, float], after: dict[str, float], wall: float,
                 min_share: float = 0.05) -> list[tuple[str, float]]:
  """(thread name, CPU time / wall time) of the threads that used at least `min_share` of
  the interval between two `thread_cpu_seconds` readings, busiest first."""
  shares = [(k.split(" ", 1)[1], (v - before.get(k, 0.0)) / wall) for k, v in after.items()]
  return sorted((s for s in shares if s[1] >= min_share), key=lambda s: -s[1])


def report(by_layer, by_kind, n: int) -> None:
  total = sum(by_kind.values())
  print("\nms/step  share  layer (pass, module, primitive)")
  for k, v in by_layer.most_common(FLAGS.top):
    print(f"{v / n / 1e3:7.2f}  {v / total * 100:4.1f}%  {k}")
  print("\nms/step  kernel kind")
  for k, v in by_kind.most_common(12):
    print(f"{v / n / 1e3:7.2f}  {k}")


def main(argv):
  del argv
  if FLAGS.analyze:
    trace_file, hlo_file = FLAGS.analyze
    with open(hlo_file) as f:
      hlo = f.read()
    by_layer, by_kind, _, _, launches = summarize(trace_file, hlo_op_names(hlo), FLAGS.steps,
                                                  kernel_groups(hlo))
    print(f"# {trace_file}: kernels {sum(by_kind.values()) / FLAGS.steps / 1e3:.1f} ms/step "
          f"in {launches / FLAGS.steps:.0f} kernels a step")
    report(by_layer, by_kind, FLAGS.steps)
    return
  config = FLAGS.config
  host_memory.configure_cpu_host(config.train)  # as main.py, before XLA's backend starts
  config.train.lambda_per = 0.0
  _, state, gbatch, step, codes = benchmark.build_step(config, FLAGS.codes)
  compiled = ts.compile_step(step, state, gbatch, None)
  if FLAGS.hlo_out:
    with open(FLAGS.hlo_out, "w") as f:
      f.write(compiled.as_text())
  for _ in range(3):
    state, m = compiled(state, gbatch, None)
  jax.block_until_ready(m)
  # The trace marks a kernel only on the thread that starts it, not the work a library's
  # thread pool hands to the other threads, so its coverage understates how busy they are:
  # read their CPU time over as many untraced steps, and over at least a second of them:
  # /proc counts CPU time in 10 ms ticks, so one toy step of a few ms can read as idle.
  cpu0, t0 = thread_cpu_seconds(), time.perf_counter()
  untraced = 0
  while untraced < FLAGS.steps or time.perf_counter() - t0 < 1.0:
    state, m = compiled(state, gbatch, None)
    jax.block_until_ready(m)
    untraced += 1
  busy = busy_threads(cpu0, thread_cpu_seconds(), time.perf_counter() - t0)
  run_dir = os.path.join(FLAGS.trace_dir, time.strftime("%Y%m%d-%H%M%S"))
  t0 = time.perf_counter()
  with jax.profiler.trace(run_dir, create_perfetto_trace=True):
    for _ in range(FLAGS.steps):
      state, m = compiled(state, gbatch, None)
      jax.block_until_ready(m)
  wall = (time.perf_counter() - t0) / FLAGS.steps
  trace = sorted(glob.glob(os.path.join(run_dir, "plugins/profile/*/perfetto_trace.json.gz")))
  if not trace:
    raise RuntimeError(f"jax.profiler wrote no perfetto trace under {run_dir}")
  hlo = compiled.as_text()
  by_layer, by_kind, covered, exec_us, launches = summarize(
      trace[-1], hlo_op_names(hlo), FLAGS.steps, kernel_groups(hlo))
  n = FLAGS.steps
  total = sum(by_kind.values())
  head = f"# {config.model.ndims}D, batch {list(gbatch['src'].shape)}, codes {codes}: "
  if exec_us:  # XLA CPU's executor spans; a GPU trace has none
    print(head + f"{exec_us / n / 1e3:.1f} ms/step in XLA's executor ({wall * 1e3:.1f} ms "
          f"wall with the profiler's own overhead), kernels {total / n / 1e3:.1f} ms/step "
          f"summed over threads, some kernel running {covered / exec_us * 100:.0f}% of the "
          "time")
  else:
    print(head + f"{wall * 1e3:.1f} ms/step wall with the profiler's own overhead, kernels "
          f"{total / n / 1e3:.1f} ms/step in {launches / n:.0f} launches, some kernel running "
          f"{covered / n / 1e3:.1f} ms")
  if busy:
    print(f"# CPU time / wall time over {untraced} untraced steps: " +
          ", ".join(f"{name} {share:.0%}" for name, share in busy) +
          f" ({sum(share for _, share in busy):.2f} cores)")
  print(f"# trace: {trace[-1]}")
  report(by_layer, by_kind, n)


if __name__ == "__main__":
  app.run(main)
