"""Official PyTorch checkpoints ⇄ Flax variables, and a command line for both directions.

    python -m seq2seq_jax.convert to-flax MODEL.pth --config MODEL.yaml --out DIR
    python -m seq2seq_jax.convert to-torch DIR --out MODEL.pth

`DIR` holds `model.yaml` (the official `seq2seq:` block) and `variables/`, an orbax
checkpoint of the Flax variables dict `{'params': ...}`.

torch is imported inside the functions that need it, so the rest of the package runs without
it, and checkpoints are always read with `weights_only=True` (no code is ever loaded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seq2seq_jax.models import (Generator, model_config_from_yaml, model_config_to_yaml)
from seq2seq_jax.models.config import norm_of

# Each entry: torch key → (flax path, torch→flax array transform, flax→torch transform).
_Entry = tuple[str, tuple[str, ...], Callable[[np.ndarray], np.ndarray],
               Callable[[np.ndarray], np.ndarray]]


def _conv_t2f(ndims):
  return lambda w: np.transpose(w, tuple(range(2, 2 + ndims)) + (1, 0))


def _conv_f2t(ndims):
  return lambda w: np.transpose(w, (ndims + 1, ndims) + tuple(range(ndims)))


def _hyper_t2f(ndims):
  return lambda w: np.transpose(w, tuple(range(2, 2 + ndims)) + (1, 0, 2 + ndims))


def _hyper_f2t(ndims):
  return lambda w: np.transpose(w, (ndims + 1, ndims) + tuple(range(ndims)) + (ndims + 2,))


_same = lambda w: w
_tr = lambda w: np.transpose(w)


def key_map(cfg: Mapping[str, Any]) -> list[_Entry]:
  """Every official state_dict key, in the official order, with its Flax path and layouts."""
  nd = int(cfg["ndims"])
  conv = (_conv_t2f(nd), _conv_f2t(nd))
  hyper = (_hyper_t2f(nd), _hyper_f2t(nd))
  out: list[_Entry] = []

  def add_conv(tkey, fpath):
    out.append((f"{tkey}.weight", fpath + ("kernel",), *conv))
    out.append((f"{tkey}.bias", fpath + ("bias",), _same, _same))

  def add_hyper(tkey, fpath):
    out.append((f"{tkey}.param", fpath + ("param",), *hyper))
    out.append((f"{tkey}.b", fpath + ("b",), _same, _same))
    for fc in ("fc", "fc_bias"):
      out.append((f"{tkey}.{fc}.weight", fpath + (fc, "kernel"), _tr, _tr))
      out.append((f"{tkey}.{fc}.bias", fpath + (fc, "bias"), _same, _same))

  for i in range(len(cfg["c_enc"])):
    add_conv(f"encoder.conv.{i}.0", ("encoder", f"conv_{i}"))
  # The official block is a Sequential: [pad, conv, norm, act, pad, conv, norm]; without a
  # norm layer the second conv moves from index 5 to 4.
  second = 5 if norm_of(cfg) is not None else 4
  for i in range(int(cfg["nres_enc"])):
    add_conv(f"encoder.res.{i}.conv_block.1", ("encoder", f"res_{i}", "conv1"))
    add_conv(f"encoder.res.{i}.conv_block.{second}", ("encoder", f"res_{i}", "conv2"))
  for i in range(int(cfg["nres_dec"])):
    for j in (1, 2):
      add_hyper(f"decoder.res.{i}.conv{j}", ("decoder", f"res_{i}", f"conv{j}"))
  for i in range(len(cfg["c_dec"]) - 1):
    add_hyper(f"decoder.convs.{i}", ("decoder", f"convs_{i}"))
  add_hyper("decoder.conv_last", ("decoder", "conv_last"))
  for lstm in ("enc_convlstm", "dec_convlstm"):
    for layer in range(3):
      out.append((f"{lstm}.cell_list.{layer}.conv.weight", (lstm, f"cell_{layer}_kernel"), *conv))
      out.append((f"{lstm}.cell_list.{layer}.conv.bias", (lstm, f"cell_{layer}_bias"),
                  _same, _same))
  out.append(("style_fc.0.weight", ("style_fc", "kernel"), _tr, _tr))
  out.append(("style_fc.0.bias", ("style_fc", "bias"), _same, _same))
  return out


def _param_shapes(model: Generator) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax param shapes for `model`, from abstract evaluation (no compute)."""
  spatial = (8 * 2 ** len(model.s_enc),) * model.ndims
  x = jax.ShapeDtypeStruct((1, 1) + spatial + (model.c_in,), jnp.float32)
  code = jax.ShapeDtypeStruct((1, model.c_s), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, code)["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _iter_flat(tree: Mapping[str, Any], prefix=()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _iter_flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def state_dict_to_variables(state_dict: Mapping[str, Any], cfg: Mapping[str, Any],
                            source: str = "state_dict") -> dict:
  """Official state_dict (arrays or tensors) → Flax variables `{'params': ...}`.

  Raises:
    KeyError: a key the config expects is absent, or one it does not expect is present.
    ValueError: a tensor's shape does not match the config (names the key and both shapes).
  """
  model = Generator.from_config(cfg)
  shapes = _param_shapes(model)
  params: dict = {}
  expected = set()
  for tkey, fpath, t2f, f2t in key_map(cfg):
    expected.add(tkey)
    if tkey not in state_dict:
      raise KeyError(f"{source}: missing key {tkey!r} that the model config requires")
    arr = np.asarray(state_dict[tkey].detach().cpu().numpy()
                     if hasattr(state_dict[tkey], "detach") else state_dict[tkey])
    want = tuple(f2t(np.empty(shapes[fpath], dtype=np.uint8)).shape)
    if tuple(arr.shape) != want:
      raise ValueError(f"{source}: key {tkey!r} has shape {tuple(arr.shape)} but the model "
                       f"config expects {want}")
    node = params
    for k in fpath[:-1]:
      node = node.setdefault(k, {})
    node[fpath[-1]] = jnp.asarray(np.ascontiguousarray(t2f(arr)), dtype=jnp.float32)
  extra = [k for k in state_dict if k not in expected]
  if extra:
    raise KeyError(f"{source}: unexpected key {extra[0]!r} for this model config "
                   f"({len(extra)} unexpected in all)")
  return {"params": params}


