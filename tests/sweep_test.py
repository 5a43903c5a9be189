"""Sweeps: kill and relaunch without redoing finished points, collated CSV against each run's
own metrics, --print_commands reproducing the sweep's workdirs, bit-identical seeds on CPU."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import collate
from experiments import seed_study
from experiments import sweep
from experiments import sweep_lib
from seq2seq_jax import train
from tests.train_test import assert_trees_equal, final_params, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
SWEEP_2X2 = str(REPO / "experiments" / "sweeps" / "tiny_2x2.py")
NAMES = ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.002,seed=0", "lr=0.002,seed=1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tiny_cache"))


def _sweep_cmd(root, cache_dir, *extra):
  return [sys.executable, "-m", "experiments.sweep", f"--config={TINY}", f"--sweep={SWEEP_2X2}",
          f"--root={root}", f"--set=data.cache_dir={cache_dir}", "--set=train.vis_steps=0",
          *extra]


def _status(root, name):
  return sweep_lib.read_json(os.path.join(root, name, "status.json")) or {}


def _last_by_step(workdir):
  """metrics.jsonl read independently of the code under test: last occurrence wins."""
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    for k, v in row.items():
      if k != "step":
        out.setdefault(k, {})[row["step"]] = v
  return out


def test_sweep_lib_helpers():
  pts = sweep_lib.product(sweep_lib.sweep("train.lr", [1e-3, 2e-3]),
                          sweep_lib.zip_(sweep_lib.sweep("train.seed", [0, 1]),
                                         sweep_lib.sweep("data.toy_seed", [5, 6])))
  assert pts[1] == {"train.lr": 1e-3, "train.seed": 1, "data.toy_seed": 6} and len(pts) == 4
  assert sweep_lib.point_name(pts[1]) == "lr=0.001,seed=1,toy_seed=6"
  assert sweep_lib.point_name({"a.seed": 1, "b.seed": 2}) == "a.seed=1,b.seed=2"
  assert sweep_lib.point_name({"train.crop_size": (1, 32, 32)}) == "crop_size=1x32x32"
  assert sweep_lib.point_name({"data.root": "/x y/z"}) == "root=_x_y_z"
  assert sweep_lib.override_flags({"train.crop_size": (1, 32, 32), "train.lr": 1e-05}) == [
      "--config.train.crop_size=(1,32,32)", "--config.train.lr=1e-05"]
  with pytest.raises(ValueError, match="equal length"):
    sweep_lib.zip_(sweep_lib.sweep("a", [1, 2]), sweep_lib.sweep("b", [1]))
  with pytest.raises(ValueError, match="set twice"):
    sweep_lib.product(sweep_lib.sweep("a", [1]), sweep_lib.sweep("a", [2]))
  cpu = sweep.device_env(1, 2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                "JAX_PLATFORMS": "cpu"})
  assert cpu["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  gpu = sweep.device_env(1, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
  assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3"
  with pytest.raises(ValueError, match="only 4 GPUs"):
    sweep.device_env(0, 8, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})


def test_failing_points_are_recorded_and_the_sweep_goes_on(tmp_path):
  sweep_file = tmp_path / "bad.py"
  sweep_file.write_text("def get_sweep():\n"
                        "  return [{'train.lr': 'not_a_float'}, {'train.batch_size': 'x'}]\n")
  root = tmp_path / "root"
  proc = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={TINY}",
                         f"--sweep={sweep_file}", f"--root={root}"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  for name, value in (("lr=not_a_float", "not_a_float"), ("batch_size=x", "'x'")):
    st = _status(root, name)
    assert st["status"] == "failed" and st["returncode"] != 0, st
    assert "sweep.log" in st["error"] and value in st["error"], st["error"]
  bad_key = tmp_path / "bad_key.py"
  bad_key.write_text("def get_sweep():\n  return [{'train.lrr': 1.0}]\n")
  proc = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={TINY}",
                         f"--sweep={bad_key}", f"--root={root}", "--print_commands"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "train.lrr" in proc.stderr and "bad_key.py" in proc.stderr


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache_dir):
  """The 2x2 tiny sweep, SIGKILLed (sweep and child) while its 3rd or 4th point is between
  checkpoints, then launched again to the end."""
  root = str(tmp_path_factory.mktemp("sweep") / "root")
  log = open(os.path.join(os.path.dirname(root), "first.log"), "w")
  proc = subprocess.Popen(_sweep_cmd(root, cache_dir), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT)
  killed = None
  deadline = time.time() + 400
  while killed is None and proc.poll() is None and time.time() < deadline:
    for name in NAMES[2:]:
      st = _status(root, name)
      ckpts = os.path.join(root, name, "checkpoints")
      if st.get("status") == "running" and os.path.isdir(os.path.join(ckpts, "4")) \
          and not os.path.isdir(os.path.join(ckpts, "8")):
        os.kill(proc.pid, signal.SIGKILL)
        try:
          os.kill(st["pid"], signal.SIGKILL)
        except ProcessLookupError:
          pass  # already gone with its parent (PR_SET_PDEATHSIG)
        killed = name
        break
    time.sleep(0.05)
  proc.wait(timeout=60)
  log.close()
  assert killed, "never caught a point between its checkpoints:\n" + open(log.name).read()
  before = {}
  for n in NAMES:
    path = os.path.join(root, n, "status.json")
    before[n] = (_status(root, n), os.stat(path).st_mtime_ns if os.path.exists(path) else None)
  second = subprocess.run(_sweep_cmd(root, cache_dir), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  return {"root": root, "killed": killed, "before": before, "second": second}


def test_sweep_killed_and_relaunched_finishes_without_redoing(swept):
  root, killed, before, second = (swept[k] for k in ("root", "killed", "before", "second"))
  assert second.returncode == 0, second.stdout + second.stderr[-3000:]
  finished_before = [n for n in NAMES if before[n][0].get("status") == "done"]
  assert NAMES[:2] == finished_before[:2] and killed not in finished_before
  assert before[killed][0]["status"] == "running"  # the SIGKILL left it marked running
  for n in NAMES:
    st = _status(root, n)
    assert st["status"] == "done", (n, st)
    log = open(os.path.join(root, n, "sweep.log")).read()
    if n in finished_before:  # untouched: same status file, one attempt, reported skipped
      assert os.stat(os.path.join(root, n, "status.json")).st_mtime_ns == before[n][1]
      assert st["attempts"] == 1 and log.count("===== attempt") == 1
      assert f"{n}: done, skipped" in second.stdout
    elif n == killed:  # resumed from its step-4 checkpoint, not restarted
      assert st["attempts"] == 2 and "resumed from" in log
    assert final_params(os.path.join(root, n))[0] == 8

  res = collate.collate(root, metric="eval_psnr", x="train.lr")
  with open(res["csv"], newline="") as f:
    rows = {r["name"]: r for r in csv.DictReader(f)}
  assert list(rows) == NAMES
  for n in NAMES:
    m, r = _last_by_step(os.path.join(root, n)), rows[n]
    last = max(m["eval_psnr"])
    assert int(r["steps"]) == max(m["train_loss"]) == 8 and int(r["eval_step"]) == last
    for k in ("eval_psnr", "eval_ssim", "eval_psnr_cross", "eval_ssim_cross"):
      assert float(r[k]) == m[k][last], (n, k)
    assert float(r["best_eval_psnr"]) == max(m["eval_psnr"].values())
    assert float(r["train_loss"]) == m["train_loss"][8]
    assert float(r["train.lr"]) == json.load(open(os.path.join(root, n, "overrides.json")))[
        "train.lr"] and r["status"] == "done" and float(r["wall_time_s"]) > 0
  groups = {g["train.lr"]: g for g in res["groups"]}
  vals = [float(rows[n]["eval_psnr"]) for n in NAMES[:2]]
  assert groups[0.001]["n"] == 2
  assert groups[0.001]["eval_psnr_mean"] == pytest.approx(np.mean(vals))
  assert groups[0.001]["eval_psnr_std"] == pytest.approx(np.std(vals, ddof=1))
  assert os.path.getsize(res["plot"]) > 1000


def test_printed_commands_reproduce_the_sweep(swept, cache_dir, tmp_path):
  root = tmp_path / "printed"
  proc = subprocess.run(_sweep_cmd(root, cache_dir, "--print_commands"), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 4 and all(l.startswith("python ") for l in lines), proc.stdout
  for line in lines:  # from another directory: the lines must not depend on the cwd
    run = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, line + "\n" + run.stderr[-3000:]
  ours = sorted(d for d in os.listdir(root) if os.path.isdir(root / d))
  assert ours == sorted(NAMES)
  for n in NAMES:
    a, b = os.path.join(swept["root"], n), str(root / n)
    assert json.load(open(os.path.join(a, "overrides.json"))) == json.load(
        open(os.path.join(b, "overrides.json")))
    assert json.load(open(os.path.join(a, "config.json"))) == json.load(
        open(os.path.join(b, "config.json")))
    step_a, params_a = final_params(a)
    step_b, params_b = final_params(b)
    assert step_a == step_b == 8
    assert_trees_equal(params_a, params_b)
    ma, mb = _last_by_step(a), _last_by_step(b)
    for k in ("train_loss", "train_rec", "train_cyc", "eval_psnr", "eval_ssim"):
      assert ma[k] == mb[k], (n, k)
  rows = collate.collate(str(root))["rows"]
  assert [r["status"] for r in rows] == ["no status.json"] * 4


def test_same_seed_bit_identical_params_other_seed_differs(cache_dir, tmp_path):
  runs = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    c = tiny_config(cache_dir, total_steps=4, seed=seed, eval_subjects=1)
    train.train_and_evaluate(c, str(tmp_path / name))
    runs[name] = final_params(tmp_path / name)
  assert runs["a"][0] == runs["b"][0] == 4
  assert_trees_equal(runs["a"][1], runs["b"][1])  # every leaf, exactly
  la, lc = jax.tree_util.tree_leaves(runs["a"][1]), jax.tree_util.tree_leaves(runs["c"][1])
  assert len(la) == len(lc)
  assert sum(not np.array_equal(x, y) for x, y in zip(la, lc)) > len(la) // 2


def test_seed_study_aggregates_contribution_tables(tmp_path):
  """Aggregation on synthetic contribution.csv files (the evaluation itself is tested with
  the evaluation code)."""
  seqs = ["t1", "t1ce", "t2", "flair"]
  c_d = {0: [-1.0, 2.0, 0.1, 1.5], 1: [-0.9, 1.4, 0.2, 1.6], 2: [-1.1, 1.8, 0.0, 1.2]}
  for seed, vals in c_d.items():
    wd = tmp_path / f"seed={seed}"
    (wd / "eval").mkdir(parents=True)
    sweep_lib.write_json(str(wd / "overrides.json"), {"train.seed": seed})
    sweep_lib.write_json(str(wd / "status.json"), {"status": "done"})
    order = np.argsort(-np.array(vals), kind="stable")
    rank = np.empty(4, int)
    rank[order] = np.arange(1, 5)
    rows = [{"variant": "robust_all_pairs", "sequence": s, "C_t": -v / 2, "rank_t": 5 - rank[i],
             "C_d": v, "rank_d": rank[i], "metrics": "zpsnr+zssim", "rows": 12}
            for i, (s, v) in enumerate(zip(seqs, vals))]
    collate.write_csv(str(wd / "eval" / "contribution.csv"), list(rows[0]), rows)
  res = seed_study.seed_study(str(tmp_path), run_evaluation=False)
  got = {r["sequence"]: r for r in res["rows"]}
  t1ce = [c_d[s][1] for s in c_d]
  assert got["t1ce"]["n"] == 3
  assert got["t1ce"]["C_d_mean"] == pytest.approx(np.mean(t1ce))
  assert got["t1ce"]["C_d_std"] == pytest.approx(np.std(t1ce, ddof=1))
  # t1ce first in seeds 0 and 2, second in seed 1 (flair first there)
  assert [got["t1ce"][f"rank_d_{i}"] for i in (1, 2, 3, 4)] == [2, 1, 0, 0]
  assert [got["flair"][f"rank_d_{i}"] for i in (1, 2, 3, 4)] == [1, 2, 0, 0]
  assert "| t1ce | 3 |" in res["markdown"] and "2/1/0/0" in res["markdown"]
  assert os.path.exists(res["csv"]) and os.path.exists(res["md"])
