"""Our train step against the official PyTorch step, side by side, in alternating rounds.

    python -m experiments.compare_official --config=configs/brats2d.py \
        --reference=/path/to/official/publications --steps=3 [--rounds=3]

`--reference` is the official code's `publications` folder (github fiy2W/mri_seq2seq at
02261ee, brought in outside this repository; never copied into it). The official step is
timed by `../shared/tools/reference_train_step.py` with the config's model keys, batch and
crop edge; ours by `experiments.benchmark` with the same work (perceptual term off, one target
code per batch as the official step). Each round runs the official step, then ours, each in a
fresh process; a shared VM's speed drifts by 10% or more within minutes, so the ratio of each
round (both timed within a minute of each other) is what is compared, and the summary line
gives the median, min and max of those ratios and each process's own peak RSS.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO.parent / "shared" / "tools" / "reference_train_step.py"

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_string("reference", None, "The official code's `publications` folder.")
flags.DEFINE_integer("steps", 3, "Timed steps for each implementation.")
flags.DEFINE_integer("rounds", 1, "Alternating rounds (official, ours) to run.")
flags.DEFINE_integer("threads", 0, "torch threads for the official step (0: torch's default).")
flags.mark_flags_as_required(["config", "reference"])


def _last_json(text: str) -> dict:
  lines = [l for l in text.splitlines() if l.startswith("{")]
  if not lines:
    raise RuntimeError(f"no JSON line in output:\n{text[-2000:]}")
  return json.loads(lines[-1])


def main(argv):
  del argv
  cfg = FLAGS.config
  spec = {k: (list(v) if isinstance(v, (list, tuple)) else v)
          for k, v in cfg.model.to_dict().items()}
  crop = list(cfg.train.crop_size)
  if len(set(crop[1:])) != 1 or (int(cfg.model.ndims) == 3 and len(set(crop)) != 1):
    raise ValueError(f"the official timing tool takes a square/cubic crop, got {crop}")
  spec.update(b=int(cfg.train.batch_size), t=1, size=int(crop[-1]))
  env = dict(os.environ)
  if FLAGS.threads:
    env["OMP_NUM_THREADS"] = str(FLAGS.threads)
  cfg_path = FLAGS["config"].config_filename
  official_cmd = [sys.executable, str(TOOL), FLAGS.reference, json.dumps(spec), str(FLAGS.steps)]
  ours_cmd = ([sys.executable, "-m", "experiments.benchmark", f"--config={cfg_path}",
               f"--steps={FLAGS.steps}", "--eval_volumes=0", "--codes=shared"] +
              [a for a in sys.argv[1:] if a.startswith("--config.")])
  rounds = []
  for _ in range(FLAGS.rounds):
    b, official_rss = _run(official_cmd, env=env)
    a, _ = _run(ours_cmd, cwd=REPO)  # reports its own peak RSS (of the step, before eval)
    b["peak_rss_mb"] = official_rss
    print(json.dumps(a))
    print(json.dumps(b))
    rounds.append((a, b))
  ratios = [b["sec_per_step"] / a["sec_per_step"] for a, b in rounds]
  med = lambda key, i: float(np.median([r[i][key] for r in rounds]))
  print(json.dumps({"config": cfg_path, "rounds": len(rounds),
                    "speedup_vs_official": float(np.median(ratios)),
                    "speedup_min": min(ratios), "speedup_max": max(ratios),
                    "ours_sec_per_step": med("sec_per_step", 0),
                    "official_sec_per_step": med("sec_per_step", 1),
                    "ours_peak_rss_mb": med("peak_rss_mb", 0),
                    "official_peak_rss_mb": med("peak_rss_mb", 1),
                    # Ours against the conv reference, each round (benchmark.py says how).
                    "fraction_of_conv_ref": [a.get("fraction_of_conv_ref") for a, _ in rounds],
                    "fraction_paired": [a.get("fraction_paired") for a, _ in rounds]}))


def _run(cmd: list[str], **kwargs) -> tuple[dict, float]:
  """Runs `cmd` to completion: (its last JSON line, its own peak RSS in MB).

  The child is reaped with `os.wait4`, which gives that child's own resource usage
  (`RUSAGE_CHILDREN` would be the largest of every child so far).
  """
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, **kwargs)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
      err.seek(0)
      raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n"
                         f"{err.read()[-3000:]}")
  return _last_json(out), usage.ru_maxrss / 1024


if __name__ == "__main__":
  app.run(main)
