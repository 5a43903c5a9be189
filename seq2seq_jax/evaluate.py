"""Test-split evaluation: official metrics, sequence contribution (C_t, C_d) and M_d maps.

    python main.py --config=configs/toy.py --workdir=DIR --mode=evaluate \
        [--checkpoint_step=N] [--save_predictions]

For every test subject, each source sequence's whole volume is encoded once and decoded for
every target (`inference.VolumeInference`), batches split over all local devices (single
process; a multi-process run evaluates on each process's first device, duplicated work).
What is written under `DIR/eval/`:

- `result_metrics.csv`: the official test rows, `name,src,tgt,psnr,ssim,lpips`, for every
  missing target (unavailable in the split CSV, but with a ground-truth file) × every available
  source, scored on the official test crop (central min(128, D) slices × `valid_size` H, W):
  PSNR and SSIM with data range 2 on the prediction's slice stack (`metrics.py`), LPIPS-alex
  summed over the slices (`lpips.py`). LPIPS needs weights that cannot be downloaded here:
  the column is left empty unless `config.eval.lpips_weights` names a weight file (or an
  `lpips_fn` is given to `evaluate_dataset`). The crop is cut from the whole-volume prediction
  (the official script feeds the crop itself: for in-plane crops smaller than the image the
  borders see more context here).
- `all_pairs_metrics.csv`: the same scores plus the scale-robust `zpsnr`/`zssim`
  (`analysis.robust_metrics`, in the brain) for every present target × every present source
  (src != tgt): on the toy split few targets are missing, and the ranking needs every cell.
- `summary.csv`: per (src, tgt) mean ± std of each metric, for both row sets.
- `contribution.csv` + `contribution.png`: C_t and C_d with ranks for each variant:
  `official` (official rows, psnr + ssim [- lpips]), `official_all_pairs`,
  `robust_all_pairs` (zpsnr + zssim, every pair) and `md` (C_d = mean M_d in the brain,
  averaged over subjects; no C_t).
- `md/<subject>_md_<sequence>.nii.gz`: M_d of every present target over every present source
  (the target itself included), in the subject's original affine and shape, plus
  `md/<subject>_md.png` (central slices, M_d over the target); `md_summary.csv`.
- `pred/<subject>_<tgt>_from_<src>.nii.gz` with `save_predictions`: the official rows'
  predictions in original geometry and intensity scale (the target's own `scale`/`offset`,
  known here from its ground truth).
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import nibabel as nib
import numpy as np
from tqdm import tqdm

from input_pipeline import dataset as dataset_lib
from input_pipeline import geometry
from input_pipeline import normalization
from seq2seq_jax import analysis
from seq2seq_jax import metrics as metrics_lib
from seq2seq_jax.inference import VolumeInference
from seq2seq_jax.models import Generator

OFFICIAL_FIELDS = ["name", "src", "tgt", "psnr", "ssim", "lpips"]
TEST_DEPTH = 128  # the official test crop keeps the central 128 slices


def _tmp(path: str) -> str:
  d, base = os.path.split(path)
  return os.path.join(d, f".tmp-{os.getpid()}-{base}")


def write_csv(path: str, rows: Sequence[Mapping], fields: Sequence[str]) -> None:
  """CSV written to a temporary name and renamed when complete."""
  tmp = _tmp(path)
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
  os.replace(tmp, path)


def save_nifti(path: str, vol: np.ndarray, affine: np.ndarray) -> None:
  """NIfTI (float32) written to a temporary name and renamed when complete."""
  tmp = _tmp(path)  # keeps the .nii.gz ending, so nibabel compresses
  nib.save(nib.Nifti1Image(np.asarray(vol, np.float32), np.asarray(affine, np.float64)), tmp)
  os.replace(tmp, path)


def test_box(shape: Sequence[int], valid_size: Sequence[int], depth: int = TEST_DEPTH):
  """Slices of the official test crop: central `depth` slices × central valid H, W."""
  size = [min(depth, shape[0])] + [min(int(v), s) for v, s in zip(valid_size[1:], shape[1:])]
  return tuple(slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(shape, size))


def _stack(x: np.ndarray) -> np.ndarray:
  """[t, D, H, W] → the scored [t·D, H, W] stack."""
  return x.reshape((-1,) + x.shape[-2:])


def score(pred, tgt, mask, lpips_fn=None, robust=True) -> dict:
  """Official PSNR/SSIM (data range 2) on `[t, D, H, W]` arrays, optional LPIPS, robust z-."""
  row = {"psnr": metrics_lib.psnr(pred, tgt),
         "ssim": metrics_lib.ssim(_stack(pred), _stack(tgt)),
         "lpips": float(lpips_fn(_stack(pred), _stack(tgt))) if lpips_fn else None}
  if robust:
    row.update(analysis.robust_metrics(_stack(pred), _stack(tgt), _stack(mask)))
  return row


def evaluate_subject(inf: VolumeInference, rec: Mapping[str, Any], valid_size: Sequence[int],
                     lpips_fn: Callable | None = None) -> dict:
  """All predictions and scores for one decoded record (`dataset.decode_record`).

  Returns {'official': rows, 'all_pairs': rows, 'md': {tgt index: [t, D, H, W]},
  'md_rows': rows, 'preds': {(src, tgt): [t, D, H, W]} (official pairs only)}.
  """
  name, seqs = rec["name"], list(rec["sequences"])
  vols = {seqs.index(s): np.asarray(v, np.float32) for s, v in rec["volumes"].items()}
  if not vols:
    raise ValueError(f"subject {name!r}: the record holds no volume")
  present = sorted(vols)
  avail = [i for i, a in enumerate(rec["available"]) if a and i in vols]
  missing = [i for i in present if not rec["available"][i]]
  phases = {i: vols[i].shape[0] for i in present}
  preds = {s: inf.predict(vols[s], [(t, phases[t]) for t in present]) for s in present}
  brain = analysis.foreground(*[v.max(axis=0) for v in vols.values()])  # [D, H, W]
  box = test_box(brain.shape, valid_size)
  crop = lambda x: x[(slice(None),) + box]
  out = {"official": [], "all_pairs": [], "md": {}, "md_rows": [], "preds": {}}
  for t in present:
    tgt = crop(vols[t])
    mask = np.broadcast_to(crop(brain[None]), tgt.shape)
    for s in present:
      if s == t:
        continue
      row = {"name": name, "src": seqs[s], "tgt": seqs[t]}
      row.update(score(crop(preds[s][t]), tgt, mask, lpips_fn))
      out["all_pairs"].append(row)
      if t in missing and s in avail:
        out["official"].append({k: row[k] for k in OFFICIAL_FIELDS})
        out["preds"][(s, t)] = preds[s][t]
    md = analysis.md_map([preds[s][t] for s in present], vols[t])
    out["md"][t] = md
    fg = np.broadcast_to(brain[None], md.shape)
    out["md_rows"].append({"name": name, "tgt": seqs[t], "sources": len(present),
                           "md_mean_brain": float(md[fg].mean())})
  return out


def _overlay_png(path: str, tgt: Mapping[str, np.ndarray], md: Mapping[str, np.ndarray],
                 title: str) -> None:
  """Rows = targets; columns = axial/coronal/sagittal central slices of the target, then M_d
  over it (hot colormap, transparent where small)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(md)
  vmax = max(float(np.percentile(m, 99.5)) for m in md.values()) or 1.0
  fig, axes = plt.subplots(len(names), 6, figsize=(12, 2.1 * len(names)), squeeze=False)
  for r, n in enumerate(names):
    v, m = tgt[n][0], md[n][0]
    c = [s // 2 for s in v.shape]
    cuts = [(v[c[0]], m[c[0]]), (v[:, c[1]], m[:, c[1]]), (v[:, :, c[2]], m[:, :, c[2]])]
    for k, (img, mm) in enumerate(cuts):
      axes[r, k].imshow(img, cmap="gray", vmin=-1, vmax=1, origin="lower")
      axes[r, k + 3].imshow(img, cmap="gray", vmin=-1, vmax=1, origin="lower")
      axes[r, k + 3].imshow(np.ma.masked_less(mm, 0.05 * vmax), cmap="hot", vmin=0, vmax=vmax,
                            alpha=0.8, origin="lower")
    axes[r, 0].set_ylabel(n)
  for a in axes.ravel():
    a.set_xticks([])
    a.set_yticks([])
  axes[0, 0].set_title("target")
  axes[0, 3].set_title(f"M_d (0..{vmax:.2f})")
  fig.suptitle(title)
  fig.tight_layout()
  tmp = _tmp(path)
  fig.savefig(tmp, format="png", dpi=80)
  plt.close(fig)
  os.replace(tmp, path)


def summarize(rows: Sequence[Mapping], keys: Sequence[str], rowset: str) -> list[dict]:
  """Mean ± std of each metric per (src, tgt) (and over all pairs, src = tgt = 'all')."""
  groups: dict[tuple[str, str], list] = {}
  for r in rows:
    groups.setdefault((r["src"], r["tgt"]), []).append(r)
    groups.setdefault(("all", "all"), []).append(r)
  out = []
  for (s, t), rs in sorted(groups.items()):
    row = {"rows": rowset, "src": s, "tgt": t, "n": len(rs)}
    for k in keys:
      v = np.array([float(r[k]) for r in rs if r.get(k) is not None], np.float64)
      v = v[np.isfinite(v)]
      row[f"{k}_mean"] = float(v.mean()) if v.size else None
      row[f"{k}_std"] = float(v.std()) if v.size else None
    out.append(row)
  return out


def contribution_table(official, all_pairs, md_rows, sequences) -> list[dict]:
  """One row per (variant, sequence): C_t, rank_t, C_d, rank_d."""
  out = []
  variants = [("official", official, ("psnr", "ssim", "lpips")),
              ("official_all_pairs", all_pairs, ("psnr", "ssim", "lpips")),
              ("robust_all_pairs", all_pairs, ("zpsnr", "zssim"))]
  for name, rows, keys in variants:
    c = analysis.contribution(rows, sequences, keys)
    for i, s in enumerate(sequences):
      out.append({"variant": name, "sequence": s, "C_t": c["C_t"][i], "rank_t": c["rank_t"][i],
                  "C_d": c["C_d"][i], "rank_d": c["rank_d"][i], "metrics": "+".join(c["metrics"]),
                  "rows": len(rows)})
  md = np.array([np.mean([r["md_mean_brain"] for r in md_rows if r["tgt"] == s] or [np.nan])
                 for s in sequences])
  rk = analysis.ranks(np.nan_to_num(md, nan=-np.inf))
  for i, s in enumerate(sequences):
    out.append({"variant": "md", "sequence": s, "C_t": None, "rank_t": None, "C_d": md[i],
                "rank_d": rk[i], "metrics": "mean M_d in brain", "rows": len(md_rows)})
  return out


def _contribution_png(path: str, table: Sequence[Mapping]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  variants = [v for v in dict.fromkeys(r["variant"] for r in table) if v != "md"]
  fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 3.2), squeeze=False)
  for ax, v in zip(axes[0], variants):
    rows = [r for r in table if r["variant"] == v]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["C_t"] for r in rows], 0.4, label="C_t")
    ax.bar(x + 0.2, [r["C_d"] for r in rows], 0.4, label="C_d")
    ax.set_xticks(x, [r["sequence"] for r in rows])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(v)
  axes[0, 0].legend()
  fig.tight_layout()
  tmp = _tmp(path)
  fig.savefig(tmp, format="png", dpi=90)
  plt.close(fig)
  os.replace(tmp, path)


