"""host_memory: glibc keeps freed pages for reuse (no page faults the second time)."""

import os
import pathlib
import subprocess
import sys

import pytest

from seq2seq_jax import host_memory

_PROBE = """
import resource, sys
from seq2seq_jax import host_memory
if sys.argv[1] == "reuse":
  assert host_memory.reuse_freed_memory()
import ctypes
libc = host_memory._libc()
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults_of_one_allocation():
  # Plain malloc/memset/free as XLA's buffers (numpy would ask for huge pages).
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(96 << 20)  # 96 MB: above glibc's largest mmap threshold
  ctypes.memset(p, 1, 96 << 20)
  libc.free(p)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_allocation()
print(faults_of_one_allocation())
"""


@pytest.mark.skipif(host_memory._libc() is None, reason="glibc only")
def test_freed_pages_are_reused_instead_of_faulted_in_again():
  def second_faults(mode):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])
  pages = (96 << 20) // 4096
  assert second_faults("default") > pages // 2  # a fresh mmap each time: every page faults
  assert second_faults("reuse") < pages // 100


# Prepended to the probes below: one field of /proc/self/smaps for the mapping holding `addr`.
_SMAPS_FIELD = """
def smaps_field(addr, name):
  inside = False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo <= addr < hi
      elif inside and head == name + ":":
        return int(line.split()[1])
"""

_THP_PROBE = _SMAPS_FIELD + """
import ctypes, os, sys
from seq2seq_jax import host_memory
host_memory.use_malloc_huge_pages()  # may re-execute this very script once
libc = host_memory._libc()
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(96 << 20)  # above glibc's mmap threshold: a mapping of its own
ctypes.memset(p, 1, 96 << 20)
eligible = smaps_field(p, "THPeligible")
print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), eligible)
"""


@pytest.mark.skipif(not host_memory.malloc_huge_pages_wanted({}),
                    reason="needs glibc >= 2.35 on Linux with transparent huge pages")
