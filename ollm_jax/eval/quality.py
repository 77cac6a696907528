"""Perplexity and KL divergence of a KV cache format, measured through the cache path.

Teacher forcing over windows of real text, fed a chunk at a time through
`ollm_jax.model.forward` with a cache of the format under test. `forward` writes a
chunk's keys/values into the cache (quantizing them) *before* attention reads it, so
every query attends to quantized keys and values, its own included, exactly as in
decode. A reference cache (default: dense in the model's own dtype, i.e. "bf16" for a
bfloat16 checkpoint and "fp32" for a float32 one) runs in lockstep over the same chunks;
each candidate's next-token distributions are compared with the reference's there and
then, so no window's logits are ever held in full.

    python -m ollm_jax.eval.quality --model DIR --text FILE [FILE ...] \
        --kv-format bf16 int8 int4-g64 [--window 2048] [--max-windows 8] [--json OUT]

Metrics, over every predicted token (all but the first of each window):
  ppl          exp(mean negative log-likelihood of the next token)
  kl_mean      mean KL(P_reference || P_format) of the next-token distributions, nats
  top1_agree   fraction of positions whose argmax equals the reference's

Dimensions: W windows, N window length, B batch (1), C chunk, V vocab.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ollm_jax import kv_cache
from ollm_jax.config import ModelConfig
from ollm_jax.model import WEIGHT_FORMATS, Params, forward, quantize_weights

DEFAULT_WINDOW = 2048
DEFAULT_CHUNK = 128


# ------------------------------------------------------------------------------ text


def token_windows(tokens: Sequence[int], window: int, max_windows: int | None = None) -> np.ndarray:
    """Cuts a token stream into non-overlapping windows: int32 [W, window]; the tail is dropped."""
    tokens = np.asarray(tokens, np.int32)
    count = len(tokens) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"{len(tokens)} tokens make no window of {window=}")
    return tokens[: count * window].reshape(count, window)


def read_texts(paths: Sequence[str | os.PathLike]) -> str:
    """The files' text, in the order given, joined by blank lines."""
    parts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read().strip())
    return "\n\n".join(parts)


def load_model(path: str, dtype: str | None = None):
    """`checkpoint.load` for the command lines: a checkpoint without a tokenizer exits."""
    from ollm_jax import checkpoint  # orbax and transformers: only when a command runs

    model = checkpoint.load(path, dtype=dtype)
    if model.tokenizer is None:
        raise SystemExit(f"{path}: the checkpoint has no tokenizer")
    return model