def evaluate_dataset(model: Generator, variables: Mapping[str, Any], dataset_dir: str,
                     out_dir: str, valid_size: Sequence[int], split: str = "test",
                     save_predictions: bool = False, lpips_fn: Callable | None = None,
                     batch_size: int = 16, patch: Sequence[int] | None = None,
                     max_subjects: int = 0, mesh=None) -> dict:
  """Evaluates `variables` on a prepared split; writes everything under `out_dir`.

  `mesh`: optional device mesh; slices/windows are split over its `data` axis.

  Returns a summary dict (row counts, mean official metrics, contribution table, seconds).
  """
  t0 = time.time()
  meta = dataset_lib.load_metadata(dataset_dir)
  sequences = list(meta["sequences"])
  src = dataset_lib.split_source(dataset_dir, split, meta)
  n = len(src) if not max_subjects else min(len(src), int(max_subjects))
  if n == 0:
    raise ValueError(f"{dataset_dir}: split {split!r} has no subject to evaluate")
  md_dir = os.path.join(out_dir, "md")
  pred_dir = os.path.join(out_dir, "pred")
  os.makedirs(md_dir, exist_ok=True)
  if save_predictions:
    os.makedirs(pred_dir, exist_ok=True)
  inf = VolumeInference(model, variables, batch_size=batch_size, patch=patch, mesh=mesh)
  official, all_pairs, md_rows = [], [], []
  for r in tqdm(range(n), desc=f"evaluate {split}", unit="subject"):
    rec = dataset_lib.decode_record(src[r])
    res = evaluate_subject(inf, rec, valid_size, lpips_fn)
    official += res["official"]
    all_pairs += res["all_pairs"]
    md_rows += res["md_rows"]
    name, seqs = rec["name"], list(rec["sequences"])
    to_nii = lambda x: geometry.to_nifti_array(x, rec["original_shape"], rec["depth_start"])
    for t, md in res["md"].items():
      save_nifti(os.path.join(md_dir, f"{name}_md_{seqs[t]}.nii.gz"), to_nii(md), rec["affine"])
    _overlay_png(os.path.join(md_dir, f"{name}_md.png"),
                 {seqs[t]: np.asarray(rec["volumes"][seqs[t]]) for t in res["md"]},
                 {seqs[t]: m for t, m in res["md"].items()}, f"{name}: M_d per target")
    if save_predictions:
      for (s, t), p in res["preds"].items():
        p = normalization.denormalize(p, rec["scale"][seqs[t]], rec["offset"][seqs[t]],
                                      rec["normalization"])
        save_nifti(os.path.join(pred_dir, f"{name}_{seqs[t]}_from_{seqs[s]}.nii.gz"),
                   to_nii(p.astype(np.float32)), rec["affine"])
  write_csv(os.path.join(out_dir, "result_metrics.csv"), official, OFFICIAL_FIELDS)
  write_csv(os.path.join(out_dir, "all_pairs_metrics.csv"), all_pairs,
            OFFICIAL_FIELDS + ["zpsnr", "zssim"])
  write_csv(os.path.join(out_dir, "md_summary.csv"), md_rows,
            ["name", "tgt", "sources", "md_mean_brain"])
  keys = ["psnr", "ssim", "lpips", "zpsnr", "zssim"]
  summary = summarize(official, keys[:3], "official") + summarize(all_pairs, keys, "all_pairs")
  write_csv(os.path.join(out_dir, "summary.csv"), summary,
            ["rows", "src", "tgt", "n"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")])
  table = contribution_table(official, all_pairs, md_rows, sequences)
  write_csv(os.path.join(out_dir, "contribution.csv"), table,
            ["variant", "sequence", "C_t", "rank_t", "C_d", "rank_d", "metrics", "rows"])
  _contribution_png(os.path.join(out_dir, "contribution.png"), table)
  mean = lambda rows, k: float(np.mean([r[k] for r in rows])) if rows else float("nan")
  return {"subjects": n, "official_rows": len(official), "all_pair_rows": len(all_pairs),
          "psnr": mean(official, "psnr"), "ssim": mean(official, "ssim"),
          "lpips": mean(official, "lpips") if lpips_fn else None,
          "psnr_all_pairs": mean(all_pairs, "psnr"), "ssim_all_pairs": mean(all_pairs, "ssim"),
          "contribution": table, "seconds": time.time() - t0, "out_dir": out_dir}


def load_model(config: ml_collections.ConfigDict, workdir: str,
               checkpoint_step: int | None = None) -> tuple[Generator, dict, int]:
  """(model, {'params': ...}, step) from `workdir`'s checkpoints (best by validation PSNR)."""
  from seq2seq_jax.checkpoint import Checkpointer
  from seq2seq_jax.train_step import make_model
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step, params = ckpt.restore_params(checkpoint_step)
  finally:
    ckpt.close()
  return make_model(config), {"params": params}, step


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint_step: int | None = None,
             save_predictions: bool = False, split: str = "test") -> dict:
  """The `--mode=evaluate` entry: restores a checkpoint, evaluates, writes `workdir/eval/`."""
  from seq2seq_jax import data as data_lib
  from seq2seq_jax import lpips as lpips_lib
  lpips_fn = lpips_lib.make_lpips_fn(config.eval.lpips_weights)  # a bad file fails here, early
  workdir = os.path.abspath(os.path.expanduser(workdir))
  model, variables, step = load_model(config, workdir, checkpoint_step)
  dataset_dir = data_lib.prepare_data(config)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  patch = tuple(config.train.valid_size) if int(config.model.ndims) == 3 else None
  import jax
  mesh = None
  if jax.process_count() == 1:  # one process: split every batch over all local devices
    from seq2seq_jax.sharding import make_mesh
    mesh = make_mesh({"data": -1, "spatial": 1})
  res = evaluate_dataset(model, variables, dataset_dir, out_dir, tuple(config.train.valid_size),
                         split=split, save_predictions=save_predictions, lpips_fn=lpips_fn,
                         patch=patch, mesh=mesh)
  res["step"] = step
  return res


def format_contribution(table: Sequence[Mapping]) -> str:
  """A Markdown table: one row per sequence, C_t/C_d (rank) per variant."""
  variants = list(dict.fromkeys(r["variant"] for r in table))
  seqs = list(dict.fromkeys(r["sequence"] for r in table))
  get = {(r["variant"], r["sequence"]): r for r in table}
  head = "| sequence | " + " | ".join(
      f"{v} C_t | {v} C_d" if v != "md" else "mean M_d (rank)" for v in variants) + " |"
  lines = [head, "|" + " --- |" * (1 + sum(1 if v == "md" else 2 for v in variants))]
  f = lambda x, r: f"{float(x):.3f} ({int(r)})"
  for s in seqs:
    cells = []
    for v in variants:
      r = get[(v, s)]
      cells += ([f(r["C_d"], r["rank_d"])] if v == "md"
                else [f(r["C_t"], r["rank_t"]), f(r["C_d"], r["rank_d"])])
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
