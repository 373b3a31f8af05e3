"""Checkpoint loaders: Hugging Face safetensors (GPT-2, Llama) and llama GGUF files."""

from models.loaders.gguf_llama import default_model_path, load_gguf
from models.loaders.hf import (
    config_from_hf_json,
    gpt2_params_from_state_dict,
    llama_params_from_state_dict,
    load_safetensors,
)

__all__ = [
    "config_from_hf_json",
    "default_model_path",
    "gpt2_params_from_state_dict",
    "llama_params_from_state_dict",
    "load_gguf",
    "load_safetensors",
]
