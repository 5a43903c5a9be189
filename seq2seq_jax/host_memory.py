"""Giving freed host memory back to the OS (glibc), which bounds the process's peak RSS.

On CPU the train step's XLA buffers are ordinary heap allocations, and glibc keeps what
initialisation and compilation freed (about 1 GB each on `brats2d`) as free heap pages, which
the step's first allocations do not necessarily reuse. Trimming between compilation and the
first step keeps those pages out of the peak (figures in experiments/README.md, "Performance").
Elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


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
