"""The largest cubic volume whose compiled step fits a memory budget, in few compilations.

Each evaluation compiles a step (a minute or more for `brats3d`), so the search guesses from
a memory model (fixed bytes + bytes per voxel, the line through the two evaluated edges
nearest the budget) and then closes in on the boundary: it ends when it knows an edge that
fits and the next multiple of `unit` that does not, or after `max_evals` evaluations.
"""

from __future__ import annotations

import math

from typing import Callable, Dict, Optional, Tuple


def largest_fitting_edge(used: Callable[[int], float], budget: float, unit: int,
                         start: Optional[int] = None,
                         measured: Optional[Dict[Tuple[int, ...], float]] = None,
                         max_evals: int = 6) -> dict:
  """Largest multiple of `unit` whose `used(edge)` (bytes) is at most `budget`.

  Args:
    used: bytes needed by a cube of that edge (a compilation); assumed to grow with the edge.
    budget: bytes available.
    unit: the edges allowed are its multiples (the model's stride times the shards).
    start: the first edge evaluated (a multiple of `unit`); None: the model's first guess.
    measured: {volume (D, H, W): bytes} already compiled: cubes whose edge is a multiple of
      `unit` count as evaluated (not compiled again); other volumes guide the model only.
    max_evals: calls of `used` at most.

  Returns:
    {"edge": largest fitting edge found (0: none), "edge_bytes": its bytes or None,
     "first_over": smallest evaluated edge over the budget or None, "exact": whether
     first_over is edge + unit (the boundary is known), "evaluated": {edge: bytes}}.
  """
  if start is not None and (start <= 0 or start % unit):
    raise ValueError(f"start edge {start} must be a positive multiple of {unit}")
  if start is None and not measured:
    raise ValueError("give a start edge, or measured volumes to guess one from")
  pts: Dict[int, float] = {}  # evaluated cube edges -> bytes
  model: Dict[int, float] = {}  # voxels -> bytes
  for volume, b in (measured or {}).items():
    model[int(math.prod(volume))] = float(b)
    if len(set(volume)) == 1 and volume[0] % unit == 0:
      pts[int(volume[0])] = float(b)
  calls = 0

  def bounds():
    fits = [e for e, b in pts.items() if b <= budget]
    over = [e for e, b in pts.items() if b > budget]
    return max(fits, default=0), min(over, default=None)

  def evaluate(edge):
    nonlocal calls
    calls += 1
    pts[edge] = model[edge ** 3] = float(used(edge))

  if start is not None and start not in pts:
    evaluate(start)
  while calls < max_evals:
    lo, hi = bounds()
    if hi is not None and hi - lo <= unit:
      break
    guess = _model_guess(model, budget, unit)
    # Keep the guess strictly between what is known to fit and what is known not to.
    guess = max(guess, lo + unit)
    if hi is not None:
      guess = min(guess, hi - unit)
    if guess in pts:
      break
    evaluate(guess)
  lo, hi = bounds()
  return {"edge": lo, "edge_bytes": pts.get(lo), "first_over": hi,
          "exact": hi is not None and hi - lo == unit, "evaluated": dict(sorted(pts.items()))}


def _model_guess(model: Dict[int, float], budget: float, unit: int) -> int:
  """The cube edge where fixed + per-voxel bytes, fitted through the two measured volumes
  nearest the budget, reaches it (rounded down to `unit`)."""
  near = sorted(model, key=lambda v: abs(model[v] - budget))[:2]
  if len(near) == 1:
    fixed, per_voxel = 0.0, model[near[0]] / near[0]
  else:
    (v0, b0), (v1, b1) = sorted((v, model[v]) for v in near)
    per_voxel = max((b1 - b0) / (v1 - v0), 1e-9)
    fixed = b1 - per_voxel * v1
  edge = int((max(budget - fixed, 0.0) / per_voxel) ** (1 / 3) + 1e-9)
  return edge - edge % unit
