"""Model configuration: the official YAML `seq2seq:` block as an `ml_collections.ConfigDict`.

The keys and their meaning are exactly the official ones (see `docs` in the README):
`ndims, c_s, c_w, c_in, c_enc, k_enc, s_enc, nres_enc, norm, c_lstm, c_dec, k_dec, s_dec,
nres_dec`. The official code never checks the constraints that tie them together; a bad
combination there fails deep inside a forward pass. `validate_model_config` checks them up
front and names the key at fault.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections
import yaml

MODEL_KEYS = ("ndims", "c_s", "c_w", "c_in", "c_enc", "k_enc", "s_enc", "nres_enc", "norm",
              "c_lstm", "c_dec", "k_dec", "s_dec", "nres_dec")
_LIST_KEYS = ("c_enc", "k_enc", "s_enc", "c_dec", "k_dec", "s_dec")
NORMS = ("InstanceNorm", None)


def paper_model_config() -> ml_collections.ConfigDict:
  """The paper's BraTS 2D (2.5D, 3 slices) generator."""
  return make_model_config(
      ndims=2, c_s=64, c_w=16, c_in=3, c_enc=[64, 128, 256], k_enc=[7, 3, 3], s_enc=[1, 2, 2],
      nres_enc=6, norm="InstanceNorm", c_lstm=256, c_dec=[128, 64, 3], k_dec=[3, 3, 7],
      s_dec=[1, 1, 1], nres_dec=6)


def make_model_config(**kwargs: Any) -> ml_collections.ConfigDict:
  """Builds a validated model config from the official keys (all required, no others)."""
  unknown = sorted(set(kwargs) - set(MODEL_KEYS))
  if unknown:
    raise KeyError(f"unknown model config key {unknown[0]!r}; expected keys {MODEL_KEYS}")
  missing = [k for k in MODEL_KEYS if k not in kwargs]
  if missing:
    raise KeyError(f"model config is missing key {missing[0]!r}")
  # Tuples, not lists: ml_collections can override tuples from the command line
  # (`--config.model.c_enc="(32, 64, 128)"`) but not lists.
  values = {k: (tuple(kwargs[k]) if k in _LIST_KEYS else kwargs[k]) for k in MODEL_KEYS}
  # `norm` may be None; a placeholder keeps the field typed as str so overrides still work.
  norm = values.pop("norm")
  cfg = ml_collections.ConfigDict(values)
  cfg.norm = ml_collections.config_dict.placeholder(str)
  cfg.norm = norm
  validate_model_config(cfg)
  return cfg


def model_config_from_yaml(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """Reads the `seq2seq:` block of an official YAML config file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"model config file not found: {path}")
  with open(path) as f:
    doc = yaml.safe_load(f)
  if not isinstance(doc, Mapping) or "seq2seq" not in doc:
    raise KeyError(f"{path}: no 'seq2seq:' block")
  try:
    return make_model_config(**doc["seq2seq"])
  except (KeyError, ValueError) as e:
    raise type(e)(f"{path}: {e.args[0]}") from None


def model_config_to_yaml(cfg: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
  """Writes `cfg` as an official-format YAML (`seq2seq:` block), atomically."""
  block = {k: (list(cfg[k]) if k in _LIST_KEYS else cfg[k]) for k in MODEL_KEYS}
  block["norm"] = norm_of(cfg)
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w") as f:
    yaml.safe_dump({"seq2seq": block}, f, sort_keys=False)
  os.replace(tmp, path)


def norm_of(cfg: Mapping[str, Any]) -> str | None:
  """The model's norm; the command line can only give strings, so 'None'/'null' mean None."""
  norm = cfg["norm"]
  return None if norm in (None, "", "None", "none", "null") else norm


def validate_model_config(cfg: Mapping[str, Any]) -> None:
  """Checks the constraints the official code leaves implicit.

  Raises:
    ValueError: naming the offending key.
  """
  if cfg["ndims"] not in (2, 3):
    raise ValueError(f"model.ndims must be 2 or 3, got {cfg['ndims']}")
  if norm_of(cfg) not in NORMS:
    raise ValueError(f"model.norm must be 'InstanceNorm' or null, got {cfg['norm']!r}")
  for key in ("c_s", "c_w", "c_in", "c_lstm"):
    if int(cfg[key]) < 1:
      raise ValueError(f"model.{key} must be positive, got {cfg[key]}")
  for key in ("nres_enc", "nres_dec"):
    if int(cfg[key]) < 0:
      raise ValueError(f"model.{key} must be >= 0, got {cfg[key]}")
  for group in (("c_enc", "k_enc", "s_enc"), ("c_dec", "k_dec", "s_dec")):
    lens = [len(cfg[k]) for k in group]
    if len(set(lens)) != 1 or lens[0] == 0:
      raise ValueError(f"model.{group[1]} and model.{group[2]} must have the length of "
                       f"model.{group[0]} ({lens[0]}), got {lens[1]} and {lens[2]}")
  for key in ("k_enc", "k_dec"):
    for k in cfg[key]:
      if k < 1 or k % 2 == 0:
        raise ValueError(f"model.{key} kernel sizes must be odd, got {list(cfg[key])}")
  for key in ("s_enc", "s_dec"):
    if any(s not in (1, 2) for s in cfg[key]):
      raise ValueError(f"model.{key} strides must be 1 or 2, got {list(cfg[key])}")
  if any(s != 1 for s in cfg["s_dec"]):
    raise ValueError(f"model.s_dec must be all 1 (upsampling is by interpolation), "
                     f"got {list(cfg['s_dec'])}")
  if cfg["c_lstm"] != cfg["c_enc"][-1]:
    raise ValueError(f"model.c_lstm ({cfg['c_lstm']}) must equal model.c_enc[-1] "
                     f"({cfg['c_enc'][-1]})")
  if cfg["c_dec"][-1] != cfg["c_in"]:
    raise ValueError(f"model.c_dec[-1] ({cfg['c_dec'][-1]}) must equal model.c_in "
                     f"({cfg['c_in']})")
  n_down = sum(1 for s in cfg["s_enc"] if s == 2)
  n_up = len(cfg["c_dec"]) - 1
  if n_down != n_up:
    raise ValueError(f"model.c_dec has {n_up} upsampling layers (len(c_dec) - 1) but "
                     f"model.s_enc has {n_down} stride-2 layers; they must match")


def total_stride(cfg: Mapping[str, Any]) -> int:
  """The factor every spatial size must be a multiple of."""
  out = 1
  for s in cfg["s_enc"]:
    out *= int(s)
  return out
