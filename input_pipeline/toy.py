"""Toy phantoms (the paper's simulated subjects): `python -m input_pipeline.toy --out DIR ...`.

Each subject is a 3D head of smooth random ellipsoid tissues (grey/white matter, ventricles)
imaged with a contrast table per sequence, so sequences share anatomy and are mostly
predictable from each other; plus lesion groups whose contrast differs from the surroundings
in a chosen subset of sequences, a smooth multiplicative bias field (shared by a subject's
sequences, as one coil) and independent noise (magnitude of signal + Gaussian) per sequence.

By default t1ce equals t1 plus "enhancing" lesions that no other sequence shows, at random
places per subject (as T1Gd is T1 plus enhancement); t1 and t1ce also share the gain. Their
ground truth is saved as `<name>_unique_t1ce.nii.gz` (one such mask per sequence that a lesion
group alone shows). An "edema" group changes t1/t1ce, t2 and flair alike. With `dynamic=True`
a 4D sequence `dce` is added: phase k = t1 + uptake(k) * (tissue enhancement + its own unique
lesions), uptake(k) = 1 - exp(-k / tau), saved as one 4D NIfTI.

Files, in the BraTS layout: `<out>/<name>/<name>_<seq>.nii.gz` (int16) plus `_seg` (lesion
group labels), `_brain` and `_unique_<seq>` (uint8) masks; split CSVs `train.csv`,
`valid.csv`, `test.csv` (`name,mask` with random missing sequences, every subject keeping at
least one) and `toy.json` (written last, marks the folder complete). Deterministic by seed.
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import uuid
from typing import Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

TISSUES = ("gm", "wm", "csf")
# Intensity of each tissue per sequence (background 0), before bias, noise and gain.
CONTRAST = {
    "t1": {"gm": 0.55, "wm": 0.80, "csf": 0.20},
    "t2": {"gm": 0.65, "wm": 0.45, "csf": 1.00},
    "flair": {"gm": 0.60, "wm": 0.50, "csf": 0.10},
    "dce": {"gm": 0.55, "wm": 0.80, "csf": 0.20},  # pre-contrast phase looks like t1
}
# Lesion groups: intensity change per sequence that shows it (others are unchanged).
DEFAULT_LESIONS = (
    dict(name="edema", contrast={"t1": -0.15, "t1ce": -0.15, "t2": 0.30, "flair": 0.45},
         count=(0, 2), radius=(0.08, 0.16)),
    dict(name="enhancing", contrast={"t1ce": 0.6}, count=(1, 3), radius=(0.05, 0.10)),
)
DCE_LESIONS = (dict(name="washin", contrast={"dce": 0.7}, count=(1, 2), radius=(0.05, 0.10)),)
DCE_TISSUE_UPTAKE = {"gm": 0.10, "wm": 0.05, "csf": 0.0}
_GRID_CACHE: Dict[int, np.ndarray] = {}


def _grid(n: int) -> np.ndarray:
  if n not in _GRID_CACHE:
    ax = np.linspace(-1, 1, n, dtype=np.float32)
    _GRID_CACHE[n] = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))  # [3, n, n, n]
  return _GRID_CACHE[n]


def _rotation(rng) -> np.ndarray:
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  return (q * np.sign(np.diag(r))).astype(np.float32)


def _ellipsoid(g, rng, centre, radii, sharp=12.0) -> np.ndarray:
  """Soft membership in [0, 1] of a randomly rotated ellipsoid (smooth edge).

  Evaluated only inside the box where the sigmoid exceeds ~3e-4, which makes small lesions
  nearly free (the 1,000-subject budget is mostly gzip).
  """
  n = g.shape[1]
  rot = _rotation(rng)
  reach = float(np.max(radii)) * np.sqrt(1.0 + 8.0 / sharp)
  idx = lambda c: (max(0, int((c - reach + 1) / 2 * (n - 1))),
                   min(n, int(np.ceil((c + reach + 1) / 2 * (n - 1))) + 1))
  (x0, x1), (y0, y1), (z0, z1) = (idx(c) for c in centre)
  out = np.zeros(g.shape[1:], np.float32)
  if x0 >= x1 or y0 >= y1 or z0 >= z1:
    return out
  sub = g[:, x0:x1, y0:y1, z0:z1] - np.asarray(centre, np.float32)[:, None, None, None]
  d = np.tensordot(rot, sub, 1)
  r2 = sum((d[i] / np.float32(radii[i])) ** 2 for i in range(3))
  out[x0:x1, y0:y1, z0:z1] = 1.0 / (1.0 + np.exp(np.clip((r2 - 1.0) * sharp, -30, 30)))
  return out


def phantom(n: int, rng, sequences: Sequence[str], lesions, phases: int = 0):
  """One subject -> (images {seq: float32 [n,n,n] or [n,n,n,P]}, masks {name: uint8})."""
  g = _grid(n)
  head_r = rng.uniform(0.70, 0.85, 3)
  head = _ellipsoid(g, rng, rng.uniform(-0.03, 0.03, 3), head_r, sharp=25.0)
  wm = np.zeros_like(head)
  for _ in range(rng.integers(3, 6)):
    wm = np.maximum(wm, _ellipsoid(g, rng, rng.uniform(-0.35, 0.35, 3) * head_r,
                                   rng.uniform(0.2, 0.45, 3)))
  csf = np.zeros_like(head)
  for side in (-1, 1):
    csf = np.maximum(csf, _ellipsoid(g, rng, [side * rng.uniform(0.08, 0.15), rng.uniform(-.1, .1),
                                              rng.uniform(-.1, .1)], rng.uniform(0.06, 0.2, 3)))
  frac = {"csf": csf * head, "wm": wm * (1 - csf) * head}
  frac["gm"] = head - frac["csf"] - frac["wm"]
  clean = {}
  for s in sequences:
    table = CONTRAST["t1" if s == "t1ce" else s]
    jit = rng.uniform(0.95, 1.05, len(TISSUES))
    clean[s] = sum(frac[t] * np.float32(table[t] * j) for t, j in zip(TISSUES, jit))
  if "t1ce" in clean and "t1" in clean:
    clean["t1ce"] = clean["t1"].copy()  # the twin: identical before its own lesions
  masks = {"brain": (head > 0.5).astype(np.uint8)}
  seg = np.zeros(head.shape, np.uint8)
  unique: Dict[str, np.ndarray] = {}
  for label, grp in enumerate(lesions, start=1):
    shown = [s for s in grp["contrast"] if s in clean]
    m = np.zeros_like(head)
    for _ in range(rng.integers(grp["count"][0], grp["count"][1] + 1)):
      m = np.maximum(m, _ellipsoid(g, rng, rng.uniform(-0.45, 0.45, 3) * head_r,
                                   rng.uniform(*grp["radius"], 3), sharp=8.0))
    m *= head > 0.5
    for s in shown:
      if s != "dce":
        clean[s] = clean[s] + np.float32(grp["contrast"][s]) * m
    seg[m > 0.5] = label
    if len(shown) == 1:
      u = unique.setdefault(shown[0], np.zeros(head.shape, np.uint8))
      u |= (m > 0.5).astype(np.uint8)
    if "dce" in shown:
      frac["dce_lesion"] = m * np.float32(grp["contrast"]["dce"])
  masks["seg"] = seg
  masks.update({f"unique_{s}": u for s, u in unique.items()})
  c = 0.5 * rng.standard_normal(3).astype(np.float32)
  bias = np.exp(0.25 * (c[0] * g[0] + c[1] * g[1] + c[2] * g[2]) + 0.1 * rng.standard_normal()
                * (g[0] ** 2 + g[1] ** 2 - 2 * g[2] ** 2)).astype(np.float32)
  gains = {s: rng.uniform(300, 3000) for s in clean}
  if "t1ce" in gains and "t1" in gains:
    gains["t1ce"] = gains["t1"]
  images = {}
  for s, img in clean.items():
    if s == "dce":
      tau = rng.uniform(0.8, 2.0)
      enh = sum(frac[t] * np.float32(DCE_TISSUE_UPTAKE[t]) for t in TISSUES)
      enh = enh + frac.get("dce_lesion", 0)
      ks = np.arange(phases, dtype=np.float32)
      img = img[..., None] + enh[..., None] * (1 - np.exp(-ks / np.float32(tau)))
    sigma = np.float32(0.02)
    # |signal + noise|: magnitude images have a non-negative, half-normal background.
    noisy = np.abs(img * (bias[..., None] if img.ndim == 4 else bias)
                   + sigma * rng.standard_normal(img.shape, np.float32))
    # Skull-stripped like BraTS: exact zeros outside the head, which the official loader's
    # background rule (crop mean == -1 after normalisation) relies on.
    outside = head < 0.01
    noisy[outside] = 0  # boolean index over the first three axes: every phase
    images[s] = noisy * np.float32(gains[s])
  return images, masks


def _affine(n: int) -> np.ndarray:
  aff = np.eye(4)
  aff[:3, 3] = -(n - 1) / 2.0
  return aff


def _make_subject(args):
  out, name, index, seed, n, sequences, lesions, phases = args
  rng = np.random.default_rng([seed, index])
  images, masks = phantom(n, rng, sequences, lesions, phases)
  d = os.path.join(out, name)
  os.makedirs(d, exist_ok=True)
  aff = _affine(n)
  for s, img in images.items():
    nib.save(nib.Nifti1Image(np.round(img).clip(0, 32767).astype(np.int16), aff),
             os.path.join(d, f"{name}_{s}.nii.gz"))
  for k, m in masks.items():
    nib.save(nib.Nifti1Image(m, aff), os.path.join(d, f"{name}_{k}.nii.gz"))
  return name


def make_toy_dataset(out_dir: str, subjects: int, seed: int, size: int = 64,
                     dynamic: bool = False, phases: int = 4, missing_prob: float = 0.25,
                     split_fractions=(0.7, 0.1, 0.2), lesions: Optional[List[dict]] = None,
                     num_workers: int = 0, progress: bool = True) -> str:
  """Writes `subjects` phantoms of size^3 under out_dir (see module docstring); returns it.

  Built under a temporary name and renamed when complete. An existing complete folder (with
  toy.json) is replaced.
  """
  sequences = ["t1", "t1ce", "t2", "flair"] + (["dce"] if dynamic else [])
  if lesions is None:
    lesions = DEFAULT_LESIONS + (DCE_LESIONS if dynamic else ())
  lesions = list(lesions)
  for grp in lesions:
    bad = [s for s in grp["contrast"] if s not in sequences]
    if bad:
      raise ValueError(f"lesion group {grp.get('name')!r} names unknown sequences {bad}")
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = f"{out_dir}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  names = [f"Toy_{i:05d}" for i in range(subjects)]
  jobs = [(tmp, nm, i, seed, size, sequences, lesions, phases if dynamic else 0)
          for i, nm in enumerate(names)]
  nw = num_workers or os.cpu_count() or 1
  try:
    os.makedirs(tmp)
    bar = tqdm(total=subjects, desc="toy", unit="subject", disable=not progress or None)
    if nw > 1 and subjects > 1:
      with cf.ProcessPoolExecutor(min(nw, subjects),
                                  mp_context=multiprocessing.get_context("spawn")) as ex:
        for _ in ex.map(_make_subject, jobs, chunksize=max(1, min(16, subjects // (4 * nw)))):
          bar.update(1)
    else:
      for j in jobs:
        _make_subject(j)
        bar.update(1)
    bar.close()
    _write_splits(tmp, names, sequences, seed, missing_prob, split_fractions)
    with open(os.path.join(tmp, "toy.json"), "w") as f:
      json.dump(dict(sequences=sequences, subjects=subjects, seed=seed, size=size,
                     dynamic=dynamic, phases=phases if dynamic else 1, lesions=lesions,
                     missing_prob=missing_prob), f, indent=1)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _write_splits(out, names, sequences, seed, missing_prob, fractions):
  """Random availability masks (each sequence missing with `missing_prob`, at least one kept)
  and a random train/valid/test partition, all from the seed."""
  rng = np.random.default_rng([seed, 2 ** 31])
  n, k = len(names), len(sequences)
  order = rng.permutation(n)
  n_valid = max(1 if n >= 3 else 0, int(round(fractions[1] * n)))
  n_test = max(1 if n >= 3 else 0, int(round(fractions[2] * n)))
  n_train = n - n_valid - n_test
  parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid],
           "test": order[n_train + n_valid:]}
  for split, idx in parts.items():
    with open(os.path.join(out, f"{split}.csv"), "w") as f:
      for i in sorted(idx):
        bits = rng.random(k) >= missing_prob
        if not bits.any():
          bits[rng.integers(k)] = True
        f.write(f"{names[i]},{int(''.join('1' if b else '0' for b in bits), 2)}\n")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--subjects", type=int, required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--dynamic", action="store_true", help="add the 4D 'dce' sequence")
  ap.add_argument("--phases", type=int, default=4)
  ap.add_argument("--missing_prob", type=float, default=0.25)
  ap.add_argument("--num_workers", type=int, default=0, help="0: one per CPU core")
  ap.add_argument("--lesions", default="",
                  help="JSON list (or a .json file) of lesion groups replacing the default, e.g. "
                       '\'[{"name": "x", "contrast": {"t2": 0.5}, "count": [1, 2], '
                       '"radius": [0.05, 0.1]}]\'')
  a = ap.parse_args(argv)
  lesions = None
  if a.lesions:
    text = open(a.lesions).read() if a.lesions.endswith(".json") else a.lesions
    lesions = json.loads(text)
  print(make_toy_dataset(a.out, a.subjects, a.seed, a.size, a.dynamic, a.phases,
                         a.missing_prob, lesions=lesions, num_workers=a.num_workers))


if __name__ == "__main__":
  main()
