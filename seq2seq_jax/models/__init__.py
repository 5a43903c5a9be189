"""Flax linen modules of the Seq2Seq generator."""
from seq2seq_jax.models.config import (MODEL_KEYS, make_model_config, model_config_from_yaml,
                                       model_config_to_yaml, paper_model_config, total_stride,
                                       validate_model_config)
from seq2seq_jax.models.generator import Generator

__all__ = ["Generator", "MODEL_KEYS", "make_model_config", "model_config_from_yaml",
           "model_config_to_yaml", "paper_model_config", "total_stride",
           "validate_model_config"]