def tokenize(tokenizer, text: str) -> list[int]:
    """Plain token ids of `text` (no BOS or other special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------- the steps


def _chunk_logprobs(params, cfg, tokens, positions, targets, cache):
    logits, cache = forward(params, cfg, tokens, positions, cache)  # [B, C, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, C, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, C]
    return logp, nll, cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _reference_step(params, cfg, tokens, positions, targets, cache):
    """One chunk through the reference cache: (log-probs [B, C, V], nll [B, C], cache)."""
    return _chunk_logprobs(params, cfg, tokens, positions, targets, cache)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _candidate_step(params, cfg, tokens, positions, targets, ref_logp, cache):
    """One chunk through a candidate cache, compared with the reference's log-probs.

    Returns nll [B, C], KL(ref || candidate) [B, C], top-1 agreement [B, C] and the cache.
    """
    logp, nll, cache = _chunk_logprobs(params, cfg, tokens, positions, targets, cache)
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)  # [B, C]
    agree = jnp.argmax(logp, axis=-1) == jnp.argmax(ref_logp, axis=-1)  # [B, C]
    return nll, kl, agree, cache


def _chunks(window: np.ndarray, chunk: int):
    """(tokens, positions, targets, valid) per chunk of one window [N]; padding at the end.

    targets[t] is the token after position t; the window's last position has none
    (valid False), nor has padding (position -1: neither written nor scored).
    """
    n = len(window)
    padded = -(-n // chunk) * chunk
    tokens = np.zeros(padded, np.int32)
    tokens[:n] = window
    positions = np.where(np.arange(padded) < n, np.arange(padded), -1).astype(np.int32)
    targets = np.zeros(padded, np.int32)
    targets[: n - 1] = window[1:]
    valid = np.arange(padded) < n - 1
    for start in range(0, padded, chunk):
        sl = slice(start, start + chunk)
        yield tokens[None, sl], positions[None, sl], targets[None, sl], valid[sl]


# ------------------------------------------------------------------------------ API


def storage(cfg: ModelConfig, kv_format: str) -> tuple[tuple[str, int | None], tuple[str, int | None]]:
    """What a format stores for this model, per side: (kind, group) for keys and values,
    an int4 group clamped to head_dim (a kivi4 group counts tokens: not clamped). Names
    with equal storage give equal results (int4-g128 is int4-g64 at head_dim 64), so
    each storage is run once."""
    fmt = kv_cache.parse_format(kv_format)

    def side(kind: str) -> tuple[str, int | None]:
        if kind == "int4":
            return kind, min(fmt.group, cfg.head_dim)
        return kind, fmt.group if kind == "kivi4" else None

    return side(fmt.k), side(fmt.v)


def evaluate_formats(
    params: Params,
    cfg: ModelConfig,
    token_windows: np.ndarray,
    kv_formats: Sequence[str],
    *,
    reference: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> dict[str, dict]:
    """Perplexity and KL from the reference of several KV cache formats at once.

    Args:
      params, cfg: the model.
      token_windows: int [W, N] token ids; each window is scored from an empty cache.
      kv_formats: any `kv_format` names `ollm_jax.kv_cache` accepts.
      reference: the format the distributions are compared with; None = the model's
        own dtype, dense ("bf16" for bfloat16 weights, "fp32" for float32).
      chunk: tokens per forward call (C).
      progress: print one line per window.
    Returns:
      {format: {"ppl", "nll_mean", "kl_mean", "top1_agree", "tokens", "reference"}} and
      the reference's own ppl under the key "reference:<name>". `tokens` counts the
      predictions scored: W * (N - 1). A format with the storage of an earlier one
      (`storage`) is not run again; its entry is that one's plus "same_storage_as".
    """
    reference = kv_cache.resolve_format(cfg, reference)
    for fmt in kv_formats:
        kv_cache.parse_format(fmt)  # fail before any compute on a bad name
    windows = np.asarray(token_windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"token_windows must be [W, N]; got shape {windows.shape}")
    n = windows.shape[1]
    if n < 2:
        raise ValueError(f"window length {n} leaves no token to predict")
    if n > cfg.max_position_embeddings:
        raise ValueError(f"window length {n} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    same = {}  # format -> the first format of equal storage, which is the one run
    for fmt in kv_formats:
        same[fmt] = next(f for f in kv_formats if storage(cfg, f) == storage(cfg, fmt))
    runs = list(dict.fromkeys(same.values()))
    names = [f"reference:{reference}", *runs]
    nll = {name: [] for name in names}  # device arrays [B, C] per chunk
    kl = {fmt: [] for fmt in runs}
    agree = {fmt: [] for fmt in runs}
    valid = []
    cache_len = -(-n // chunk) * chunk
    for w, window in enumerate(windows):
        t0 = time.perf_counter()
        ref_cache = kv_cache.create(cfg, 1, cache_len, reference)
        caches = {fmt: kv_cache.create(cfg, 1, cache_len, fmt) for fmt in runs}
        for tokens, positions, targets, ok in _chunks(window, chunk):
            ref_logp, ref_nll, ref_cache = _reference_step(params, cfg, tokens, positions, targets, ref_cache)
            nll[names[0]].append(ref_nll)
            for fmt in runs:
                c_nll, c_kl, c_agree, caches[fmt] = _candidate_step(
                    params, cfg, tokens, positions, targets, ref_logp, caches[fmt]
                )
                nll[fmt].append(c_nll)
                kl[fmt].append(c_kl)
                agree[fmt].append(c_agree)
            valid.append(ok)
        if progress:
            jax.block_until_ready(nll[names[-1]][-1])
            print(f"window {w + 1}/{len(windows)}: {time.perf_counter() - t0:.1f} s", flush=True)

    mask = np.concatenate(valid)  # [W * padded N]

    def mean(parts) -> float:
        values = np.concatenate([np.asarray(p, np.float64)[0] for p in jax.device_get(parts)])
        return float(values[mask].mean())

    results = {}
    for name in names:
        nll_mean = mean(nll[name])
        results[name] = {"ppl": math.exp(nll_mean), "nll_mean": nll_mean, "tokens": int(mask.sum()),
                         "reference": reference}
    for fmt in runs:
        results[fmt].update(kl_mean=mean(kl[fmt]), top1_agree=mean(agree[fmt]))
    for fmt in kv_formats:
        if same[fmt] != fmt:
            results[fmt] = dict(results[same[fmt]], same_storage_as=same[fmt])
    return {name: results[name] for name in [names[0], *kv_formats]}


def evaluate(
    params: Params,
    cfg: ModelConfig,
    token_windows: np.ndarray,
    kv_format: str,
    *,
    reference: str | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> dict:
    """Perplexity of one KV cache format and its mean KL from the reference.

    See `evaluate_formats`; returns {"ppl", "nll_mean", "kl_mean", "top1_agree",
    "tokens", "reference"} for `kv_format`.
    """
    return evaluate_formats(params, cfg, token_windows, [kv_format], reference=reference, chunk=chunk)[kv_format]


# ------------------------------------------------------------------------------ CLI


def cpu_name() -> str:
    """The host CPU's model name and core count, for results files."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def update_json(path: str | os.PathLike, section: str, value: dict, merge=None) -> None:
    """Writes `value` under key `section` of the JSON object at `path`, keeping other keys.

    With `merge(old, new) -> dict | None`, an existing section is combined with the new
    one when `merge` returns a dict (e.g. runs of the same settings adding formats).
    """
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    if merge is not None and section in data:
        value = merge(data[section], value) or value
    data[section] = value
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# What may differ between runs of one setting; "runs" lists them per run.
RUN_KEYS = ("formats", "date", "seconds", "machine", "commit", "reference_ppl")


