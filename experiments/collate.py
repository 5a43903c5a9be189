"""Collates a sweep's points: one CSV row each, a plot, mean +- std over seeds.

    python -m experiments.collate ROOT [--metric=eval_psnr] [--x=train.lr] [--out=FILE.csv]

Writes `results.csv` (one row per point: its overrides, status, steps, final and best eval
PSNR/SSIM, final train loss, wall time, error), `results_by_seed.csv` (points that differ only
in `--seed_key` grouped: n, mean and sample std (ddof=1) of each metric) and
`<metric>_vs_<x>.png` beside `--out` (default `ROOT/results.csv`). Metrics come from each
point's own `metrics.jsonl`, the last occurrence of a step winning (a resumed run logs again
the steps after its last checkpoint). The plot and the seed groups use the points whose
status is `done` (or that have no status.json: runs launched from --print_commands lines).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments import sweep_lib

FLAGS = flags.FLAGS
def _define_flags() -> None:
  # Only when run as a program: these modules are imported together by tests, and absl
  # flags are process-global.
  flags.DEFINE_string("metric", "eval_psnr", "Column plotted and summarised over seeds.")
  flags.DEFINE_string("x", None, "Swept key on the plot's x axis (default: the first swept key "
                      "other than the seed key).")
  flags.DEFINE_string("out", None, "CSV path (default ROOT/results.csv).")
  flags.DEFINE_string("seed_key", "train.seed", "Override key whose points are averaged over.")


EVAL_KEYS = ("eval_psnr", "eval_ssim", "eval_psnr_cross", "eval_ssim_cross")
METRIC_COLUMNS = ("steps", "eval_step", *EVAL_KEYS, "best_eval_psnr", "best_eval_psnr_step",
                  "best_eval_ssim", "best_eval_ssim_step", "train_loss", "wall_time_s")


def find_points(root: str) -> list[str]:
  """Point directories under `root` (those with overrides.json), in the sweep's order."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"sweep root {root} does not exist")
  names = sorted(d for d in os.listdir(root)
                 if os.path.isfile(os.path.join(root, d, "overrides.json")))
  manifest = sweep_lib.read_json(os.path.join(root, "sweep.json")) or {}
  order = {p["name"]: i for i, p in enumerate(manifest.get("points", []))}
  return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def summarize_point(workdir: str) -> dict[str, Any]:
  """One point's row: its overrides, status and metrics (from metrics.jsonl)."""
  overrides = sweep_lib.read_json(os.path.join(workdir, "overrides.json"))
  if not isinstance(overrides, dict):
    raise ValueError(f"{workdir}/overrides.json is not a JSON object")
  status = sweep_lib.read_json(os.path.join(workdir, "status.json")) or {}
  m = sweep_lib.read_metrics(workdir)
  row: dict[str, Any] = {"name": os.path.basename(workdir), "overrides": overrides,
                         "status": status.get("status", "no status.json"),
                         "attempts": status.get("attempts", ""),
                         "wall_time_s": status.get("wall_time_s", ""),
                         "error": status.get("error", "")}
  train_steps = m.get("train_loss", {})
  row["steps"] = max(train_steps) if train_steps else 0
  row["train_loss"] = train_steps[row["steps"]] if train_steps else ""
  evals = m.get("eval_psnr", {})
  if evals:
    last = max(evals)
    row["eval_step"] = last
    for k in EVAL_KEYS:
      row[k] = m.get(k, {}).get(last, "")
    for k in ("eval_psnr", "eval_ssim"):
      best = max(m[k], key=lambda s: (m[k][s], -s))  # earliest step among equal bests
      row[f"best_{k}"], row[f"best_{k}_step"] = m[k][best], best
  return row


def write_csv(path: str, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: _fmt(r.get(k, "")) for k in header})
  os.replace(tmp, path)


def _fmt(v: Any) -> Any:
  if isinstance(v, (list, tuple, dict)):
    return json.dumps(v)
  return v


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _usable(row: dict[str, Any]) -> bool:
  return row["status"] in ("done", "no status.json")


