"""Synthesise the missing sequences of a new subject from whatever sequences it has.

    python main.py --mode=predict --config=configs/toy.py --workdir=DIR \
        --input=SUBJECT_DIR_OR_FILES --output=OUT_DIR [--md] [--checkpoint_step=N]

`--input` is a folder or a comma-separated list of NIfTI files. A file belongs to sequence
`s` when its name (without `.nii`/`.nii.gz`) is `s` or ends with `_s` (the BraTS layout
`<name>_<seq>.nii.gz`), or when it is given as `s=PATH`; files of no known sequence (masks,
segmentations) are skipped with a warning. The model's sequences (names, code order, phase
counts) are those of the dataset it was trained on (the prepared dataset's metadata).

Each input volume is normalised as in training (`config.data.normalization`, on the whole
volume: no depth crop). Every missing sequence is predicted from every present one and the
predictions are averaged (each source alone is a valid estimate; the mean is less noisy), then
written as float32 NIfTI with the input's affine and shape:

- intensity: the missing sequence's own normalisation scale is unknown (it would come from
  its own 99th percentile), so the inverse normalisation uses the scale and offset of the
  first present source in code order, i.e. `(y + 1) / 2 · 2·p99(source)` for the official
  scheme. Values are therefore on the source's intensity scale, in [0, 2·p99(source)]; the
  scale used is written to `<subject>_predict.json`.
- `--md` also writes M_d for every present sequence (mean over present sources, itself
  included, of |G(source, code) − sequence|, in normalised units) as `<subject>_md_<seq>.nii.gz`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from input_pipeline import geometry
from input_pipeline import normalization
from input_pipeline import readers
from seq2seq_jax import analysis
from seq2seq_jax.evaluate import save_nifti
from seq2seq_jax.inference import VolumeInference
from seq2seq_jax.models import Generator


class PredictError(ValueError):
  """Bad input for prediction (names the file or the problem)."""


def _stem(path: str) -> str:
  base = os.path.basename(path)
  for ext in (".nii.gz", ".nii"):
    if base.endswith(ext):
      return base[:-len(ext)]
  return base


def resolve_inputs(inputs: str | Sequence[str], sequences: Sequence[str]) -> tuple[str, dict]:
  """(subject name, {sequence: path}) from a folder or a list of files (see module doc)."""
  if isinstance(inputs, str):
    if os.path.isdir(inputs):
      subject = os.path.basename(os.path.normpath(inputs))
      entries = sorted(os.path.join(inputs, f) for f in os.listdir(inputs)
                       if f.endswith((".nii", ".nii.gz")))
      if not entries:
        raise PredictError(f"input folder {inputs}: no .nii/.nii.gz file")
    else:
      entries = [e.strip() for e in inputs.split(",") if e.strip()]
      subject = None
  else:
    entries, subject = list(inputs), None
  files: dict[str, str] = {}
  # Longest names first, so that `x_t1ce` is never taken for `t1`.
  by_len = sorted(sequences, key=len, reverse=True)
  for e in entries:
    if "=" in e and not os.path.exists(e):
      seq, path = e.split("=", 1)
      if seq not in sequences:
        raise PredictError(f"input {e!r}: {seq!r} is not one of the model's sequences "
                           f"{list(sequences)}")
    else:
      path, stem = e, _stem(e)
      seq = next((s for s in by_len if stem == s or stem.endswith("_" + s)), None)
      if seq is None:
        logging.warning("predict: %s matches none of the sequences %s; skipped", path,
                        list(sequences))
        continue
    if not os.path.isfile(path):
      raise PredictError(f"input file {path} (sequence {seq!r}) not found")
    if seq in files:
      raise PredictError(f"two inputs for sequence {seq!r}: {files[seq]} and {path}")
    files[seq] = path
  if not files:
    raise PredictError(f"none of the model's sequences {list(sequences)} found in the input "
                       f"{inputs!r} (files are matched by name: <name>_<seq>.nii.gz, "
                       f"<seq>.nii.gz, or seq=PATH)")
  if subject is None:
    seq0, path0 = next(iter(files.items()))
    stem = _stem(path0)
    subject = stem[:-len(seq0) - 1] if stem.endswith("_" + seq0) else "subject"
  return subject, files


def read_inputs(subject: str, files: Mapping[str, str]):
  """Volumes in stored order `[t, D, H, W]`, the affine and nibabel shape; checks that every
  sequence shares the first one's shape and affine."""
  vols, ref = {}, None
  for seq, path in files.items():
    try:
      arr, aff, shape = readers._read_nifti(subject, path)
    except readers.SubjectError as e:
      raise PredictError(str(e)) from e
    if ref is None:
      ref = (arr.shape[-3:], aff, shape[:3], path)
    elif arr.shape[-3:] != ref[0]:
      raise PredictError(f"{path}: shape {shape[:3]} differs from {ref[2]} of {ref[3]} "
                         f"(all sequences of a subject must share one grid)")
    elif not np.allclose(aff, ref[1], rtol=0, atol=1e-4):
      raise PredictError(f"{path}: affine differs from that of {ref[3]}:\n{aff}\nvs\n{ref[1]}")
    vols[seq] = arr if arr.ndim == 4 else arr[None]
  return vols, ref[1], ref[2]


