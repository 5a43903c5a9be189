"""Device mesh and shardings: batch split on `data`, first spatial axis split on `spatial`.

Params and optimizer state are replicated; GSPMD inserts the collectives (gradient all-reduce
over `data`, halo exchange and norm statistics over `spatial`).
"""

from __future__ import annotations

from typing import Mapping

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from input_pipeline import sampling

AXES = ("data", "spatial")


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> tuple[int, int]:
  """Resolves the config's axis sizes; one axis may be -1 (all remaining devices)."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if fixed <= 0 or (free and n_devices % fixed) or fixed > n_devices:
    raise ValueError(f"config.mesh {dict(zip(AXES, sizes))} does not fit {n_devices} devices")
  if free:
    sizes[free[0]] = n_devices // fixed
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices=None) -> Mesh:
  """A (data, spatial) mesh; without a -1 axis it may use the first few devices only."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  n = int(np.prod(shape))
  if n < len(devices) and jax.process_count() > 1:
    raise ValueError(f"config.mesh {dict(zip(AXES, shape))} uses {n} of {len(devices)} devices; "
                     "multi-process runs must use them all")
  return Mesh(np.asarray(devices[:n]).reshape(shape), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(ndim: int, spatial_axis: int = 2) -> P:
  """Image arrays `[b, t, *spatial, c]` (ndim ≥ 4): batch on `data`, first spatial axis on
  `spatial`. Smaller arrays (codes `[b, c_s]`, indices `[b]`): batch on `data` only."""
  spec = [None] * ndim
  spec[0] = "data"
  if ndim >= 4:
    spec[spatial_axis] = "spatial"
  return P(*spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim))


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's part of the batch into global arrays sharded over the mesh
  (`batch_spec` of each array)."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
  return out


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of the global batch; checks it splits evenly."""
  n_proc = jax.process_count()
  data = mesh.shape["data"]
  if global_batch_size % data or global_batch_size % n_proc:
    raise ValueError(f"config.train.batch_size={global_batch_size} must be a multiple of the "
                     f"mesh's data axis ({data}) and of the process count ({n_proc})")
  return global_batch_size // n_proc


def check_spatial_split(crop_size, ndims: int, stride: int, mesh: Mesh,
                        conv_forms: str = "auto") -> None:
  """Checks that the mesh's `spatial` axis splits the training crop's first spatial extent
  (depth in 3D, height in 2D) evenly; warns where the model's downsampled extents do not.
  Refuses XLA's conv forms (`config.train.conv_forms='xla'`) split over CPU devices.

  Layers whose extent the shards do not divide (or, strided, whose slabs do not line up with
  their outputs) cannot run per shard (`sharded_conv.sharded_reflect_conv`) and fall back to
  GSPMD: slower on CPU, and XLA CPU's 3D conv under GSPMD has given wrong results inside a
  whole step (experiments/README.md, fifteenth session). When XLA's forms left every layer
  to GSPMD, on CPU devices that whole step was wrong the same way: `brats3d` at 64³ over 8
  host devices gave gradients 11% off one device's on 2 cores and right on one
  (experiments/README.md, seventeenth session).
  """
  n = int(mesh.shape["spatial"])
  if n == 1:
    return
  if conv_forms == "xla" and mesh.devices.flat[0].platform == "cpu":
    raise ValueError(
        f"config.train.conv_forms='xla' with config.mesh's spatial axis ({n}) on CPU devices: "
        "XLA CPU has computed wrong gradients for such a step (a race between the devices' "
        "threads; experiments/README.md). Use 'auto' (the CPU-tuned forms) on CPU")
  # The model's spatial axes are the read window's last `ndims` (a 2D window leads with its
  # slice count, which c_in sets and which does not matter here).
  first = sampling.crop_shape(ndims, 1, crop_size)[-ndims]
  if first % n:
    raise ValueError(f"config.train.crop_size={tuple(crop_size)}: its first spatial extent "
                     f"({first}) must be a multiple of config.mesh's spatial axis ({n})")
  if first % (n * stride):
    logging.warning("config.train.crop_size=%s: %d is not a multiple of the spatial axis (%d) "
                    "times the model's total stride (%d); the downsampled layers it does not "
                    "split run under GSPMD, not per shard",
                    tuple(crop_size), first, n, stride)


def device_peak_mb() -> float | None:
  """The first local device's peak memory in use so far, in MB (GPU/TPU allocator stats;
  None on CPU, which keeps none)."""
  peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return peak / 2**20 if peak is not None else None


def planned_device_bytes(compiled) -> int:
  """What one device needs for a compiled program by XLA's buffer plan: its arguments,
  outputs not written into donated arguments, and temporaries."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
  """Blocks until every process has reached the barrier `name` (no-op with one process).

  Uses the distributed runtime's coordination service, not a device collective. On CPU, a
  program's first collective over a new group of devices sets up its gloo context, and that
  set-up gives the other processes only 30 s to arrive: a process that compiled its train
  step more than 30 s after another (on a loaded 2-core machine: compile times differ
  that much) failed there with "Gloo context initialization failed ... GetKeyValue() timed
  out", and the other hung. So this is the project's one barrier (`multihost_utils.
  sync_global_devices` is a collective): while process 0 prepares the data, and after
  compiling, before the first step, which keeps processes within that window.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client that orbax's multihost helpers use too
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(f"{jax.process_count()} processes but no distributed client; call "
                       "jax.distributed.initialize() first")
  client.wait_at_barrier(name, int(timeout_s * 1000))
