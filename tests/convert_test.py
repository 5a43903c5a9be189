"""Official checkpoint import/export: round trips, strict-load compatibility, bad checkpoints."""

import collections

import numpy as np
import pytest
import torch

from seq2seq_jax import convert
from seq2seq_jax.models import model_config_from_yaml
from tests.reference import FORWARD, paths


@pytest.mark.parametrize("name", FORWARD)
def test_export_is_what_official_strict_load_accepts(fixtures_dir, name, tmp_path):
  """Export writes the same keys (same order), shapes, dtypes and values as the official
  state_dict, which is what `load_state_dict(strict=True)` checks; import → export → import
  is exact."""
  pth, yml, _ = paths(fixtures_dir, name)
  _, variables = convert.load_torch_checkpoint(pth, yml)
  out = tmp_path / "out.pth"
  convert.save_torch_checkpoint(variables, model_config_from_yaml(yml), out)
  official = torch.load(pth, weights_only=True)
  exported = torch.load(out, weights_only=True)
  assert list(exported.keys()) == list(official.keys())
  for k, v in official.items():
    assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
    assert torch.equal(exported[k], v), k
  _, again = convert.load_torch_checkpoint(out, yml)
  flat_a = dict(convert._iter_flat(variables["params"]))
  flat_b = dict(convert._iter_flat(again["params"]))
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))


def test_command_line_round_trip(fixtures_dir, tmp_path, capsys):
  pth, yml, npz = paths(fixtures_dir, "seq2seq_3d_small")
  out_dir = tmp_path / "flax"
  assert convert.main(["to-flax", str(pth), "--config", str(yml), "--out", str(out_dir)]) == 0
  assert (out_dir / "model.yaml").is_file()
  model, variables = convert.load_flax_checkpoint(out_dir)
  assert model.ndims == 3
  back = tmp_path / "back.pth"
  assert convert.main(["to-torch", str(out_dir), "--out", str(back)]) == 0
  a, b = torch.load(pth, weights_only=True), torch.load(back, weights_only=True)
  assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
  with pytest.raises(FileExistsError, match="already exists"):
    convert.main(["to-flax", str(pth), "--config", str(yml), "--out", str(out_dir)])
  assert not list(tmp_path.glob("*.tmp*"))  # nothing half-written left behind


def _modified(fixtures_dir, tmp_path, fn):
  pth, yml, _ = paths(fixtures_dir, "seq2seq_2p5d_small")
  sd = collections.OrderedDict(torch.load(pth, weights_only=True))
  fn(sd)
  bad = tmp_path / "bad.pth"
  torch.save(sd, bad)
  return bad, yml


def test_wrong_shape_names_key_and_both_shapes(fixtures_dir, tmp_path):
  def change(sd):
    sd["decoder.convs.1.param"] = torch.zeros(8, 16, 5, 5, 4)
  bad, yml = _modified(fixtures_dir, tmp_path, change)
  with pytest.raises(ValueError, match=r"decoder\.convs\.1\.param.*\(8, 16, 5, 5, 4\).*"
                                       r"\(8, 16, 3, 3, 4\)"):
    convert.load_torch_checkpoint(bad, yml)


def test_missing_and_unexpected_keys(fixtures_dir, tmp_path):
  bad, yml = _modified(fixtures_dir, tmp_path, lambda sd: sd.pop("style_fc.0.bias"))
  with pytest.raises(KeyError, match=r"missing key 'style_fc\.0\.bias'"):
    convert.load_torch_checkpoint(bad, yml)
  bad, yml = _modified(fixtures_dir, tmp_path,
                       lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)))
  with pytest.raises(KeyError, match=r"unexpected key 'extra\.weight'"):
    convert.load_torch_checkpoint(bad, yml)


def test_checkpoint_of_another_config_is_rejected(fixtures_dir):
  pth, _, _ = paths(fixtures_dir, "seq2seq_2p5d_small")
  _, yml, _ = paths(fixtures_dir, "seq2seq_nonorm_small")
  with pytest.raises((KeyError, ValueError), match=r"encoder\.|decoder\.|style_fc"):
    convert.load_torch_checkpoint(pth, yml)


class _NotWeights:
  pass


def test_pickled_code_is_never_loaded(tmp_path, fixtures_dir):
  bad = tmp_path / "code.pth"
  torch.save({"encoder.conv.0.0.weight": _NotWeights()}, bad)
  _, yml, _ = paths(fixtures_dir, "seq2seq_2p5d_small")
  with pytest.raises(ValueError, match="not a readable torch state_dict"):
    convert.load_torch_checkpoint(bad, yml)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    convert.load_torch_checkpoint(tmp_path / "nope.pth", yml)
