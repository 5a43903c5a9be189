"""Orbax checkpoints of the train state, with the data iterator's state beside it.

Layout (`WORKDIR/checkpoints/`):

    <step>/state/   orbax StandardSave of {'params', 'opt_state', 'step', 'rng', 'nonfinite'}
    <step>/data/    JSON: the grain iterator state of every loader shard (`shard_<i>` keys)

Saves are asynchronous. The latest `keep` checkpoints are kept, plus the one with the best
validation PSNR (`metrics={'eval_psnr': ...}` at save time). With plain orbax, on any
topology (the checkpoint may come from a pod):

    path = f'{WORKDIR}/checkpoints/{step}/state'
    with ocp.StandardCheckpointer() as c:
      meta = c.metadata(path).item_metadata
      dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
      params = c.restore(path, target)['params']
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

_best_fn = lambda m: float(m["eval_psnr"])


class Checkpointer:
  """Saves and restores `(state, data iterator states)` under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=max(1, int(keep))),
        policies.BestN(get_metric_fn=_best_fn, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_fn, best_mode="max", create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_states: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts an async save; refuses state holding a non-finite value."""
    leaves = jax.tree_util.tree_leaves(state["params"])
    if not all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves):
      raise FloatingPointError(f"refusing to checkpoint non-finite params at step {step}")
    self.manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(dict(data_states))),
        metrics=dict(metrics) if metrics else None, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `state` with the shardings given by `abstract_state` (ShapeDtypeStructs)."""
    out = self.manager.restore(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                           data=ocp.args.JsonRestore()))
    return out["state"], dict(out["data"] or {})

  def restore_params(self, step: int | None = None) -> tuple[int, Any]:
    """`(step, params)` as numpy on the host (evaluation, export); default: the best step."""
    if step is None:
      step = self.best_step() or self.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}")
    return int(step), read_state(self.directory, int(step))["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_state(checkpoints_dir: str, step: int) -> Any:
  """The saved train state of `step` as numpy arrays, whatever topology saved it."""
  path = os.path.join(os.path.abspath(checkpoints_dir), str(int(step)), "state")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    state = ckptr.restore(path, target)
  return jax.tree_util.tree_map(np.asarray, state)
