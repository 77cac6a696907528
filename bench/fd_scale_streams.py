"""Probe: does int4 decode at 128k pay for its scale and zero-point arrays beyond their bytes?

Until session 11 an Int4 K and V store each held words [B, K, S, D/4] and two small arrays
[B, K, S, N] (N group scales, N zero points): per 64-slot block a program read two 4 KiB
word tiles and four small scale tiles (256 bytes for g64, 128 for g128), six streams
where bf16 reads two. Run on that layout (`-s11-b-fd_scale_streams.log`, an H200),
aliasing each store's zero points to its scales (two scale streams; the repeat reads are
L2 hits) took the int4-g128 kernel from 58.1 to 48.3 us at batch 1 and from 419.3 to 341.4
at batch 8, 17-19% of the time for 2.9% fewer bytes (int4-g64: 7.3% and 6.5% for 5.6%).
So the stores now keep (scale, zero) pairs in one array (`kv_cache.Int4.scale_zero`): on
the same bytes int4-g64 took 41.4 and 292.3 us, g128 38.9 and 268.8 (`-s11-c-`). This
times the decode kernel (GPU time from a profiler trace, the combine apart) on the stores
as they are (two scale streams) and with V's pairs aliased to K's (one; 5.6% of the g64
bytes, 2.9% of g128).

    python3 bench/fd_scale_streams.py [--batch 1,8] [--length 131072] [--groups 64,128]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from ollm_jax import kv_cache  # noqa: E402
from pallas_kernels import flash_decode as fd  # noqa: E402


def _variants(k: kv_cache.Int4, v: kv_cache.Int4) -> dict[str, tuple[kv_cache.Int4, kv_cache.Int4]]:
    return {
        "2 scale streams (as stored)": (k, v),
        "1 (V's aliased to K's)": (k, kv_cache.Int4(v.q, k.scale_zero)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--groups", default="64,128", help="int4 channel groups")
    args = parser.parse_args()
    env = common.environment()
    common.print_environment(env)
    h, kv_heads, d = 32, 8, 128
    key = jax.random.key(0)
    for b in (int(x) for x in args.batch.split(",")):
        for group in (int(x) for x in args.groups.split(",")):
            shape = (b, args.length, kv_heads, d)
            k = fd._random_store(jax.random.fold_in(key, 1), "int4", shape, group)
            v = fd._random_store(jax.random.fold_in(key, 2), "int4", shape, group)
            q = jax.random.normal(key, (b, h, d), jnp.bfloat16)
            pos = jnp.full((b,), args.length - 1, jnp.int32)
            nbytes = sum(x.nbytes for x in jax.tree.leaves((k, v)))
            for name, (kk, vv) in _variants(k, v).items():
                fn = jax.jit(lambda q, kk, vv: fd.flash_decode(q, kk, vv, pos))
                fn(q, kk, vv).block_until_ready()
                table = common.kernel_table(common.device_kernel_events(lambda: fn(q, kk, vv), reps=10), per=10)
                main_us = sum(r["us_per"] for r in table if r["kernel"].startswith("flash_decode_k"))
                print(f"B={b} L={args.length} int4-g{group} {name:30s} kernel {main_us:7.1f} us  "
                      f"({nbytes / 1e6:.1f} MB stored, {nbytes / main_us / 1e3:.0f} GB/s of it)", flush=True)


if __name__ == "__main__":
    main()
