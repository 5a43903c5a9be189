"""Bad input: every case is an error naming subject and file, or (on_error='skip') a warning."""
import json
import os

import nibabel as nib
import numpy as np
import pytest

from input_pipeline import config, dataset, prepare

SEQS = ("t1", "t1ce", "t2", "flair")
AFF = np.diag([1.0, 1.0, 1.0, 1.0])


def make_brats(root, names=("s0", "s1", "s2"), shape=(8, 9, 10)):
  rng = np.random.default_rng(0)
  for n in names:
    os.makedirs(os.path.join(root, n), exist_ok=True)
    for s in SEQS:
      vol = rng.integers(0, 1000, shape).astype(np.int16)
      nib.save(nib.Nifti1Image(vol, AFF), os.path.join(root, n, f"{n}_{s}.nii.gz"))
  with open(os.path.join(root, "train.csv"), "w") as f:
    f.writelines(f"{n},15\n" for n in names)
  return root


def cfg(root, out, **kw):
  c = config.default_data_config()
  c.layout, c.root, c.cache_dir, c.num_workers = "brats", str(root), str(out), 1
  c.train_csv, c.valid_csv, c.test_csv = os.path.join(str(root), "train.csv"), "", ""
  c.update(kw)
  return c


def path(root, n, s):
  return os.path.join(str(root), n, f"{n}_{s}.nii.gz")


def save(root, n, s, vol, aff=AFF):
  nib.save(nib.Nifti1Image(vol, aff), path(root, n, s))


def truncate(root, n, s, keep=0.5):
  p = path(root, n, s)
  data = open(p, "rb").read()
  open(p, "wb").write(data[: int(len(data) * keep)])


def corrupt(root, n, s):
  open(path(root, n, s), "wb").write(b"this is not a nifti file")


CASES = {
    "missing file": (lambda r: os.remove(path(r, "s1", "t2")), "s1_t2.nii.gz", "file not found"),
    "truncated gz": (lambda r: truncate(r, "s1", "flair"), "s1_flair.nii.gz", "unreadable"),
    "truncated tail": (lambda r: truncate(r, "s2", "t1", 0.9), "s2_t1.nii.gz", "unreadable"),
    "garbage file": (lambda r: corrupt(r, "s1", "t1"), "s1_t1.nii.gz", "unreadable"),
    "shape mismatch": (lambda r: save(r, "s1", "t1ce", np.ones((8, 9, 11), np.int16)),
                       "s1_t1ce.nii.gz", "shape"),
    "affine mismatch": (lambda r: save(r, "s1", "t2", np.ones((8, 9, 10), np.int16),
                                       np.diag([1.0, 1.0, 2.0, 1.0])), "s1_t2.nii.gz", "affine"),
    "nan voxels": (lambda r: save(r, "s1", "t1", np.where(np.eye(8, 9)[..., None] > 0, np.nan,
                                                          np.ones((8, 9, 10), np.float32))),
                   "s1_t1.nii.gz", "NaN/Inf"),
    "inf voxels": (lambda r: save(r, "s1", "flair", np.full((8, 9, 10), np.inf, np.float32)),
                   "s1_flair.nii.gz", "NaN/Inf"),
    "all zero": (lambda r: save(r, "s1", "t2", np.zeros((8, 9, 10), np.int16)),
                 "s1_t2.nii.gz", "percentile"),
    "no available sequence": (
        lambda r: open(os.path.join(r, "train.csv"), "w").write("s0,15\ns1,0\ns2,15\n"),
        "train.csv", "no available sequence"),
    "absent subject": (
        lambda r: open(os.path.join(r, "train.csv"), "a").write("s1x,15\n"),
        "train.csv", "does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_subject_raises_naming_subject_and_file(tmp_path, case):
  root = make_brats(str(tmp_path / "data"))
  good = prepare.prepare(cfg(root, tmp_path / "c"), out_dir=str(tmp_path / "prepared"))
  before = open(os.path.join(good, "metadata.json")).read()
  damage, fname, reason = CASES[case]
  damage(root)
  bad = {"absent subject": "s1x", "truncated tail": "s2"}.get(case, "s1")
  with pytest.raises(prepare.PrepareError) as e:
    prepare.prepare(cfg(root, tmp_path / "c"), out_dir=str(tmp_path / "prepared"))
  msg = str(e.value)
  assert f"subject {bad!r}" in msg and fname in msg and reason in msg, msg
  # the dataset already written is untouched and nothing half-written is left beside it
  assert open(os.path.join(good, "metadata.json")).read() == before
  assert dataset.load_metadata(good)["splits"]["train"]["count"] == 3
  assert sorted(os.listdir(tmp_path)) == ["data", "prepared"]


@pytest.mark.parametrize("case", ["truncated gz", "all zero", "absent subject"])
def test_bad_subject_skipped_with_warning(tmp_path, case):
  root = make_brats(str(tmp_path / "data"))
  CASES[case][0](root)
  bad = "s1x" if case == "absent subject" else "s1"
  with pytest.warns(UserWarning, match=f"train/{bad}: subject '{bad}'"):
    d = prepare.prepare(cfg(root, tmp_path / "c", on_error="skip"))
  meta = dataset.load_metadata(d)
  names = [s["name"] for s in meta["splits"]["train"]["subjects"]]
  assert bad not in names and {"s0", "s2"} <= set(names)
  assert [s["name"] for s in meta["skipped"]] == [bad]


def write_json(tmp_path, files_s1):
  root = make_brats(str(tmp_path / "data"), names=("s0", "s1"))
  desc = dict(sequences=list(SEQS), splits=dict(train=["s0", "s1"]), subjects=[
      dict(name="s0", files={s: f"s0/s0_{s}.nii.gz" for s in SEQS}),
      dict(name="s1", files=files_s1)])
  p = os.path.join(root, "dataset.json")
  with open(p, "w") as f:
    json.dump(desc, f)
  c = cfg(root, tmp_path / "c", layout="dataset_json", dataset_json=p)
  c.train_csv = ""
  return c, p


def test_unknown_sequence_name_in_dataset_json(tmp_path):
  c, p = write_json(tmp_path, {"t1": "s1/s1_t1.nii.gz", "t1gd": "s1/s1_t1ce.nii.gz"})
  with pytest.raises(prepare.PrepareError, match=r"subject 's1', file .*dataset.json: "
                     r"unknown sequence name 't1gd'"):
    prepare.prepare(c)
  c.on_error = "skip"
  with pytest.warns(UserWarning, match="t1gd"):
    d = prepare.prepare(c)
  assert [s["name"] for s in dataset.load_metadata(d)["splits"]["train"]["subjects"]] == ["s0"]


def test_dataset_json_split_naming_absent_subject(tmp_path):
  c, p = write_json(tmp_path, {"t1": "s1/s1_t1.nii.gz"})
  desc = json.load(open(p))
  desc["splits"]["train"].append("ghost")
  json.dump(desc, open(p, "w"))
  with pytest.raises(prepare.PrepareError, match=r"subject 'ghost', file .*dataset.json: named"):
    prepare.prepare(c)


def test_unavailable_sequence_may_lack_its_file(tmp_path):
  root = make_brats(str(tmp_path / "data"))
  os.remove(path(root, "s1", "flair"))
  open(os.path.join(root, "train.csv"), "w").write("s0,15\ns1,14\ns2,15\n")  # 1110: no flair
  d = prepare.prepare(cfg(root, tmp_path / "c"))
  assert dataset.load_metadata(d)["splits"]["train"]["count"] == 3
