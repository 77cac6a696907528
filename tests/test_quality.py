"""The KV quality harness (`ollm_jax.eval`) on stories260K, and the notebook that uses it.

The perplexity of the chunked cache path must equal exp(mean NLL) of one plain forward
over each window; a format compared with itself has KL 0; int8 drifts a little, int4
more; the passkey path (chunked prefill into a growing cache, then the engine's decode)
gives `generate`'s tokens.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ollm_jax import convert, generate, kv_cache
from ollm_jax.config import ModelConfig
from ollm_jax.eval import passkey, quality
from ollm_jax.model import forward
from tests.conftest import REPO, STORIES260K, require

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high. Lily asked "
    "her mom for help. Her mom smiled and said they could get it together. They found a long stick "
    "and pushed the ball down. Lily was so happy. She played with the ball all day with her friend Ben."
)


@pytest.fixture(scope="module")
def stories():
    import transformers

    path = require(STORIES260K, "stories260K")
    params, hf = convert.load_hf_dir(path, dtype="float32", progress=False)
    cfg = ModelConfig.from_hf(hf, dtype="float32")
    return params, cfg, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def windows(stories):
    _, _, tok = stories
    text = " ".join(STORY.replace("Lily", name) for name in ("Lily", "Anna", "Tom", "Sue"))
    # 100 is not a multiple of the chunk (32): the last chunk of each window is padded.
    return quality.token_windows(quality.tokenize(tok, text), 100, 3)


def test_perplexity_equals_full_forward(stories, windows):
    params, cfg, _ = stories
    got = quality.evaluate(params, cfg, windows, "fp32", chunk=32)
    nll = []
    for window in windows:  # one forward over the whole window, no chunks
        cache = kv_cache.create(cfg, 1, len(window), "fp32")
        logits, _ = forward(params, cfg, jnp.asarray(window)[None], jnp.arange(len(window))[None], cache)
        logp = jax.nn.log_softmax(np.asarray(logits[0, :-1], np.float64), axis=-1)
        nll.append(-np.take_along_axis(np.asarray(logp), window[1:, None], axis=1)[:, 0])
    nll = np.concatenate(nll)
    assert got["tokens"] == windows.shape[0] * (windows.shape[1] - 1) == nll.size
    np.testing.assert_allclose(got["nll_mean"], nll.mean(), rtol=1e-6)
    np.testing.assert_allclose(got["ppl"], math.exp(nll.mean()), rtol=1e-6)
    assert got["reference"] == "fp32" and got["kl_mean"] == 0.0


def test_kl_of_a_format_against_itself_is_zero(stories, windows):
    params, cfg, _ = stories
    got = quality.evaluate_formats(params, cfg, windows, ["int8"], reference="int8", chunk=32)
    assert got["int8"]["kl_mean"] == 0.0
    assert got["int8"]["top1_agree"] == 1.0
    assert got["int8"]["ppl"] == got["reference:int8"]["ppl"]


def test_quantized_kl_small_positive_and_ordered(stories, windows):
    params, cfg, _ = stories
    # reference fp32; at head_dim 8 every int4 group is 8, so int4-g32 is int4's storage.
    got = quality.evaluate_formats(params, cfg, windows, ["int8", "int4", "int4-g32", "kivi4-g32"], chunk=32)
    assert got["int4-g32"] == dict(got["int4"], same_storage_as="int4")
    assert 0.0 < got["kivi4-g32"]["kl_mean"] < 10 and "same_storage_as" not in got["kivi4-g32"]
    assert got["int8"]["reference"] == "fp32"
    assert 0.0 < got["int8"]["kl_mean"] < 0.01, got["int8"]
    assert abs(got["int8"]["ppl"] / got["reference:fp32"]["ppl"] - 1) < 0.01, got
    assert got["int4"]["kl_mean"] > 3 * got["int8"]["kl_mean"], got


def test_storage_and_bytes_per_token(stories):
    _, cfg, _ = stories  # head_dim 8, 4 KV heads
    assert quality.storage(cfg, "int4-g32") == quality.storage(cfg, "int4-g64") == (("int4", 8), ("int4", 8))
    assert quality.storage(cfg, "kivi4-g32") != quality.storage(cfg, "kivi4-g64")  # kivi4 groups tokens
    k, d = cfg.num_kv_heads, cfg.head_dim
    keys = k * d // 2 + 2 * 2 * k * d / 32  # nibbles; fp16 scale and zero per channel per 32 tokens
    values = k * d // 2 + 2 * 2 * k  # nibbles; fp16 scale and zero per token and head (group 8)
    assert kv_cache.bytes_per_token_per_layer(cfg, "kivi4-g32") == keys + values


def test_bad_inputs_name_values(stories):
    params, cfg, _ = stories
    with pytest.raises(ValueError, match="int5"):
        quality.evaluate(params, cfg, np.ones((1, 8), np.int32), "int5")
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        quality.evaluate(params, cfg, np.ones((1, 600), np.int32), "int8")
    with pytest.raises(ValueError, match="no window"):
        quality.token_windows([1, 2, 3], 8)


def test_passkey_path_matches_generate(stories):
    params, cfg, tok = stories
    prompt = quality.tokenize(tok, STORY)[:50]
    new = 8
    # chunk 16 and a first cache of 32 slots: the cache grows 32 -> 58 (64 for kivi4's
    # whole token groups) during the prefill, copying Kivi4 keys (residual included) and
    # Int4 values.
    kv_format = "kivi4-g32"
    got = passkey.greedy(params, cfg, prompt, kv_format, max_new_tokens=new, chunk=16, min_cache=32)
    want, _ = generate(params, cfg, jnp.asarray([prompt]), jnp.asarray([len(prompt)]), jax.random.key(0),
                       max_new_tokens=new, eos_ids=(), kv_format=kv_format)
    np.testing.assert_array_equal(got, np.asarray(want[0]))


def test_passkey_prompt(stories):
    _, _, tok = stories
    haystack = passkey.Haystack(tok)
    needle = quality.tokenize(tok, " " + passkey.NEEDLE.format(key="12345"))
    for depth in (0.0, 0.5, 1.0):
        prompt = haystack.prompt(300, depth, "12345", offset=2)
        assert 300 - 30 < len(prompt) <= 300
        starts = [i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle]
        assert len(starts) == 1
        filler = len(prompt) - len(haystack.intro) - len(needle) - len(haystack.question)
        assert abs((starts[0] - len(haystack.intro)) / filler - depth) < 0.1, (depth, starts[0], len(prompt))
    assert prompt[: len(haystack.intro)] == haystack.intro and prompt[-len(haystack.question) :] == haystack.question
    assert passkey.sentences("One. Two!  Three?\nFour") == ["One.", "Two!", "Three?", "Four"]


def test_passkey_run_records_every_format(stories):
    params, cfg, tok = stories
    out = passkey.run(params, cfg, tok, ["fp32", "int8"], lengths=[256], trials=2, chunk=64)
    assert set(out["accuracy"]) == {"fp32", "int8"}
    assert len(out["trials"]) == 2 and all(set(t["correct"]) == {"fp32", "int8"} for t in out["trials"])
    json.dumps(out)  # the CLI writes it as JSON


def test_notebook_executes():
    import nbclient
    import nbformat

    require(STORIES260K, "stories260K")
    path = REPO / "notebooks" / "kv_quantization.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any failure
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "keys and values" in text


def test_json_runs_of_one_setting_merge(tmp_path):
    path = tmp_path / "q.json"
    combine = lambda old, new: {"results": {**old["results"], **new["results"]}}
    merge = lambda old, new: quality.merge_runs(old, new, combine=combine)
    first = {"window": 8, "formats": ["a"], "seconds": 1.0, "results": {"a": 1}}
    quality.update_json(path, "perplexity", first, merge=merge)
    quality.update_json(path, "other", {"x": 1})
    quality.update_json(path, "perplexity", {**first, "formats": ["b"], "seconds": 2.0, "results": {"b": 2}}, merge=merge)
    data = json.loads(path.read_text())
    assert data["other"] == {"x": 1}
    assert data["perplexity"]["results"] == {"a": 1, "b": 2}
    assert [r["formats"] for r in data["perplexity"]["runs"]] == [["a"], ["b"]]
    quality.update_json(path, "perplexity", {**first, "window": 16, "results": {"c": 3}}, merge=merge)
    assert json.loads(path.read_text())["perplexity"]["results"] == {"c": 3}  # other settings: replaced
