"""host_memory: glibc keeps freed pages for reuse (no page faults the second time)."""

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
