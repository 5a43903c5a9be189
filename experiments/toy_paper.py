"""The paper's toy experiment end to end, one command.

    python -m experiments.toy_paper --workdir=/tmp/toy_paper [--config=configs/toy.py]
        [--config.train.total_steps=...] [--skip_train]

1. makes the toy phantoms (t1ce = t1 + enhancing lesions that no other sequence shows, at
   random places per subject) and prepares them (`config.data`);
2. trains the config in `--workdir` (resumes; returns at once when already finished; a
   workdir that holds a run uses its own `config.json`, not `--config`);
3. evaluates the test split (`main.py --mode=evaluate`: official metrics, C_t/C_d in every
   variant, M_d NIfTI per subject and target);
4. scores M_d of t1ce against the ground-truth unique-lesion masks within the brain: ROC AUC
   pooled over every test voxel and per subject (and M_d of the other sequences against the
   same masks, as controls: they should not single out t1ce's lesions);
5. prints a results table and writes it to `WORKDIR/toy_paper.md` (and `.json`).
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import ml_collections
import nibabel as nib
import numpy as np
from ml_collections import config_flags

from seq2seq_jax import analysis

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "toy.py"),
                                  "Experiment config (a toy layout).", lock_config=True)
  flags.DEFINE_string("workdir", "/tmp/toy_paper", "Training and evaluation directory.")
  flags.DEFINE_bool("skip_train", False, "Evaluate the workdir's checkpoints as they are.")
  flags.DEFINE_string("unique_sequence", "t1ce", "The sequence whose unique lesions M_d "
                      "should find.")


def toy_root(config: ml_collections.ConfigDict) -> str:
  """The raw toy NIfTI folder of `config.data` (made when absent)."""
  from input_pipeline import prepare
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.cache_dir = os.path.abspath(os.path.expanduser(data.cache_dir))
  return prepare._resolve_toy(data).root


def md_auc(eval_dir: str, root: str, unique: str, sequences) -> dict:
  """ROC AUC of each target's M_d against `<subject>_unique_<unique>` within the brain."""
  md_dir = os.path.join(eval_dir, "md")
  subjects = sorted({f.split("_md_")[0] for f in os.listdir(md_dir) if f.endswith(".nii.gz")})
  pooled = {s: ([], []) for s in sequences}
  per_subject = {s: [] for s in sequences}
  for name in subjects:
    lesion_path = os.path.join(root, name, f"{name}_unique_{unique}.nii.gz")
    brain = np.asarray(nib.load(os.path.join(root, name, f"{name}_brain.nii.gz")).dataobj) > 0
    lesion = np.asarray(nib.load(lesion_path).dataobj) > 0
    # Control: the unique sequence's own intensity (its lesions are bright, so intensity alone
    # separates them to some degree; M_d must do better to show it finds *unique* content).
    img = np.asarray(nib.load(os.path.join(root, name, f"{name}_{unique}.nii.gz")).dataobj)
    pooled.setdefault("intensity", ([], []))
    per_subject.setdefault("intensity", [])
    pooled["intensity"][0].append(img[brain].astype(np.float64))
    pooled["intensity"][1].append(lesion[brain])
    if lesion[brain].any():
      per_subject["intensity"].append(analysis.roc_auc(img[brain], lesion[brain]))
    for s in sequences:
      path = os.path.join(md_dir, f"{name}_md_{s}.nii.gz")
      if not os.path.isfile(path):
        continue
      md = np.asarray(nib.load(path).dataobj)
      if md.shape != brain.shape:
        raise ValueError(f"{path}: shape {md.shape} differs from the mask's {brain.shape}")
      scores, labels = md[brain], lesion[brain]
      pooled[s][0].append(scores)
      pooled[s][1].append(labels)
      if labels.any() and not labels.all():
        per_subject[s].append(analysis.roc_auc(scores, labels))
  out = {}
  for s in list(sequences) + ["intensity"]:
    if not pooled.get(s, [[]])[0]:
      continue
    sc, lb = np.concatenate(pooled[s][0]), np.concatenate(pooled[s][1])
    ps = np.asarray(per_subject[s])
    out[s] = {"auc_pooled": analysis.roc_auc(sc, lb), "auc_mean": float(ps.mean()),
              "auc_std": float(ps.std()), "auc_min": float(ps.min()), "subjects": len(ps),
              "lesion_voxels": int(lb.sum()), "brain_voxels": int(lb.size)}
  return out


def results_markdown(res: dict, auc: dict, unique: str, step: int, eval_seconds: float) -> str:
  from seq2seq_jax.evaluate import format_contribution
  lines = [f"Checkpoint step {step}; test subjects {res['subjects']}; official rows "
           f"{res['official_rows']}, all-pair rows {res['all_pair_rows']}; evaluation "
           f"{eval_seconds:.0f} s.", "",
           "| rows | PSNR | SSIM |", "| --- | --- | --- |",
           f"| official (missing targets) | {res['psnr']:.2f} | {res['ssim']:.4f} |",
           f"| all pairs (src != tgt) | {res['psnr_all_pairs']:.2f} | "
           f"{res['ssim_all_pairs']:.4f} |", "",
           f"M_d of each target vs the `{unique}` unique-lesion masks, within the brain:", "",
           "| M_d of | ROC AUC pooled | per subject mean ± std (min) | subjects |",
           "| --- | --- | --- | --- |"]
  for s, a in auc.items():
    label = f"({unique} intensity, control)" if s == "intensity" else s
    lines.append(f"| {label} | {a['auc_pooled']:.3f} | {a['auc_mean']:.3f} ± {a['auc_std']:.3f} "
                 f"({a['auc_min']:.3f}) | {a['subjects']} |")
  lines += ["", "Contribution (C value (rank)); `md` = mean M_d in the brain:", "",
            format_contribution(res["contribution"])]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str, skip_train: bool = False,
        unique: str = "t1ce") -> dict:
  from seq2seq_jax import evaluate
  from seq2seq_jax import train
  workdir = os.path.abspath(os.path.expanduser(workdir))
  saved = os.path.join(workdir, "config.json")
  if os.path.isfile(saved):
    # A workdir holding a run is continued and evaluated with the config it was trained with,
    # whatever configs/toy.py says now (the model and the phantoms must match).
    with open(saved) as f:
      config = ml_collections.ConfigDict(json.load(f))
    print(f"using the run's own config {saved}")
  root = toy_root(config)  # 1. phantoms
  if not skip_train:
    train.train_and_evaluate(config, workdir)  # 2. (prepares the data too)
  t0 = time.time()
  res = evaluate.evaluate(config, workdir)  # 3.
  eval_seconds = time.time() - t0
  sequences = [r["sequence"] for r in res["contribution"] if r["variant"] == "official"]
  auc = md_auc(os.path.join(workdir, "eval"), root, unique, sequences)  # 4.
  text = results_markdown(res, auc, unique, res["step"], eval_seconds)
  for ext, body in (("md", text + "\n"),
                    ("json", json.dumps({"auc": auc, "eval_seconds": eval_seconds,
                                         **{k: v for k, v in res.items()}}, indent=1,
                                        default=lambda o: o.item() if hasattr(o, "item")
                                        else str(o)))):
    path = os.path.join(workdir, f"toy_paper.{ext}")
    with open(path + ".tmp", "w") as f:
      f.write(body)
    os.replace(path + ".tmp", path)
  print(text)
  return {"auc": auc, "results": res, "markdown": text}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.skip_train,
      flags.FLAGS.unique_sequence)


if __name__ == "__main__":
  app.run(main)
