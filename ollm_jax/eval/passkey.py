"""Passkey retrieval through a KV cache format.

A random number (5 digits by default) is hidden at a random depth in filler text and
asked for at the end (Mohtashami & Jaggi, 2023):

    There is an important info hidden inside a lot of irrelevant text. ...
    The grass is green. The sky is blue. ... The pass key is 48213. Remember it.
    48213 is the pass key. ... The grass is green. ...
    What is the pass key? The pass key is

The model greedy-decodes a few tokens; a trial succeeds when the number appears in
them. Every format sees the same prompts (paired trials), so its accuracy can be set
against the dense reference's length by length.

The prompt is prefilled a chunk at a time into a cache that grows through power-of-two
sizes (attention reads every slot of the cache, so a cache sized to the prompt's end
from the start would cost about twice the causal work), then decoded by the engine's own
`ollm_jax.generation.decode` loop. For short prompts the tokens equal
`ollm_jax.generate`'s (tests/test_quality.py checks); at 8k tokens on a CPU a one-shot
prefill would materialise [K, G, T, S] scores of gigabytes per layer.

    python -m ollm_jax.eval.passkey --model DIR --kv-format bf16 int8 int4-g64 \
        [--lengths 1024 2048 4096 8192] [--trials 5] [--haystack FILE ...] [--json OUT]

Dimensions: B batch (1), T prompt tokens, C chunk, S cache slots, V vocab.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from ollm_jax import generation, kv_cache
from ollm_jax.config import ModelConfig
from ollm_jax.eval import quality
from ollm_jax.model import Params, forward
from ollm_jax.sampling import SamplingParams

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
CLASSIC_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 12  # a space and one token per digit, with room to spare


# ---------------------------------------------------------------------------- prompts


def sentences(text: str) -> list[str]:
    """Text split into sentences (on ., ! or ? followed by white space), white space collapsed."""
    text = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


class Haystack:
    """Filler sentences, each tokenized once (with a leading space), cycled to any length."""

    def __init__(self, tokenizer, filler: Sequence[str] = CLASSIC_FILLER):
        self.tokenizer = tokenizer
        self.units = [quality.tokenize(tokenizer, " " + s) for s in filler]
        self.intro = quality.tokenize(tokenizer, INTRO)
        self.question = quality.tokenize(tokenizer, " " + QUESTION)

    def prompt(self, length: int, depth: float, key: str, *, offset: int = 0) -> list[int]:
        """Token ids of at most `length` tokens: intro, filler with the needle at `depth`
        (0 = first, 1 = last of the filler), question. Filler starts at unit `offset`."""
        needle = quality.tokenize(self.tokenizer, " " + NEEDLE.format(key=key))
        budget = length - len(self.intro) - len(needle) - len(self.question)
        filler: list[list[int]] = []
        used, i = 0, offset
        while used + len(self.units[i % len(self.units)]) <= budget:
            filler.append(self.units[i % len(self.units)])
            used += len(filler[-1])
            i += 1
        if not filler:
            raise ValueError(f"{length=} leaves no room for filler")
        at = round(depth * len(filler))
        pieces = [self.intro, *filler[:at], needle, *filler[at:], self.question]
        return [t for piece in pieces for t in piece]


# ---------------------------------------------------------------------- cache-path run


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _prefill_step(params, cfg, tokens, positions, last_index, cache):
    """One prompt chunk into the cache; logits [B, V] of the chunk's row `last_index`."""
    logits, cache = forward(params, cfg, tokens, positions, cache, logits_index=last_index)  # [B, 1, V]
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "kv_format"))
def _grow(cache: kv_cache.KVCache, cfg: ModelConfig, max_len: int, kv_format: str) -> kv_cache.KVCache:
    """The cache copied into one of `max_len` slots: each store leaf keeps its prefix along
    the one axis that grew (its slots or slot groups: axis 1 of a dense store, 2 of a
    head-major quantized one); leaves of unchanged shape (kivi4's residual and flush mark)
    are kept whole."""
    bigger = kv_cache.create(cfg, cache.batch, max_len, kv_format)

    def copy(new, old):
        if new.shape == old.shape:
            return old
        [axis] = [i for i, (a, b) in enumerate(zip(new.shape, old.shape)) if a != b]
        return lax.dynamic_update_slice_in_dim(new, old, 0, axis)

    layers = jax.tree.map(copy, bigger.layers, cache.layers)
    return kv_cache.KVCache(layers=layers, lengths=cache.lengths)


