#!/usr/bin/env python3
"""Does greedy prompt lookup reproduce greedy `generate()` token for token? Per dtype.

In float32 it must (the tests check it). In bfloat16 the target's verify pass over
G + 1 tokens and its one-token decode step round differently, so a near-tie can
split the two outputs. This script shows that on any device (the CPU included, so no GPU
kernel is involved): SmolLM2 on essay-quoting prompts, both dtypes.

    python3 bench/speculative_precision.py --model downloads/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --essays downloads/PaulGrahamEssays
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ollm_jax  # noqa: E402
from ollm_jax import convert  # noqa: E402
from ollm_jax.config import ModelConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="downloads/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--essays", default="downloads/PaulGrahamEssays")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--gamma", type=int, default=8)
    args = p.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.essays, "*.txt")))[: args.prompts]
    if not paths:
        raise SystemExit(f"no essays in {args.essays!r} (python checkpoints/fetch_essays.py)")
    for dtype in ("bfloat16", "float32"):
        params, hf, tokenizer = convert.load_gguf(args.model, dtype=dtype, progress=False)
        cfg = ModelConfig.from_hf(hf, dtype=dtype)
        same = 0
        for path in paths:
            with open(path) as f:
                doc = f.read()[:1500]
            messages = [{"role": "user", "content": doc + "\n\nQuote the first two sentences of the essay above exactly."}]
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
            tokens, lengths = jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32)
            kw = dict(max_new_tokens=args.new_tokens, eos_ids=(tokenizer.eos_token_id,))
            a, la = ollm_jax.generate(params, cfg, tokens, lengths, jax.random.key(0), **kw)
            b, lb, stats = ollm_jax.speculative_generate(params, cfg, tokens, lengths, jax.random.key(0),
                                                         draft="prompt_lookup", num_draft_tokens=args.gamma, **kw)
            a, b = np.asarray(a[0, : int(la[0])]), np.asarray(b[0, : int(lb[0])])
            n = min(len(a), len(b))
            diff = np.flatnonzero(a[:n] != b[:n])
            identical = len(a) == len(b) and diff.size == 0
            same += identical
            where = "identical" if identical else f"first difference at token {diff[0] if diff.size else n}"
            print(f"{dtype:9s} {os.path.basename(path):24s} {where}; accepted drafts {int(stats.accepted_tokens[0])}")
        print(f"{dtype}: {same}/{len(paths)} identical to generate()\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
