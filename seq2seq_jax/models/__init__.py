"""Flax linen modules of the Seq2Seq generator.

`Generator` is imported on first use, so that reading a config (configs/*.py import
`seq2seq_jax.models.config`) does not import JAX: a launcher that only reads configs, such
as experiments/compare_official.py, then maps none of jaxlib's pages, which would otherwise
be shared with its children and kept resident in them (host_memory.page_out_compiler_code).
"""
from seq2seq_jax.models.config import (MODEL_KEYS, make_model_config, model_config_from_yaml,
                                       model_config_to_yaml, paper_model_config, total_stride,
                                       validate_model_config)

__all__ = ["Generator", "MODEL_KEYS", "make_model_config", "model_config_from_yaml",
           "model_config_to_yaml", "paper_model_config", "total_stride",
           "validate_model_config"]


def __getattr__(name):
  if name == "Generator":
    from seq2seq_jax.models.generator import Generator
    return Generator
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
