"""grain loaders: resumable training batches and centre-cropped evaluation views.

Training stream (per process): the split's subjects, sharded by `process_index::process_count`,
shuffled with the seed (a new order every epoch) and repeated forever, form a sequence of
subject visits; visit v yields examples v*rep_step .. v*rep_step + rep_step-1, and batch k
holds examples k*b .. k*b + b-1. Every random choice is drawn from a generator seeded by
(seed, process_index, example or visit number), so batch k is a pure function of k: the grain
iterator's state is just the next batch index, and a restored iterator continues with the very
batches an uninterrupted run would have produced, whatever the prefetching.

One (src, tgt) pair per batch (`pair_per_batch`, and always when sequences differ in phase
count) is drawn from (seed, batch number) alone, so every loader shard of a global batch draws
the same pair, uniformly among the pairs that every shard has a subject for (from the dataset
metadata). An example whose subject lacks the pair takes a random subject of its shard that has
it, drawn from (seed, process_index, example number).
"""
import collections
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import grain
import numpy as np

from input_pipeline import dataset, geometry, sampling

# Stream tags, so the generators never coincide.
_EXAMPLE, _VISIT, _PAIR, _SUBSTITUTE = 0, 1, 3, 4


def _process_defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # only when not given, so tools and tests need no jax initialisation
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


class _SubjectCache:
  """LRU cache of decoded subjects by key (consecutive batches share visits)."""

  def __init__(self, size: int):
    self._size = size
    self._data: "collections.OrderedDict[Any, Dict]" = collections.OrderedDict()
    self._lock = threading.Lock()

  def __call__(self, v: Any, encoded: Callable[[], bytes]) -> Dict[str, Any]:
    with self._lock:
      if v in self._data:
        self._data.move_to_end(v)
        return self._data[v]
    rec = dataset.decode_record(encoded(), as_float32=False)
    seqs = rec["sequences"]
    rec["vols"] = {seqs.index(s): vol for s, vol in rec["volumes"].items()}
    rec["avail_idx"] = [i for i, a in enumerate(rec["available"]) if a and i in rec["vols"]]
    with self._lock:
      self._data[v] = rec
      while len(self._data) > self._size:
        self._data.popitem(last=False)
    return rec


