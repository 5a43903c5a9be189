"""Dataset layouts -> per-subject file lists, and reading/validating one subject's NIfTI files.

Two layouts (see README.md):
  * 'brats': `<root>/<name>/<name>_<seq>.nii.gz` plus split CSVs of lines `name,mask`, where the
    mask written in binary with len(sequences) digits has digit i (from the left) = 1 when
    sequence i is available (the official `bin(mask)[2:].zfill(4)`).
  * 'dataset_json': an nnU-Net-style JSON naming the sequences in order and, per subject, the
    file of each sequence present; a dynamic sequence is one 4D NIfTI or a list of 3D files,
    one per phase. Splits come from its "splits" entry or from the split CSVs.

Arrays follow SimpleITK's order, as the official code reads them: nibabel's (x, y, z[, t])
transposed to ([t,] z, y, x); we always return [t, D, H, W] with t = 1 for static sequences.
"""
import csv
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np


class SubjectError(ValueError):
  """Bad input for one subject; the message names the subject and the file."""

  def __init__(self, subject: str, path: str, reason: str):
    super().__init__(f"subject {subject!r}, file {path}: {reason}")
    self.subject, self.path, self.reason = subject, path, reason


@dataclasses.dataclass
class SubjectSpec:
  """Where one subject's data lives. files[seq] is one path (3D or 4D) or one path per phase."""
  name: str
  files: Dict[str, List[str]]
  available: List[int]
  source: str  # the split CSV or dataset.json naming the subject, for error messages
  error: Optional[str] = None  # a problem found while listing, reported when it is loaded


def parse_mask(mask: str, n: int, name: str, path: str) -> List[int]:
  try:
    value = int(str(mask).strip())
  except ValueError as e:
    raise SubjectError(name, path, f"mask {mask!r} is not an integer") from e
  if value < 0 or value >= 2 ** n:
    raise SubjectError(name, path, f"mask {value} out of range for {n} sequences")
  return [int(c) for c in bin(value)[2:].zfill(n)]


