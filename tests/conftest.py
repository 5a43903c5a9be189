"""Shared test set-up: CPU devices, paths to the shared fixtures."""
import os
import pathlib

# Several CPU devices so that sharded code runs in tests; must precede the first jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As main.py with train.remat or train.recompute_elementwise on: without it XLA CPU merges
# their recomputation away.
from seq2seq_jax import host_memory  # noqa: E402  (imports no jax)
host_memory.keep_remat_barriers(True)
# As main.py with the default train.xla_cpu_eigen_convs: XLA CPU's convs through Eigen.
host_memory.use_eigen_cpu_convs(True)
# One persistent compilation cache for the whole run, subprocesses included: the many short
# training runs of the tests compile the same programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/seq2seq_jax_test_jit_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "reference"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.fail(f"reference fixtures not found at {FIXTURES} (../shared beside the repo root)")
  return FIXTURES
