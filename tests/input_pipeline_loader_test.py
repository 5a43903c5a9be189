"""Training iterator and evaluation views: sharding, determinism, resumption, crop content."""
import itertools

import numpy as np
import pytest

from input_pipeline import config, dataset, geometry, loader, prepare, sampling

NUM_CODES = 6


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
  c = config.default_data_config()
  c.cache_dir = str(tmp_path_factory.mktemp("cache"))
  c.toy_subjects, c.toy_size, c.toy_seed, c.num_workers, c.dtype = 12, 20, 5, 1, "float32"
  return prepare.prepare(c)


@pytest.fixture(scope="module")
def dyn_dir(tmp_path_factory):
  c = config.default_data_config()
  c.cache_dir = str(tmp_path_factory.mktemp("cache_dyn"))
  c.toy_subjects, c.toy_size, c.toy_dynamic, c.num_workers = 6, 16, True, 1
  return prepare.prepare(c)


_OPEN = []


@pytest.fixture(autouse=True)
def close_iterators():
  """Stops prefetch threads when a test ends, so none outlives it."""
  yield
  while _OPEN:
    _OPEN.pop().close()


def it2d(d, **kw):
  args = dict(ndims=2, c_in=3, crop_size=[1, 12, 12], batch_size=4, rep_step=4, seed=0,
              num_codes=NUM_CODES, process_index=0, process_count=1)
  args.update(kw)
  it = loader.make_train_iterator(d, **args)
  _OPEN.append(it)
  return it


def same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def visit_names(d, seed, pi, pc, n):
  vis = loader.train_visits(d, seed, pi, pc)
  return [dataset.decode_record(vis[i])["name"] for i in range(n)]


def test_processes_see_disjoint_shards_covering_the_split(ds_dir):
  meta = dataset.load_metadata(ds_dir)
  names = {s["name"] for s in meta["splits"]["train"]["subjects"]}
  n = len(names)
  p0 = visit_names(ds_dir, 0, 0, 2, len(range(0, n, 2)))
  p1 = visit_names(ds_dir, 0, 1, 2, len(range(1, n, 2)))
  assert len(set(p0)) == len(p0) and len(set(p1)) == len(p1)  # one epoch, no repeats
  assert not set(p0) & set(p1) and set(p0) | set(p1) == names
  # the next epoch revisits the same shard in a new order
  two = visit_names(ds_dir, 0, 0, 2, 2 * len(p0))
  assert sorted(two[len(p0):]) == sorted(p0)


