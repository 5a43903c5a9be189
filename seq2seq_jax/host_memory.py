"""Host memory of the CPU step: XLA's CPU scheduler choice, remat that recomputes,
returning freed heap pages, and handing back the compiler's code after compiling.

On CPU the train step's XLA buffers are ordinary heap allocations, and glibc keeps what
initialisation and compilation freed (about 1 GB each on `brats2d`) as free heap pages, which
the step's first allocations do not necessarily reuse. Trimming between compilation and the
first step keeps those pages out of the peak (figures in experiments/README.md, "Performance").
Elsewhere (macOS, musl) this does nothing.

XLA CPU's default, concurrency-optimised scheduler keeps independent branches' buffers alive
together. The plain scheduler gives brats2d's step the same time (6.8 s) with 1.5 instead of
2.7 GB of temporaries, but makes the small toy step 14% slower (0.154 vs 0.133 s), hence the
per-config `train.xla_cpu_lean_scheduler`.

XLA CPU allocates a step's temporaries when the step starts and frees them after it; glibc
serves buffers that large with a fresh `mmap` (its threshold rises to at most 32 MB, and
worker threads' arenas are capped at 64 MB a heap), so every step page-faults all of them in
again: 17,400 faults and 34 ms of kernel time in the toy step's 141 ms. `reuse_freed_memory`
(`train.cpu_heap_reuse`) makes glibc keep freed pages for reuse instead: toy step 134 ms,
0 faults. Its risk is the heap growing: with async dispatch the worker thread sets a step's
outputs ready before it frees the step's temporaries, so the next step, dispatched at once,
can allocate its own while they are still held, and the heap keeps both. The toy step's
heap grew so by one step's temporaries at a time (330 → 597 MB in 60 steps; peak RSS 461–709
MB over 14 runs); brats2d's one peak of 6.5 instead of 3.9 GB may have been the same. So
`cpu_heap_reuse` also runs steps inline (`run_cpu_steps_inline`), which frees them first: toy
arena 330 MB throughout, peak RSS 452–473 MB over 14 runs, same step time
(experiments/README.md, "seventh session").

Compiling also leaves XLA's compiler code resident: jaxlib's one library holds the compiler
(LLVM included) beside the runtime, and the pages a compilation ran stay mapped and counted
in RSS. `release_after_compile` (called after initialising the state and after compiling the
step, and in training after the first validation, samples and checkpoint) trims the heap and
asks the kernel to reclaim those pages; the steps fault back the few they run. Toy benchmark
peak RSS 456–467 → 392–394 MB, brats3d 1.51–1.53 → 1.42 GB (experiments/README.md, "eighth
session").

Huge pages take most of that cost away without heap reuse: glibc's `glibc.malloc.hugetlb=1`
tunable asks for transparent huge pages on what malloc maps, so temporaries fault in 2 MB
at a time instead of 4 kB (brats2d step 9.90 → 8.82 s, same peak RSS). glibc reads tunables
only at start-up, so `use_malloc_huge_pages` re-executes the entry point once with it set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def _add_xla_flag(flag: str, value: bool | str) -> bool:
  """Appends `flag=value` to XLA_FLAGS unless the user already set that flag there; returns
  whether it did."""
  flags = os.environ.get("XLA_FLAGS", "")
  if flag in flags:
    return False
  if isinstance(value, bool):
    value = "true" if value else "false"
  os.environ["XLA_FLAGS"] = f"{flags} {flag}={value}".strip()
  return True


def use_lean_cpu_scheduler(lean: bool) -> None:
  """Picks XLA CPU's plain (lean) or concurrency-optimised scheduler through XLA_FLAGS.

  XLA reads XLA_FLAGS when its first backend starts: call this before the first computation
  (main.py does, before anything touches a device). A value already in XLA_FLAGS wins.
  """
  _add_xla_flag(_SCHEDULER_FLAG, not lean)


_FUSION_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters"


def use_cpu_fusion_emitters(on: bool) -> None:
  """Whether XLA CPU generates its fusions through its MLIR fusion emitters (its default) or
  its older LLVM IR emitters.

  The older emitters compile the toy step with about 200 MB less peak memory (416–465 vs
  589–661 MB peak RSS while compiling) at the same step time, but take about twice as long
  (19–25 vs 11–12 s); on small models the compile sets much of the process's peak.
  Before the first computation, as `use_lean_cpu_scheduler`. A value already in XLA_FLAGS wins.
  With jaxlib 0.11 or newer this does nothing: their XLA has only the MLIR emitters, and an
  unknown flag in XLA_FLAGS aborts the process (seen with 0.11.2, the toy config on an H200).
  """
  global _emitters_off_here
  if on or not xla_has_older_cpu_emitters():  # on is XLA's default
    return
  if _add_xla_flag(_FUSION_EMITTERS_FLAG, False):
    _emitters_off_here = True


def xla_has_older_cpu_emitters(jaxlib_version: str | None = None) -> bool:
  """Whether the installed jaxlib's XLA still has `--xla_cpu_use_fusion_emitters` (before
  0.11). Read from the package's metadata: this runs before JAX is imported."""
  version = _jaxlib_version(jaxlib_version)
  return version is not None and version < (0, 11)


