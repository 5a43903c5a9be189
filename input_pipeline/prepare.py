"""Preprocess a NIfTI dataset once into ArrayRecord shards: `python -m input_pipeline.prepare`.

Output folder: `<split>-NNNNN.array_record` shards of subject records (schema in dataset.py)
and `metadata.json`, written last. The folder is built under a temporary name beside the
destination and renamed when complete, so a half-finished run is never read as a dataset
(`dataset.load_metadata` also insists on `metadata.json`). The destination's default name holds
a hash of the inputs (paths, sizes, mtimes, split files) and settings; preparing again with the
same inputs finds the complete folder and returns at once.
"""
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
import warnings
from typing import Dict, List, Optional, Tuple

import ml_collections
import numpy as np
from tqdm import tqdm

from input_pipeline import dataset, normalization, readers

PREPARE_VERSION = 1
SPLITS = ("train", "valid", "test")


class PrepareError(ValueError):
  """A subject failed and data.on_error is 'raise'; the message names the subject and file."""


@dataclasses.dataclass(frozen=True)
class Settings:
  sequences: Tuple[str, ...]
  depth: int
  normalization: str
  dtype: str


def _central_depth(d: int, depth: int) -> int:
  """First kept slice: the official `(d - nd) // 2 if d > nd else 0`."""
  return (d - depth) // 2 if depth and d > depth else 0


def process_subject(spec: readers.SubjectSpec, split: str, st: Settings):
  """Reads, validates, normalises and encodes one subject. Runs in worker processes, so
  failures come back as ('error', name, message) rather than as exceptions."""
  try:
    want = spec.available
    vols, affine, shape, paths = readers.load_subject(spec, st.sequences, want)
    if split == "train":  # training must not see what the split calls missing
      vols = {s: v for s, v in vols.items() if want[st.sequences.index(s)]}
    out, scale, offset = {}, {}, {}
    d0 = _central_depth(next(iter(vols.values())).shape[1], st.depth)
    for s, v in vols.items():
      try:
        norm, scale[s], offset[s] = normalization.normalize(v, st.normalization)
      except normalization.NormalizationError as e:
        raise readers.SubjectError(spec.name, paths[s], str(e)) from e
      if st.depth:
        norm = norm[:, d0:d0 + st.depth]
      out[s] = dataset.store_volume(norm, st.dtype)
    rec = dict(name=spec.name, sequences=list(st.sequences), available=list(want),
               present=[int(s in out) for s in st.sequences], volumes=out, scale=scale,
               offset=offset, affine=affine, original_shape=list(shape), depth_start=d0,
               storage_scale=dataset.storage_scale(st.dtype), normalization=st.normalization)
    info = dict(name=spec.name, shape=list(next(iter(out.values())).shape[1:]),
                phases={s: int(v.shape[0]) for s, v in out.items()},
                available=list(want), present=rec["present"])
    return "ok", spec.name, dataset.encode_record(rec), info
  except readers.SubjectError as e:
    return "error", spec.name, str(e), None
  except Exception as e:  # anything else still names the subject
    return "error", spec.name, f"subject {spec.name!r}: {type(e).__name__}: {e}", None


def _process_star(args):
  return process_subject(*args)


def collect_specs(cfg) -> Tuple[List[str], Dict[str, List[readers.SubjectSpec]]]:
  """The subjects of every configured split, per the layout."""
  seqs = list(cfg.sequences)
  specs = {}
  csvs = {"train": cfg.get("train_csv"), "valid": cfg.get("valid_csv"), "test": cfg.get("test_csv")}
  for split in SPLITS:
    if cfg.layout in ("brats", "toy"):
      if csvs[split]:
        specs[split] = readers.brats_specs(cfg.root, csvs[split], seqs)
    elif cfg.layout == "dataset_json":
      seqs, sp = readers.dataset_json_specs(cfg.dataset_json, seqs or None, split,
                                            csvs[split] or None, cfg.get("root") or None)
      if sp:
        specs[split] = sp
    else:
      raise ValueError(f"unknown data.layout {cfg.layout!r} (brats, dataset_json, toy)")
  if not any(specs.values()):
    raise ValueError("no subjects: configure split CSVs (or 'splits' in dataset.json)")
  return seqs, specs


