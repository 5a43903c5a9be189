"""Readers, normalisation, prepare and the toy phantoms, checked against direct computations."""
import json
import os

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from input_pipeline import (config, dataset, geometry, normalization, prepare,
                            toy)

SEQS = ["t1", "t1ce", "t2", "flair"]


def official_direct(path, depth):
  """The official recipe written out with numpy on the file as SimpleITK would give it."""
  arr = np.asanyarray(nib.load(path).dataobj).T  # SimpleITK order (z, y, x)
  amax = np.percentile(arr, 99) * 2
  arr = np.clip(arr, 0, amax) / amax * 2 - 1
  d = arr.shape[0]
  rd = (d - depth) // 2 if d > depth else 0
  return arr[rd:rd + depth].astype(np.float32), amax


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("toy") / "toy")
  return toy.make_toy_dataset(root, 6, seed=3, size=20, num_workers=1, progress=False)


def brats_cfg(root, cache, **kw):
  c = config.default_data_config()
  c.layout, c.root, c.cache_dir, c.num_workers = "brats", root, cache, 1
  for s in ("train", "valid", "test"):
    c[f"{s}_csv"] = os.path.join(root, f"{s}.csv")
  c.depth = 16
  c.update(kw)
  return c


def test_normalised_volumes_bit_equal_to_direct_numpy(toy_root, tmp_path):
  for dtype in ("float32", "float16"):
    d = prepare.prepare(brats_cfg(toy_root, str(tmp_path), dtype=dtype))
    n = 0
    for split in ("train", "valid", "test"):
      for rec in dataset.read_subjects(d, split):
        assert rec["depth_start"] == 2  # 20 slices, central 16 kept
        for s, vol in rec["volumes"].items():
          want, amax = official_direct(os.path.join(toy_root, rec["name"],
                                                    f"{rec['name']}_{s}.nii.gz"), 16)
          assert vol.dtype == np.float32 and vol.shape == (1,) + want.shape
          if dtype == "float32":
            np.testing.assert_array_equal(vol[0], want)
          else:
            np.testing.assert_array_equal(vol[0], want.astype(np.float16).astype(np.float32))
          assert rec["scale"][s] == amax
          n += 1
    assert n > 10


def test_int16_storage_round_trip():
  v = np.linspace(-1, 1, 1001, dtype=np.float32)
  stored = dataset.store_volume(v, "int16")
  back = stored.astype(np.float32) * np.float32(dataset.storage_scale("int16"))
  assert stored.dtype == np.int16 and np.max(np.abs(back - v)) <= 1.6e-5


def test_records_hold_only_numeric_arrays():
  rec = dict(name="a", volumes={"t1": np.arange(8, dtype=np.float16).reshape(1, 2, 2, 2)},
             affine=np.eye(4), storage_scale=1.0)
  back = dataset.decode_record(dataset.encode_record(rec), as_float32=False)
  np.testing.assert_array_equal(back["volumes"]["t1"], rec["volumes"]["t1"])
  assert back["volumes"]["t1"].dtype == np.float16
  np.testing.assert_array_equal(back["affine"], np.eye(4))
  with pytest.raises(ValueError, match="numeric"):
    dataset.encode_array(np.array([{"x": 1}], dtype=object))
  with pytest.raises(ValueError, match="numbers only"):
    dataset.decode_array({"dtype": "|O", "shape": [1], "data": b"\0" * 8})