def _jaxlib_version(version: str | None = None) -> tuple[int, int] | None:
  """(major, minor) of `version`, or of the installed jaxlib (read from its metadata)."""
  if version is None:
    try:
      version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
      return None
  m = re.match(r"(\d+)\.(\d+)", version)
  return (int(m.group(1)), int(m.group(2))) if m else None


_emitters_off_here = False  # whether use_cpu_fusion_emitters(False) set the flag

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# XLA CPU's default YNNPACK fusions in jaxlib 0.10 and 0.11 less the convolutions: the
# default compiles to the same HLO as "individual_dot,reduce,individual_convolution".
_YNN_WITHOUT_CONVS = "individual_dot,reduce"


def use_eigen_cpu_convs(on: bool) -> bool:
  """Whether XLA CPU runs its convolutions through Eigen rather than YNNPACK.

  With jaxlib 0.10 XLA CPU hands every unpadded convolution to YNNPACK, which runs the
  model's layers at 69-183 GFLOP/s on a 2-core AVX-512 VM, where Eigen's convolution (what
  XLA CPU runs for padded ones, and for all once YNNPACK's conv fusion is off) reaches
  222-307 (experiments/README.md, "twenty-seventh session"); `gemm_conv`'s form choices
  follow (`eigen_cpu_convs`). Sets `--xla_cpu_experimental_ynn_fusion_type` to XLA's
  default less `individual_convolution`, only where JAX will run on the CPU, with a jaxlib
  that has the flag (0.10 or newer: an unknown flag aborts the process), and unless the
  user's XLA_FLAGS already set it. Before the first computation, as `use_lean_cpu_scheduler`.
  Returns whether it set the flag.
  """
  if not on or not _cpu_only() or (_jaxlib_version() or (0, 0)) < (0, 10):
    return False
  return _add_xla_flag(_YNN_FLAG, _YNN_WITHOUT_CONVS)


def eigen_cpu_convs() -> bool:
  """Whether this process's XLA_FLAGS keep convolutions out of YNNPACK (`use_eigen_cpu_convs`,
  or the user's own `--xla_cpu_experimental_ynn_fusion_type` without a convolution type)."""
  m = re.search(_YNN_FLAG + r"=(\S*)", os.environ.get("XLA_FLAGS", ""))
  return bool(m) and "convolution" not in m.group(1)


def one_off_compile_options() -> dict:
  """Compiler options for one-off compilations at start-up (the state's initialisation).

  `use_cpu_fusion_emitters(False)` exists for the step's compile-time peak. The older
  emitters compile the toy model's initialisation (a threefry kernel per parameter) in 25 s
  instead of 7.6 s, with a lower peak (313 vs 360 MB RSS) that does not matter there: it
  runs before anything else is resident, below training's later peak. So such compilations
  get the MLIR emitters back, unless the user's own XLA_FLAGS turned them off.
  """
  return {"xla_cpu_use_fusion_emitters": True} if _emitters_off_here else {}


_BARRIER_PASS = "cse_barrier_expander"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin", "libtpu")


def _cpu_only() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_PLUGINS)


