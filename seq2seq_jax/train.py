"""Training loop: `train_and_evaluate(config, workdir)`, what `main.py --mode=train` runs.

Resumes from the latest checkpoint in `workdir` (model state and data iterator state), so a
pre-empted run launched again continues on the very same batches.
"""

from __future__ import annotations

import json
import logging as pylogging
import math
import os
import signal
import sys
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from input_pipeline import dataset as dataset_lib
from input_pipeline import loader
from seq2seq_jax import data as data_lib
from seq2seq_jax import host_memory
from seq2seq_jax import sharding
from seq2seq_jax import train_step as ts
from seq2seq_jax import validation
from seq2seq_jax import vgg as vgg_lib
from seq2seq_jax import visualize
from seq2seq_jax.checkpoint import Checkpointer
from seq2seq_jax.models import conv
from seq2seq_jax.models import total_stride

BATCH_KEYS = ("src", "tgt", "src_code", "tgt_code")


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + ".tmp", path)


def _maybe_inject_fault(step: int, ckpt: Checkpointer) -> None:
  """Test hook: SIGKILL this process right after the checkpoint of a chosen step is written
  (env SEQ2SEQ_JAX_SIGKILL_AFTER_CKPT=<step>), to test resuming after a hard pre-emption."""
  if os.environ.get("SEQ2SEQ_JAX_SIGKILL_AFTER_CKPT") == str(step):
    ckpt.wait()
    os.kill(os.getpid(), signal.SIGKILL)


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's INFO chatter (several lines per save) from the absl log."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


