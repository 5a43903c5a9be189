"""Building blocks of sweeps: sweep files, point names, command lines, status files.

A sweep file is a Python file with `get_sweep()` returning a list of override dicts, one per
point, keys being dotted config paths:

    from experiments.sweep_lib import product, sweep

    def get_sweep():
      return product(sweep("train.lr", [1e-3, 3e-4]), sweep("train.seed", [0, 1, 2]))

`product` and `zip_` combine lists of dicts the way the JAX research codebases' hyper-parameter
helpers do, so a sweep reads as one expression.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import sys
from typing import Any, Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main.py")

Point = dict[str, Any]

# Characters kept in a point's directory name; the rest become "_" (portable across file
# systems and safe unquoted in most shells but for ",", which shlex.quote handles).
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 150


def sweep(key: str, values: Iterable[Any]) -> list[Point]:
  """One swept field: `[{key: v} for v in values]`."""
  return [{key: v} for v in values]


def fixed(key: str, value: Any) -> list[Point]:
  """A field held at one value (one point); combine with `product`."""
  return [{key: value}]


def product(*sweeps: Sequence[Point]) -> list[Point]:
  """Cartesian product: every combination, the last sweep varying fastest."""
  out = []
  for combo in itertools.product(*sweeps):
    merged: Point = {}
    for part in combo:
      _merge_into(merged, part)
    out.append(merged)
  return out


def zip_(*sweeps: Sequence[Point]) -> list[Point]:
  """Element-wise merge of sweeps of equal length (e.g. an lr paired with its warm-up)."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f"zip_ needs sweeps of equal length, got lengths {[len(s) for s in sweeps]}")
  out = []
  for parts in zip(*sweeps):
    merged: Point = {}
    for part in parts:
      _merge_into(merged, part)
    out.append(merged)
  return out


def _merge_into(merged: Point, part: Point) -> None:
  for k, v in part.items():
    if k in merged:
      raise ValueError(f"config key {k!r} is set twice in one point ({merged[k]!r}, {v!r})")
    merged[k] = v


def load_sweep(path: str) -> list[Point]:
  """Points of the sweep file at `path` (its `get_sweep()`), checked for shape."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"sweep file {path} does not exist")
  spec = importlib.util.spec_from_file_location(
      "_sweep_" + hashlib.sha1(path.encode()).hexdigest()[:8], path)
  module = importlib.util.module_from_spec(spec)
  if REPO not in sys.path:  # sweep files import experiments.sweep_lib
    sys.path.insert(0, REPO)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"sweep file {path} has no get_sweep()")
  points = list(module.get_sweep())
  for i, p in enumerate(points):
    if not isinstance(p, dict) or not all(isinstance(k, str) and k for k in p):
      raise ValueError(f"sweep file {path}: point {i} is not a dict of dotted config keys: {p!r}")
  names = [point_name(p) for p in points]
  seen: dict[str, int] = {}
  for i, n in enumerate(names):
    if n in seen:
      raise ValueError(f"sweep file {path}: points {seen[n]} and {i} have the same name {n!r} "
                       f"({points[seen[n]]!r}, {points[i]!r})")
    seen[n] = i
  return points


def check_keys(points: Sequence[Point], config: Any, sweep_path: str) -> None:
  """Fails naming the sweep file, point and key when a key is not in `config` (a ConfigDict),
  before any run starts rather than once per point."""
  for i, p in enumerate(points):
    for key in p:
      node = config
      for part in key.split("."):
        try:
          node = node[part]
        except (KeyError, TypeError, AttributeError):
          raise KeyError(f"sweep file {sweep_path}: point {i} sets {key!r}, which the config "
                         f"does not have") from None


def format_value(value: Any) -> str:
  """A value as config_flags parses it on the command line."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def override_flags(overrides: Point) -> list[str]:
  return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def _name_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "x".join(_name_value(v) for v in value)
  return format_value(value)


def point_name(overrides: Point) -> str:
  """A readable, file-system-safe directory name, e.g. `lr=0.001,seed=0`.

  Keys are shortened to their last component unless two keys of the point share it; names
  too long for comfort keep a prefix and get a hash of the full overrides.
  """
  if not overrides:
    return "default"
  last = [k.rsplit(".", 1)[-1] for k in overrides]
  parts = []
  for key, short in zip(overrides, last):
    label = short if last.count(short) == 1 else key
    parts.append(f"{label}={_name_value(overrides[key])}")
  name = _UNSAFE.sub("_", ",".join(parts))
  if name in (".", ".."):
    name = "_" + name
  if len(name) > _MAX_NAME:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode())
    name = name[:_MAX_NAME - 9] + "~" + digest.hexdigest()[:8]
  return name


def main_command(config_path: str, workdir: str, overrides: Point, fixed_flags: Sequence[str],
                 python: str = sys.executable) -> list[str]:
  """The `python main.py ...` argv of one point; absolute paths so it runs from anywhere."""
  return [python, MAIN, f"--config={os.path.abspath(config_path)}",
          f"--workdir={os.path.abspath(workdir)}", *fixed_flags, *override_flags(overrides)]


def shell_line(argv: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` to a temporary name then renames it: readers never see half a file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False, default=str)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str, default: Any = None) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return default
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_metrics(workdir: str) -> dict[str, dict[int, float]]:
  """metrics.jsonl as {key: {step: value}}, the last occurrence winning: a resumed run logs
  again the steps between its last checkpoint and the pre-emption."""
  out: dict[str, dict[int, float]] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        # Only a line cut short by a SIGKILL (and glued to the resumed run's first line) can
        # be invalid; the steps it held are logged again by the resumed run.
        print(f"warning: {path}:{n} is not valid JSON, skipped", file=sys.stderr)
        continue
      step = int(row.pop("step"))
      for k, v in row.items():
        out.setdefault(k, {})[step] = v
  return out
