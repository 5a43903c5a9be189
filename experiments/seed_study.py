"""Seed study: how stable the sequence contributions C_t / C_d and their ranks are.

    python -m experiments.sweep --config=configs/toy.py \
        --sweep=experiments/sweeps/toy_seeds.py --root=/tmp/toy_seeds
    python -m experiments.seed_study /tmp/toy_seeds

For each trained point of the sweep under ROOT, runs the test-split evaluation
(`python main.py --mode=evaluate ...`, with the point's own config and overrides, output in
`eval.log`) when `WORKDIR/eval/contribution.csv` is missing, then aggregates the points'
contribution tables: per variant and sequence, mean and sample std (ddof=1) of C_t and C_d and
how often each rank occurs. Writes `ROOT/seed_study.csv` and `ROOT/seed_study.md` (also
printed). Exit code 1 when a point could not be evaluated (the others are still aggregated).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments import collate
from experiments import sweep_lib

FLAGS = flags.FLAGS
def _define_flags() -> None:
  # Only when run as a program: these modules are imported together by tests, and absl
  # flags are process-global.
  flags.DEFINE_string("config", None, "Config file the sweep ran (default: from ROOT/sweep.json).")
  flags.DEFINE_list("variants", None, "Contribution variants in the Markdown table (default: all; "
                    "e.g. robust_all_pairs,official_all_pairs).")
  flags.DEFINE_bool("evaluate", True, "Run the evaluation of points lacking contribution.csv.")


CONTRIBUTION = os.path.join("eval", "contribution.csv")


def evaluate_point(workdir: str, config_path: str, fixed_flags: Sequence[str]) -> str | None:
  """Runs main.py --mode=evaluate for one point; returns an error message or None."""
  overrides = sweep_lib.read_json(os.path.join(workdir, "overrides.json")) or {}
  argv = sweep_lib.main_command(config_path, workdir, overrides, fixed_flags) + ["--mode=evaluate"]
  log_path = os.path.join(workdir, "eval.log")
  with open(log_path, "a") as log:
    log.write(f"\n===== {sweep_lib.shell_line(argv)}\n")
    log.flush()
    rc = subprocess.run(argv, cwd=sweep_lib.REPO, stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL).returncode
  if rc == 0 and os.path.exists(os.path.join(workdir, CONTRIBUTION)):
    return None
  return f"evaluation exited with {rc}, no {CONTRIBUTION} (see {log_path})"


def read_contribution(path: str) -> list[dict[str, Any]]:
  """Rows of one contribution.csv (variant, sequence, C_t, rank_t, C_d, rank_d, ...)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  need = {"variant", "sequence", "C_t", "rank_t", "C_d", "rank_d"}
  if not rows or not need <= set(rows[0]):
    raise ValueError(f"{path}: expected columns {sorted(need)}, got "
                     f"{sorted(rows[0]) if rows else 'no rows'}")
  num = lambda v: float(v) if v not in ("", "None", None) else None
  return [{"variant": r["variant"], "sequence": r["sequence"], "C_t": num(r["C_t"]),
           "rank_t": num(r["rank_t"]), "C_d": num(r["C_d"]), "rank_d": num(r["rank_d"])}
          for r in rows]