def test_splits_availability_and_train_only_stores_available(toy_root, tmp_path):
  d = prepare.prepare(brats_cfg(toy_root, str(tmp_path)))
  meta = dataset.load_metadata(d)
  assert meta["sequences"] == SEQS
  for split in ("train", "valid", "test"):
    with open(os.path.join(toy_root, f"{split}.csv")) as f:
      rows = [line.strip().split(",") for line in f if line.strip()]
    recs = dataset.read_subjects(d, split)
    assert [r["name"] for r in recs] == [n for n, _ in rows]
    assert meta["splits"][split]["count"] == len(rows)
    for rec, (_, mask) in zip(recs, rows):
      bits = [int(c) for c in bin(int(mask))[2:].zfill(4)]
      assert rec["available"] == bits
      stored = [s for s in SEQS if s in rec["volumes"]]
      assert stored == ([s for s, b in zip(SEQS, bits) if b] if split == "train" else SEQS)
      ref = nib.load(os.path.join(toy_root, rec["name"], f"{rec['name']}_t1.nii.gz"))
      np.testing.assert_array_equal(rec["affine"], ref.affine)
      assert rec["original_shape"] == list(ref.shape)


def test_prepare_rerun_is_noop_and_settings_change_the_folder(toy_root, tmp_path):
  c = brats_cfg(toy_root, str(tmp_path))
  d = prepare.prepare(c)
  stamp = os.stat(os.path.join(d, "metadata.json")).st_mtime_ns
  assert prepare.prepare(c) == d
  assert os.stat(os.path.join(d, "metadata.json")).st_mtime_ns == stamp
  d2 = prepare.prepare(brats_cfg(toy_root, str(tmp_path), dtype="float32"))
  assert d2 != d
  leftovers = [p for p in os.listdir(os.path.dirname(d)) if ".tmp-" in p or ".old-" in p]
  assert leftovers == []


def test_half_finished_folder_is_not_a_dataset(tmp_path):
  (tmp_path / "train-00000.array_record").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="not a complete prepared dataset"):
    dataset.load_metadata(str(tmp_path))


def test_toy_layout_via_config_and_parallel_prepare(tmp_path):
  c = config.default_data_config()
  c.cache_dir, c.toy_subjects, c.toy_size, c.num_workers = str(tmp_path), 5, 16, 2
  d = prepare.prepare(c)
  meta = dataset.load_metadata(d)
  assert sum(v["count"] for v in meta["splits"].values()) == 5
  c1 = ml_collections.ConfigDict(c.to_dict())
  c1.num_workers = 1  # worker count is not part of the result
  assert prepare.prepare(c1) == d