def keep_remat_barriers(remat: bool) -> bool:
  """Makes `train.remat` and `train.recompute_elementwise` recompute on CPU: keeps XLA CPU
  from deleting remat's barriers.

  `jax.checkpoint` puts its recomputation behind an optimization barrier so that XLA cannot
  merge it with the forward pass (CSE). XLA CPU deletes every barrier right after its first
  CSE pass, and a later CSE then merges the recomputation away: with remat on, the compiled
  step was the step without it (a 16-layer chain: 62 dots in, 47 compiled, temporaries
  unchanged). Disabling that pass (`--xla_disable_hlo_passes=cse_barrier_expander`) keeps the
  barriers to the end; CPU code generation treats them as no-ops. Only with either option
  on (the barriers also stop fusions across them) and only where JAX will run on CPU: the
  GPU compiler runs the same pass after scheduling, where the barrier has done its job.

  Call it before the first computation (XLA reads XLA_FLAGS when its backend starts).
  Returns whether the flag is set.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _BARRIER_PASS in flags:
    return True
  if not remat or not _cpu_only():
    return False
  m = re.search(r"--xla_disable_hlo_passes=(\S*)", flags)
  if m:
    flags = flags.replace(m.group(0), f"{m.group(0)},{_BARRIER_PASS}")
  else:
    flags = f"{flags} --xla_disable_hlo_passes={_BARRIER_PASS}".strip()
  os.environ["XLA_FLAGS"] = flags
  return True


def without_kept_barriers(flags: str) -> str:
  """`flags` (XLA_FLAGS) less `keep_remat_barriers`' disabled pass, for a process that
  compiles for a GPU (`experiments/gpu_plan.py`): XLA's GPU compiler rejects a program whose
  barriers reach its code generation ("Unsupported instruction opcode: opt-barrier")."""
  def keep_others(m):
    passes = [p for p in m.group(1).split(",") if p and p != _BARRIER_PASS]
    return f"--xla_disable_hlo_passes={','.join(passes)}" if passes else ""
  return " ".join(re.sub(r"--xla_disable_hlo_passes=(\S*)", keep_others, flags).split())


@functools.lru_cache(maxsize=None)
def _libc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim  # glibc only
    return libc
  except (OSError, AttributeError):
    return None


def release_free_memory() -> bool:
  """Returns the heap's free pages to the OS (`malloc_trim(0)`); whether any were released."""
  libc = _libc()
  return bool(libc and libc.malloc_trim(0))


_MADV_PAGEOUT = 21  # Linux >= 5.4 (asm-generic/mman-common.h); older kernels: EINVAL


def _compiler_roots() -> list[str]:
  """Directories of the libraries that hold XLA's compilers: jaxlib, and any PJRT plugins."""
  import importlib  # jaxlib imported here: this module is imported before the re-exec
  roots = []
  for name in ("jaxlib", "jax_plugins"):
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    for path in getattr(module, "__path__", []):
      roots.append(os.path.join(os.path.realpath(path), ""))
  return roots


def _code_mappings(roots) -> list[tuple[int, int]]:
  """Address ranges of this process's executable file mappings under `roots`."""
  ranges, prefixes = [], tuple(roots)
  try:
    with open("/proc/self/maps") as f:
      for line in f:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[1] == "r-xp" and parts[5].strip().startswith(prefixes):
          lo, hi = (int(v, 16) for v in parts[0].split("-"))
          ranges.append((lo, hi))
  except OSError:  # no procfs (macOS)
    return []
  return ranges


def page_out_compiler_code(roots=None) -> int:
  """Asks the kernel to reclaim the resident pages of XLA's machine code now
  (`madvise(MADV_PAGEOUT)` on the executable mappings of the libraries under `roots`, by
  default jaxlib's and the PJRT plugins'); returns how many mappings the kernel accepted.

  jaxlib's one library holds XLA's compiler (LLVM included) beside its runtime: compiling
  the toy step leaves 110 MB of that code resident and counted in the process's RSS,
  while the steps run 34 MB of it. Reclaiming keeps contents (the pages are clean; what
  runs again is read back from the file, so a later compilation pays major page faults),
  and the kernel skips pages that other processes map too: those cost their memory once,
  not per process. Linux 5.4 or newer; elsewhere a no-op.
  """
  libc = _libc()
  if libc is None or not sys.platform.startswith("linux"):
    return 0
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  ranges = _code_mappings(_compiler_roots() if roots is None else roots)
  return sum(libc.madvise(lo, hi - lo, _MADV_PAGEOUT) == 0 for lo, hi in ranges)