def aggregate(tables: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
  """Per (variant, sequence): n, mean/std of C_t and C_d, counts of each rank."""
  cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
  n_seq: dict[str, int] = {}
  for table in tables:
    for r in table:
      cells.setdefault((r["variant"], r["sequence"]), []).append(r)
    for v in {r["variant"] for r in table}:
      n_seq[v] = max(n_seq.get(v, 0), sum(r["variant"] == v for r in table))
  out = []
  for (variant, seq), rs in cells.items():
    row: dict[str, Any] = {"variant": variant, "sequence": seq, "n": len(rs)}
    for k in ("C_t", "C_d"):
      vals = np.array([r[k] for r in rs if r[k] is not None and np.isfinite(r[k])])
      row[f"{k}_mean"] = float(vals.mean()) if vals.size else None
      row[f"{k}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else None)
    for k in ("rank_t", "rank_d"):
      ranks = [int(r[k]) for r in rs if r[k] is not None]
      for i in range(1, n_seq[variant] + 1):
        row[f"{k}_{i}"] = ranks.count(i) if ranks else None
    out.append(row)
  return out


def markdown(rows: Sequence[dict[str, Any]], variants: Sequence[str] | None = None) -> str:
  """One Markdown table per variant: mean ± std and rank counts (1st/2nd/... place)."""
  variants = variants or list(dict.fromkeys(r["variant"] for r in rows))
  parts = []
  for v in variants:
    vr = [r for r in rows if r["variant"] == v]
    if not vr:
      raise ValueError(f"variant {v!r} not in the contribution tables "
                       f"(have: {', '.join(dict.fromkeys(r['variant'] for r in rows))})")
    n_rank = sum(k.startswith("rank_d_") for k in vr[0])
    has_t = any(r["C_t_mean"] is not None for r in vr)
    places = "/".join(str(i) for i in range(1, n_rank + 1))
    head = ["sequence", "n"] + (["C_t mean ± std"] if has_t else []) + ["C_d mean ± std"]
    head += ([f"rank C_t = {places}"] if has_t else []) + [f"rank C_d = {places}"]
    lines = [f"**{v}**", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    pm = lambda r, k: (f"{r[k + '_mean']:.3f} ± {r[k + '_std']:.3f}"
                       if r[k + "_mean"] is not None else "-")
    counts = lambda r, k: "/".join(str(r[f"{k}_{i}"]) for i in range(1, n_rank + 1))
    for r in sorted(vr, key=lambda r: -(r["C_d_mean"] if r["C_d_mean"] is not None else -1e9)):
      cells = [r["sequence"], str(r["n"])] + ([pm(r, "C_t")] if has_t else []) + [pm(r, "C_d")]
      cells += ([counts(r, "rank_t")] if has_t else []) + [counts(r, "rank_d")]
      lines.append("| " + " | ".join(cells) + " |")
    parts.append("\n".join(lines))
  return "\n\n".join(parts) + "\n"


def seed_study(root: str, config_path: str | None = None, run_evaluation: bool = True,
               variants: Sequence[str] | None = None) -> dict[str, Any]:
  """Evaluates what is missing, aggregates, writes ROOT/seed_study.{csv,md}."""
  root = os.path.abspath(os.path.expanduser(root))
  manifest = sweep_lib.read_json(os.path.join(root, "sweep.json")) or {}
  config_path = config_path or manifest.get("config")
  fixed_flags = manifest.get("fixed", [])
  tables, used, errors = [], [], {}
  for name in collate.find_points(root):
    wd = os.path.join(root, name)
    status = (sweep_lib.read_json(os.path.join(wd, "status.json")) or {}).get("status")
    if status not in (None, "done"):
      errors[name] = f"training status is {status!r}, not evaluated"
      continue
    if not os.path.exists(os.path.join(wd, CONTRIBUTION)):
      if not run_evaluation:
        errors[name] = f"no {CONTRIBUTION}"
        continue
      if not config_path:
        raise ValueError(f"{root}/sweep.json names no config: pass --config")
      print(f"[seed_study] {name}: evaluating", flush=True)
      err = evaluate_point(wd, config_path, fixed_flags)
      if err:
        errors[name] = err
        continue
    tables.append(read_contribution(os.path.join(wd, CONTRIBUTION)))
    used.append(name)
  if not tables:
    raise ValueError(f"no point under {root} has {CONTRIBUTION}: {errors}")
  rows = aggregate(tables)
  csv_path = os.path.join(root, "seed_study.csv")
  header = list(dict.fromkeys(k for r in rows for k in r))
  collate.write_csv(csv_path, header, rows)
  md = (f"Seed study over {len(used)} points of {root} ({', '.join(used)}); mean ± sample std; "
        f"rank counts: how many points ranked the sequence 1st/2nd/...\n\n"
        + markdown(rows, variants))
  md_path = os.path.join(root, "seed_study.md")
  tmp = f"{md_path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(md)
  os.replace(tmp, md_path)
  return {"rows": rows, "markdown": md, "csv": csv_path, "md": md_path, "points": used,
          "errors": errors}


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m experiments.seed_study ROOT [--config=...]")
  res = seed_study(argv[1], FLAGS.config and os.path.abspath(FLAGS.config), FLAGS.evaluate,
                   FLAGS.variants)
  print(res["markdown"])
  for name, err in res["errors"].items():
    print(f"[seed_study] {name}: {err}", file=sys.stderr)
  print("wrote", res["csv"], res["md"])
  return 1 if res["errors"] else 0


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