def input_hash(cfg, seqs, specs) -> str:
  """Hash of settings, split membership and every input file's path, size and mtime."""
  h = hashlib.sha256()
  keys = ("layout", "depth", "normalization", "dtype", "on_error", "records_per_shard")
  h.update(json.dumps([PREPARE_VERSION, dataset.RECORD_VERSION, seqs,
                       {k: cfg.get(k) for k in keys}], sort_keys=True).encode())
  for split, sp in sorted(specs.items()):
    for s in sp:
      h.update(json.dumps([split, s.name, s.available, s.source]).encode())
      for seq in seqs:
        for p in s.files.get(seq, []):
          try:
            stt = os.stat(p)
            h.update(f"{p}|{stt.st_size}|{stt.st_mtime_ns}".encode())
          except OSError:
            h.update(f"{p}|absent".encode())
  return h.hexdigest()


def _existing_hash(out_dir: str) -> Optional[str]:
  try:
    with open(os.path.join(out_dir, "metadata.json")) as f:
      return json.load(f).get("input_hash")
  except (OSError, ValueError):
    return None


def _resolve_toy(cfg) -> ml_collections.ConfigDict:
  from input_pipeline import toy  # local import: the generator is only needed for 'toy'
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  dyn = bool(cfg.get("toy_dynamic", False))
  root = os.path.join(cfg.cache_dir, "toy", f"toy-n{cfg.toy_subjects}-s{cfg.toy_size}"
                      f"-seed{cfg.toy_seed}{'-dyn' if dyn else ''}")
  if not os.path.isfile(os.path.join(root, "toy.json")):
    toy.make_toy_dataset(root, cfg.toy_subjects, cfg.toy_seed, size=cfg.toy_size, dynamic=dyn,
                         num_workers=cfg.get("num_workers", 0))
  with open(os.path.join(root, "toy.json")) as f:
    cfg.sequences = tuple(json.load(f)["sequences"])
  cfg.root = root
  for split in SPLITS:
    cfg[f"{split}_csv"] = os.path.join(root, f"{split}.csv")
  return cfg


