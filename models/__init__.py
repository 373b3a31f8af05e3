"""Decoder models on a packed ragged token batch over a paged KV cache."""

from models.batch import RaggedBatch, pack_batch
from models.config import PRESETS, ModelConfig, get_config
from models.decoder import RandomWeights, forward, init_params, param_shapes, step
from models.kv_cache import KVCache, init_kv_cache

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "RaggedBatch",
    "forward",
    "get_config",
    "init_kv_cache",
    "RandomWeights",
    "init_params",
    "pack_batch",
    "param_shapes",
    "step",
]