def test_same_seed_same_batches_other_seed_differs(ds_dir):
  a = list(itertools.islice(it2d(ds_dir), 5))
  b = list(itertools.islice(it2d(ds_dir, num_threads=0, prefetch=0), 5))
  c = list(itertools.islice(it2d(ds_dir, seed=1), 5))
  assert all(same(x, y) for x, y in zip(a, b))
  assert not all(same(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("k", [1, 3])
def test_restored_iterator_continues_with_the_same_batches(ds_dir, k):
  ref = list(itertools.islice(it2d(ds_dir), k + 4))
  it = it2d(ds_dir)
  for _ in range(k):
    next(it)
  state = it.get_state()
  fresh = it2d(ds_dir)
  fresh.set_state(state)
  for want in ref[k:]:
    assert same(next(fresh), want)


def find_window(vol, crop):
  """All (z, y, x, flipped) where crop [d, h, w] occurs in vol [D, H, W] (brute force)."""
  d, h, w = crop.shape
  hits = []
  for flip, v in ((False, vol), (True, vol[..., ::-1])):
    for z, y, x in itertools.product(*(range(s - c + 1) for s, c in zip(vol.shape, crop.shape))):
      if np.array_equal(v[z:z + d, y:y + h, x:x + w], crop):
        hits.append((z, y, x, flip))
  return hits


@pytest.mark.parametrize("ndims", [2, 3])
def test_batches_are_crops_of_the_subjects_available_sequences(ds_dir, ndims):
  rep = 4
  kw = dict(ndims=2, c_in=3, crop_size=[1, 10, 10]) if ndims == 2 else dict(
      ndims=3, c_in=1, crop_size=[8, 8, 8])
  it = it2d(ds_dir, batch_size=rep, rep_step=rep, **kw)
  vis = loader.train_visits(ds_dir, 0, 0, 1)
  flips_seen = set()
  for v in range(3):
    batch = next(it)  # batch v == visit v (batch_size == rep_step)
    rec = dataset.decode_record(vis[v])
    seqs = rec["sequences"]
    avail = [i for i, a in enumerate(rec["available"]) if a]
    flips = set()
    for j in range(rep):
      s, t = batch["src_idx"][j], batch["tgt_idx"][j]
      assert s in avail and t in avail
      np.testing.assert_array_equal(np.flatnonzero(batch["available"][j]), avail)
      np.testing.assert_array_equal(batch["src_code"][j], np.eye(NUM_CODES)[s])
      src = batch["src"][j, 0]
      tgt = batch["tgt"][j, 0]
      # back to [d, h, w]: 2.5D channels are consecutive slices
      src = np.moveaxis(src, -1, 0) if ndims == 2 else src[..., 0]
      tgt = np.moveaxis(tgt, -1, 0) if ndims == 2 else tgt[..., 0]
      assert src.mean() != -1.0
      hits = find_window(rec["volumes"][seqs[s]][0], src)
      assert hits, "source crop is no window of the source volume"
      z, y, x, fl = hits[0]
      vt = rec["volumes"][seqs[t]][0]
      vt = vt[..., ::-1] if fl else vt
      d, h, w = src.shape
      np.testing.assert_array_equal(tgt, vt[z:z + d, y:y + h, x:x + w])
      flips.add(fl)
    assert len(flips) == 1  # one flip per subject visit
    flips_seen |= flips


def test_all_background_source_crops_are_skipped(ds_dir):
  # Background is common in these volumes: a sizeable share of 3^3 windows is all -1, so
  # without the rule 320 crops would surely include some.
  rec = dataset.read_subjects(ds_dir, "train")[0]
  v = next(iter(rec["volumes"].values()))[0]
  win = np.lib.stride_tricks.sliding_window_view(v, (3, 3, 3))
  assert (win.max(axis=(-3, -2, -1)) == -1).mean() > 0.1
  it = it2d(ds_dir, ndims=3, c_in=1, crop_size=[3, 3, 3], batch_size=16, rep_step=8)
  for batch in itertools.islice(it, 20):
    assert not np.any(batch["src"].reshape(16, -1).mean(axis=1) == -1.0)


def test_padding_to_the_model_stride_and_back(ds_dir):
  b = next(it2d(ds_dir, crop_size=[1, 10, 10], pad_multiple=8))
  assert b["src"].shape == (4, 1, 16, 16, 3)
  assert np.all(b["src"][:, :, :3] == -1) and np.all(b["src"][:, :, 13:] == -1)
  plain = next(it2d(ds_dir, crop_size=[1, 10, 10]))
  got = geometry.unpad(b["src"], (2, 3), [(3, 3), (3, 3)])
  np.testing.assert_array_equal(got, plain["src"])


def test_dynamic_sequences_draw_one_pair_per_batch(dyn_dir):
  meta = dataset.load_metadata(dyn_dir)
  assert meta["phases"]["dce"] == 4
  seen_t = set()
  it = it2d(dyn_dir, batch_size=3, rep_step=2, crop_size=[1, 8, 8])
  for b in itertools.islice(it, 12):
    assert len(set(b["src_idx"])) == 1 and len(set(b["tgt_idx"])) == 1
    t_src = 4 if b["src_idx"][0] == 4 else 1
    assert b["src"].shape == (3, t_src, 8, 8, 3)
    seen_t.add(b["src"].shape[1])
  assert seen_t == {1, 4}


def test_pair_per_batch_is_the_same_in_every_shard(ds_dir):
  meta = dataset.load_metadata(ds_dir)
  records = meta["splits"]["train"]["subjects"]
  assert not all(all(r["present"]) for r in records)  # the case that needs substitutes
  shards = [it2d(ds_dir, batch_size=3, rep_step=1, pair_per_batch=True, process_index=p,
                 process_count=2) for p in range(2)]
  pairs = set()
  for b0, b1 in itertools.islice(zip(*shards), 30):
    for k in ("src_idx", "tgt_idx"):
      assert len(set(b0[k]) | set(b1[k])) == 1, k
    for b in (b0, b1):
      np.testing.assert_array_equal(b["tgt_code"].argmax(1), b["tgt_idx"])
      # Every example's subject has both sequences of the pair.
      assert (b["available"][:, b["src_idx"][0]] == 1).all()
      assert (b["available"][:, b["tgt_idx"][0]] == 1).all()
    pairs.add((int(b0["src_idx"][0]), int(b0["tgt_idx"][0])))
  assert len(pairs) >= 8


def test_pair_per_batch_needs_a_pair_in_every_shard():
  meta = {"sequences": ["t1", "t2"],
          "splits": {"train": {"subjects": [{"present": [1, 0]}, {"present": [0, 1]}]}}}
  with pytest.raises(ValueError, match="each of the 2 loader shards"):
    loader._shared_pairs(meta, "train", 2)
  pairs, _ = loader._shared_pairs(meta, "train", 1)
  assert pairs == [(0, 0), (1, 1)]


@pytest.mark.parametrize("ndims", [2, 3])
def test_eval_views_are_centre_crops(ds_dir, ndims):
  c_in = 3 if ndims == 2 else 1
  views = loader.make_eval_views(ds_dir, "test", ndims=ndims, c_in=c_in,
                                 valid_size=[6, 14, 13], pad_multiple=4)
  recs = dataset.read_subjects(ds_dir, "test")
  assert [v["name"] for v in views] == [r["name"] for r in recs]
  for v, r in zip(views, recs):
    z0, y0, x0, d, h, w = v["view_box"]
    assert (z0, y0, x0, d, h, w) == (7, 3, 3, 6, 14, 13)
    for i, arr in v["views"].items():
      vol = r["volumes"][r["sequences"][i]]
      np.testing.assert_array_equal(v["volumes"][i], vol)
      if ndims == 2:
        assert arr.shape == (6, 1, 16, 16, 3)
        core = geometry.unpad(arr, (2, 3), v["view_pads"])
        # stack j: slices z0+j-1 .. z0+j+1, i.e. the official valid stack rd+j with
        # rd = (D - c_in + 1 - d) // 2 = 6 here (D = 20)
        for j in range(d):
          np.testing.assert_array_equal(np.moveaxis(core[j, 0], -1, 0),
                                        vol[0, z0 + j - 1:z0 + j + 2, y0:y0 + h, x0:x0 + w])
      else:
        assert arr.shape == (1, 1, 8, 16, 16, 1)
        core = geometry.unpad(arr, (2, 3, 4), v["view_pads"])
        np.testing.assert_array_equal(core[0, 0, ..., 0], vol[0, z0:z0 + d, y0:y0 + h, x0:x0 + w])
    assert v["available"] == [i for i, a in enumerate(r["available"]) if a]


def test_stack_slices_borders_and_middle_channel():
  vol = np.arange(2 * 5 * 2 * 2, dtype=np.float32).reshape(2, 5, 2, 2)
  st = geometry.stack_slices(vol, 3)
  assert st.shape == (5, 2, 2, 2, 3)
  np.testing.assert_array_equal(geometry.unstack_middle(st), vol)
  assert np.all(st[0, ..., 0] == -1) and np.all(st[4, ..., 2] == -1)
  np.testing.assert_array_equal(st[2, 1, ..., 2], vol[1, 3])


def test_int16_storage_gives_the_same_batches_within_quantisation(ds_dir):
  meta = dataset.load_metadata(ds_dir)
  c = config.default_data_config()
  c.cache_dir = ds_dir.split("/prepared/")[0]
  c.toy_subjects, c.toy_size, c.toy_seed, c.num_workers, c.dtype = 12, 20, 5, 1, "int16"
  d16 = prepare.prepare(c)
  assert d16 != ds_dir and dataset.load_metadata(d16)["storage_scale"] != 1.0
  small = dict(ndims=3, c_in=1, crop_size=[3, 3, 3], batch_size=16, rep_step=8)
  for kw in ({}, small):  # small crops: the background rule must see -1, not -32767
    for a, b in zip(itertools.islice(it2d(ds_dir, **kw), 4), itertools.islice(it2d(d16, **kw), 4)):
      np.testing.assert_array_equal(a["src_idx"], b["src_idx"])
      np.testing.assert_allclose(a["src"], b["src"], atol=2e-5, rtol=0)
      np.testing.assert_allclose(a["tgt"], b["tgt"], atol=2e-5, rtol=0)
      assert not np.any(b["src"].reshape(len(b["src"]), -1).mean(axis=1) == -1.0)
  assert meta["dtype"] == "float32"


def test_crop_starts_follow_the_official_randint_range():
  rng = np.random.default_rng(0)
  starts = np.array([sampling.random_corner(rng, (10, 7, 5), (4, 7, 1)) for _ in range(2000)])
  assert set(starts[:, 0]) == set(range(0, 10 - 4))  # randint(0, d - nd - 1), inclusive
  assert set(starts[:, 1]) == {0}  # size == crop
  assert set(starts[:, 2]) == set(range(0, 4))


def test_eval_views_of_a_dynamic_sequence_keep_its_phases(dyn_dir):
  views = loader.make_eval_views(dyn_dir, "test", ndims=3, c_in=1, valid_size=[8, 8, 8])
  meta = dataset.load_metadata(dyn_dir)
  for v in views:
    for i, arr in v["views"].items():
      assert arr.shape == (1, meta["phases"][v["sequences"][i]], 8, 8, 8, 1)


def test_process_defaults_come_from_jax(ds_dir):
  a = next(it2d(ds_dir, process_index=None, process_count=None))
  assert same(a, next(it2d(ds_dir)))  # one process here: index 0 of 1
  with pytest.raises(ValueError, match="process_index 2 not in"):
    it2d(ds_dir, process_index=2, process_count=2)
