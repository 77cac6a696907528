"""Conversion of Hugging Face and GGUF checkpoints into ollm-jax checkpoints.

  load_hf_dir(src)      HF directory (config.json + safetensors)  -> (params, hf_config)
  load_gguf(path)       llama.cpp GGUF file                       -> (params, hf_config, tokenizer)
  convert(src, dst)     either of them -> an ollm-jax checkpoint directory (`ollm_jax.checkpoint`)

Which tensors must exist and their shapes come from `model.param_specs(cfg)` only: every
weight there has one Hugging Face name and one layout change (`_slots`), and a GGUF name
is a renaming of the Hugging Face one. Params are built in numpy on the host.

Dimensions: E hidden, H query heads, K KV heads, N either of them, D head_dim, F MLP
hidden, V vocab.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ollm_jax import model
from ollm_jax.checkpoint import (
    CONFIG_FILE, DTYPE_KEY, PARAMS_DIR, CheckpointError, flatten, load_tokenizer, save_params,
)
from ollm_jax.config import ModelConfig, RopeScaling, UnsupportedConfigError

__all__ = [
    "CheckpointError",
    "ConvertSummary",
    "convert",
    "convert_cli_args",
    "convert_cli_main",
    "gguf_name",
    "hf_tensors",
    "load_gguf",
    "load_hf_dir",
    "permute_qk",
]

# general.architecture -> model_type. llama.cpp writes Mistral files as "llama".
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Quantization types we dequantize (gguf.quants, numpy). Others (IQ*, TQ*, ...) are refused.
GGUF_QUANT_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")

Tensors = Mapping[str, Callable[[], np.ndarray]]  # name -> lazy loader of the array


# ----------------------------------------------------------------------------------------------
# Names and layouts, derived from param_specs.


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One weight: our pytree path, its Hugging Face name and layout, and the two layout maps."""

    path: str  # "layers_0/attn/w_q"
    hf_name: str  # "model.layers.0.self_attn.q_proj.weight"
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(a):
    return a