def release_after_compile() -> None:
  """What a compilation leaves resident and the run no longer needs: the heap's free pages
  (`release_free_memory`) and the compiler's code (`page_out_compiler_code`).

  Call it after compiling, before the compiled step's first run allocates its buffers
  (train.py and the benchmarks do).
  """
  release_free_memory()
  page_out_compiler_code()


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def reuse_freed_memory() -> bool:
  """Makes glibc keep freed heap pages for the next allocation instead of returning them.

  One arena for all threads (so allocations are not capped by a thread arena's 64 MB heaps),
  no mmap for large blocks, and no automatic trimming; `release_free_memory` still returns
  pages on demand. Call it before the XLA backend starts its threads (main.py does). Returns
  whether glibc accepted the settings (False elsewhere).
  """
  libc = _libc()
  if libc is None or not hasattr(libc, "mallopt"):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30),
              (_M_TOP_PAD, 64 << 20))
  return all(libc.mallopt(k, v) == 1 for k, v in settings)


def configure_cpu_host(train) -> None:
  """The CPU host settings a training config's `train` fields ask for: XLA's scheduler,
  its fusion emitters (`xla_cpu_fusion_emitters`), Eigen's convolutions
  (`xla_cpu_eigen_convs`), remat barriers (`remat` or
  `recompute_elementwise`), freed-page reuse with inline steps (`cpu_heap_reuse`).

  Call it before the first computation and before XLA starts its threads (main.py and the
  benchmarks do).
  """
  use_lean_cpu_scheduler(bool(train.xla_cpu_lean_scheduler))
  use_cpu_fusion_emitters(bool(train.xla_cpu_fusion_emitters))
  use_eigen_cpu_convs(bool(train.xla_cpu_eigen_convs))
  keep_remat_barriers(bool(train.remat or train.recompute_elementwise))
  if train.cpu_heap_reuse:
    reuse_freed_memory()
    run_cpu_steps_inline()


def run_cpu_steps_inline() -> None:
  """Makes the CPU client run each single-device computation on the calling thread, so that
  a step has freed its temporaries by the time its outputs are ready.

  With async dispatch (JAX's default) a worker thread frees them only after setting the
  outputs ready, and under `reuse_freed_memory` the heap grows (figures in the module
  docstring). Computations over several devices stay asynchronous in XLA.

  Call it before the first computation (the client reads the setting when it starts).
  """
  import jax  # here, not at the top: this module is imported before the re-exec
  jax.config.update("jax_cpu_enable_async_dispatch", False)


_TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_ENV = "SEQ2SEQ_MALLOC_HUGE_PAGES"  # "0": never re-execute for huge pages


def _thp_available() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def malloc_huge_pages_wanted(environ=None) -> bool:
  """Whether `use_malloc_huge_pages` would re-execute with `environ` (default: this process's
  environment): Linux, glibc ≥ 2.35 (the tunable), transparent huge pages not disabled, the
  tunable not yet set, no opt-out."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT_ENV, "1") == "0" or _TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return False
  if sys.platform != "linux":
    return False
  lib, version = platform.libc_ver()
  try:
    new_enough = tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False
  return lib == "glibc" and new_enough and _thp_available()


def use_malloc_huge_pages() -> None:
  """Re-executes this process (same interpreter, same command line) with glibc malloc's
  transparent huge pages on, unless `malloc_huge_pages_wanted()` says no; returns otherwise.

  Call it first thing in an entry point's `if __name__ == "__main__":` (main.py and the
  benchmarks do), before heavy imports, so the restart costs only an interpreter start.
  The tunable is appended to any GLIBC_TUNABLES already given; `SEQ2SEQ_MALLOC_HUGE_PAGES=0`
  turns this off. The process keeps its PID (execv), so launchers and signals are unaffected.
  """
  if not malloc_huge_pages_wanted():
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  os.environ["GLIBC_TUNABLES"] = f"{tunables}:{_TUNABLE}=1" if tunables else f"{_TUNABLE}=1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
