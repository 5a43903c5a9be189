"""Runs a sweep: one `main.py` training run per point, each in its own workdir.

    python -m experiments.sweep --config=configs/toy.py \
        --sweep=experiments/sweeps/toy_lr_seed.py --root=/tmp/toy_sweep [--parallel=2]
    python -m experiments.sweep ... --print_commands   # one `python main.py ...` line per point

Each point runs in `ROOT/<name>` (e.g. `ROOT/lr=0.001,seed=0`) holding `overrides.json`,
`command.sh`, `status.json` (running | done | failed, attempts, wall time, error) and
`sweep.log` (the run's output) beside the training outputs. Launched again, the sweep skips
done points, resumes interrupted ones (main.py continues from its last checkpoint) and retries
failed ones. A failing point is recorded and the sweep goes on; the exit code is 1 when any
point failed. `--set=KEY=VALUE` (repeatable) fixes a config field for every point without
putting it in the names.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from experiments import sweep_lib

FLAGS = flags.FLAGS
def _define_flags() -> None:
  # Only when run as a program: these modules are imported together by tests, and absl
  # flags are process-global.
  flags.DEFINE_string("config", None, "Experiment config file (configs/*.py).")
  flags.DEFINE_string("sweep", None, "Sweep file with get_sweep().")
  flags.DEFINE_string("root", None, "Directory holding one workdir per point.")
  flags.DEFINE_integer("parallel", 1, "Points run at once, each on its share of the devices.")
  flags.DEFINE_bool("print_commands", False, "Print one `python main.py ...` line per point and "
                    "run nothing.")
  flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every point (not in names).")
  flags.DEFINE_string("python", "python", "Interpreter named in --print_commands lines.")


# A traceback's last line, or absl's one-line report of a bad flag.
_ERROR_LINE = re.compile(r"^([\w.]*(Error|Exception|Exit|Interrupt)\b|FATAL\b).*")


def _check_config(config_path: str, points: Sequence[sweep_lib.Point], sweep_path: str) -> None:
  """Catches a misspelt key before any run instead of in every point's log."""
  import importlib.util
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"config file {config_path} does not exist")
  if sweep_lib.REPO not in sys.path:
    sys.path.insert(0, sweep_lib.REPO)
  spec = importlib.util.spec_from_file_location("_sweep_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep_lib.check_keys(points, module.get_config(), sweep_path)


def _fixed_flags(settings: Sequence[str]) -> list[str]:
  out = []
  for s in settings:
    if "=" not in s:
      raise ValueError(f"--set={s!r}: expected KEY=VALUE")
    key, value = s.split("=", 1)
    out.append(f"--config.{key.removeprefix('config.')}={value}")
  return out


def prepare_points(root: str, config_path: str, sweep_path: str, points, fixed_flags,
                   python: str) -> list[dict[str, Any]]:
  """Creates each point's directory with its overrides and command; refuses a directory that
  holds another sweep's point under the same name."""
  os.makedirs(root, exist_ok=True)
  out = []
  for p in points:
    name = sweep_lib.point_name(p)
    workdir = os.path.join(root, name)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "overrides.json")
    old = sweep_lib.read_json(path)
    if old is not None and old != p:
      raise ValueError(f"{path} holds overrides {old!r}, not this sweep's {p!r}: use another "
                       f"--root or remove {workdir}")
    if old is None:
      sweep_lib.write_json(path, p)
    argv = sweep_lib.main_command(config_path, workdir, p, fixed_flags, python=python)
    _write_text(os.path.join(workdir, "command.sh"), sweep_lib.shell_line(argv) + "\n")
    out.append({"name": name, "workdir": workdir, "overrides": p, "argv": argv})
  manifest = os.path.join(root, "sweep.json")
  known = {q["name"]: q for q in (sweep_lib.read_json(manifest) or {}).get("points", [])}
  known.update({q["name"]: {"name": q["name"], "overrides": q["overrides"]} for q in out})
  sweep_lib.write_json(manifest, {"config": config_path, "sweep": sweep_path,
                                  "fixed": list(fixed_flags), "points": list(known.values())})
  return out


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _visible_gpus(env: dict[str, str]) -> list[str]:
  if env.get("CUDA_VISIBLE_DEVICES", "").strip():
    return [d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
  if env.get("JAX_PLATFORMS", "") == "cpu" or not shutil.which("nvidia-smi"):
    return []
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, l in enumerate(out.stdout.splitlines()) if l.startswith("GPU ")]


