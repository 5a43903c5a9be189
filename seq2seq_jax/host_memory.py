"""Host memory of the CPU step: XLA's CPU scheduler choice, and returning freed heap pages.

On CPU the train step's XLA buffers are ordinary heap allocations, and glibc keeps what
initialisation and compilation freed (about 1 GB each on `brats2d`) as free heap pages, which
the step's first allocations do not necessarily reuse. Trimming between compilation and the
first step keeps those pages out of the peak (figures in experiments/README.md, "Performance").
Elsewhere (macOS, musl) this does nothing.

XLA CPU's default, concurrency-optimised scheduler keeps independent branches' buffers alive
together. The plain scheduler gives brats2d's step the same time (6.8 s) with 1.5 instead of
2.7 GB of temporaries, but makes the small toy step 14% slower (0.154 vs 0.133 s), hence the
per-config `train.xla_cpu_lean_scheduler`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def use_lean_cpu_scheduler(lean: bool) -> None:
  """Picks XLA CPU's plain (lean) or concurrency-optimised scheduler through XLA_FLAGS.

  XLA reads XLA_FLAGS when its first backend starts: call this before the first computation
  (main.py does, before anything touches a device). A value already in XLA_FLAGS wins.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _SCHEDULER_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_SCHEDULER_FLAG}={'false' if lean else 'true'}".strip()


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
