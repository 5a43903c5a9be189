"""Reading a prepared dataset: metadata, per-split grain sources, decoded subject records."""
import json
import os
from typing import Any, Dict, List

import grain

from input_pipeline import records

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
  if meta.get("record_version") != records.RECORD_VERSION:
    raise ValueError(f"{dataset_dir} holds record version {meta.get('record_version')}, this "
                     f"code reads {records.RECORD_VERSION}; prepare it again")
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
  return [records.decode_record(src[i]) for i in range(len(src))]