def test_dataset_json_dynamic_4d_file_equals_one_file_per_phase(tmp_path):
  rng = np.random.default_rng(0)
  aff = np.diag([1.0, 1.2, 1.5, 1.0])
  names = ["a", "b"]
  subjects = []
  for n in names:
    t1 = rng.uniform(0, 100, (8, 9, 10)).astype(np.float32)
    dce = rng.uniform(0, 100, (8, 9, 10, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(t1, aff), str(tmp_path / f"{n}_t1.nii.gz"))
    if n == "a":  # one 4D file
      nib.save(nib.Nifti1Image(dce, aff), str(tmp_path / f"{n}_dce.nii.gz"))
      files = {"t1": f"{n}_t1.nii.gz", "dce": f"{n}_dce.nii.gz"}
    else:  # one 3D file per phase
      for p in range(3):
        nib.save(nib.Nifti1Image(dce[..., p], aff), str(tmp_path / f"{n}_dce_{p}.nii.gz"))
      files = {"t1": f"{n}_t1.nii.gz", "dce": [f"{n}_dce_{p}.nii.gz" for p in range(3)]}
    subjects.append(dict(name=n, files=files, dce=dce))
  desc = dict(sequences=["t1", "dce"],
              subjects=[dict(name=s["name"], files=s["files"]) for s in subjects],
              splits=dict(train=names, test=names))
  (tmp_path / "dataset.json").write_text(json.dumps(desc))
  c = config.default_data_config()
  c.layout, c.dataset_json = "dataset_json", str(tmp_path / "dataset.json")
  c.sequences, c.cache_dir = ("t1", "dce"), str(tmp_path / "c")
  c.num_workers = 1
  d = prepare.prepare(c)
  meta = dataset.load_metadata(d)
  assert meta["phases"] == {"t1": 1, "dce": 3}
  for rec, s in zip(dataset.read_subjects(d, "test"), subjects):
    want, _, _ = normalization.official(s["dce"].T)  # [t, z, y, x]
    np.testing.assert_array_equal(rec["volumes"]["dce"], want.astype(np.float16).astype(np.float32))
    assert rec["volumes"]["dce"].shape == (3, 10, 9, 8)
    np.testing.assert_allclose(rec["affine"], aff)


def test_geometry_round_trip_back_to_nifti(toy_root, tmp_path):
  d = prepare.prepare(brats_cfg(toy_root, str(tmp_path), dtype="float32", depth=12))
  rec = dataset.read_subjects(d, "test")[0]
  path = os.path.join(toy_root, rec["name"], f"{rec['name']}_t2.nii.gz")
  orig = np.asanyarray(nib.load(path).dataobj).astype(np.float64)
  back = normalization.denormalize(rec["volumes"]["t2"], rec["scale"]["t2"])
  back = geometry.to_nifti_array(back, rec["original_shape"], rec["depth_start"], fill=np.nan)
  assert back.shape == orig.shape
  kept = ~np.isnan(back)
  assert kept.sum() == orig.size * 12 // 20  # 12 central slices of 20 along z
  inside = kept & (orig < rec["scale"]["t2"])  # voxels the clip leaves untouched
  np.testing.assert_allclose(back[inside], orig[inside], rtol=1e-5, atol=1e-3)


def test_toy_is_deterministic_and_t1ce_is_t1_plus_unique_lesions(tmp_path):
  a = toy.make_toy_dataset(str(tmp_path / "a"), 3, seed=7, size=24, num_workers=1, progress=False)
  b = toy.make_toy_dataset(str(tmp_path / "b"), 3, seed=7, size=24, num_workers=2, progress=False)
  c = toy.make_toy_dataset(str(tmp_path / "c"), 3, seed=8, size=24, num_workers=1, progress=False)
  def load(root, n, s):
    return np.asanyarray(nib.load(os.path.join(root, n, f"{n}_{s}.nii.gz")).dataobj)
  for n in ("Toy_00000", "Toy_00002"):
    np.testing.assert_array_equal(load(a, n, "t2"), load(b, n, "t2"))
    assert not np.array_equal(load(a, n, "t2"), load(c, n, "t2"))
    t1, t1ce = load(a, n, "t1").astype(float), load(a, n, "t1ce").astype(float)
    uniq, brain = load(a, n, "unique_t1ce").astype(bool), load(a, n, "brain").astype(bool)
    assert uniq.sum() > 0 and not (uniq & ~brain).any()
    level = t1[brain].mean()
    rest = brain & ~uniq
    assert (t1ce - t1)[uniq].mean() > 0.4 * level  # lesions only t1ce shows
    assert abs((t1ce - t1)[rest].mean()) < 0.02 * level  # elsewhere the twin equals t1
  with open(os.path.join(a, "train.csv")) as f:
    assert all(0 < int(line.split(",")[1]) < 16 for line in f)


def test_toy_dynamic_sequence_follows_uptake(tmp_path):
  root = toy.make_toy_dataset(str(tmp_path / "d"), 2, seed=1, size=20, dynamic=True,
                              num_workers=1, progress=False)
  n = "Toy_00000"
  dce = np.asanyarray(nib.load(os.path.join(root, n, f"{n}_dce.nii.gz")).dataobj).astype(float)
  m = np.asanyarray(nib.load(os.path.join(root, n, f"{n}_unique_dce.nii.gz")).dataobj).astype(bool)
  assert dce.shape == (20, 20, 20, 4) and m.any()
  curve = dce[m].mean(axis=0)
  assert np.all(np.diff(curve) > 0)  # wash-in: brighter with every phase
  assert json.load(open(os.path.join(root, "toy.json")))["sequences"][-1] == "dce"


def test_command_lines(tmp_path):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo)
  run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=repo, env=env, check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
  root = run("input_pipeline.toy", "--out", str(tmp_path / "t"), "--subjects", "4", "--seed",
             "1", "--size", "12", "--num_workers", "1")
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(
      "import ml_collections\nfrom input_pipeline import config\n"
      "def get_config():\n  c = ml_collections.ConfigDict()\n"
      "  c.data = config.default_data_config()\n  c.data.layout = 'brats'\n  return c\n")
  out = run("input_pipeline.prepare", f"--config={cfg_file}", f"--config.data.root={root}",
            f"--train_csv={root}/train.csv", f"--test_csv={root}/test.csv",
            f"--cache_dir={tmp_path / 'c'}", "--num_workers=1", "--dtype=float32")
  meta = dataset.load_metadata(out)
  assert meta["dtype"] == "float32" and meta["layout"] == "brats"
  assert meta["splits"]["train"]["count"] + meta["splits"]["test"]["count"] == 3