def device_env(slot: int, parallel: int, env: dict[str, str]) -> dict[str, str]:
  """The environment of the run in `slot` of `parallel`: its own GPUs, or on CPU its own
  forced host devices (XLA_FLAGS), so that concurrent runs do not share an accelerator."""
  env = dict(env)
  if parallel <= 1:
    return env
  gpus = _visible_gpus(env)
  if gpus:
    per = len(gpus) // parallel
    if per == 0:
      raise ValueError(f"--parallel={parallel} but only {len(gpus)} GPUs are visible")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * per:(slot + 1) * per])
    return env
  flag = "--xla_force_host_platform_device_count"
  xla = env.get("XLA_FLAGS", "")
  m = re.search(flag + r"=(\d+)", xla)
  per = max(1, (int(m.group(1)) if m else 1) // parallel)
  xla = re.sub(flag + r"=\d+", "", xla).strip()
  env["XLA_FLAGS"] = f"{xla} {flag}={per}".strip()
  return env


def _die_with_parent() -> None:
  """Child-side: SIGKILL this run when the sweep process dies, even by SIGKILL, so that a
  killed sweep leaves no orphan writing into a workdir the next launch resumes."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


class _Run:
  """One point being run: its process, log, lock and status."""

  def __init__(self, point: dict[str, Any], slot: int, env: dict[str, str]):
    self.point, self.slot = point, slot
    wd = point["workdir"]
    self.status_path = os.path.join(wd, "status.json")
    self.lock = open(os.path.join(wd, ".lock"), "w")
    try:
      fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.lock.close()
      raise
    old = sweep_lib.read_json(self.status_path) or {}
    self.wall = float(old.get("wall_time_s", 0.0))
    if old.get("status") == "running":
      # The previous attempt was killed: count its time up to its last output.
      last = max((os.path.getmtime(os.path.join(wd, f)) for f in ("metrics.jsonl", "sweep.log")
                  if os.path.exists(os.path.join(wd, f))), default=old.get("started", 0))
      self.wall += max(0.0, last - float(old.get("started", last)))
    self.attempts = int(old.get("attempts", 0)) + 1
    self.log = open(os.path.join(wd, "sweep.log"), "a")
    self.log.write(f"\n===== attempt {self.attempts} at {time.ctime()}: "
                   f"{sweep_lib.shell_line(point['argv'])}\n")
    self.log.flush()
    self.started = time.time()
    self.proc = subprocess.Popen(point["argv"], cwd=sweep_lib.REPO, env=env, stdout=self.log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 preexec_fn=_die_with_parent)
    self._status("running", pid=self.proc.pid)

  def _status(self, status: str, **extra) -> None:
    sweep_lib.write_json(self.status_path, {
        "status": status, "attempts": self.attempts, "started": self.started,
        "wall_time_s": self.wall + (time.time() - self.started if status != "running" else 0.0),
        "overrides": self.point["overrides"], **extra})

  def finish(self) -> bool:
    """Records the exit of the process; True when it succeeded."""
    rc = self.proc.returncode
    self.log.close()
    if rc == 0:
      self._status("done", returncode=0, finished=time.time())
    else:
      self._status("failed", returncode=rc, finished=time.time(), error=self._error(rc))
    self.lock.close()
    return rc == 0

  def _error(self, rc: int) -> str:
    with open(self.log.name, errors="replace") as f:
      lines = [l.rstrip() for l in f.read().splitlines()[-200:] if l.strip()]
    attempt = max((i for i, l in enumerate(lines) if l.startswith("===== attempt")), default=-1)
    lines = lines[attempt + 1:]
    errors = [l for l in lines if _ERROR_LINE.match(l)]
    what = errors[-1] if errors else (lines[-1] if lines else "(no output)")
    how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
    return f"{how}: {what} (see {self.log.name})"

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
    self.lock.close()


def run_points(points: list[dict[str, Any]], parallel: int,
               env: dict[str, str] | None = None) -> dict[str, str]:
  """Runs the points not yet done, `parallel` at a time; returns {name: final status}."""
  env = dict(os.environ if env is None else env)
  results: dict[str, str] = {}
  pending = []
  for p in points:
    status = (sweep_lib.read_json(os.path.join(p["workdir"], "status.json")) or {}).get("status")
    if status == "done":
      print(f"[sweep] {p['name']}: done, skipped", flush=True)
      results[p["name"]] = "done"
    else:
      pending.append(p)
  running: dict[int, _Run] = {}
  try:
    while pending or running:
      for slot in range(max(1, parallel)):
        if slot in running or not pending:
          continue
        p = pending.pop(0)
        try:
          running[slot] = _Run(p, slot, device_env(slot, parallel, env))
        except BlockingIOError:
          print(f"[sweep] {p['name']}: locked by another sweep process, skipped", flush=True)
          results[p["name"]] = "locked"
          continue
        print(f"[sweep] {p['name']}: started (attempt {running[slot].attempts})", flush=True)
      time.sleep(0.2)
      for slot, r in list(running.items()):
        if r.proc.poll() is not None:
          ok = r.finish()
          results[r.point["name"]] = "done" if ok else "failed"
          msg = "done" if ok else f"FAILED: {sweep_lib.read_json(r.status_path)['error']}"
          print(f"[sweep] {r.point['name']}: {msg}", flush=True)
          del running[slot]
  finally:
    for r in running.values():  # only on an exception/interrupt: leave them resumable
      r.kill()
  return results


def _on_sigterm(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("config", "sweep", "root"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  config_path = os.path.abspath(FLAGS.config)
  sweep_path = os.path.abspath(FLAGS.sweep)
  root = os.path.abspath(os.path.expanduser(FLAGS.root))
  points = sweep_lib.load_sweep(sweep_path)
  _check_config(config_path, points, sweep_path)
  fixed_flags = _fixed_flags(FLAGS.set)
  python = FLAGS.python if FLAGS.print_commands else sys.executable
  prepared = prepare_points(root, config_path, sweep_path, points, fixed_flags, python)
  if FLAGS.print_commands:
    for p in prepared:
      print(sweep_lib.shell_line(p["argv"]))
    return 0
  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    results = run_points(prepared, FLAGS.parallel)
  except KeyboardInterrupt as e:
    print(f"[sweep] interrupted ({e or 'Ctrl-C'}): running points stopped, launch the same "
          f"command again to resume", file=sys.stderr, flush=True)
    return 130
  counts = {s: sum(v == s for v in results.values()) for s in sorted(set(results.values()))}
  print(f"[sweep] {len(results)} points: {counts}; collate with: python -m experiments.collate "
        f"{root}", flush=True)
  return 1 if any(v != "done" for v in results.values()) else 0


if __name__ == "__main__":
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