def test_entry_points_restart_once_with_malloc_huge_pages(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(_THP_PROBE)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1])

  def run(**extra):
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         check=True, env={**env, **extra})
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout  # restarted at most once, before printing anything
    words = lines[0].split()  # pid, [GLIBC_TUNABLES], THPeligible
    return words[1:-1], int(words[-1])

  tunables, eligible = run()
  assert tunables == ["glibc.malloc.hugetlb=1"]
  assert eligible == 1  # glibc madvised the block: the kernel may back it with 2 MB pages
  # A tunable the user set is kept, the huge-page one appended.
  tunables, eligible = run(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert tunables == ["glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"] and eligible == 1
  # Opted out: no restart, and (with THP in madvise mode) the block is not eligible.
  tunables, eligible = run(SEQ2SEQ_MALLOC_HUGE_PAGES="0")
  assert tunables == []
  with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
    if "[madvise]" in f.read():
      assert eligible == 0


def test_keep_remat_barriers_sets_or_extends_the_disabled_passes(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert not host_memory.keep_remat_barriers(False)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  assert host_memory.keep_remat_barriers(True)
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     "--xla_disable_hlo_passes=cse_barrier_expander")
  assert host_memory.keep_remat_barriers(True)  # idempotent
  assert os.environ["XLA_FLAGS"].count("cse_barrier_expander") == 1
  monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=foo")
  assert host_memory.keep_remat_barriers(True)
  assert os.environ["XLA_FLAGS"] == "--xla_disable_hlo_passes=foo,cse_barrier_expander"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # the GPU compiler needs its barrier pass
  assert not host_memory.keep_remat_barriers(True)
  assert os.environ["XLA_FLAGS"] == ""


def test_without_kept_barriers_undoes_keep_remat_barriers_only(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  for before in ("", "--xla_force_host_platform_device_count=2",
                 "--xla_disable_hlo_passes=foo --xla_dump_to=/tmp/d",
                 "--xla_disable_hlo_passes=foo,bar"):
    monkeypatch.setenv("XLA_FLAGS", before)
    assert host_memory.keep_remat_barriers(True)
    assert host_memory.without_kept_barriers(os.environ["XLA_FLAGS"]) == before
  assert host_memory.without_kept_barriers(
      "--xla_disable_hlo_passes=cse_barrier_expander,foo --a=1") == (
          "--xla_disable_hlo_passes=foo --a=1")


@pytest.mark.parametrize("remat,elementwise", [(False, False), (True, False), (False, True)])
def test_configure_cpu_host_sets_what_the_train_fields_ask(monkeypatch, remat, elementwise):
  """Either recompute option keeps the barriers; the scheduler and fusion-emitter flags
  follow the config; heap reuse comes with inline steps."""
  import jax
  import ml_collections
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(host_memory, "_emitters_off_here", False)  # restored afterwards
  reused = []
  # This process's allocator stays as it is; only the call is recorded.
  monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: reused.append(True))
  reuse = remat  # one case with, two without
  train = ml_collections.ConfigDict(dict(
      xla_cpu_lean_scheduler=True, remat=remat, recompute_elementwise=elementwise,
      cpu_heap_reuse=reuse, xla_cpu_fusion_emitters=elementwise, xla_cpu_eigen_convs=remat))
  before = jax.config.values["jax_cpu_enable_async_dispatch"]
  try:
    host_memory.configure_cpu_host(train)
    inline = not jax.config.values["jax_cpu_enable_async_dispatch"]
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", before)
  flags = os.environ["XLA_FLAGS"]
  assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags
  assert ("cse_barrier_expander" in flags) == (remat or elementwise)
  emitters_off = not elementwise and host_memory.xla_has_older_cpu_emitters()
  assert ("--xla_cpu_use_fusion_emitters=false" in flags) == emitters_off
  assert bool(reused) == reuse and inline == reuse
  assert host_memory.eigen_cpu_convs() == remat
  # One-off compilations get the MLIR emitters back where this call turned them off.
  assert host_memory.one_off_compile_options() == (
      {"xla_cpu_use_fusion_emitters": True} if emitters_off else {})


def test_fusion_emitters_flag_only_for_an_xla_that_has_it(monkeypatch):
  assert host_memory.xla_has_older_cpu_emitters("0.10.2")
  assert not host_memory.xla_has_older_cpu_emitters("0.11.2")
  assert not host_memory.xla_has_older_cpu_emitters("1.0.0")
  # jaxlib 0.11's XLA aborts on the flag it no longer has: none is set there.
  monkeypatch.setattr(host_memory, "_emitters_off_here", False)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(host_memory.importlib.metadata, "version", lambda name: "0.11.2")
  host_memory.use_cpu_fusion_emitters(False)
  assert os.environ["XLA_FLAGS"] == "" and host_memory.one_off_compile_options() == {}


def test_one_off_compile_options_leave_a_users_own_flag(monkeypatch):
  monkeypatch.setattr(host_memory, "_emitters_off_here", False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
  host_memory.use_cpu_fusion_emitters(False)
  assert host_memory.one_off_compile_options() == {}
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=false"


@pytest.mark.skipif(not host_memory.xla_has_older_cpu_emitters(),
                    reason="jaxlib >= 0.11: XLA CPU has only the MLIR emitters")
def test_both_fusion_emitters_initialise_the_same_state():
  """The state's initialisation is compiled with the MLIR emitters even where the step uses
  the older ones (`one_off_compile_options`): it must give the same state, bit for bit."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import tiny
  from seq2seq_jax import train_step as ts
  config = tiny.get_config()
  model = ts.make_model(config)
  x = jnp.zeros((1, 1, 8, 8, int(config.model.c_in)), jnp.float32)
  init = jax.jit(lambda x: ts.init_state(model, config, x)).lower(x)
  states = [init.compile(compiler_options={"xla_cpu_use_fusion_emitters": on})(x)
            for on in (False, True)]
  leaves = [jax.tree_util.tree_leaves(s) for s in states]
  assert len(leaves[0]) > 10
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_LATE_FREE_PROBE = """
import ctypes, functools, sys
from seq2seq_jax import host_memory
if sys.argv[1] == "inline":
  host_memory.run_cpu_steps_inline()
class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                             "usmblks", "fsmblks", "uordblks", "fordblks",
                                             "keepcost")]
libc = host_memory._libc()
libc.mallinfo2.restype = MallInfo2
import jax, jax.numpy as jnp

@functools.partial(jax.jit, donate_argnums=0)
def step(x):
  y = jnp.cumsum(jnp.sin(x))  # a 16 MB temporary
  return x + 1e-6 * y[::-1], jnp.sum(y)

def in_use():
  m = libc.mallinfo2()
  return m.uordblks + m.hblkhd  # heap chunks and mmapped ones

x, s = step(jnp.ones((4 << 20,), jnp.float32))
jax.block_until_ready(s)
base = in_use()
late = 0
for _ in range(100):
  x, s = step(x)
  jax.block_until_ready(s)
  late += in_use() > base + (8 << 20)
print(late)
"""


@pytest.mark.skipif(not hasattr(host_memory._libc(), "mallinfo2"), reason="glibc >= 2.33 only")
def test_inline_steps_have_freed_their_temporaries_when_outputs_are_ready():
  """With async dispatch the worker thread sets a step's outputs ready and only then frees
  its temporaries (this probe saw 4, 25 and 32 of 50-200 steps still holding them in some
  runs, none in others); inline, never."""
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  out = subprocess.run([sys.executable, "-c", _LATE_FREE_PROBE, "inline"], capture_output=True,
                       text=True, cwd=repo, env={**os.environ, "PYTHONPATH": repo,
                                                 "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.split()[-1]) == 0


_PAGEOUT_PROBE = _SMAPS_FIELD + """
import hashlib, mmap, os, sys
import jax, jax.numpy as jnp
from seq2seq_jax import host_memory