def test_toy_lesion_groups_are_configurable():
  groups = [dict(name="t2only", contrast={"t2": 0.5}, count=(2, 2), radius=(0.15, 0.2))]
  images, masks = toy.phantom(24, np.random.default_rng(0), ["t1", "t2", "flair"], groups)
  assert set(masks) == {"brain", "seg", "unique_t2"}
  m = masks["unique_t2"].astype(bool)
  base, _ = toy.phantom(24, np.random.default_rng(0), ["t1", "t2", "flair"],
                        [dict(groups[0], contrast={"t2": 0.0})])
  # same draws, lesion contrast 0 vs 0.5: only t2 changes, and only inside (and at the soft
  # edge around) its lesions
  for s in ("t1", "flair"):
    np.testing.assert_array_equal(images[s], base[s])
  diff = images["t2"] - base["t2"]
  assert diff[m].mean() > 10 * max(np.abs(diff[~m]).mean(), 1e-9) and diff[m].min() >= 0


def test_dataset_json_with_split_csv_narrowing_availability(tmp_path):
  rng = np.random.default_rng(1)
  subjects = []
  for n in ("a", "b"):
    files = {}
    for s in ("t1", "t2"):
      nib.save(nib.Nifti1Image(rng.integers(1, 99, (6, 6, 6)).astype(np.int16), np.eye(4)),
               str(tmp_path / f"{n}_{s}.nii.gz"))
      files[s] = f"{n}_{s}.nii.gz"
    subjects.append(dict(name=n, files=files))
  (tmp_path / "dataset.json").write_text(json.dumps(dict(sequences=["t1", "t2"],
                                                         subjects=subjects)))
  (tmp_path / "train.csv").write_text("a,2\nb,3\n")  # a: t1 only (binary 10)
  c = config.default_data_config()
  c.layout, c.dataset_json, c.sequences = "dataset_json", str(tmp_path / "dataset.json"), ()
  c.train_csv, c.cache_dir, c.num_workers = str(tmp_path / "train.csv"), str(tmp_path / "c"), 1
  d = prepare.prepare(c)
  a, b = dataset.read_subjects(d, "train")
  assert (a["available"], sorted(a["volumes"])) == ([1, 0], ["t1"])
  assert (b["available"], sorted(b["volumes"])) == ([1, 1], ["t1", "t2"])


def test_a_concurrent_identical_run_leaves_the_finished_dataset_in_place(toy_root, tmp_path):
  c = brats_cfg(toy_root, str(tmp_path))
  d = prepare.prepare(c)
  inode = os.stat(d).st_ino
  digest = dataset.load_metadata(d)["input_hash"]
  tmp = tmp_path / "late.tmp"
  tmp.mkdir()
  prepare._swap_into_place(str(tmp), d, digest)  # a second host finishing after the first
  assert os.stat(d).st_ino == inode and dataset.load_metadata(d)["input_hash"] == digest