def _slots(cfg: ModelConfig) -> list[_Slot]:
    """Every weight of `param_specs(cfg)` with its Hugging Face name, shape and layout maps."""
    layer_names = {
        "attn_norm/scale": "input_layernorm.weight",
        "mlp_norm/scale": "post_attention_layernorm.weight",
        "attn/w_q": "self_attn.q_proj.weight",
        "attn/w_k": "self_attn.k_proj.weight",
        "attn/w_v": "self_attn.v_proj.weight",
        "attn/w_o": "self_attn.o_proj.weight",
        "attn/b_q": "self_attn.q_proj.bias",
        "attn/b_k": "self_attn.k_proj.bias",
        "attn/b_v": "self_attn.v_proj.bias",
        "attn/b_o": "self_attn.o_proj.bias",
        "attn/q_norm/scale": "self_attn.q_norm.weight",
        "attn/k_norm/scale": "self_attn.k_norm.weight",
        "mlp/w_gate": "mlp.gate_proj.weight",
        "mlp/w_up": "mlp.up_proj.weight",
        "mlp/w_down": "mlp.down_proj.weight",
    }
    top_names = {"embedding": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
                 "lm_head": "lm_head.weight"}
    slots = []
    for path, spec in flatten(model.param_specs(cfg)).items():
        shape = tuple(spec.shape)
        if path in top_names:
            hf_name = top_names[path]
        elif (m := re.fullmatch(r"layers_(\d+)/(.+)", path)) and m.group(2) in layer_names:
            hf_name = f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
        else:
            raise NotImplementedError(f"convert: no Hugging Face name for model weight {path} {shape}")
        leaf = path.rsplit("/", 1)[-1]
        if leaf in ("w_q", "w_k", "w_v"):  # ours [E, N, D] <- HF [N*D, E]
            e, n, d = shape
            to_ours = lambda a, s=shape: a.T.reshape(s)
            to_hf = lambda a, e=e, n=n, d=d: a.reshape(e, n * d).T
            hf_shape = (n * d, e)
        elif leaf == "w_o":  # ours [E, H, D] <- HF [E, H*D]
            e, h, d = shape
            to_ours = lambda a, s=shape: a.reshape(s)
            to_hf = lambda a, e=e, h=h, d=d: a.reshape(e, h * d)
            hf_shape = (e, h * d)
        elif leaf in ("b_q", "b_k", "b_v"):  # ours [N, D] <- HF [N*D]
            to_ours = lambda a, s=shape: a.reshape(s)
            to_hf = lambda a: a.reshape(-1)
            hf_shape = (math.prod(shape),)
        elif leaf in ("w_gate", "w_up", "w_down", "lm_head"):  # ours [in, out] <- HF [out, in]
            to_ours = to_hf = np.transpose
            hf_shape = shape[::-1]
        else:  # embedding [V, E], norm scales, b_o: same layout
            to_ours = to_hf = _same
            hf_shape = shape
        slots.append(_Slot(path, hf_name, hf_shape, to_ours, to_hf))
    return slots


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, last = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def hf_tensors(params: model.Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our params as a Hugging Face state dict {name: numpy array} (inverse of loading)."""
    flat = flatten(params)
    return {s.hf_name: np.ascontiguousarray(s.to_hf(np.asarray(flat[s.path]))) for s in _slots(cfg)}


_GGUF_RENAMES = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"blk.\1.attn_norm."),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blk.\1.ffn_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.", r"blk.\1.attn_q."),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.", r"blk.\1.attn_k."),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.", r"blk.\1.attn_v."),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"blk.\1.attn_output."),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.", r"blk.\1.attn_q_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.", r"blk.\1.attn_k_norm."),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blk.\1.ffn_gate."),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"blk.\1.ffn_up."),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"blk.\1.ffn_down."),
)


def gguf_name(hf_name: str) -> str:
    """The llama.cpp tensor name of a Hugging Face tensor name ("model.norm.weight" -> "output_norm.weight")."""
    for pattern, repl in _GGUF_RENAMES:
        new, n = re.subn("^" + pattern, repl, hf_name)
        if n:
            return new
    raise KeyError(f"no GGUF name for {hf_name}")


def permute_qk(w: np.ndarray, n_heads: int, *, reverse: bool = False) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half -> interleaved RoPE), or its inverse.

    w is [N*D, ...] (a projection weight or bias, HF layout); rows of each head are reordered.
    """
    d2 = w.shape[0] // n_heads // 2
    if reverse:  # [N, D/2, 2, ...] -> [N, 2, D/2, ...]
        return w.reshape(n_heads, d2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_heads, 2, d2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _assemble(cfg: ModelConfig, tensors: Tensors, *, where: str, ignore: Callable[[str], bool],
              names: Callable[[str], str] = _same, progress: bool = True) -> model.Params:
    """Builds the params pytree from {source name: loader}, checking names and shapes.

    `names` maps a Hugging Face name to the source's name (identity, or `gguf_name`).
    """
    slots = _slots(cfg)
    want = {names(s.hf_name): s for s in slots}
    missing = [n for n in want if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]}{more}")
    unexpected = sorted(n for n in tensors if n not in want and not ignore(n))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more: {', '.join(unexpected[1:4])})" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}{more}")

    dtype = jnp.dtype(cfg.dtype)  # a numpy dtype (ml_dtypes for bfloat16)
    flat = {}
    bar = tqdm(want.items(), desc=f"converting {os.path.basename(where)}", unit="tensor", disable=not progress)
    for name, slot in bar:
        array = tensors[name]()
        if tuple(array.shape) != slot.hf_shape:
            raise CheckpointError(f"{where}: {name}: expected shape {slot.hf_shape} but got {tuple(array.shape)}")
        flat[slot.path] = np.ascontiguousarray(slot.to_ours(array).astype(dtype))
    return _unflatten(flat)


def _model_config(hf: dict[str, Any], dtype: str, where: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf, dtype=dtype)
    except UnsupportedConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e
    except KeyError as e:
        raise CheckpointError(f"{where}: config lacks required key {e}") from e


# ----------------------------------------------------------------------------------------------
# Hugging Face directories.


