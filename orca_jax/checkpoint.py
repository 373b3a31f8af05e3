"""Params checkpoints with orbax: save any params pytree, restore it (optionally re-laid out).

A loaded GGUF or safetensors model is dequantized and re-arranged once, saved here, and later
restored straight into the dtype and sharding the server wants.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


def save_params(path: str | os.PathLike, params: PyTree, *, overwrite: bool = False) -> None:
    """Write `params` (a pytree of arrays) to the directory `path`; blocks until it is on disk.

    Raises ValueError if `path` exists, unless `overwrite`.
    """
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), params, force=overwrite)
        ckptr.wait_until_finished()


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def restore_params(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
    """Read params saved by `save_params`.

    Args:
      path: the checkpoint directory.
      like: optional tree of the same structure, of arrays or `jax.ShapeDtypeStruct`s: each leaf
        is restored with its dtype (cast if the saved one differs) and sharding. Without it,
        leaves come back as saved, on the default device.
    """
    target = None if like is None else jax.tree.map(_abstract, like)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(path), target)