def prepare(data_cfg, out_dir: Optional[str] = None) -> str:
  """Prepares the dataset described by `data_cfg` (see config.py); returns its folder.

  Bad subjects raise `PrepareError` ("subject 'NAME', file PATH: reason"), or with
  data_cfg.on_error == 'skip' are left out with a warning listing them. Nothing is renamed into
  place before every split is complete.
  """
  cfg = _resolve_toy(data_cfg) if data_cfg.layout == "toy" else data_cfg
  if cfg.get("on_error", "raise") not in ("raise", "skip"):
    raise ValueError(f"data.on_error must be 'raise' or 'skip', got {cfg.on_error!r}")
  seqs, specs = collect_specs(cfg)
  digest = input_hash(cfg, seqs, specs)
  if out_dir is None:
    out_dir = os.path.join(cfg.cache_dir, "prepared", f"{cfg.layout}-{digest[:16]}")
  out_dir = os.path.abspath(out_dir)
  if _existing_hash(out_dir) == digest:
    logging.info("prepared dataset %s is up to date", out_dir)
    return out_dir
  st = Settings(tuple(seqs), int(cfg.depth or 0), cfg.normalization, cfg.dtype)
  dataset.store_volume(np.zeros(1, np.float32), st.dtype)  # fail fast on a bad dtype
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = f"{out_dir}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    meta = _write_splits(cfg, st, specs, tmp)
    meta.update(version=PREPARE_VERSION, record_version=dataset.RECORD_VERSION,
                input_hash=digest, layout=cfg.layout, sequences=seqs, depth=st.depth,
                normalization=st.normalization, dtype=st.dtype,
                storage_scale=dataset.storage_scale(st.dtype), created=time.time())
    with open(os.path.join(tmp, "metadata.json"), "w") as f:
      json.dump(meta, f, indent=1)
    _swap_into_place(tmp, out_dir, digest)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _swap_into_place(tmp: str, out_dir: str, digest: str) -> None:
  """Renames tmp to out_dir. Leaves an identical dataset finished meanwhile by a concurrent run
  (e.g. another host) in place, since readers may already have it open."""
  if _existing_hash(out_dir) == digest:
    return
  old = None
  if os.path.exists(out_dir):
    old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
  try:
    os.rename(tmp, out_dir)
  except OSError:
    if _existing_hash(out_dir) != digest:  # else a concurrent run finished the same dataset
      raise
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _write_splits(cfg, st: Settings, specs, tmp: str) -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter
  nw = int(cfg.get("num_workers", 0) or 0) or (os.cpu_count() or 1)
  per_shard = int(cfg.get("records_per_shard", 64))
  meta = dict(splits={}, skipped=[])
  phases: Dict[str, int] = {}
  total = sum(len(v) for v in specs.values())
  jobs = [(s, split, st) for split, sp in specs.items() for s in sp]
  ex = None
  if nw > 1 and total > 1:
    ex = cf.ProcessPoolExecutor(min(nw, total), mp_context=multiprocessing.get_context("spawn"))
    results = ex.map(_process_star, jobs, chunksize=1)
  else:
    results = map(_process_star, jobs)
  writer, split_of = None, None
  try:
    bar = tqdm(total=total, desc="prepare", unit="subject", disable=None)
    for (spec, split, _), (status, name, payload, info) in zip(jobs, results):
      bar.update(1)
      entry = meta["splits"].setdefault(split, dict(count=0, shards=[], subjects=[]))
      if status == "ok":
        for s, t in info["phases"].items():
          if phases.setdefault(s, t) != t:
            status = "error"
            payload = (f"subject {name!r}, file {spec.files[s][0]}: sequence {s!r} has {t} "
                       f"phases, other subjects have {phases[s]}")
      if status == "error":
        if cfg.get("on_error", "raise") == "raise":
          raise PrepareError(payload)
        meta["skipped"].append(dict(split=split, name=name, reason=payload))
        continue
      if writer is None or split_of != split or entry["count"] % per_shard == 0:
        if writer is not None:
          writer.close()
        fname = f"{split}-{len(entry['shards']):05d}.array_record"
        writer = ArrayRecordWriter(os.path.join(tmp, fname), "group_size:1,uncompressed")
        entry["shards"].append(fname)
        split_of = split
      writer.write(payload)
      entry["count"] += 1
      entry["subjects"].append(info)
    bar.close()
  finally:
    if writer is not None:
      writer.close()
    if ex is not None:
      ex.shutdown(cancel_futures=True)
  meta["phases"] = {s: phases.get(s, 1) for s in st.sequences}
  if meta["skipped"]:
    listing = "; ".join(f"{d['split']}/{d['name']}: {d['reason']}" for d in meta["skipped"])
    warnings.warn(f"skipped {len(meta['skipped'])} subject(s): {listing}")
    logging.warning("skipped subjects: %s", listing)
  return meta


def main(argv):
  """CLI: `python -m input_pipeline.prepare --config=configs/x.py [--config.data.root=...]`."""
  del argv
  cfg = _CONFIG.value
  data = cfg.data if cfg is not None and "data" in cfg else cfg
  if data is None:
    from input_pipeline import config as config_lib
    data = config_lib.default_data_config()
  data = ml_collections.ConfigDict(data.to_dict())
  for name in ("layout", "root", "cache_dir", "train_csv", "valid_csv", "test_csv",
               "dataset_json", "on_error", "dtype"):
    val = getattr(flags.FLAGS, name)
    if val:
      data[name] = val
  if flags.FLAGS.num_workers is not None:
    data.num_workers = flags.FLAGS.num_workers
  if flags.FLAGS.sequences:
    data.sequences = tuple(flags.FLAGS.sequences)
  print(prepare(data, flags.FLAGS.out_dir or None))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Python config file; its `data` block (or the whole config) is used.")
  flags.DEFINE_string("out_dir", "", "Destination (default: <cache_dir>/prepared/<layout>-<hash>).")
  for _name in ("layout", "root", "cache_dir", "train_csv", "valid_csv", "test_csv",
                "dataset_json", "on_error", "dtype"):
    flags.DEFINE_string(_name, "", f"Overrides data.{_name}.")
  flags.DEFINE_integer("num_workers", None, "Overrides data.num_workers (0: one per core).")
  flags.DEFINE_list("sequences", [], "Overrides data.sequences (comma separated, code order).")
  app.run(main)
