"""The training loop's view of the input pipeline: prepared data and sharded batches.

The global batch is the concatenation of `S` loader shards (`config.train.data_shards`,
default: the process count), each a disjoint part of the training subjects with its own
seeded sampling. Process `p` of `P` produces shards `p·S/P … (p+1)·S/P - 1`. With `S` fixed,
the global batches are the same whatever the number of processes, so one process can
reproduce a multi-host run exactly (and a run can resume on another host count).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from input_pipeline import loader
from input_pipeline import prepare as prepare_lib
from seq2seq_jax import sharding


def prepare_data(config: ml_collections.ConfigDict) -> str:
  """Prepares the dataset once (a no-op when up to date); process 0 writes, others wait."""
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.cache_dir = os.path.abspath(os.path.expanduser(data_cfg.cache_dir))
  path = None
  if jax.process_index() == 0:
    path = prepare_lib.prepare(data_cfg)
  # Not a device collective: on CPU its gloo set-up would give the waiting processes only 30 s
  # while process 0 prepares, which takes minutes on a real dataset (sharding.py).
  sharding.wait_for_all_processes("prepare_data", timeout_s=24 * 3600.0)  # a whole dataset
  if path is None:
    path = prepare_lib.prepare(data_cfg)
  return path


class TrainBatches:
  """This process's part of every global batch, from its loader shards, with a state."""

  def __init__(self, dataset_dir: str, config: ml_collections.ConfigDict, pad_multiple: int):
    tc = config.train
    n_proc, pi = jax.process_count(), jax.process_index()
    n_shards = int(tc.data_shards) or n_proc
    if n_shards % n_proc:
      raise ValueError(f"config.train.data_shards={n_shards} must be a multiple of the "
                       f"process count {n_proc}")
    if int(tc.batch_size) % n_shards:
      raise ValueError(f"config.train.batch_size={tc.batch_size} must be a multiple of the "
                       f"number of data shards ({n_shards})")
    per_proc = n_shards // n_proc
    self.shards = list(range(pi * per_proc, (pi + 1) * per_proc))
    self.n_shards = n_shards
    self.iters = {
        s: loader.make_train_iterator(
            dataset_dir, ndims=int(config.model.ndims), c_in=int(config.model.c_in),
            crop_size=tuple(tc.crop_size), batch_size=int(tc.batch_size) // n_shards,
            rep_step=int(tc.rep_step), seed=int(tc.seed), num_codes=int(config.model.c_s),
            process_index=s, process_count=n_shards, pad_multiple=pad_multiple,
            pair_per_batch=bool(tc.pair_per_batch))
        for s in self.shards}

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self.iters[s]) for s in self.shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {f"shard_{s}": it.get_state() for s, it in self.iters.items()}

  def set_state(self, states: dict[str, Any]) -> None:
    for s, it in self.iters.items():
      key = f"shard_{s}"
      if key not in states:
        raise KeyError(f"checkpoint holds data states for {sorted(states)} but this run reads "
                       f"{key} (of {self.n_shards}); keep config.train.data_shards as it was")
      it.set_state(states[key])

  def global_state(self) -> dict[str, Any]:
    """Every process's shard states (a collective: all processes must call it)."""
    import json
    local = json.dumps(self.get_state()).encode()
    if jax.process_count() == 1:
      return json.loads(local)
    size = int(np.max(multihost_utils.process_allgather(np.array([len(local)]))))
    buf = np.frombuffer(local.ljust(size), np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(-1, size)
    out = {}
    for row in rows:
      out.update(json.loads(bytes(row).decode().rstrip()))
    return out
