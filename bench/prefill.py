#!/usr/bin/env python3
"""Prefill attention benchmark: the block-sparse Pallas kernel under each sparsity pattern,
side by side with cuDNN and jax's Pallas reference `mha`, in the same run on the same card.

Shape (issue 4): B=1, 32 query heads, 8 KV heads, head_dim 128, T = S in {4k, 16k, 64k},
bf16, q_offset 0. Patterns:

  dense causal, sliding window 1024 and 4096, strided (ANCHORS.md: local 256 + every key
  with position mod 1024 < 128), BigBird (window 384, 128 global, 3 random blocks of 128),
  multi-scale (window 1024, pools 4 and 16, level-1 span 4096).

Implementations per pattern:
  ours     `ollm_jax.router.attention(impl="pallas")` (tables built on the host once,
           before timing; multi-scale includes its XLA K/V pooling)
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True,
           local_window_size=(w - 1, 0))`: dense causal and windows only
  jax-mha  `jax.experimental.pallas.ops.gpu.attention.mha(causal=True)` with K/V repeated
           to 32 heads (it has no GQA): dense causal only

Timing: after a compile call, `--calls` calls are dispatched back to back and blocked on
once; time = elapsed / calls, median of `--reps` such runs (launch overhead amortised,
as a prefill inside a model's jit sees it). FLOPs count only the blocks our kernel keeps
(4 * block_q * block_k * D per kept block and head), the same count for every
implementation of a pattern, so TFLOP/s ratios are time ratios. "% peak" is against a bf16
8192^3 matmul measured in the same run. "launch" is our kernel on a single 128 x 128
block with the same heads: the fixed cost in the block-sparse budget.

Acceptance (issue 4), printed at the end:
  dense causal 16k: ours >= 85% of cuDNN's TFLOP/s
  windows 1024 / 4096 at 16k: ours <= 1.15 x cuDNN's time, and under FlexAttention's
    1.05 / 2.56 ms (ANCHORS.md, H200)
  block-sparse patterns: time <= 1.3 * (d / d_causal) * t_causal + launch, where d / d_causal
    is the pattern's kept blocks over dense causal's on the same block grid
  strided at 16k: < 1.19 ms (FlexAttention, ANCHORS.md)

Writes <out>/<date>-<card>-prefill[-4k-16k].json and .md (rewritten after each length).
`--rebuild-router-table` (no GPU) turns every recorded bench/results/*prefill*.json into
bench/results/router_table.json, the measured table `impl="auto"` reads.

Usage (repo root; the package need not be installed):
  python3 bench/prefill.py --seq 4096 16384 --out bench/results/
  python3 bench/prefill.py --seq 65536 --out bench/results/
  python3 bench/prefill.py --block-q 128 --block-k 128 --num-warps 8 --num-stages 3 --seq 16384
  python3 bench/prefill.py --rebuild-router-table                     # after copying results in
  python3 bench/prefill.py --smoke                                    # CPU, seconds
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ollm_jax_bench_jit_cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from ollm_jax import patterns as P  # noqa: E402
from ollm_jax import router  # noqa: E402
from pallas_kernels import flash_prefill as fp  # noqa: E402

PATTERNS: dict[str, P.Pattern] = {
    "dense causal": P.DenseCausal(),
    "window 1024": P.SlidingWindow(1024),
    "window 4096": P.SlidingWindow(4096),
    "strided": P.anchors_strided(),
    "bigbird": P.BigBird(window=384, num_global=128, num_random=3, block=128, seed=0),
    "multiscale": P.MultiScale(window=1024, pools=(4, 16)),
}
ROUTER_IMPLS = ("pallas", "cudnn", "xla")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", nargs="+", type=int, default=[4096, 16384, 65536])
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--num-stages", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=None, help="calls per timed run (default: ~100 ms of work)")
    p.add_argument("--no-peers", action="store_true", help="ours only")
    p.add_argument("--router-table", default=None, metavar="PATH",
                   help="also write a router table (the repo's entries plus this run's) to PATH")
    p.add_argument("--rebuild-router-table", action="store_true",
                   help="no timing: rebuild bench/results/router_table.json from bench/results/*prefill*.json")
    p.add_argument("--out", default=None, help="DIR/ (dated file names) or FILE.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CPU: interpret + xla)")
    p.add_argument("--recheck", metavar="JSON", default=None,
                   help="no timing: recompute a saved run's acceptance and rewrite its .json and .md")
    return p.parse_args(argv)


def time_calls(fn, *args, reps: int, calls: int | None) -> float:
    """Seconds per call: `calls` async dispatches then one block, median over `reps`
    (about 0.1 s of work per run when calls is None)."""
    return fp.time_fn(fn, *args, reps=reps, calls=calls, work_s=0.1)


def make_impls(pattern: P.Pattern, knobs: dict[str, Any], on_gpu: bool, peers: bool) -> dict[str, Any]:
    """name -> jitted fn(q, k, v)."""
    impls = {"ours": jax.jit(functools.partial(router.attention, pattern=pattern, impl="pallas", **knobs))}
    if not on_gpu:
        impls["xla"] = jax.jit(functools.partial(router.attention, pattern=pattern, impl="xla"))
    if on_gpu and peers and pattern.contiguous:
        w = pattern.contiguous_window
        impls["cudnn"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn", local_window_size=None if w is None else (w - 1, 0)))
        if w is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from jax.experimental.pallas.ops.gpu import attention as jax_attention

            def mha(q, k, v):
                g = q.shape[2] // k.shape[2]
                k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
                return jax_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)

            impls["jax-mha"] = jax.jit(mha)
    return impls


def bench_seq(args, seq: int, key, peak: float | None, on_gpu: bool) -> list[dict[str, Any]]:
    h, kh, d = args.heads, args.kv_heads, args.head_dim
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, seq), 3)
    q = jax.random.normal(kq, (1, seq, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (1, seq, kh, d), jnp.bfloat16)
    v = jax.random.normal(kv, (1, seq, kh, d), jnp.bfloat16)
    # Tables (and the FLOP count of every pattern, so ratios to dense causal are block
    # ratios) use the table variant's tiles; the contiguous patterns run their own variant's
    # defaults (`fp.DEFAULT_CONFIG`) unless --block-q/--block-k/... are given.
    dq, dk, _, _ = fp.default_config(d, "table")
    bq, bk = args.block_q or dq, args.block_k or dk
    knobs = dict(block_q=args.block_q, block_k=args.block_k, num_warps=args.num_warps, num_stages=args.num_stages)
    launch = None
    try:  # fixed cost: one 128 x 128 block per head
        small = [x[:, :128] for x in (q, k, v)]
        fn = jax.jit(functools.partial(router.attention, pattern=P.DenseCausal(), impl="pallas", **knobs))
        launch = time_calls(fn, *small, reps=args.reps, calls=args.calls)
    except Exception as e:
        print(f"  launch timing failed: {type(e).__name__}: {e}")
    rows = []
    for name in args.patterns:
        pattern = PATTERNS[name]
        t0 = time.perf_counter()
        tables = pattern.block_tables(seq, seq, bq, bk)  # host, once (cached)
        build = time.perf_counter() - t0
        flops = fp.kept_flops(tables, 1, h, d)
        row = {"pattern": name, "pattern_repr": P.describe(pattern), "pattern_kind": pattern.name, "seq_len": seq,
               "window": getattr(pattern, "window", None), "block_density": tables.density,
               "partial_fraction": tables.partial_fraction,
               "kept_blocks_per_head": tables.kept_blocks / tables.num_heads,
               "block_q": bq, "block_k": bk, "kept_flops": flops, "table_build_s": build, "launch_s": launch,
               "impls": {}}
        for impl, fn in make_impls(pattern, knobs, on_gpu, not args.no_peers).items():
            try:
                sec = time_calls(fn, q, k, v, reps=args.reps, calls=args.calls)
                tf = flops / sec / 1e12
                row["impls"][impl] = {"ms": sec * 1e3, "tflops": tf, "pct_peak": 100 * tf / peak if peak else None}
            except Exception as e:
                row["impls"][impl] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                traceback.print_exc(limit=2)
            r = row["impls"][impl]
            print(f"  S={seq:6d} {name:13s} {impl:8s} " + (
                f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s" + (f" ({r['pct_peak']:.0f}% peak)" if peak else "")
                if "ms" in r else r["error"]) + f"  [density {tables.density:.4f}]", flush=True)
        rows.append(row)
    del q, k, v
    return rows


def acceptance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {(r["pattern"], r["seq_len"]): r for r in rows}

    def ms(p, s, impl):
        r = by.get((p, s))
        return None if r is None else r["impls"].get(impl, {}).get("ms")

    for s in sorted({r["seq_len"] for r in rows}):
        ours, cudnn = ms("dense causal", s, "ours"), ms("dense causal", s, "cudnn")
        if ours and cudnn:
            out.append({"check": f"dense causal S={s}: ours TFLOP/s / cuDNN >= 0.85", "value": cudnn / ours,
                        "pass": cudnn / ours >= 0.85 if s == 16384 else None})
        for w, flex in (("window 1024", 1.05), ("window 4096", 2.56)):
            o, c = ms(w, s, "ours"), ms(w, s, "cudnn")
            if o and c:
                out.append({"check": f"{w} S={s}: ours / cuDNN time <= 1.15", "value": o / c,
                            "pass": o / c <= 1.15 if s == 16384 else None})
            if o and s == 16384:  # ANCHORS.md, H200
                out.append({"check": f"{w} S={s}: ours < FlexAttention's {flex} ms (H200 anchor)", "value": o,
                            "pass": o < flex})
        causal = by.get(("dense causal", s))
        for p in ("strided", "bigbird", "multiscale"):
            r = by.get((p, s))
            o = ms(p, s, "ours")
            if causal and r and o and ours:
                # d / d_causal as a ratio of kept blocks on the same block grid: the work kept.
                # (Densities divide by each pattern's own key axis, which for multi-scale is
                # S + its summaries, so their ratio would understate its work by S / S'.)
                kept = r["kept_blocks_per_head"] / causal["kept_blocks_per_head"]
                budget = 1.3 * kept * ours + 1e3 * (causal["launch_s"] or 0)
                out.append({"check": f"{p} S={s}: time <= 1.3 * (kept blocks / causal's = {kept:.4f}) * t_causal "
                                     f"+ launch ({budget:.3f} ms)", "value": o / budget, "pass": o <= budget})
        o = ms("strided", s, "ours")
        if o and s == 16384:
            out.append({"check": "strided S=16384: < 1.19 ms (FlexAttention)", "value": o, "pass": o < 1.19})
    return out


def markdown(env, peak, rows, checks, args) -> str:
    peak_note = f"bf16 matmul peak measured in this run: {peak:.0f} TFLOP/s." if peak else ""
    lines = [f"# Prefill attention, {env['jax_device_kind']} ({common.card_slug(env)}), {env['date_utc'][:10]}", "",
             f"B=1, {args.heads} query heads, {args.kv_heads} KV heads, head_dim {args.head_dim}, bf16, T = S. "
             + peak_note, f"Command: `{env['command']}`; jax {env['jax']}; git {env['git']}.", "",
             "TFLOP/s count only the blocks our kernel keeps (same FLOPs for every implementation of a pattern).", ""]
    impls = sorted({i for r in rows for i in r["impls"]}, key=["ours", "cudnn", "jax-mha", "xla"].index)
    headers = ["S", "pattern", "density"] + [f"{i} ms" for i in impls] + [f"{i} TFLOP/s" for i in impls]
    table = []
    for r in rows:
        cells = [r["seq_len"], r["pattern"], f"{r['block_density']:.4f}"]
        cells += [f"{r['impls'][i]['ms']:.3f}" if "ms" in r["impls"].get(i, {}) else "-" for i in impls]
        cells += [f"{r['impls'][i]['tflops']:.0f}" if "ms" in r["impls"].get(i, {}) else "-" for i in impls]
        table.append(cells)
    lines += [common.format_table(headers, table), "",
              "Density is the fraction of a pattern's own [T, key axis] grid kept; multi-scale's key axis is "
              "S plus its pooled summaries, so the block-sparse budgets below compare kept blocks (the work) "
              "with dense causal's on the same block grid.", "", "## Acceptance", ""]
    lines += [f"- {c['check']}: {c['value']:.3f} -> {'PASS' if c['pass'] else 'info' if c['pass'] is None else 'FAIL'}"
              for c in checks]
    return "\n".join(lines) + "\n"


def router_entries(entries: list[dict[str, Any]], env, rows, head_dim) -> list[dict[str, Any]]:
    """`entries` with this run's measurements merged in (same card/pattern/window/D/S replaced)."""
    card = common.card_slug(env)
    for r in rows:
        times = {("pallas" if i == "ours" else i): v["ms"] for i, v in r["impls"].items()
                 if "ms" in v and (i == "ours" or i in ROUTER_IMPLS)}
        if not times:
            continue
        entry = {"card": card, "pattern": r["pattern_kind"], "window": r["window"], "head_dim": head_dim,
                 "seq_len": r["seq_len"], "times_ms": times, "best": min(times, key=times.get),
                 "date": env["date_utc"][:10], "source": "bench/prefill.py"}
        entries = [e for e in entries if not all(e.get(x) == entry[x] for x in ("card", "pattern", "window",
                                                                                  "head_dim", "seq_len"))]
        entries.append(entry)
    return entries


