"""Every experiment config loads, validates and takes command-line overrides of any field."""

import os
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from seq2seq_jax.models.config import norm_of, validate_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_argv(monkeypatch):
  monkeypatch.setattr(sys, "argv", list(sys.argv))


CONFIGS = ["toy", "tiny", "brats2d", "brats3d", "dce4d"]


def _parse(*argv):
  # config_flags reads the overrides from sys.argv itself, so the test sets it too.
  sys.argv = ["prog", *argv]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv,
                                  lock_config=True)
  fv(["prog", *argv])
  return fv.config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates(name):
  c = _parse(f"--config={REPO}/configs/{name}.py")
  validate_model_config(c.model)
  assert c.data.layout in ("toy", "brats", "dataset_json")


def test_model_and_train_fields_override_from_command_line():
  c = _parse(f"--config={REPO}/configs/toy.py", "--config.model.c_enc=(8, 16, 32)",
             "--config.model.c_lstm=32", "--config.model.s_enc=(1,1,2)",
             "--config.model.c_dec=(16,3)", "--config.model.k_dec=(3,7)",
             "--config.model.s_dec=(1,1)", "--config.train.lr=1e-4",
             "--config.model.norm=None")
  assert tuple(c.model.c_enc) == (8, 16, 32) and tuple(c.model.c_dec) == (16, 3)
  assert c.train.lr == 1e-4 and norm_of(c.model) is None
  validate_model_config(c.model)


def test_unknown_key_is_an_error_naming_it():
  with pytest.raises(Exception, match="not_a_field"):
    _parse(f"--config={REPO}/configs/toy.py", "--config.train.not_a_field=1")


def test_reading_configs_imports_no_jax():
  """Launchers that only read configs (experiments/compare_official.py) must not map jaxlib:
  its pages would then be shared with their children, where the compiler's code could not be
  paged out (host_memory.page_out_compiler_code)."""
  import subprocess
  code = ("import importlib.util, sys\n"
          f"for name in {CONFIGS!r}:\n"
          f"  spec = importlib.util.spec_from_file_location(name, '{REPO}/configs/' + name + '.py')\n"
          "  module = importlib.util.module_from_spec(spec)\n"
          "  spec.loader.exec_module(module)\n"
          "  module.get_config()\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=REPO)
  assert out.stdout.strip() == "[]"
