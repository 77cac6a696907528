"""Checkpoint conversion (Hugging Face safetensors and GGUF) and loading, on tiny random models.

Every source is built here from `model.init_params`, so the converted params can be
compared with the ones that produced the file. Bad inputs must raise CheckpointError
naming the value and leave an existing destination byte-for-byte intact.
"""

from __future__ import annotations

import argparse
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ollm_jax import checkpoint, convert, model
from ollm_jax.checkpoint import CheckpointError, flatten
from ollm_jax.config import ModelConfig

STORIES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "stories260K")
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def hf_config(model_type="llama", tie=True, **changes):
    hf = {
        "model_type": model_type, "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    }
    return hf | changes


def random_params(hf, seed=0):
    """float32 params with non-trivial norms and biases (init_params sets those to 1 and 0)."""
    cfg = ModelConfig.from_hf(hf, dtype="float32")
    params = model.init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [np.asarray(x + 0.01 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    return cfg, jax.tree.unflatten(treedef, leaves)


def write_hf_dir(path, hf, cfg, params, *, shards=1, edit=None):
    """A Hugging Face directory; `edit(tensors)` may change the state dict first."""
    os.makedirs(path, exist_ok=True)
    tensors = convert.hf_tensors(params, cfg)
    if edit:
        edit(tensors)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return path
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, os.path.join(path, shard))
        weight_map |= {n: shard for n in part}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def write_gguf(path, hf, cfg, params, *, arch="llama", qtype=gguf.GGMLQuantizationType.F32, raw=None,
               drop=None, extra=None):
    """A GGUF file as llama.cpp writes it: q/k rows permuted for llama, 2-D weights in `qtype`.

    The metadata comes from `cfg`, the tensors from `params`. `raw` = {gguf name: (qtype,
    uint8 bytes)} replaces tensors with raw data; `drop` leaves one out; `extra` adds some.
    """
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    # A small byte-level BPE vocabulary filling the model's vocab.
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", "Ċ"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += ["Ġa", "he", "Ġhe"] + [f"x{i}" for i in range(cfg.vocab_size - len(tokens) - 3)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ a", "h e", "Ġ he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    tensors = {convert.gguf_name(n): a for n, a in convert.hf_tensors(params, ModelConfig.from_hf(hf)).items()}
    for name, a in (tensors | (extra or {})).items():
        if name == drop:
            continue
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            a = convert.permute_qk(a, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        if raw and name in raw:
            t, data = raw[name]
            w.add_tensor(name, data, raw_dtype=t)
        elif a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def snapshot(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def assert_params_equal(got, want):
    fg, fw = flatten(got), flatten(want)
    assert fg.keys() == fw.keys()
    for k in fw:
        np.testing.assert_array_equal(np.asarray(fg[k], np.float32), np.asarray(fw[k], np.float32), err_msg=k)


# --------------------------------------------------------------------------------------------
# Hugging Face directories.


@pytest.mark.parametrize("model_type,tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
def test_hf_dir_round_trip(tmp_path, model_type, tie):
    hf = hf_config(model_type, tie)
    cfg, params = random_params(hf)
    src = write_hf_dir(tmp_path / "src", hf, cfg, params)
    got, got_hf = convert.load_hf_dir(src, "float32", progress=False)
    assert got_hf == hf
    assert_params_equal(got, params)


def test_hf_dir_sharded_with_index(tmp_path):
    hf = hf_config("qwen2", tie=False)
    cfg, params = random_params(hf)
    src = write_hf_dir(tmp_path / "src", hf, cfg, params, shards=3)
    got, _ = convert.load_hf_dir(src, "float32", progress=False)
    assert_params_equal(got, params)


def test_hf_dir_ignores_inv_freq_and_tied_lm_head(tmp_path):
    hf = hf_config("llama", tie=True)
    cfg, params = random_params(hf)

    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    src = write_hf_dir(tmp_path / "src", hf, cfg, params, edit=edit)
    got, _ = convert.load_hf_dir(src, "float32", progress=False)
    assert_params_equal(got, params)


def test_convert_and_load_round_trip(tmp_path):
    hf = hf_config("qwen3", tie=False)
    cfg, params = random_params(hf)
    src = write_hf_dir(tmp_path / "src", hf, cfg, params)
    dst = tmp_path / "out" / "ckpt"
    summary = convert.convert(src, dst, "float32", progress=False)
    assert summary.num_params == model.num_params(params)
    m = checkpoint.load(dst)
    assert m.cfg == cfg and m.tokenizer is None
    assert_params_equal(m.params, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(m.params))

    # bfloat16 conversion: the same values, rounded; load can cast on the way in.
    convert.convert(src, dst, "bfloat16", progress=False)
    m = checkpoint.load(dst)
    assert m.cfg.dtype == "bfloat16"
    assert_params_equal(m.params, jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params))
    assert jax.tree.leaves(checkpoint.load(dst, dtype="float32").params)[0].dtype == jnp.float32
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt"]  # the old checkpoint and temp dirs are gone


def test_load_rejects_params_not_matching_config(tmp_path):
    hf = hf_config()
    cfg, params = random_params(hf)
    dst = tmp_path / "ckpt"
    convert.convert(write_hf_dir(tmp_path / "src", hf, cfg, params), dst, "float32", progress=False)
    config_path = dst / "config.json"
    good = json.loads(config_path.read_text())

    config_path.write_text(json.dumps(good | {"intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"layers_0/mlp/w_down: expected shape \(128, 64\) .*but got \(96, 64\)"):
        checkpoint.load(dst)
    config_path.write_text(json.dumps(good | {"num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers_1/"):
        checkpoint.load(dst)
    config_path.write_text(json.dumps(good | {"tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match=r"missing tensor lm_head"):
        checkpoint.load(dst)
    config_path.write_text(json.dumps(good | {"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"model_type='gpt2'"):
        checkpoint.load(dst)
    with pytest.raises(CheckpointError, match=r"no config.json"):
        checkpoint.load(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# GGUF files.


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
def test_gguf_f32_round_trip_is_exact(tmp_path, arch, tie):
    hf = hf_config(arch, tie)
    cfg, params = random_params(hf)
    path = write_gguf(str(tmp_path / "m.gguf"), hf, cfg, params, arch=arch)
    got, got_hf, tok = convert.load_gguf(path, "float32", progress=False)
    assert ModelConfig.from_hf(got_hf, dtype="float32") == cfg
    assert_params_equal(got, params)  # exact: the q/k permutation is undone
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "a he"}], tokenize=False)
    assert text == "<|im_start|>user\na he<|im_end|>\n"
    ids = tok("a he")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "Ġhe"]


@pytest.mark.parametrize("qtype,tol", [("Q8_0", 0.01), ("Q4_0", 0.15), ("Q4_1", 0.15), ("Q5_0", 0.05)])
def test_gguf_quantized_within_quant_error(tmp_path, qtype, tol):
    hf = hf_config("llama", tie=False)
    cfg, params = random_params(hf)
    qt = gguf.GGMLQuantizationType[qtype]
    path = write_gguf(str(tmp_path / "m.gguf"), hf, cfg, params, qtype=qt)
    got, _, _ = convert.load_gguf(path, "float32", progress=False)
    fg, fw = flatten(got), flatten(params)
    for k, want in fw.items():
        # error relative to the tensor's scale: well below what a wrong row order would give
        err = np.max(np.abs(fg[k] - want)) / np.max(np.abs(want))
        assert err < tol, (k, err)
    # The q/k rows are back in Hugging Face order: far closer to it than to llama.cpp's order.
    hf_q = convert.hf_tensors(params, cfg)["model.layers.0.self_attn.q_proj.weight"]  # [H*D, E]
    still_permuted = convert.permute_qk(hf_q, cfg.num_heads).T.reshape(fw["layers_0/attn/w_q"].shape)
    right = np.abs(fg["layers_0/attn/w_q"] - fw["layers_0/attn/w_q"]).mean()
    wrong = np.abs(fg["layers_0/attn/w_q"] - still_permuted).mean()
    assert right < 0.5 * wrong, (right, wrong)


def test_convert_gguf_writes_tokenizer_and_chat_template(tmp_path):
    hf = hf_config("qwen2", tie=False)
    cfg, params = random_params(hf)
    path = write_gguf(str(tmp_path / "m.gguf"), hf, cfg, params, arch="qwen2", qtype=gguf.GGMLQuantizationType.Q8_0)
    dst = tmp_path / "ckpt"
    convert.convert(path, dst, "bfloat16", progress=False)
    m = checkpoint.load(dst)
    assert m.cfg == cfg.replace(dtype="bfloat16")
    assert m.tokenizer.chat_template == CHAT_TEMPLATE
    assert m.tokenizer("a he")["input_ids"] == [5, 33]  # "a", "Ġhe"


# --------------------------------------------------------------------------------------------
# Bad inputs: CheckpointError naming the value, the old destination intact, no temp dirs left.


@pytest.fixture
def good_dst(tmp_path):
    hf = hf_config()
    cfg, params = random_params(hf)
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "ckpt"
    convert.convert(write_hf_dir(tmp_path / "good", hf, cfg, params), dst, "float32", progress=False)
    return dst, snapshot(dst), hf, cfg, params


def _assert_fails(good_dst, src, match):
    dst, before = good_dst[:2]
    with pytest.raises(CheckpointError, match=match):
        convert.convert(src, dst, progress=False)
    assert snapshot(dst) == before
    assert os.listdir(dst.parent) == ["ckpt"]
    assert_params_equal(checkpoint.load(dst).params, good_dst[4])


def _del(name):
    return lambda t: t.pop(name)


@pytest.mark.parametrize("edit,match", [
    (_del("model.layers.1.mlp.up_proj.weight"), r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.ones(3, np.float32)}),
     r"unexpected tensor model\.layers\.0\.self_attn\.extra\.weight"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.ones((64, 95), np.float32)}),
     r"model\.layers\.0\.mlp\.down_proj\.weight: expected shape \(64, 96\) but got \(64, 95\)"),
    (lambda t: t.update({"lm_head.bias": np.ones(64, np.float32)}), r"unexpected tensor lm_head\.bias"),
])
def test_bad_hf_tensors(tmp_path, good_dst, edit, match):
    hf, cfg, params = good_dst[2:]
    _assert_fails(good_dst, write_hf_dir(tmp_path / "bad", hf, cfg, params, edit=edit), match)


def test_bad_hf_model_type(tmp_path, good_dst):
    hf, cfg, params = good_dst[2:]
    src = write_hf_dir(tmp_path / "bad", hf | {"model_type": "gpt2"}, cfg, params)
    _assert_fails(good_dst, src, r"unsupported model_type='gpt2'")


@pytest.mark.parametrize("keep", [20, -100])
def test_truncated_safetensors(tmp_path, good_dst, keep):
    hf, cfg, params = good_dst[2:]
    src = write_hf_dir(tmp_path / "bad", hf, cfg, params)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep])
    _assert_fails(good_dst, src, r"model\.safetensors: truncated or corrupt safetensors")


def test_missing_shard(tmp_path, good_dst):
    hf, cfg, params = good_dst[2:]
    src = write_hf_dir(tmp_path / "bad", hf, cfg, params, shards=2)
    os.remove(src / "model-00002-of-00002.safetensors")
    _assert_fails(good_dst, src, r"shard model-00002-of-00002\.safetensors does not exist")


def test_bad_source_path(tmp_path, good_dst):
    (tmp_path / "x.bin").write_bytes(b"123")
    _assert_fails(good_dst, tmp_path / "x.bin", r"x\.bin: not a Hugging Face model directory or an existing \.gguf")


def test_gguf_unsupported_architecture(tmp_path, good_dst):
    hf, cfg, params = good_dst[2:]
    path = write_gguf(str(tmp_path / "m.gguf"), hf, cfg, params, arch="phi3")
    _assert_fails(good_dst, path, r"unsupported GGUF architecture 'phi3'")


def test_gguf_unsupported_quant_type(tmp_path, good_dst):
    hf, cfg, params = good_dst[2:]
    qt = gguf.GGMLQuantizationType.IQ4_NL
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = {"blk.1.ffn_up.weight": (qt, np.zeros((96, 64 // block * size), np.uint8))}
    path = write_gguf(str(tmp_path / "m.gguf"), hf, cfg, params, raw=raw)
    _assert_fails(good_dst, path, r"tensor blk\.1\.ffn_up\.weight has unsupported quantization type IQ4_NL")


def test_gguf_shape_mismatch_missing_unexpected(tmp_path, good_dst):
    hf, cfg, params = good_dst[2:]
    path = write_gguf(str(tmp_path / "m.gguf"), hf, cfg.replace(intermediate_size=64), params)
    _assert_fails(good_dst, path, r"blk\.0\.ffn_down\.weight: expected shape \(64, 64\) but got \(64, 96\)")
    path = write_gguf(str(tmp_path / "m2.gguf"), hf, cfg, params, drop="blk.1.attn_v.weight")
    _assert_fails(good_dst, path, r"missing tensor blk\.1\.attn_v\.weight")
    path = write_gguf(str(tmp_path / "m3.gguf"), hf, cfg, params, extra={"blk.0.ffn_up.bias": np.ones(96, np.float32)})
    _assert_fails(good_dst, path, r"unexpected tensor blk\.0\.ffn_up\.bias")


def test_failure_while_writing_keeps_old_dst(tmp_path, good_dst, monkeypatch):
    hf, cfg, params = good_dst[2:]
    src = write_hf_dir(tmp_path / "src2", hf, cfg, params)

    def broken_save(path, params):
        os.makedirs(path)
        raise CheckpointError("disk full")

    monkeypatch.setattr(convert, "save_params", broken_save)
    _assert_fails(good_dst, src, "disk full")


@pytest.mark.parametrize("keep", [40, 3000, -64])
def test_truncated_gguf(tmp_path, good_dst, keep):
    hf, cfg, params = good_dst[2:]
    path = write_gguf(str(tmp_path / "m.gguf"), hf, cfg, params)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:keep])
    _assert_fails(good_dst, path, r"m\.gguf: truncated")


def test_cli_exit_codes(tmp_path, good_dst, capsys):
    hf, cfg, params = good_dst[2:]
    parser = convert.convert_cli_args(argparse.ArgumentParser())
    bad = write_hf_dir(tmp_path / "bad", hf | {"model_type": "bert"}, cfg, params)
    assert convert.convert_cli_main(parser.parse_args([str(bad), str(tmp_path / "o"), "--no-progress"])) == 2
    assert "model_type='bert'" in capsys.readouterr().err
    good = write_hf_dir(tmp_path / "good2", hf, cfg, params)
    assert convert.convert_cli_main(parser.parse_args([str(good), str(tmp_path / "o"), "--no-progress"])) == 0
    assert "converted" in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "o").cfg.dtype == "bfloat16"


# --------------------------------------------------------------------------------------------
# The real stories260K model.


@pytest.mark.skipif(not os.path.isdir(STORIES), reason=f"stories260K not found at {STORIES}")
def test_stories260k(tmp_path):
    import transformers
    from ollm_jax import kv_cache

    dst = tmp_path / "stories"
    convert.convert(STORIES, dst, "float32", progress=False)
    m = checkpoint.load(dst)
    assert model.num_params(m.params) == 260_032
    ref = transformers.AutoTokenizer.from_pretrained(STORIES)
    ids = m.tokenizer("Once upon a time")["input_ids"]
    assert ids == ref("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]

    # Greedy: the README's known-good continuation starts ", there was a little girl named Lily."
    cache = kv_cache.create(m.cfg, 1, 32)
    tokens, positions = jnp.asarray([ids]), jnp.arange(len(ids))[None]
    out = []
    for _ in range(12):
        logits, cache = model.forward(m.params, m.cfg, tokens, positions, cache)
        out.append(int(jnp.argmax(logits[0, -1])))
        tokens, positions = jnp.asarray([[out[-1]]]), positions[:, -1:] + 1
    assert m.tokenizer.decode(ids + out, skip_special_tokens=True).startswith(
        "Once upon a time, there was a little girl named Lily."
    )