def _cache_sizes(total: int, min_size: int) -> list[int]:
    """Powers of two from `min_size` below `total`, then `total`."""
    sizes, s = [], min_size
    while s < total:
        sizes.append(s)
        s *= 2
    return [*sizes, total]


def greedy(
    params: Params,
    cfg: ModelConfig,
    prompt: Sequence[int],
    kv_format: str,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_len: int | None = None,
    chunk: int = quality.DEFAULT_CHUNK,
    min_cache: int = 1024,
) -> np.ndarray:
    """Greedy continuation of one prompt through a cache of `kv_format`.

    Args:
      prompt: token ids (T of them).
      max_len: the final cache size, at least T + max_new_tokens (default exactly that);
        a fixed value (e.g. the length bucket) keeps compilations few.
      chunk: prompt tokens per forward call; min_cache: the first cache size.
    Returns:
      int32 [max_new_tokens] new tokens (no early stop at EOS).
    """
    t = len(prompt)
    max_len = max_len or t + max_new_tokens
    if t + max_new_tokens > max_len:
        raise ValueError(f"prompt {t} + {max_new_tokens=} exceeds {max_len=}")
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"{max_len=} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    sizes = _cache_sizes(max_len, min(min_cache, max_len))
    padded = -(-t // chunk) * chunk
    tokens = np.zeros(padded, np.int32)
    tokens[:t] = prompt
    positions = np.where(np.arange(padded) < t, np.arange(padded), -1).astype(np.int32)
    cache = kv_cache.create(cfg, 1, sizes[0], kv_format)
    for start in range(0, padded, chunk):
        need = min(start + chunk, t)
        if cache.max_len < need:
            cache = _grow(cache, cfg, next(s for s in sizes if s >= need), kv_format)
        last = np.array([[min(t - 1 - start, chunk - 1)]], np.int32)
        logits, cache = _prefill_step(
            params, cfg, tokens[None, start : start + chunk], positions[None, start : start + chunk], last, cache
        )
    if cache.max_len < max_len:
        cache = _grow(cache, cfg, max_len, kv_format)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    state = generation.DecodeState(
        tokens=jnp.zeros((1, max_new_tokens), jnp.int32).at[:, 0].set(first),
        num_tokens=jnp.ones((1,), jnp.int32),
        done=jnp.zeros((1,), bool),
        step=jnp.array(1, jnp.int32),
        prompt_lengths=jnp.array([t], jnp.int32),
        cache=cache,
        key=jax.random.key(0),
    )
    state = generation.decode(params, cfg, state, max_new_tokens, sampling=SamplingParams(), eos_ids=())
    return np.asarray(state.tokens[0])


def run(
    params: Params,
    cfg: ModelConfig,
    tokenizer,
    kv_formats: Sequence[str],
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    trials: int = 5,
    digits: int = 5,
    seed: int = 0,
    filler: Sequence[str] = CLASSIC_FILLER,
    chunk: int = quality.DEFAULT_CHUNK,
    progress: bool = False,
) -> dict:
    """Passkey accuracy of each format at each total length (prompt + new tokens).

    Trial i at length L has its key, depth and filler offset drawn from
    `seed`, L and i, so every format answers the same prompts.
    Returns:
      {"accuracy": {format: {L: fraction}}, "trials": [{"length", "depth", "key",
      "prompt_tokens", "answers": {format: text}, "correct": {format: bool}}, ...],
      "same_storage": {format: the format whose run it shares}}
    """
    # Names of equal storage (int4-g128 is int4-g64 at head_dim 64) run once.
    same = {f: next(g for g in kv_formats if quality.storage(cfg, g) == quality.storage(cfg, f)) for f in kv_formats}
    haystack = Haystack(tokenizer, filler)
    correct = {fmt: {int(n): 0 for n in lengths} for fmt in kv_formats}
    records = []
    for length in lengths:
        for i in range(trials):
            rng = np.random.default_rng([seed, length, i])
            key = str(rng.integers(10 ** (digits - 1), 10**digits))
            depth = float(rng.uniform(0.0, 1.0))
            offset = int(rng.integers(len(haystack.units)))
            prompt = haystack.prompt(length - MAX_NEW_TOKENS, depth, key, offset=offset)
            record = {"length": length, "depth": round(depth, 3), "key": key, "prompt_tokens": len(prompt),
                      "answers": {}, "correct": {}}
            for fmt in kv_formats:
                t0 = time.perf_counter()
                if same[fmt] != fmt:
                    text = record["answers"][same[fmt]]
                else:
                    out = greedy(params, cfg, prompt, fmt, max_len=length, chunk=chunk)
                    text = tokenizer.decode(out.tolist(), skip_special_tokens=True)
                ok = key in text
                correct[fmt][length] += ok
                record["answers"][fmt] = text
                record["correct"][fmt] = bool(ok)
                if progress:
                    print(f"L={length} trial {i} depth {depth:.2f} key {key} {fmt}: {text!r} "
                          f"{'ok' if ok else 'MISS'} ({time.perf_counter() - t0:.1f} s)", flush=True)
            records.append(record)
    accuracy = {fmt: {n: c / trials for n, c in per.items()} for fmt, per in correct.items()}
    return {"accuracy": accuracy, "trials": records, "same_storage": {f: g for f, g in same.items() if f != g}}


def _combine(old: dict, new: dict) -> dict:
    """Results of two runs over the same prompts (same seed, lengths, trials) as one."""
    key = lambda t: (t["length"], t["key"], t["depth"])
    trials = {key(t): t for t in old["trials"]}
    if set(trials) != {key(t) for t in new["trials"]}:
        return {"trials": new["trials"]}  # other prompts: merge_runs sees the settings differ
    for t in new["trials"]:
        merged = trials[key(t)]
        merged["answers"] = {**merged["answers"], **t["answers"]}
        merged["correct"] = {**merged["correct"], **t["correct"]}
    return {"accuracy": {**old["accuracy"], **new["accuracy"]}, "trials": list(trials.values()),
            "same_storage": {**old.get("same_storage", {}), **new.get("same_storage", {})}}


def format_table(accuracy: dict[str, dict[int, float]]) -> str:
    lengths = list(next(iter(accuracy.values())))
    lines = ["| format | " + " | ".join(f"{n}" for n in lengths) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    for fmt, per in accuracy.items():
        lines.append(f"| {fmt} | " + " | ".join(f"{100 * per[n]:.0f}%" for n in lengths) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ollm_jax.eval.passkey", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a converted ollm-jax checkpoint directory")
    p.add_argument("--kv-format", nargs="+", required=True, help="KV cache formats to evaluate")
    p.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS),
                   help="total lengths (prompt + new tokens)")
    p.add_argument("--trials", type=int, default=5, help="trials per length")
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", nargs="*", default=None,
                   help="text files whose sentences are the filler (default: the grass-is-green lines)")
    p.add_argument("--chunk", type=int, default=quality.DEFAULT_CHUNK)
    p.add_argument("--dtype", default=None, help="load weights as this dtype (default: as stored)")
    p.add_argument("--json", default=None, help="also write results under key 'passkey' of this JSON file")
    args = p.parse_args(argv)

    model = quality.load_model(args.model, args.dtype)
    filler = sentences(quality.read_texts(args.haystack)) if args.haystack else CLASSIC_FILLER
    print(f"{args.model} ({model.cfg.dtype}), max_position_embeddings={model.cfg.max_position_embeddings}; "
          f"lengths {args.lengths}, {args.trials} trials each", flush=True)
    t0 = time.perf_counter()
    out = run(model.params, model.cfg, model.tokenizer, args.kv_format, lengths=args.lengths, trials=args.trials,
              digits=args.digits, seed=args.seed, filler=filler, chunk=args.chunk, progress=True)
    seconds = time.perf_counter() - t0
    print(format_table(out["accuracy"]))
    print(f"{seconds:.0f} s on {quality.cpu_name()} ({jax.devices()[0].platform})")
    if args.json:
        quality.update_json(args.json, "passkey", {
            "model": os.path.basename(os.path.normpath(args.model)),
            "dtype": model.cfg.dtype,
            "max_position_embeddings": model.cfg.max_position_embeddings,
            "filler": "haystack: " + ", ".join(os.path.basename(h) for h in args.haystack) if args.haystack
            else "classic",
            "trials_per_length": args.trials,
            "digits": args.digits,
            "seed": args.seed,
            "formats": args.kv_format,
            "seconds": round(seconds, 1),
            "machine": quality.cpu_name(),
            "date": time.strftime("%Y-%m-%d"),
            "commit": quality.git_commit(),
            **out,
        }, merge=lambda old, new: quality.merge_runs(old, new, combine=_combine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