pylogging.getLogger("absl").addFilter(_QuietOrbax())


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without importing torch.

  tensorboardX's writer module imports torch whenever it is installed, only so that it can
  take torch tensors as values. In a training process, which logs floats and never uses
  torch, that cost 186 MB of RSS and 1.7 s (torch 2.13 CPU; experiments/README.md). A `None`
  in `sys.modules` makes `import torch` raise ImportError, which tensorboardX catches.
  """
  block = "torch" not in sys.modules and "tensorboardX.writer" not in sys.modules
  if block:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if block:
      del sys.modules["torch"]
  return SummaryWriter


class _Logger:
  """TensorBoard scalars (tensorboardX) and a metrics.jsonl file, on process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      self.writer = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def scalars(self, step: int, values: dict) -> None:
    if not self.active:
      return
    for k, v in values.items():
      self.writer.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.active:
      self.writer.close()
      self.jsonl.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming when it holds a checkpoint).

  Returns:
    A summary dict: final `step`, last `eval_psnr`/`eval_ssim`, `best_step`.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  tc = config.train
  save_config(config, workdir)
  vgg = vgg_lib.check_vgg_weights(tc.vgg_weights or None, tc.lambda_per)  # fail at start-up

  # The mesh, batch and crop are checked before the dataset is prepared (minutes on real data).
  mesh = sharding.make_mesh(config.mesh)
  stride = total_stride(config.model)
  sharding.local_batch_size(int(tc.batch_size), mesh)  # checks the batch splits evenly
  ndims, c_in, c_s = int(config.model.ndims), int(config.model.c_in), int(config.model.c_s)
  conv.check_forms(tc.conv_forms)
  sharding.check_spatial_split(tc.crop_size, ndims, stride, mesh, tc.conv_forms)
  dataset_dir = data_lib.prepare_data(config)
  meta = dataset_lib.load_metadata(dataset_dir)
  model = ts.make_model(config)
  if len(meta["sequences"]) > c_s:
    raise ValueError(f"the dataset has {len(meta['sequences'])} sequences but config.model.c_s "
                     f"is {c_s}; c_s must be at least the number of sequences")

  data_iter = data_lib.TrainBatches(dataset_dir, config, pad_multiple=stride)
  n_train = int(meta["splits"]["train"]["count"])
  steps_per_epoch = max(1, math.ceil(n_train * int(tc.rep_step) / int(tc.batch_size)))
  total_steps = min(int(tc.total_steps), int(tc.epochs) * steps_per_epoch)
  eval_every = int(tc.eval_steps) or steps_per_epoch
  schedule = ts.poly_epoch_schedule(float(tc.lr), float(tc.min_lr), int(tc.epochs),
                                    steps_per_epoch)

  sample_x = jnp.zeros((1, 1) + (2 * stride,) * ndims + (c_in,), jnp.float32)
  abstract = ts.abstract_state(model, config, sample_x)
  state_sh = ts.state_shardings(mesh, abstract)
  ckpt = Checkpointer(workdir, keep=int(tc.keep_ckpts))
  latest = ckpt.latest_step()
  if latest is not None:
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    state, data_states = ckpt.restore(latest, target)
    data_iter.set_state(data_states)
    logging.info("resumed from %s step %d", ckpt.directory, latest)
  else:
    state = ts.create_state(model, config, sample_x, state_sh)
  # Before the step's compilation, which then starts from less resident memory (host_memory.py).
  host_memory.release_after_compile()
  vgg = (jax.device_put(vgg, sharding.replicated(mesh)) if vgg is not None else None)

  batch_ndims = {"src": ndims + 3, "tgt": ndims + 3, "src_code": 2, "tgt_code": 2}
  train_step = ts.make_train_step(model, config, schedule, mesh, state_sh, batch_ndims)
  views = loader.make_eval_views(dataset_dir, "valid", ndims=ndims, c_in=c_in,
                                 valid_size=tuple(tc.valid_size), pad_multiple=stride)
  if int(tc.eval_subjects) > 0:
    views = views[:int(tc.eval_subjects)]
  predictor = validation.Predictor(model, sharding.replicated(mesh))
  log = _Logger(workdir)
  if views and eval_every > 0 and latest is None:
    base = validation.identity_baseline(views, ndims)
    log.scalars(0, {"baseline_psnr_cross": base["psnr"], "baseline_ssim_cross": base["ssim"]})

  step = int(jax.device_get(state["step"]))
  summary: dict[str, Any] = {"step": step}
  last_eval: dict[str, float] = {}
  periodic_done: set[str] = set()
  pending: list = []
  compiled = None
  t_last, step_last = time.time(), step
  bar = tqdm(total=total_steps, initial=step, disable=jax.process_index() != 0,
             desc="train", dynamic_ncols=True)
  try:
    while step < total_steps:
      batch = next(data_iter)
      gbatch = sharding.global_batch(mesh, {k: batch[k] for k in BATCH_KEYS})
      if compiled is None:
        # Compiled ahead of the first step so that what compilation freed, and the compiler's
        # code, go back to the OS before the step's own buffers are allocated (peak RSS; see
        # host_memory.py).
        compiled = ts.compile_step(train_step, state, gbatch, vgg)
        host_memory.release_after_compile()
        # Processes start the first step, whose collectives set up gloo on CPU, together.
        sharding.wait_for_all_processes("train_step_compiled")
      state, metrics = compiled(state, gbatch, vgg)
      pending.append(metrics)
      step += 1
      bar.update(1)
      is_last = step == total_steps
      if step % int(tc.log_steps) == 0 or is_last:
        host = jax.device_get(pending)
        pending = []
        bad = [step - len(host) + 1 + i for i, m in enumerate(host) if not m["finite"]]
        if bad:
          logging.warning("non-finite loss/gradient at steps %s: updates skipped", bad)
        streak = int(jax.device_get(state["nonfinite"]))
        if streak >= int(tc.max_nonfinite):
          raise FloatingPointError(
              f"{streak} non-finite steps in a row (up to step {step}, "
              f"config.train.max_nonfinite={tc.max_nonfinite}); the last checkpoint "
              f"({ckpt.latest_step()}) holds finite params")
        finite = [m for m in host if m["finite"]] or host
        now = time.time()
        scalars = {f"train_{k}": float(np.mean([m[k] for m in finite]))
                   for k in ("loss", "rec", "cyc", "per")}
        scalars["lr"] = float(host[-1]["lr"])
        scalars["steps_per_sec"] = (step - step_last) / max(now - t_last, 1e-9)
        scalars["nonfinite_steps"] = float(len(bad))
        t_last, step_last = now, step
        log.scalars(step, scalars)
        bar.set_postfix(loss=f"{scalars['train_loss']:.4f}", rec=f"{scalars['train_rec']:.4f}")
      metrics_at_step = None
      periodic = set()  # which of validation, samples and checkpoint ran at this step
      if views and eval_every > 0 and (step % eval_every == 0 or is_last):
        periodic.add("eval")
        last_eval = validation.validate(predictor, {"params": state["params"]}, views, c_s)
        log.scalars(step, {f"eval_{k}": v for k, v in last_eval.items() if k != "pairs"})
        metrics_at_step = {"eval_psnr": last_eval["psnr"]}
        bar.write(f"step {step}: eval PSNR {last_eval['psnr']:.2f} SSIM {last_eval['ssim']:.4f} "
                  f"(src != tgt: {last_eval['psnr_cross']:.2f} / {last_eval['ssim_cross']:.4f})")
      if int(tc.vis_steps) > 0 and views and (step % int(tc.vis_steps) == 0 or is_last):
        periodic.add("vis")
        rows = validation.sample_rows(predictor, {"params": state["params"]}, views[0], c_s,
                                      meta["sequences"])
        if jax.process_index() == 0:
          visualize.save_grid(rows, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
      if step % int(tc.ckpt_steps) == 0 or is_last:
        periodic.add("ckpt")
        ckpt.save(step, state, data_iter.global_state(), metrics=metrics_at_step)
        _maybe_inject_fault(step, ckpt)
      if periodic - periodic_done:
        # Their first run compiled (predictor, sample rows) and touched compiler code and
        # scratch memory that later runs do not need resident (host_memory.py).
        periodic_done |= periodic
        host_memory.release_after_compile()
  finally:
    bar.close()
    ckpt.close()
    log.close()
  summary.update(step=step, best_step=ckpt.best_step(), steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps)
  if last_eval:
    summary.update({f"eval_{k}": v for k, v in last_eval.items() if k != "pairs"})
  return summary