def rss_mb(lo):
  return smaps_field(lo, "Rss") / 1024

path = os.path.join(sys.argv[1], "code.bin")
with open(path, "wb") as f:  # a stand-in library that no other process maps
  f.write(os.urandom(16 << 20))
  f.flush()
  os.fsync(f.fileno())  # clean pages: the kernel reclaims those without writing them
with open(path, "rb") as f:
  m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
digest = hashlib.sha256(m[:]).hexdigest()  # touches every page
lo = next(int(l.split("-")[0], 16) for l in open("/proc/self/maps") if l.rstrip().endswith(path))
before = rss_mb(lo)
accepted = host_memory.page_out_compiler_code(roots=[os.path.join(sys.argv[1], "")])
after = rss_mb(lo)
same = hashlib.sha256(m[:]).hexdigest() == digest
f = jax.jit(lambda x: jnp.tanh(x).sum())
compiled = f.lower(jnp.ones(8)).compile()
jaxlib_mappings = host_memory.page_out_compiler_code()  # default roots: jaxlib's libraries
print(before, accepted, after, same, jaxlib_mappings, float(compiled(jnp.ones(8))))
"""


def _filesystem_type(path) -> str:
  """The type of the filesystem holding `path` (the longest mount point above it)."""
  path, best, kind = os.path.realpath(path), "", ""
  with open("/proc/self/mounts") as f:
    for line in f:
      _, mount, fstype = line.split()[:3]
      if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
        best, kind = mount, fstype
  return kind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT)")
def test_page_out_compiler_code_drops_resident_code_and_keeps_its_contents(tmp_path):
  """A private executable mapping's resident pages go, its bytes read back the same, and the
  default roots find jaxlib's own libraries (with a compiled function still right after)."""
  if _filesystem_type(tmp_path) == "tmpfs":
    pytest.skip("tmpfs pages are reclaimed only to swap; the stand-in file needs a disk")
  out = subprocess.run([sys.executable, "-c", _PAGEOUT_PROBE, str(tmp_path)],
                       capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).parents[1])
  before, accepted, after, same, jaxlib_mappings, value = out.stdout.split()
  assert float(before) >= 15  # 16 MB mapped and read
  assert int(accepted) == 1
  assert float(after) < 1, f"{after} MB of the mapping still resident"
  assert same == "True"
  assert int(jaxlib_mappings) >= 1
  assert float(value) == pytest.approx(8 * 0.7615942, rel=1e-6)


def test_eigen_convs_flag_only_on_cpu_and_never_over_the_users(monkeypatch):
  """`use_eigen_cpu_convs` sets XLA's YNNPACK fusion types to its default less convolutions
  where JAX runs on the CPU with a jaxlib that has the flag; a user's own setting wins."""
  flag = "--xla_cpu_experimental_ynn_fusion_type"
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert not host_memory.use_eigen_cpu_convs(False) and not host_memory.eigen_cpu_convs()
  assert host_memory.use_eigen_cpu_convs(True) and host_memory.eigen_cpu_convs()
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     f"{flag}=individual_dot,reduce")
  assert not host_memory.use_eigen_cpu_convs(True)  # set once
  monkeypatch.setenv("XLA_FLAGS", f"{flag}=individual_dot,reduce,individual_convolution")
  assert not host_memory.use_eigen_cpu_convs(True) and not host_memory.eigen_cpu_convs()
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.use_eigen_cpu_convs(True) and os.environ["XLA_FLAGS"] == ""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(host_memory.importlib.metadata, "version", lambda name: "0.9.2")
  assert not host_memory.use_eigen_cpu_convs(True) and os.environ["XLA_FLAGS"] == ""


_YNN_PROBE = """
import sys
from seq2seq_jax import host_memory
host_memory.use_eigen_cpu_convs(sys.argv[1] == "eigen")
import jax, jax.numpy as jnp
x, w = jnp.ones((1, 50, 50, 64)), jnp.ones((3, 3, 64, 64))
f = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
    a, b, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print("ynn" if "__ynn_fusion" in f.lower(x, w).compile().as_text() else "eigen")
"""


def test_the_flag_takes_convolutions_out_of_ynnpack():
  """What the flag is for: jaxlib's XLA CPU compiles an unpadded conv into a YNNPACK fusion by
  default, and into its own (Eigen) convolution with the flag set."""
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  for mode in ("ynn", "eigen"):
    out = subprocess.run([sys.executable, "-c", _YNN_PROBE, mode], capture_output=True,
                         text=True, env=env, cwd=repo, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == mode