def seed_groups(rows: Sequence[dict[str, Any]], seed_key: str) -> list[dict[str, Any]]:
  """Mean and sample std of each metric over points that differ only in `seed_key`."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    if _usable(r) and seed_key in r["overrides"]:
      rest = {k: v for k, v in r["overrides"].items() if k != seed_key}
      groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(r)
  out = []
  for key, members in groups.items():
    g: dict[str, Any] = {**json.loads(key), "n": len(members),
                         "seeds": " ".join(str(r["overrides"][seed_key]) for r in members)}
    for col in METRIC_COLUMNS:
      vals = [r[col] for r in members if _is_number(r.get(col))]
      if vals:
        g[f"{col}_mean"] = float(np.mean(vals))
        g[f"{col}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    out.append(g)
  return out


def plot(rows: Sequence[dict[str, Any]], metric: str, x: str, seed_key: str, path: str) -> bool:
  """`metric` against the swept `x`, one line per combination of the other swept keys, mean
  over seeds with +- std bars; False when no point has both values."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series: dict[str, dict[float, list[float]]] = {}
  for r in rows:
    xv, yv = r["overrides"].get(x), r.get(metric)
    if not (_usable(r) and _is_number(xv) and _is_number(yv)):
      continue
    rest = {k: v for k, v in r["overrides"].items() if k not in (x, seed_key)}
    label = ", ".join(f"{k}={v}" for k, v in rest.items()) or metric
    series.setdefault(label, {}).setdefault(float(xv), []).append(float(yv))
  if not series:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  all_x = []
  for label, pts in series.items():
    xs = sorted(pts)
    all_x += xs
    means = [np.mean(pts[v]) for v in xs]
    stds = [np.std(pts[v], ddof=1) if len(pts[v]) > 1 else 0.0 for v in xs]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    for v in xs:
      ax.scatter([v] * len(pts[v]), pts[v], s=8, alpha=0.4, color="gray")
  if min(all_x) > 0 and max(all_x) / min(all_x) >= 10:
    ax.set_xscale("log")
  ax.set_xlabel(x)
  ax.set_ylabel(metric + " (mean ± std over seeds)")
  if len(series) > 1:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  tmp = path[:-4] + f".tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return True


def collate(root: str, metric: str = "eval_psnr", x: str | None = None, out: str | None = None,
            seed_key: str = "train.seed") -> dict[str, Any]:
  """Writes the CSVs and the plot; returns their paths and the rows."""
  root = os.path.abspath(os.path.expanduser(root))
  rows = [summarize_point(os.path.join(root, n)) for n in find_points(root)]
  if not rows:
    raise ValueError(f"no point directories (with overrides.json) under {root}")
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r["overrides"] if k not in keys]
  for r in rows:
    r.update({k: r["overrides"].get(k, "") for k in keys})
  if metric not in METRIC_COLUMNS:
    raise ValueError(f"--metric={metric!r}: choose one of {', '.join(METRIC_COLUMNS)}")
  out = os.path.abspath(out or os.path.join(root, "results.csv"))
  write_csv(out, ["name", *keys, "status", "attempts", *METRIC_COLUMNS, "error"], rows)
  result: dict[str, Any] = {"rows": rows, "csv": out}

  groups = seed_groups(rows, seed_key)
  if groups:
    by_seed = out[:-4] + "_by_seed.csv" if out.endswith(".csv") else out + "_by_seed.csv"
    stats = [f"{c}_{s}" for c in METRIC_COLUMNS for s in ("mean", "std")]
    write_csv(by_seed, [k for k in keys if k != seed_key] + ["n", "seeds"] + stats, groups)
    result.update(by_seed=by_seed, groups=groups)

  if x is None:
    swept = [k for k in keys if len({json.dumps(r[k], default=str) for r in rows}) > 1]
    x = next((k for k in swept if k != seed_key), swept[0] if swept else None)
  if x is not None:
    if x not in keys:
      raise ValueError(f"--x={x!r} is not a swept key of {root} (swept: {', '.join(keys)})")
    path = os.path.join(os.path.dirname(out), f"{metric}_vs_{x.rsplit('.', 1)[-1]}.png")
    if plot(rows, metric, x, seed_key, path):
      result["plot"] = path
  return result


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m experiments.collate ROOT [--metric=... --x=...]")
  res = collate(argv[1], FLAGS.metric, FLAGS.x, FLAGS.out, FLAGS.seed_key)
  m = FLAGS.metric
  for r in res["rows"]:
    val = r.get(m, "")
    val = f"{val:.4f}" if _is_number(val) else "-"
    print(f"{r['name']:40s} {r['status']:14s} steps {r['steps']:>7} {m} {val}")
  for g in res.get("groups", []):
    if f"{m}_mean" in g:
      rest = {k: v for k, v in g.items() if "." in k}
      print(f"over seeds {g['seeds']} {rest or ''}: {m} {g[m + '_mean']:.4f} ± "
            f"{g[m + '_std']:.4f} (n={g['n']})")
  print("wrote", res["csv"], *(res[k] for k in ("by_seed", "plot") if k in res))
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