def read_split_csv(path: str, n_seq: int) -> List[Tuple[str, List[int]]]:
  """Reads `name,mask` lines (no header) -> [(name, availability bits)]."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"split CSV {path} does not exist")
  out = []
  with open(path, newline="") as f:
    for row in csv.reader(f):
      if not row or not row[0].strip():
        continue
      if len(row) < 2:
        raise SubjectError(row[0], path, "split CSV line has no mask column (want name,mask)")
      out.append((row[0].strip(), parse_mask(row[1], n_seq, row[0].strip(), path)))
  return out


def brats_specs(root: str, csv_path: str, sequences: Sequence[str]) -> List[SubjectSpec]:
  """Subjects of one split in the BraTS layout. A subject folder that is absent is reported by
  `load_subject` (so that on_error='skip' can skip it like any other bad subject)."""
  specs = []
  for name, bits in read_split_csv(csv_path, len(sequences)):
    files = {}
    for s in sequences:
      files[s] = [os.path.join(root, name, f"{name}_{s}.nii.gz")]
    spec = SubjectSpec(name, files, bits, csv_path)
    if not os.path.isdir(os.path.join(root, name)):
      spec.error = f"named in the split CSV but folder {os.path.join(root, name)} does not exist"
    specs.append(spec)
  return specs


def dataset_json_specs(json_path: str, sequences: Optional[Sequence[str]], split: str,
                       csv_path: Optional[str] = None,
                       root: Optional[str] = None) -> Tuple[List[str], List[SubjectSpec]]:
  """Subjects of one split of a dataset.json layout -> (sequence names, specs).

  Format: {"sequences": [...], "subjects": [{"name": ..., "files": {seq: path | [paths]},
  "available": [0/1...] (optional)}], "splits": {"train": [names], ...} (optional)}. Relative
  paths are relative to `root` (default: the JSON's folder).
  """
  with open(json_path) as f:
    desc = json.load(f)
  seqs = list(desc.get("sequences") or [])
  if not seqs:
    raise ValueError(f"{json_path}: 'sequences' must list the sequence names in code order")
  if sequences and list(sequences) != seqs:
    raise ValueError(f"{json_path}: sequences {seqs} differ from the config's {list(sequences)}")
  base = root or os.path.dirname(os.path.abspath(json_path))
  by_name = {}
  for entry in desc.get("subjects", []):
    name = entry.get("name")
    if not name:
      raise ValueError(f"{json_path}: a subject entry has no 'name': {entry}")
    files, error = {}, None
    for key, val in (entry.get("files") or {}).items():
      if key not in seqs:
        error = f"unknown sequence name {key!r} in 'files' (known: {seqs})"
        continue
      paths = [val] if isinstance(val, str) else list(val)
      files[key] = [p if os.path.isabs(p) else os.path.join(base, p) for p in paths]
    avail = entry.get("available")
    avail = [int(s in files) for s in seqs] if avail is None else [int(a) for a in avail]
    if len(avail) != len(seqs):
      raise SubjectError(name, json_path, f"'available' has {len(avail)} entries, want {len(seqs)}")
    by_name[name] = SubjectSpec(name, files, avail, json_path, error)
  if "splits" in desc:
    names = [(n, None) for n in desc["splits"].get(split, [])]
    source = json_path
  elif csv_path:
    names = read_split_csv(csv_path, len(seqs))
    source = csv_path
  else:  # this split is simply not configured
    return seqs, []
  specs = []
  for name, bits in names:
    if name not in by_name:
      specs.append(SubjectSpec(name, {}, bits or [0] * len(seqs), source,
                               f"named in the split but absent from {json_path}"))
      continue
    spec = dataclasses.replace(by_name[name], source=source if by_name[name].error is None
                               else json_path)
    if bits is not None:  # the CSV may only narrow what the JSON says is there
      spec.available = [a & b for a, b in zip(spec.available, bits)]
    specs.append(spec)
  return seqs, specs


def _read_nifti(name: str, path: str) -> Tuple[np.ndarray, np.ndarray, Tuple[int, ...]]:
  """-> (array in SimpleITK order, affine, nibabel shape); errors name subject and file."""
  if not os.path.isfile(path):
    raise SubjectError(name, path, "file not found")
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # nibabel/gzip/zlib raise many types for damaged files
    raise SubjectError(name, path, f"unreadable NIfTI ({type(e).__name__}: {e})") from e
  if data.ndim not in (3, 4):
    raise SubjectError(name, path, f"expected a 3D or 4D volume, got shape {data.shape}")
  if not np.all(np.isfinite(data)):
    raise SubjectError(name, path, f"{int(np.sum(~np.isfinite(data)))} NaN/Inf voxels")
  return data.T, np.asarray(img.affine, np.float64), tuple(int(s) for s in data.shape)


def load_subject(spec: SubjectSpec, sequences: Sequence[str], want: Sequence[int]):
  """Reads the sequences flagged in `want` (files that must exist) plus any other present file.

  Returns (volumes {seq: [t, D, H, W] native dtype}, affine, nibabel shape of the first
  sequence, first file per sequence). Raises SubjectError for missing/unreadable files and
  shape or affine mismatches between the subject's sequences.
  """
  if spec.error:
    raise SubjectError(spec.name, spec.source, spec.error)
  if not any(spec.available):
    raise SubjectError(spec.name, spec.source, "no available sequence (mask is 0)")
  vols, ref, paths = {}, None, {}
  for i, s in enumerate(sequences):
    files = spec.files.get(s, [])
    if not files:
      if want[i]:
        raise SubjectError(spec.name, spec.source, f"no file given for available sequence {s!r}")
      continue
    if not want[i] and not all(os.path.exists(p) for p in files):
      continue  # an unavailable sequence without its file is simply absent
    phases = []
    for p in files:
      arr, aff, shape = _read_nifti(spec.name, p)
      if len(files) > 1 and arr.ndim != 3:
        raise SubjectError(spec.name, p, f"phase files must be 3D, got shape {shape}")
      if ref is None:
        ref = (arr.shape[-3:], aff, shape[:3], p)
      elif arr.shape[-3:] != ref[0]:
        raise SubjectError(spec.name, p, f"shape {shape[:3]} differs from {ref[2]} of {ref[3]}")
      elif not np.allclose(aff, ref[1], rtol=0, atol=1e-4):
        raise SubjectError(spec.name, p,
                           f"affine differs from that of {ref[3]}:\n{aff}\nvs\n{ref[1]}")
      phases.append(arr if arr.ndim == 4 else arr[None])
    vols[s] = np.concatenate(phases, axis=0) if len(phases) > 1 else phases[0]
    paths[s] = files[0]
  return vols, ref[1], ref[2], paths
