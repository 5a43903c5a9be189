"""Our train step against the official PyTorch step, side by side in one run.

    python -m experiments.compare_official --config=configs/brats2d.py \
        --reference=/path/to/official/publications --steps=3

`--reference` is the official code's `publications` folder (github fiy2W/mri_seq2seq at
02261ee, brought in outside this repository; never copied into it). The official step is
timed by `../shared/tools/reference_train_step.py` with the config's model keys, batch and
crop edge; ours by `experiments.benchmark` with the same work (perceptual term off, one target
code per batch as the official step). Prints both JSON lines and one with the ratio.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO.parent / "shared" / "tools" / "reference_train_step.py"

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_string("reference", None, "The official code's `publications` folder.")
flags.DEFINE_integer("steps", 3, "Timed steps for each implementation.")
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
  # The official step runs first: the children's peak RSS is then its own (ours reports its
  # own peak in its JSON line).
  theirs = subprocess.run(
      [sys.executable, str(TOOL), FLAGS.reference, json.dumps(spec), str(FLAGS.steps)],
      capture_output=True, text=True, check=True, env=env)
  official_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  ours = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", f"--config={cfg_path}",
       f"--steps={FLAGS.steps}", "--eval_volumes=0", "--codes=shared"] +
      [a for a in sys.argv[1:] if a.startswith("--config.")],
      cwd=REPO, capture_output=True, text=True, check=True)
  a, b = _last_json(ours.stdout), _last_json(theirs.stdout)
  b["peak_rss_mb"] = official_rss
  print(json.dumps(a))
  print(json.dumps(b))
  print(json.dumps({"config": cfg_path,
                    "speedup_vs_official": b["sec_per_step"] / a["sec_per_step"],
                    "ours_sec_per_step": a["sec_per_step"],
                    "official_sec_per_step": b["sec_per_step"],
                    "ours_peak_rss_mb": a["peak_rss_mb"], "official_peak_rss_mb": official_rss}))


if __name__ == "__main__":
  app.run(main)
