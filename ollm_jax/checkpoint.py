"""ollm-jax checkpoints on disk: loading them into a `Model`, and saving parameter pytrees.

A checkpoint directory (written by `ollm_jax.convert.convert`) holds

  config.json     the Hugging Face style config dict, plus `"dtype"` (the stored param dtype)
  params/         an orbax checkpoint of the params pytree (layout of `model.param_specs`)
  tokenizer*.json the tokenizer (`tokenizer.save_pretrained`), chat template included;
                  optional, `Model.tokenizer` is None without it

The shapes of the stored params are checked against `model.param_specs(cfg)` before
anything is restored, so a checkpoint that does not match its config.json fails with the
name of the tensor and both shapes instead of deep inside orbax.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ollm_jax import model
from ollm_jax.config import ModelConfig, UnsupportedConfigError

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
DTYPE_KEY = "dtype"  # config.json key recording the stored parameter dtype
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint (ours, Hugging Face or GGUF) is missing, corrupt or does not match its config."""


class Model(NamedTuple):
    """A loaded model: parameters, config and (optionally) tokenizer."""

    params: model.Params
    cfg: ModelConfig
    tokenizer: Any  # a transformers tokenizer, or None when the checkpoint has none


def flatten(tree: Any) -> dict[str, Any]:
    """A nested dict pytree as {"layers_0/attn/w_q": leaf, ...}."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def save_params(path: str | os.PathLike, params: model.Params) -> None:
    """Writes a params pytree (numpy or jax arrays) as an orbax checkpoint at `path` (must not exist)."""
    path = os.path.abspath(os.fspath(path))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
        ckptr.wait_until_finished()


def check_shapes(stored: dict[str, tuple[int, ...]], specs: model.Params, *, where: str) -> None:
    """Raises CheckpointError unless `stored` ({name: shape}) has exactly the tensors of `specs`."""
    want = {name: tuple(s.shape) for name, s in flatten(specs).items()}
    missing = sorted(set(want) - set(stored))
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]} (and {len(missing) - 1} more)"
                              if len(missing) > 1 else f"{where}: missing tensor {missing[0]}")
    unexpected = sorted(set(stored) - set(want))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, shape in want.items():
        if tuple(stored[name]) != shape:
            raise CheckpointError(
                f"{where}: {name}: expected shape {shape} (from config.json) but got {tuple(stored[name])}"
            )


def read_config(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Reads `path/config.json` into (ModelConfig, raw dict); dtype defaults to the stored one."""
    config_path = os.path.join(os.fspath(path), CONFIG_FILE)
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an ollm-jax checkpoint (no {CONFIG_FILE})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: corrupt JSON: {e}") from e
    try:
        cfg = ModelConfig.from_hf(hf, dtype=dtype or hf.get(DTYPE_KEY) or "bfloat16")
    except (UnsupportedConfigError, KeyError) as e:
        raise CheckpointError(f"{config_path}: {type(e).__name__}: {e}") from e
    return cfg, hf


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in `path` (local files only), or None if there is none."""
    path = os.fspath(path)
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    import transformers  # heavy; only when a tokenizer is there

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def load(path: str | os.PathLike, *, dtype: str | None = None, tokenizer: bool = True) -> Model:
    """Loads an ollm-jax checkpoint directory.

    Args:
      path: a directory written by `ollm_jax.convert.convert`.
      dtype: parameter dtype ("bfloat16", "float32", ...); defaults to the stored one.
      tokenizer: also load the tokenizer (if the checkpoint has one).
    Returns:
      Model(params, cfg, tokenizer): params are jax arrays in the layout of `model.param_specs(cfg)`.
    Raises:
      CheckpointError: no/corrupt config.json, unsupported config, or params whose names or
        shapes do not match `param_specs(cfg)` (naming the tensor and both shapes).
    """
    path = os.path.abspath(os.fspath(path))
    cfg, hf = read_config(path, dtype=dtype)
    stored_dtype = hf.get(DTYPE_KEY) or cfg.dtype
    specs = model.param_specs(cfg.replace(dtype=stored_dtype))
    params_path = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise CheckpointError(f"{path}: not an ollm-jax checkpoint (no {PARAMS_DIR}/ directory)")

    with ocp.StandardCheckpointer() as ckptr:
        try:
            meta = ckptr.metadata(params_path)
        except Exception as e:  # orbax raises many types for a damaged directory
            raise CheckpointError(f"{params_path}: unreadable orbax checkpoint: {type(e).__name__}: {e}") from e
        meta = getattr(meta, "item_metadata", meta)
        stored = {name: tuple(m.shape) for name, m in flatten(dict(meta)).items()}
        check_shapes(stored, specs, where=params_path)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), specs)
        try:
            params = ckptr.restore(params_path, target)
        except Exception as e:
            raise CheckpointError(f"{params_path}: restoring failed: {type(e).__name__}: {e}") from e

    if jnp.dtype(cfg.dtype) != jnp.dtype(stored_dtype):
        params = jax.tree.map(lambda x: x.astype(cfg.dtype), params)
    return Model(params=params, cfg=cfg, tokenizer=load_tokenizer(path) if tokenizer else None)