def load_hf_dir(src: str | os.PathLike, dtype: str = "float32", *, progress: bool = True
                ) -> tuple[model.Params, dict[str, Any]]:
    """Reads a Hugging Face model directory (config.json + model.safetensors or an indexed set of shards).

    Args:
      src: the directory.
      dtype: dtype of the returned arrays.
      progress: show a tqdm bar over tensors.
    Returns:
      (params, hf_config): params a nested dict of numpy arrays in the layout of
      `model.param_specs(cfg)`; hf_config the dict of config.json.
    Raises:
      CheckpointError: unsupported model_type, missing/unexpected tensor, shape mismatch,
        truncated or corrupt safetensors file, missing shard.
    """
    from safetensors import SafetensorError, safe_open

    src = os.fspath(src)
    config_path = os.path.join(src, "config.json")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read config: {e}") from e
    cfg = _model_config(hf, dtype, config_path)

    index_path = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: corrupt index: {e}") from e
        shards = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(src, "model.safetensors")):
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")

    def ignore(name: str) -> bool:
        return bool(_IGNORED_HF.match(name)) or (cfg.tie_word_embeddings and name == "lm_head.weight")

    with contextlib.ExitStack() as stack:
        tensors: dict[str, Callable[[], np.ndarray]] = {}
        for shard in shards:
            path = os.path.join(src, shard)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path}: shard {shard} does not exist")
            try:
                f = stack.enter_context(safe_open(path, framework="np"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file: {e}") from e
            for name in f.keys():
                if name in tensors:
                    raise CheckpointError(f"{path}: tensor {name} also stored in another shard")
                if weight_map is not None and weight_map.get(name) != shard:
                    raise CheckpointError(f"{index_path}: tensor {name} is in {shard} but indexed as "
                                          f"{weight_map.get(name)}")

                def load(f=f, name=name, path=path):
                    try:
                        return f.get_tensor(name)
                    except (SafetensorError, OSError, TypeError) as e:
                        raise CheckpointError(f"{path}: cannot read tensor {name}: {e}") from e

                tensors[name] = load
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(tensors))
            if absent:
                raise CheckpointError(f"{index_path}: missing tensor {absent[0]} (indexed in {weight_map[absent[0]]})")
        params = _assemble(cfg, tensors, where=src, ignore=ignore, progress=progress)
    return params, hf


def _hf_tokenizer(src: str):
    """The tokenizer of a Hugging Face directory, or None if it has none."""
    try:
        return load_tokenizer(src)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{src}: cannot load tokenizer: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# GGUF files.


def _gguf_reader(path: str):
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # short reads surface as ValueError, IndexError, struct errors, ...
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise CheckpointError(
                f"{path}: truncated GGUF file: tensor {t.name}: expected {t.n_bytes} bytes but got {t.data.nbytes}"
            )
    return reader


def _gguf_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _llama3_rope_scaling(freq_factors: np.ndarray, cfg: ModelConfig, where: str) -> dict[str, Any]:
    """Llama 3.x GGUF files store RoPE scaling as per-frequency factors (`rope_freqs.weight`, [D/2]).

    Finds the llama3 scaling parameters (factors tried: 8, 32, 16, 4, with the Llama 3 defaults
    for the rest) that reproduce them.
    """
    base = np.asarray(model._inv_frequencies(cfg.replace(rope_scaling=None)))
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        for orig in (8192, 4096, 131072):
            rs = RopeScaling("llama3", factor, 1.0, 4.0, orig)
            scaled = np.asarray(model._inv_frequencies(cfg.replace(rope_scaling=rs)))
            if np.allclose(base / scaled, freq_factors, rtol=1e-3):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": orig}
    raise CheckpointError(f"{where}: rope_freqs.weight matches no supported llama3 RoPE scaling")


def _float32(x) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (9.999999747378752e-06 -> 1e-05)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _gguf_hf_config(reader, path: str, tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A Hugging Face style config dict from GGUF metadata."""
    arch = _gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def need(key):
        value = _gguf_value(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(_gguf_value(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_gguf_value(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: partial rotary embedding ({arch}.rope.dimension_count={rope_dim}, "
                              f"head_dim={head_dim}) is not supported")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    vocab = _gguf_value(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = tensor_shapes["token_embd.weight"][0] if "token_embd.weight" in tensor_shapes else len(tokens or ())
    hf: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": GGUF_ARCHITECTURES[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_gguf_value(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_gguf_value(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": _float32(_gguf_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32(_gguf_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "hidden_act": "silu",
    }
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        value = _gguf_value(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            hf[name] = int(value)
    scaling_type = _gguf_value(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        hf["rope_scaling"] = {"rope_type": scaling_type,
                              "factor": float(_gguf_value(reader, f"{arch}.rope.scaling.factor", 1.0))}
        orig = _gguf_value(reader, f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            hf["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    return hf


def _gguf_tokenizer(reader, path: str):
    """Rebuilds the tokenizer (and chat template) from GGUF metadata with transformers' converters.

    transformers' own `AutoTokenizer.from_pretrained(gguf_file=...)` imports torch; this
    uses the same converters (`integrations.ggml`) without it. Returns None when the file
    has no vocabulary.
    """
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    import transformers
    from tokenizers import pre_tokenizers, processors
    try:  # transformers moved its GGUF helpers from integrations.ggml to integrations.gguf
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    arch = _gguf_value(reader, "general.architecture")
    sections = {
        section: {name: _gguf_value(reader, f"tokenizer.{key}") for key, name in renames.items()
                  if f"tokenizer.{key}" in reader.fields}
        for section, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok_dict, tok_config = sections["tokenizer"], sections["tokenizer_config"]
    try:
        backend, _ = convert_gguf_tokenizer(GGUF_ARCHITECTURES[arch], tok_dict)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot rebuild the tokenizer: {type(e).__name__}: {e}") from e
    if _gguf_value(reader, "tokenizer.ggml.pre") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits digits one by one before the GPT-2 regex;
        # transformers' converter gives only the latter.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer]
        )
    tokens = tok_dict["tokens"]
    # Special tokens by id (the converter's own bos/eos strings are unreliable).
    special = {name: tokens[tok_config[f"{name}_id"]] for name in ("bos_token", "eos_token", "unk_token", "pad_token")
               if tok_config.get(f"{name}_id") is not None and tok_config[f"{name}_id"] < len(tokens)}
    add_bos = _gguf_value(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        bos = special.get("bos_token")
        if add_bos and bos is not None:
            bos_id = tok_config["bos_token_id"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        elif not add_bos:
            backend.post_processor = None
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=tok_config.get("chat_template"), **special
    )


def load_gguf(path: str | os.PathLike, dtype: str = "float32", *, progress: bool = True
              ) -> tuple[model.Params, dict[str, Any], Any]:
    """Reads a llama.cpp GGUF file (architectures llama/mistral, qwen2, qwen3).

    Quantized tensors are dequantized with `gguf.quants` (numpy), and llama's q/k row
    permutation is undone.

    Args:
      path: the .gguf file.
      dtype: dtype of the returned arrays.
      progress: show a tqdm bar over tensors.
    Returns:
      (params, hf_config, tokenizer): params as in `load_hf_dir`; hf_config a Hugging Face
      style config dict built from the metadata; tokenizer a transformers tokenizer with the
      file's chat template (None if the file has no vocabulary).
    Raises:
      CheckpointError: unsupported architecture or quantization type, missing/unexpected
        tensor, shape mismatch, truncated or corrupt file.
    """
    from gguf import GGMLQuantizationType, dequantize

    path = os.fspath(path)
    reader = _gguf_reader(path)
    by_name = {t.name: t for t in reader.tensors}
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}  # numpy/HF order
    hf = _gguf_hf_config(reader, path, shapes)
    cfg = _model_config(hf, dtype, path)
    if "rope_freqs.weight" in by_name and "rope_scaling" not in hf:
        hf["rope_scaling"] = _llama3_rope_scaling(np.asarray(dequantize(
            by_name["rope_freqs.weight"].data, by_name["rope_freqs.weight"].tensor_type)).reshape(-1), cfg, path)
        cfg = _model_config(hf, dtype, path)

    supported = {GGMLQuantizationType[name] for name in GGUF_QUANT_TYPES}
    for t in reader.tensors:
        if t.tensor_type not in supported:
            raise CheckpointError(f"{path}: tensor {t.name} has unsupported quantization type "
                                  f"{t.tensor_type.name}; supported: {', '.join(GGUF_QUANT_TYPES)}")

    permuted = {}
    if hf["model_type"] == "llama":  # llama.cpp permutes q/k rows only for llama-arch files
        for i in range(cfg.num_layers):
            for kind, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
                for suffix in ("weight", "bias"):
                    permuted[f"blk.{i}.attn_{kind}.{suffix}"] = n

    def loader(t):
        def load():
            array = dequantize(t.data, t.tensor_type).reshape(shapes[t.name])
            if t.name in permuted:
                array = permute_qk(array, permuted[t.name], reverse=True)
            return array

        return load

    tensors = {name: loader(t) for name, t in by_name.items()}
    params = _assemble(cfg, tensors, where=path, ignore=lambda n: n == "rope_freqs.weight",
                       names=gguf_name, progress=progress)
    return params, hf, _gguf_tokenizer(reader, path)


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint.


class ConvertSummary(NamedTuple):
    src: str
    dst: str
    model_type: str
    num_params: int
    num_bytes: int
    dtype: str
    seconds: float

    def __str__(self):
        return (f"converted {self.src} -> {self.dst}: {self.model_type}, {self.num_params:,} params, "
                f"{self.num_bytes / 2**20:.1f} MiB {self.dtype}, {self.seconds:.1f} s")


def _replace_dir(tmp: str, dst: str) -> None:
    """Moves the finished `tmp` to `dst`, replacing any old `dst` only once `tmp` is in place."""
    old = None
    if os.path.lexists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
        os.rmdir(old)  # only the unique name is wanted
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "bfloat16", *,
            progress: bool = True) -> ConvertSummary:
    """Converts a Hugging Face directory or a .gguf file into an ollm-jax checkpoint at `dst`.

    Writes `dst/params/` (orbax), `dst/config.json` (Hugging Face style, with "dtype") and the
    tokenizer files. Everything is written to a temporary sibling of `dst` first and renamed
    into place, so `dst` is either the old checkpoint (on any error) or the complete new one.

    Raises:
      CheckpointError: bad source (see `load_hf_dir`, `load_gguf`), naming the offending value.
    """
    start = time.perf_counter()
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if jnp.dtype(dtype) not in (jnp.dtype("bfloat16"), jnp.dtype("float32"), jnp.dtype("float16")):
        raise CheckpointError(f"unsupported {dtype=}; supported: bfloat16, float32, float16")
    if os.path.isdir(src):
        params, hf = load_hf_dir(src, dtype, progress=progress)
        tokenizer = _hf_tokenizer(src)
    elif src.endswith(".gguf") and os.path.isfile(src):
        params, hf, tokenizer = load_gguf(src, dtype, progress=progress)
    else:
        raise CheckpointError(f"{src}: not a Hugging Face model directory or an existing .gguf file")

    hf = {k: v for k, v in hf.items() if k != "torch_dtype"} | {DTYPE_KEY: dtype}
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        save_params(os.path.join(tmp, PARAMS_DIR), params)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(hf, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    leaves = jax.tree.leaves(params)
    return ConvertSummary(src, dst, hf["model_type"], sum(x.size for x in leaves), sum(x.nbytes for x in leaves),
                          dtype, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Command line (checkpoints/convert.py and `ollm-jax convert`).


def convert_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the arguments of `convert`: SRC DST [--dtype]."""
    parser.add_argument("src", help="Hugging Face model directory or .gguf file")
    parser.add_argument("dst", help="output ollm-jax checkpoint directory (replaced atomically)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="parameter dtype to store (default: bfloat16)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def convert_cli_main(args: argparse.Namespace) -> int:
    """Runs a conversion from parsed arguments; prints a one-line summary. Returns the exit code (2 on error)."""
    try:
        summary = convert(args.src, args.dst, args.dtype, progress=getattr(args, "progress", True))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0