def write_router_table(path: str, entries: list[dict[str, Any]]) -> None:
    table = {"comment": "Measured by bench/prefill.py (rebuild: python3 bench/prefill.py --rebuild-router-table); "
                        "read by ollm_jax.router for impl='auto'. times_ms per router impl; best = fastest.",
             "entries": sorted(entries, key=lambda e: (e["card"], e["pattern"], e.get("window") or 0,
                                                       e["head_dim"], e["seq_len"]))}
    common.save_json(path, table)
    print(f"router table: {path} ({len(entries)} entries)")


def rebuild_router_table() -> int:
    import glob

    entries: list[dict[str, Any]] = []
    paths = sorted(glob.glob(os.path.join(REPO, "bench", "results", "*prefill*.json")))
    for path in paths:  # dated names: later runs replace earlier ones
        with open(path) as f:
            run = json.load(f)
        entries = router_entries(entries, run["environment"], run["rows"], run["args"]["head_dim"])
    write_router_table(router.ROUTER_TABLE, entries)
    print(f"from {len(paths)} result file(s)")
    return 0


def recheck(path: str) -> int:
    """Recomputes a saved run's acceptance (no timing) and rewrites its .json and .md."""
    with open(path) as f:
        saved = json.load(f)
    args = argparse.Namespace(**saved["args"])
    saved["acceptance"] = acceptance(saved["rows"])
    command = "python3 bench/prefill.py --recheck " + path
    saved["rechecked"] = [e for e in saved.get("rechecked", []) if e["command"] != command] + [
        {"date": datetime.date.today().isoformat(), "command": command}]
    common.save_json(path, saved)
    md = markdown(saved["environment"], saved["matmul_peak_tflops"], saved["rows"], saved["acceptance"], args)
    with open(path[: -len(".json")] + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rebuild_router_table:
        return rebuild_router_table()
    if args.recheck:
        return recheck(args.recheck)
    on_gpu = jax.default_backend() == "gpu"
    if args.smoke:
        args.seq, args.heads, args.kv_heads, args.head_dim = [256], 4, 1, 64
        args.reps, args.calls = 1, 1
        args.block_q, args.block_k = args.block_q or 64, args.block_k or 32
        PATTERNS["multiscale"] = P.MultiScale(window=64, pools=(4, 16))
        for name in ("window 1024", "window 4096"):
            PATTERNS[name] = P.SlidingWindow(int(name.split()[1]) // 16)
        PATTERNS["strided"], PATTERNS["bigbird"] = P.Strided(32, 128, 16), P.BigBird(48, 16, 2, 64)
    elif not on_gpu:
        raise SystemExit("the benchmark needs a GPU; use --smoke on the CPU")
    env = common.environment()
    common.print_environment(env)
    peak = fp.matmul_peak_tflops() if on_gpu else None
    if peak:
        print(f"bf16 matmul peak (8192^3, this run): {peak:.0f} TFLOP/s")
    key = jax.random.key(0)
    rows: list[dict[str, Any]] = []
    path = None
    if args.out:
        date = datetime.date.today().isoformat()
        seqs = "" if args.seq == [4096, 16384, 65536] else "-" + "-".join(f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in args.seq)
        path = (args.out if args.out.endswith(".json")
                else os.path.join(args.out, f"{date}-{common.card_slug(env)}-prefill{seqs}.json"))
    for seq in args.seq:
        rows += bench_seq(args, seq, key, peak, on_gpu)
        checks = acceptance(rows)
        if path:  # rewritten after each length: a run cut by a time limit keeps what it finished
            common.save_json(path, {"environment": env, "args": vars(args), "matmul_peak_tflops": peak,
                                    "rows": rows, "acceptance": checks})
    md = markdown(env, peak, rows, checks, args)
    print("\n" + md)
    if path:
        with open(path[: -len(".json")] + ".md", "w") as f:
            f.write(md)
        print(f"wrote {path} and .md")
    if args.router_table:
        entries = router.load_table(router.ROUTER_TABLE).get("entries", [])
        write_router_table(args.router_table, router_entries(list(entries), env, rows, args.head_dim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
