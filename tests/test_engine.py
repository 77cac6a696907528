"""The host-side convenience (text in, text out, streaming) and the CLI, on stories260K."""

import json
import pathlib

import pytest

from ollm_jax import checkpoint, cli, convert, engine
from tests.conftest import STORIES260K, require

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures/stories260k_greedy.json").read_text())


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory):
    src = require(STORIES260K, "stories260K")
    dst = tmp_path_factory.mktemp("ckpt") / "stories"
    convert.convert(src, dst, dtype="float32", progress=False)
    return dst


def test_complete_streams_the_greedy_continuation(stories_dir):
    model = checkpoint.load(stories_dir)
    case = FIXTURE["cases"][0]
    pieces = []
    c = engine.complete(model, case["prompt_ids"], max_new_tokens=24, on_text=pieces.append, chunk=5)
    assert c.tokens == case["output_ids"][:24]  # transformers' own greedy tokens
    assert c.finish_reason == "length" and c.prompt_tokens == len(case["prompt_ids"])
    assert "".join(pieces) == c.text == model.tokenizer.decode(case["output_ids"][:24], skip_special_tokens=True)
    assert c.decode_tokens > 0 and c.tokens_per_s > 0


def test_text_prompt_is_tokenized_like_transformers(stories_dir):
    model = checkpoint.load(stories_dir)
    case = FIXTURE["cases"][0]
    assert model.tokenizer.encode(case["prompt"]) == case["prompt_ids"]
    c = engine.complete(model, case["prompt"], max_new_tokens=10)
    assert c.tokens == case["output_ids"][:10]


def test_over_long_prompt_names_the_lengths(stories_dir):
    model = checkpoint.load(stories_dir)
    with pytest.raises(ValueError, match=r"prompt of 500 tokens \+ max_new_tokens=20 exceeds .*=512"):
        engine.complete(model, [1] * 500, max_new_tokens=20)


def test_chat_needs_a_template(stories_dir):
    model = checkpoint.load(stories_dir)  # stories260K's tokenizer has no chat template
    with pytest.raises(ValueError, match="no chat template"):
        engine.chat(model, [{"role": "user", "content": "hi"}])


def test_cli_generate_and_bad_input(stories_dir, capsys):
    assert cli.main(["generate", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Once upon a time, there was a little girl")
    assert "12 new tokens (length)" in out.err
    assert cli.main(["generate", str(stories_dir), "--prompt", "x", "--max-new-tokens", "600"]) == 2
    assert "exceeds the model's maximum length" in capsys.readouterr().err
    assert cli.main(["chat", str(stories_dir / "missing"), "--prompt", "hi"]) == 2
    capsys.readouterr()
    # int8 weight-only matrices: the same story opening (stories260K is robust to it here).
    assert cli.main(["generate", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "6",
                     "--weights", "int8"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time, there was a little")
    assert cli.main(["generate", str(stories_dir), "--prompt", "x", "--weights", "int4"]) == 2
    assert "weight_format 'int4'" in capsys.readouterr().err