def variables_to_state_dict(variables: Mapping[str, Any],
                            cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax variables → official state_dict arrays (float32, official key order and layout)."""
  params = variables["params"] if "params" in variables else variables
  flat = dict(_iter_flat(params))
  out = {}
  for tkey, fpath, _, f2t in key_map(cfg):
    if fpath not in flat:
      raise KeyError(f"flax params lack {'/'.join(fpath)} (official key {tkey!r})")
    out[tkey] = np.ascontiguousarray(f2t(np.asarray(flat[fpath], dtype=np.float32)))
  return out


def load_torch_checkpoint(pth_path: str | os.PathLike,
                          yaml_path: str | os.PathLike) -> tuple[Generator, dict]:
  """Reads an official `.pth` state_dict and its YAML config.

  Returns:
    `(model, variables)`: the linen `Generator` and a Flax variables dict, so that
    `model.apply(variables, x, code, n_outseq=n)` runs the official network.
  """
  import torch  # only needed for conversion

  cfg = model_config_from_yaml(yaml_path)
  pth_path = os.fspath(pth_path)
  if not os.path.isfile(pth_path):
    raise FileNotFoundError(f"checkpoint not found: {pth_path}")
  try:
    state_dict = torch.load(pth_path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for corrupt files
    raise ValueError(f"{pth_path}: not a readable torch state_dict ({e})") from e
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{pth_path}: holds a {type(state_dict).__name__}, not a state_dict")
  variables = state_dict_to_variables(state_dict, cfg, source=pth_path)
  return Generator.from_config(cfg), variables


def save_torch_checkpoint(variables: Mapping[str, Any], cfg: Mapping[str, Any],
                          pth_path: str | os.PathLike) -> None:
  """Writes a `.pth` that the official `Generator.load_state_dict(..., strict=True)` takes."""
  import collections

  import torch

  sd = variables_to_state_dict(variables, cfg)
  tensors = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in sd.items())
  pth_path = os.fspath(pth_path)
  tmp = f"{pth_path}.tmp"
  torch.save(tensors, tmp)
  os.replace(tmp, pth_path)


def save_flax_checkpoint(variables: Mapping[str, Any], cfg: ml_collections.ConfigDict,
                         out_dir: str | os.PathLike) -> None:
  """Writes `out_dir/model.yaml` + `out_dir/variables` (orbax); `out_dir` must not exist."""
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir):
    raise FileExistsError(f"output directory already exists: {out_dir}")
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  model_config_to_yaml(cfg, os.path.join(tmp, "model.yaml"))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "variables"), jax.tree_util.tree_map(np.asarray, variables))
  os.replace(tmp, out_dir)


def load_flax_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[Generator, dict]:
  """Reads a directory written by `save_flax_checkpoint` (or `to-flax`)."""
  import orbax.checkpoint as ocp

  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  cfg = model_config_from_yaml(os.path.join(ckpt_dir, "model.yaml"))
  path = os.path.join(ckpt_dir, "variables")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no orbax checkpoint at {path}")
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(path)
  return Generator.from_config(cfg), variables


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m seq2seq_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("to-flax", help="official .pth + YAML → orbax checkpoint directory")
  p.add_argument("pth")
  p.add_argument("--config", required=True, help="official YAML with a seq2seq: block")
  p.add_argument("--out", required=True, help="output directory (must not exist)")
  p = sub.add_parser("to-torch", help="orbax checkpoint directory → official .pth")
  p.add_argument("ckpt_dir")
  p.add_argument("--out", required=True, help="output .pth path")
  args = parser.parse_args(argv)
  if args.cmd == "to-flax":
    _, variables = load_torch_checkpoint(args.pth, args.config)
    save_flax_checkpoint(variables, model_config_from_yaml(args.config), args.out)
    print(f"wrote {args.out}")
  else:
    model_cfg = model_config_from_yaml(os.path.join(args.ckpt_dir, "model.yaml"))
    _, variables = load_flax_checkpoint(args.ckpt_dir)
    save_torch_checkpoint(variables, model_cfg, args.out)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