def predict_subject(model: Generator, variables: Mapping[str, Any], sequences: Sequence[str],
                    phases: Mapping[str, int], inputs, out_dir: str,
                    normalization_scheme: str = "official", md: bool = False,
                    batch_size: int = 16, patch: Sequence[int] | None = None) -> dict:
  """Writes every missing sequence (and M_d with `md`) for one subject; returns a summary.

  Args:
    model, variables: the generator and `{'params': ...}`.
    sequences: the model's sequences in code order; `phases`: images per sequence.
    inputs: a folder, a comma-separated string, or a list of paths / `seq=PATH`.
    out_dir: output folder (created).
  """
  subject, files = resolve_inputs(inputs, sequences)
  raw, affine, shape = read_inputs(subject, files)
  for s, v in raw.items():
    if v.shape[0] != int(phases.get(s, 1)):
      raise PredictError(f"{files[s]}: {v.shape[0]} image(s) but the model's sequence {s!r} "
                         f"has {phases.get(s, 1)}")
  code = {s: i for i, s in enumerate(sequences)}
  norm, scale, offset = {}, {}, {}
  for s, v in raw.items():
    try:
      norm[s], scale[s], offset[s] = normalization.normalize(v, normalization_scheme)
    except normalization.NormalizationError as e:
      raise PredictError(f"{files[s]}: cannot normalise ({e})") from e
  present = [s for s in sequences if s in norm]
  missing = [s for s in sequences if s not in norm]
  targets = missing + (present if md else [])
  inf = VolumeInference(model, variables, batch_size=batch_size, patch=patch)
  preds = {s: inf.predict(norm[s], [(code[t], int(phases.get(t, 1))) for t in targets])
           for s in present}
  os.makedirs(out_dir, exist_ok=True)
  ref = present[0]
  written = {}
  to_nii = lambda x: geometry.to_nifti_array(x, shape, 0)
  for t in missing:
    y = np.mean([preds[s][code[t]] for s in present], axis=0)
    y = normalization.denormalize(y, scale[ref], offset[ref], normalization_scheme)
    path = os.path.join(out_dir, f"{subject}_{t}.nii.gz")
    save_nifti(path, to_nii(y.astype(np.float32)), affine)
    written[t] = path
  if md:
    for t in present:
      m = analysis.md_map([preds[s][code[t]] for s in present], norm[t])
      path = os.path.join(out_dir, f"{subject}_md_{t}.nii.gz")
      save_nifti(path, to_nii(m), affine)
      written[f"md_{t}"] = path
  summary = {"subject": subject, "inputs": files, "present": present, "missing": missing,
             "written": written, "intensity_reference": ref, "scale": scale[ref],
             "offset": offset[ref], "normalization": normalization_scheme}
  tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{subject}_predict.json")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, f"{subject}_predict.json"))
  return summary


def predict(config, workdir: str, inputs: str, output: str, checkpoint_step: int | None = None,
            md: bool = False) -> dict:
  """The `--mode=predict` entry: model from `workdir`, sequences from the prepared data."""
  from input_pipeline import dataset as dataset_lib
  from seq2seq_jax import data as data_lib
  from seq2seq_jax.evaluate import load_model
  model, variables, _ = load_model(config, os.path.expanduser(workdir), checkpoint_step)
  meta = dataset_lib.load_metadata(data_lib.prepare_data(config))
  sequences = list(meta["sequences"])
  phases = {s: int(meta.get("phases", {}).get(s, 1)) for s in sequences}
  patch = tuple(config.train.valid_size) if int(config.model.ndims) == 3 else None
  return predict_subject(model, variables, sequences, phases, inputs, output,
                         normalization_scheme=str(config.data.normalization), md=md,
                         patch=patch)
