"""The prepared dataset: subject record schema, metadata, per-split sources.

A record is a msgpack map whose arrays are stored as {dtype, shape, data} maps (numeric dtypes
only, raw bytes), so a prepared dataset can never execute code when read. Schema:

  name:            str, the subject id.
  sequences:       list[str], every sequence name of the dataset in code order.
  available:       list[int] (0/1 per sequence), what the split CSV says may be used as input.
  present:         list[int] (0/1 per sequence), which volumes are stored in this record.
  volumes:         {sequence: array}, normalised [t, D, H, W] (t = phases, 1 if static),
                   stored as float16 (or int16 with `storage_scale`, or float32).
  scale:           {sequence: float}, the normalisation parameters' scale (official: a =
                   2 * p99), so `denormalize` maps predictions back to the input intensities.
  offset:          {sequence: float}, the normalisation offset (0 for the official scheme).
  affine:          array, the 4x4 float64 affine of the NIfTI files (nibabel convention).
  original_shape:  list[int], nibabel spatial shape (x, y, z) of the input files.
  depth_start:     int, first kept slice of the array's depth axis (central crop offset).
  storage_scale:   float, multiply stored values by this (1 except for int16 storage).
  normalization:   str, the scheme (see normalization.py); version: int, RECORD_VERSION.
"""
import json
import os
from typing import Any, Dict, List

import grain
import msgpack
import numpy as np

RECORD_VERSION = 2
_INT16_SCALE = 1.0 / 32767.0


_ARRAY_KINDS = "biuf"  # numbers only: an object dtype could smuggle pickled data


def encode_array(arr: np.ndarray) -> Dict[str, Any]:
  """-> {dtype, shape, data}: raw little-endian bytes, decoded without any parsing.

  Not `.npy` bytes: np.load parses the header with ast.literal_eval, and CPython 3.11 corrupts
  its AST state when two threads parse at once (loader prefetch threads), after which any
  ast.parse in the process can raise "SystemError: AST constructor recursion depth mismatch".
  """
  arr = np.asarray(arr)
  if arr.dtype.kind not in _ARRAY_KINDS:
    raise ValueError(f"only numeric arrays can be stored, got dtype {arr.dtype}")
  arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
  return {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}


def decode_array(enc: Dict[str, Any]) -> np.ndarray:
  dtype = np.dtype(enc["dtype"])
  if dtype.kind not in _ARRAY_KINDS:
    raise ValueError(f"refusing to decode an array of dtype {dtype} (numbers only)")
  return np.frombuffer(enc["data"], dtype=dtype).reshape(enc["shape"])


def store_volume(vol: np.ndarray, dtype: str) -> np.ndarray:
  """Casts a normalised float32 volume to the storage dtype.

  int16 storage maps [-1, 1] linearly onto [-32767, 32767]; it is exact to 1.5e-5, which is
  finer than float16's 4.9e-4 spacing near 1, at the same size.
  """
  if dtype == "float32":
    return vol.astype(np.float32)
  if dtype == "float16":
    return vol.astype(np.float16)
  if dtype == "int16":
    return np.round(np.clip(vol, -1.0, 1.0) / _INT16_SCALE).astype(np.int16)
  raise ValueError(f"unknown storage dtype {dtype!r} (float16, int16 or float32)")


def storage_scale(dtype: str) -> float:
  return _INT16_SCALE if dtype == "int16" else 1.0


def encode_record(rec: Dict[str, Any]) -> bytes:
  """Encodes a subject record (see module docstring)."""
  out = dict(rec)
  out["volumes"] = {k: encode_array(v) for k, v in rec["volumes"].items()}
  out["affine"] = encode_array(np.asarray(rec["affine"], np.float64))
  out["version"] = RECORD_VERSION
  return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes, as_float32: bool = True) -> Dict[str, Any]:
  """Decodes a record; volumes come back as float32 [t, D, H, W] unless `as_float32` is False."""
  rec = msgpack.unpackb(data, raw=False)
  if rec.get("version") != RECORD_VERSION:
    raise ValueError(f"record of subject {rec.get('name')!r} has version {rec.get('version')}, "
                     f"this code reads version {RECORD_VERSION}; re-run input_pipeline.prepare")
  vols = {k: decode_array(v) for k, v in rec["volumes"].items()}
  if as_float32:
    s = rec["storage_scale"]
    vols = {k: (v.astype(np.float32) * np.float32(s) if s != 1.0 else v.astype(np.float32))
            for k, v in vols.items()}
  rec["volumes"] = vols
  rec["affine"] = decode_array(rec["affine"]).copy()
  return rec

METADATA = "metadata.json"


def load_metadata(dataset_dir: str) -> Dict[str, Any]:
  """metadata.json of a prepared dataset; refuses folders that `prepare` has not finished."""
  path = os.path.join(dataset_dir, METADATA)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{dataset_dir} is not a complete prepared dataset (no {METADATA}); "
        "run `python -m input_pipeline.prepare` (half-finished runs live in *.tmp-* folders)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("record_version") != RECORD_VERSION:
    raise ValueError(f"{dataset_dir} holds record version {meta.get('record_version')}, this "
                     f"code reads {RECORD_VERSION}; prepare it again")
  return meta


def shard_paths(dataset_dir: str, split: str, meta=None) -> List[str]:
  meta = meta or load_metadata(dataset_dir)
  if split not in meta["splits"] or not meta["splits"][split]["shards"]:
    raise ValueError(f"{dataset_dir} has no subjects in split {split!r} "
                     f"(splits: { {k: v['count'] for k, v in meta['splits'].items()} })")
  return [os.path.join(dataset_dir, s) for s in meta["splits"][split]["shards"]]


def split_source(dataset_dir: str, split: str, meta=None) -> grain.sources.ArrayRecordDataSource:
  """Random-access source of the encoded subject records of one split, in prepare's order."""
  return grain.sources.ArrayRecordDataSource(shard_paths(dataset_dir, split, meta))


def read_subjects(dataset_dir: str, split: str) -> List[Dict[str, Any]]:
  """Every decoded record of a split (volumes as float32); for evaluation and tests."""
  src = split_source(dataset_dir, split)
  return [decode_record(src[i]) for i in range(len(src))]