def merge_runs(old: dict, new: dict, *, combine) -> dict | None:
    """`old` and `new` of equal settings (all keys but RUN_KEYS, "runs" and those
    `combine` fills) as one section: `combine(old, new)` gives the merged data keys,
    "runs" lists each run's RUN_KEYS and formats. None when the settings differ."""
    data = combine(old, new)
    settings = lambda d: {k: v for k, v in d.items() if k not in (*RUN_KEYS, "runs", *data)}
    if settings(old) != settings(new):
        return None
    run = lambda d: {k: d.get(k) for k in RUN_KEYS if k in d}
    return {**settings(new), **data, "runs": [*(old.get("runs") or [run(old)]), run(new)]}


def git_commit() -> str | None:
    """The source tree's git commit (with "+dirty" for local changes), if it is a checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def format_table(results: dict[str, dict], cfg: ModelConfig) -> str:
    """A markdown table: ppl, change vs reference, KL, top-1 agreement, bytes per token."""
    ref_name = next(k for k in results if k.startswith("reference:"))
    ref = results[ref_name]
    ref_bytes = kv_cache.bytes_per_token_per_layer(cfg, ref["reference"])
    lines = [
        f"reference {ref['reference']}: ppl {ref['ppl']:.4f} over {ref['tokens']} tokens",
        "",
        "| format | ppl | vs ref | mean KL | top-1 agree | bytes/token/layer | compression |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fmt, r in results.items():
        if fmt == ref_name:
            continue
        b = kv_cache.bytes_per_token_per_layer(cfg, fmt)
        lines.append(
            f"| {fmt} | {r['ppl']:.4f} | {100 * (r['ppl'] / ref['ppl'] - 1):+.3f}% | {r['kl_mean']:.5f} | "
            f"{100 * r['top1_agree']:.2f}% | {b} | {ref_bytes / b:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ollm_jax.eval.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a converted ollm-jax checkpoint directory")
    p.add_argument("--text", nargs="+", required=True, help="UTF-8 text files, concatenated in this order")
    p.add_argument("--kv-format", nargs="+", required=True, help="KV cache formats to evaluate")
    p.add_argument("--reference", default=None, help="reference format (default: the model's dtype, dense)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per window (N)")
    p.add_argument("--max-windows", type=int, default=None, help="use at most this many windows")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tokens per forward call")
    p.add_argument("--dtype", default=None, help="load weights as this dtype (default: as stored)")
    p.add_argument("--weights", default="bf16", choices=WEIGHT_FORMATS,
                   help="int8: every matrix in int8 weight-only (`model.quantize_weights`); bf16: as loaded")
    p.add_argument("--json", default=None, help="also write results under key 'perplexity' of this JSON file")
    args = p.parse_args(argv)

    model = load_model(args.model, args.dtype)
    model = model._replace(params=quantize_weights(model.params, args.weights))
    tokens = tokenize(model.tokenizer, read_texts(args.text))
    windows = token_windows(tokens, args.window, args.max_windows)
    print(f"{args.model} ({model.cfg.dtype}, {args.weights} matrices): {len(tokens)} tokens from "
          f"{len(args.text)} files; {windows.shape[0]} windows of {args.window}; chunk {args.chunk}", flush=True)
    reference = kv_cache.resolve_format(model.cfg, args.reference)
    t0 = time.perf_counter()
    # The reference runs anyway; a format equal to it is not run twice (its KL is 0).
    candidates = [fmt for fmt in args.kv_format if fmt != reference]
    results = evaluate_formats(model.params, model.cfg, windows, candidates, reference=reference,
                               chunk=args.chunk, progress=True)
    ref_row = results[f"reference:{reference}"]
    results = {name: results.get(name) or dict(ref_row, kl_mean=0.0, top1_agree=1.0)
               for name in [f"reference:{reference}", *args.kv_format]}
    seconds = time.perf_counter() - t0
    print(format_table(results, model.cfg))
    print(f"{seconds:.0f} s on {cpu_name()} ({jax.devices()[0].platform})")
    if args.json:
        ref_key = f"reference:{reference}"

        def combine(old: dict, new: dict) -> dict:
            # The first run's reference row stays (the older rows' "vs ref" is against it);
            # each run records its own reference ppl in "runs".
            old.setdefault("reference_ppl", old["results"].get(ref_key, {}).get("ppl"))
            return {"results": {**old["results"], **{k: v for k, v in new["results"].items() if k != ref_key}},
                    "bytes_per_token_per_layer": {**old["bytes_per_token_per_layer"],
                                                  **new["bytes_per_token_per_layer"]}}

        update_json(args.json, "perplexity", {
            "model": os.path.basename(os.path.normpath(args.model)),
            "dtype": model.cfg.dtype,
            "window": args.window,
            "windows": int(windows.shape[0]),
            "chunk": args.chunk,
            "reference": reference,
            "texts": [os.path.basename(t) for t in args.text],
            "formats": args.kv_format,
            "seconds": round(seconds, 1),
            "machine": cpu_name(),
            "date": time.strftime("%Y-%m-%d"),
            "commit": git_commit(),
            "reference_ppl": results[f"reference:{reference}"]["ppl"],
            "bytes_per_token_per_layer": {
                fmt: kv_cache.bytes_per_token_per_layer(model.cfg, fmt) for fmt in (reference, *args.kv_format)
            },
            "results": results,
        }, merge=lambda old, new: merge_runs(old, new, combine=combine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