class _TrainBatch:
  """Batch index -> batch dict (see make_train_iterator)."""

  def __init__(self, visits, records, meta, *, ndims, c_in, crop_size, batch_size, rep_step,
               seed, num_codes, process_index, process_count, pad_multiple, cache_size,
               pair_per_batch, split):
    self.visits, self.records = visits, records
    self.subjects = _SubjectCache(cache_size)
    self.seqs = meta["sequences"]
    if num_codes < len(self.seqs):
      raise ValueError(f"num_codes {num_codes} < {len(self.seqs)} sequences {self.seqs}")
    phases = [meta["phases"].get(s, 1) for s in self.seqs]
    self.per_batch_pair = bool(pair_per_batch) or len(set(phases)) > 1
    if self.per_batch_pair:
      self.pairs, self.have = _shared_pairs(meta, split, process_count)
      self.mine = range(process_index, len(self.have), process_count)  # this shard's records
    self.window = sampling.crop_shape(ndims, c_in, crop_size)
    self.ndims, self.b, self.rep = ndims, batch_size, rep_step
    self.seed, self.pi, self.num_codes = seed, process_index, num_codes
    self.norm, self.pad_multiple = meta["normalization"], pad_multiple
    # Records stay in their storage dtype in the cache; int16's scale is applied per crop.
    self.scale = float(meta.get("storage_scale", 1.0))

  def _rng(self, tag: int, n: int):
    return np.random.default_rng([self.seed, self.pi, tag, n])

  def _pair(self, rng, avail: Sequence[int]):
    return int(rng.choice(avail)), int(rng.choice(avail))

  def __call__(self, k: int) -> Dict[str, np.ndarray]:
    ex = range(k * self.b, (k + 1) * self.b)
    visits = [i // self.rep for i in ex]
    subj = {v: self.subjects(v, lambda v=v: self.visits[v]) for v in dict.fromkeys(visits)}
    pair = None
    if self.per_batch_pair:
      # Not seeded by the process (shard) index: every shard of global batch k draws this pair.
      pair = self.pairs[int(np.random.default_rng([self.seed, _PAIR, k]).integers(
          len(self.pairs)))]
      for j, (i, v) in enumerate(zip(ex, visits)):
        if not set(pair) <= set(subj[v]["avail_idx"]):
          ok = [r for r in self.mine if set(pair) <= self.have[r]]
          r = ok[int(self._rng(_SUBSTITUTE, i).integers(len(ok)))]
          visits[j] = ("record", r)
          subj[visits[j]] = self.subjects(visits[j], lambda r=r: self.records[r])
    out = collections.defaultdict(list)
    for i, v in zip(ex, visits):
      s = subj[v]
      rng = self._rng(_EXAMPLE, i)
      src, tgt = pair or self._pair(rng, s["avail_idx"])
      # A substitute subject's flip is its own example's draw.
      flip = bool(self._rng(_VISIT, v).integers(2) if isinstance(v, int) else rng.integers(2))
      a, b = sampling.draw_example(rng, s["vols"], src, tgt, flip, self.ndims, self.window,
                                   self.norm, self.pad_multiple, self.scale)
      out["src"].append(a)
      out["tgt"].append(b)
      out["src_idx"].append(src)
      out["tgt_idx"].append(tgt)
      out["available"].append(s["avail_idx"])
    eye = np.eye(self.num_codes, dtype=np.float32)
    avail = np.zeros((len(ex), self.num_codes), np.float32)
    for j, idx in enumerate(out.pop("available")):
      avail[j, idx] = 1.0
    batch = {k_: np.stack(v_) for k_, v_ in out.items()}
    batch["available"] = avail
    batch["src_idx"] = batch["src_idx"].astype(np.int32)
    batch["tgt_idx"] = batch["tgt_idx"].astype(np.int32)
    batch["src_code"] = eye[batch["src_idx"]]
    batch["tgt_code"] = eye[batch["tgt_idx"]]
    return batch


def _shared_pairs(meta: Dict[str, Any], split: str, n_shards: int):
  """The (src, tgt) pairs that every loader shard has a subject for, and each record's usable
  sequences (metadata: present and available, in record order; shard s holds records
  s::n_shards)."""
  have = []
  for info in meta["splits"][split]["subjects"]:
    usable = zip(info["present"], info.get("available", info["present"]))
    have.append({i for i, (p, a) in enumerate(usable) if p and a})
  n = len(meta["sequences"])
  pairs = [(a, b) for a in range(n) for b in range(n)
           if all(any({a, b} <= h for h in have[s::n_shards]) for s in range(n_shards))]
  if not pairs:
    raise ValueError(f"one (src, tgt) pair per batch: no sequence of {meta['sequences']} is "
                     f"held by a {split} subject in each of the {n_shards} loader shards")
  return pairs, have


def train_visits(dataset_dir: str, seed: int, process_index: int, process_count: int,
                 split: str = "train") -> grain.MapDataset:
  """This process's endless, per-epoch reshuffled sequence of encoded subject dataset."""
  meta = dataset.load_metadata(dataset_dir)
  ds = grain.MapDataset.source(dataset.split_source(dataset_dir, split, meta))
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"process {process_index} of {process_count} gets no {split} subject "
                     f"({meta['splits'][split]['count']} in {dataset_dir})")
  return ds.shuffle(seed=seed).repeat(None)


