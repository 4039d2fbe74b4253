"""Interoperability with other ecosystems: Hugging Face Mixtral checkpoints <-> moe_train models (see hf.py)."""

from moe_train.interop.hf import (check_mixtral_compatible, config_from_hf, config_to_hf, load_mixtral, load_weights,
                                  save_mixtral, save_weights, state_dict_from_hf, state_dict_to_hf)

__all__ = ["check_mixtral_compatible", "config_from_hf", "config_to_hf", "load_mixtral", "load_weights",
           "save_mixtral", "save_weights", "state_dict_from_hf", "state_dict_to_hf"]