def make_train_iterator(dataset_dir: str, *, ndims: int, c_in: int, crop_size: Sequence[int],
                        batch_size: int, rep_step: int, seed: int, num_codes: int,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None, pad_multiple: int = 1,
                        split: str = "train", num_threads: int = 2, prefetch: int = 4,
                        num_batches: Optional[int] = None,
                        pair_per_batch: bool = False) -> grain.DatasetIterator:
  """Endless (or `num_batches`) iterator of training batches for this process.

  Yields numpy dicts: src [b, t_src, *spatial, c_in], tgt [b, t_tgt, *spatial, c_in] float32
  in [-1, 1]; src_code, tgt_code one-hot [b, num_codes] float32; src_idx, tgt_idx int32 [b];
  available [b, num_codes] float32, 1 for each sequence the example's subject has.
  spatial is (H, W) for ndims=2 (crop_size [1, H, W], c_in neighbouring slices as channels)
  and (D, H, W) for ndims=3 (c_in = 1), each padded with -1 up to a multiple of pad_multiple.
  With `pair_per_batch`, and always when the dataset's sequences differ in phase count, every
  example of batch k has the same (src, tgt) pair, the same in every process (module doc).
  The iterator has get_state()/set_state() for checkpointing, and close() to stop its
  prefetch threads.
  """
  pi, pc = _process_defaults(process_index, process_count)
  meta = dataset.load_metadata(dataset_dir)
  visits = train_visits(dataset_dir, seed, pi, pc, split)
  records = dataset.split_source(dataset_dir, split, meta)
  # The cache only has to hold the visits of the batches being built at once (a BraTS subject
  # is ~60 MB in float16), since consecutive batches share visits.
  make = _TrainBatch(visits, records, meta, ndims=ndims, c_in=c_in, crop_size=crop_size,
                     batch_size=batch_size, rep_step=rep_step, seed=seed, num_codes=num_codes,
                     process_index=pi, process_count=pc, pad_multiple=pad_multiple,
                     cache_size=max(4, (num_threads + 2) * (batch_size // rep_step + 2)),
                     pair_per_batch=pair_per_batch, split=split)
  ds = grain.MapDataset.range(num_batches or 2 ** 62).map(make)
  opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(opts))


def make_eval_views(dataset_dir: str, split: str, *, ndims: int, c_in: int,
                    valid_size: Sequence[int], pad_multiple: int = 1,
                    process_index: int = 0, process_count: int = 1) -> List[Dict[str, Any]]:
  """Per-subject evaluation inputs (this process's share: records process_index::process_count).

  Each dict: name; sequences (names); available and present (sequence indices); views
  {index: centre crop of valid_size [D, H, W] in model layout: [D, t, H, W, c_in] 2.5D stacks
  (stack j centred on crop slice j, real neighbours where the volume has them, -1 beyond) or
  [1, t, D, H, W, 1] for 3D, H/W (and D in 3D) padded with -1 to pad_multiple}; view_box
  (z0, y0, x0, d, h, w) of the crop in the stored volume; view_pads ([(before, after)] per
  spatial axis, for geometry.unpad); volumes {index: full stored float32 [t, D, H, W]};
  affine; original_shape; depth_start; scale/offset {index: float}; normalization.
  """
  meta = dataset.load_metadata(dataset_dir)
  src = dataset.split_source(dataset_dir, split, meta)
  out = []
  for r in range(process_index, len(src), process_count):
    rec = dataset.decode_record(src[r])
    seqs = rec["sequences"]
    vols = {seqs.index(s): v for s, v in rec["volumes"].items()}
    shape = next(iter(vols.values())).shape[1:]
    size = [min(int(v), s) for v, s in zip(valid_size, shape)]
    box = [(s - v) // 2 for s, v in zip(shape, size)]
    views, pads = {}, None
    for i, v in vols.items():
      if ndims == 2:
        st = geometry.stack_slices(v[:, :, box[1]:box[1] + size[1], box[2]:box[2] + size[2]],
                                   c_in, start=box[0], count=size[0])
        views[i], pads = geometry.pad_to_multiple(st, (2, 3), pad_multiple)
      else:
        crop = v[:, box[0]:box[0] + size[0], box[1]:box[1] + size[1], box[2]:box[2] + size[2]]
        views[i], pads = geometry.pad_to_multiple(crop[None, ..., None], (2, 3, 4), pad_multiple)
    out.append(dict(
        name=rec["name"], sequences=seqs,
        available=[i for i, a in enumerate(rec["available"]) if a],
        present=sorted(vols), views=views, view_box=tuple(box + size), view_pads=pads,
        volumes=vols, affine=rec["affine"], original_shape=rec["original_shape"],
        depth_start=rec["depth_start"], normalization=rec["normalization"],
        scale={seqs.index(s): v for s, v in rec["scale"].items()},
        offset={seqs.index(s): v for s, v in rec["offset"].items()}))
  return out
