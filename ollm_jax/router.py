"""The attention router: one call for prefill attention under any sparsity pattern.

  attention(q, k, v, *, pattern, impl="auto", q_offset=0, lengths=None) -> o

impl:
  "pallas"  the block-sparse flash kernel (`pallas_kernels.flash_prefill`); interpret
            mode off the GPU (slow; that is how CI tests it).
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`: dense causal and
            sliding-window patterns only, query offset 0, GPU only.
  "xla"     plain JAX: a dense masked softmax over the pattern's mask (the reference).
  "auto"    decided here, once per traced shape, in `choose`: on the CPU "xla"; on a GPU
            the fastest measured implementation for (card, pattern kind, head_dim,
            sequence length) in the router table (bench/results/router_table.json,
            written by bench/prefill.py; env OLLM_ROUTER_TABLE overrides the path), or
            without a table entry: cuDNN for dense causal / sliding window, the Pallas
            kernel for every other pattern.

An implementation that cannot run here (wrong pattern or dtype, no GPU, a Triton or cuDNN
failure on this card) falls back to "xla" with a warning; it never raises. On a GPU the
kernel is compiled once per configuration before it is used (so a compile failure is seen
here, not inside the caller's jit). `logging.getLogger("ollm_jax.router")` at DEBUG says
what was chosen and why.

Dimensions: B batch, T queries, S keys, H query heads, K KV heads, D head_dim.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from ollm_jax import patterns as patterns_lib
from pallas_kernels import on_gpu

log = logging.getLogger("ollm_jax.router")

IMPLS = ("auto", "pallas", "cudnn", "xla")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTER_TABLE = os.path.join(_REPO, "bench", "results", "router_table.json")
_CARDS = ("h200", "h100", "a100", "l40s", "l4", "a10g", "t4")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    pattern: patterns_lib.Pattern | None = None,
    impl: str = "auto",
    q_offset: int | jax.Array = 0,
    lengths: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Attention of new queries over keys under a sparsity pattern.

    Args:
      q: [B, T, H, D] queries (RoPE applied); query i is at position q_offset + i.
      k, v: [B, S, K, D]; key s is at position s.
      pattern: a `ollm_jax.patterns` pattern; None = dense causal.
      impl: "auto", "pallas", "cudnn" or "xla" (see the module docstring).
      q_offset: absolute position of query 0: a Python int, a traced scalar, or [B]
        per-sequence offsets (decode). Table-driven patterns need a Python int for
        "pallas" (else they run on "xla"); cuDNN needs a static 0; [B] offsets run on
        the contiguous kernel or "xla".
      lengths: [B] int32 valid keys per sequence (keys >= lengths[b] are padding); None = S.
      sm_scale: softmax scale; None = D ** -0.5.
      block_q, block_k, num_warps, num_stages: Pallas tuning knobs (None = defaults).
    Returns:
      [B, T, H, D] in q's dtype. Rows with no visible key are unspecified (finite).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention {impl=}; choose from {IMPLS}")
    pattern = patterns_lib.DenseCausal() if pattern is None else pattern
    if isinstance(pattern, patterns_lib.PerHead) and pattern.num_heads != q.shape[2]:
        raise ValueError(f"PerHead pattern has {pattern.num_heads} heads; q has {q.shape[2]}")
    knobs = dict(block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
    chosen, why = choose(pattern, q, k, impl=impl, q_offset=q_offset)
    if impl not in ("auto", chosen):
        warnings.warn(f"attention impl {impl!r} for {patterns_lib.describe(pattern)}: {why}; using {chosen!r}",
                      stacklevel=2)
    log.debug("attention %s T=%d S=%d H=%d K=%d D=%d %s: %s (%s)", patterns_lib.describe(pattern), q.shape[1],
              k.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, chosen, why)
    if chosen != "xla":
        run = functools.partial(_run, chosen, pattern=pattern, q_offset=q_offset, sm_scale=sm_scale, knobs=knobs)
        problem = _probe(run, q, k, v, lengths, chosen, pattern, q_offset, knobs)
        if problem is None:
            try:
                return run(q, k, v, lengths)
            except Exception as e:  # a configuration the kernel rejects at trace time
                problem = f"{type(e).__name__}: {e}"
        warnings.warn(f"attention impl {chosen!r} cannot run {patterns_lib.describe(pattern)} "
                      f"(q {q.shape} {q.dtype}, k {k.shape}): {problem}; using the XLA reference", stacklevel=2)
    return _run("xla", q, k, v, lengths, pattern=pattern, q_offset=q_offset, sm_scale=sm_scale, knobs=knobs)


# ----------------------------------------------------------------------------- choice


def _static_int(x) -> int | None:
    """x as a Python int if it is concrete, else None."""
    try:
        return int(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def _pallas_problem(pattern, q, k, q_offset) -> str | None:
    d = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype} (kernel takes bf16 or fp16)"
    if d < 16 or d > 256 or d & (d - 1):
        return f"head_dim {d} (kernel takes a power of two in 16..256)"
    if not pattern.contiguous and _static_int(q_offset) is None:
        return "a traced q_offset (block tables are built on the host for a static offset)"
    return None


def _cudnn_problem(pattern, q, k, q_offset) -> str | None:
    if not on_gpu():
        return "no GPU"
    if not pattern.contiguous:
        return f"{pattern.name} is not dense causal or a sliding window"
    if _static_int(q_offset) != 0:
        return "q_offset != 0 (cuDNN's causal mask is top-left aligned)"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype}"
    return None


def card() -> str:
    """A short name of the default device ('h200', 'h100', ..., or 'cpu')."""
    kind = jax.devices()[0].device_kind.lower()
    if jax.default_backend() != "gpu":
        return "cpu"
    return next((c for c in _CARDS if c in kind), "".join(ch if ch.isalnum() else "-" for ch in kind))


@functools.lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict[str, Any]:
    """The measured router table ({} when absent or unreadable)."""
    path = path or os.environ.get("OLLM_ROUTER_TABLE", ROUTER_TABLE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"router table {path} unreadable ({e}); using defaults")
        return {}


def _measured(pattern, head_dim: int, seq_len: int) -> tuple[str, str] | None:
    """(fastest impl, why) from the table for this card and pattern kind: the entry of the
    same head_dim (else any), nearest in sequence length and window (log distance)."""
    entries = [e for e in load_table().get("entries", [])
               if e.get("card") == card() and e.get("pattern") == pattern.name and e.get("best")]
    same_d = [e for e in entries if e.get("head_dim") == head_dim]
    entries = same_d or entries
    if not entries:
        return None
    window = getattr(pattern, "window", None)

    def distance(e):
        d = abs(math.log(e["seq_len"] / max(seq_len, 1)))
        if window and e.get("window"):
            d += abs(math.log(e["window"] / window))
        return d

    e = min(entries, key=distance)
    times = ", ".join(f"{k} {t:.3g} ms" for k, t in sorted(e.get("times_ms", {}).items()))
    return e["best"], f"router table: {card()} {pattern.name} D={e.get('head_dim')} S={e['seq_len']}: {times}"


def choose(pattern, q, k, *, impl: str = "auto", q_offset=0) -> tuple[str, str]:
    """(implementation, reason). The one place the decision is made."""
    pallas_problem = _pallas_problem(pattern, q, k, q_offset)
    if impl == "xla":
        return "xla", "asked for"
    if impl == "pallas":
        return ("pallas", "asked for") if pallas_problem is None else ("xla", f"pallas asked for, but {pallas_problem}")
    if impl == "cudnn":
        problem = _cudnn_problem(pattern, q, k, q_offset)
        return ("cudnn", "asked for") if problem is None else ("xla", f"cudnn asked for, but {problem}")
    # auto
    if not on_gpu():
        return "xla", f"backend {jax.default_backend()} (kernels are for the GPU; interpret mode is for tests)"
    cudnn_problem = _cudnn_problem(pattern, q, k, q_offset)
    usable = {"pallas": pallas_problem is None, "cudnn": cudnn_problem is None, "xla": True}
    measured = _measured(pattern, q.shape[-1], k.shape[1])
    if measured is not None and usable.get(measured[0], False):
        return measured
    if cudnn_problem is None:
        return "cudnn", "default for dense causal / sliding window on a GPU (no table entry)"
    if pallas_problem is None:
        return "pallas", f"default for block-sparse patterns on a GPU (cuDNN: {cudnn_problem})"
    return "xla", f"no kernel fits: pallas {pallas_problem}; cudnn {cudnn_problem}"


# ----------------------------------------------------------------------------- running


def _run(impl, q, k, v, lengths, *, pattern, q_offset, sm_scale, knobs):
    from pallas_kernels import flash_prefill as fp  # the kernels import this package
    from pallas_kernels import multiscale

    knobs = {n: x for n, x in knobs.items() if x is not None}
    t, s = q.shape[1], k.shape[1]
    if impl == "cudnn":
        window = pattern.contiguous_window
        return jax.nn.dot_product_attention(
            q, k, v, scale=sm_scale, is_causal=True, implementation="cudnn",
            key_value_seq_lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32),
            local_window_size=None if window is None else (window - 1, 0),
        )
    interpret = not on_gpu()
    if isinstance(pattern, patterns_lib.MultiScale):
        off = _static_int(q_offset) if impl == "pallas" else q_offset
        return multiscale.multiscale_attention(q, k, v, pattern, q_offset=off, lengths=lengths, impl=impl,
                                               interpret=interpret, sm_scale=sm_scale, **knobs)
    if impl == "pallas":
        if pattern.contiguous:
            return fp.flash_prefill(q, k, v, None, lengths=lengths, q_offset=q_offset,
                                    window=pattern.contiguous_window, sm_scale=sm_scale, interpret=interpret, **knobs)
        bq = knobs.pop("block_q", None) or fp.default_config(q.shape[-1])[0]
        bk = knobs.pop("block_k", None) or fp.default_config(q.shape[-1])[1]
        tables = pattern.block_tables(t, s, bq, bk, _static_int(q_offset))
        return fp.flash_prefill(q, k, v, tables, lengths=lengths, sm_scale=sm_scale, interpret=interpret, **knobs)
    # xla: the mask is computed in the graph (no T x S host constant).
    return fp.flash_prefill_reference(q, k, v, _xla_mask(pattern, t, s, q_offset), lengths=lengths,
                                      sm_scale=sm_scale)


def _xla_mask(pattern, seq_q: int, seq_k: int, q_offset) -> jax.Array:
    """The pattern's mask over [T, S] (PerHead: [H, T, S]); with [B] offsets
    [B, 1 or H, T, S]."""
    static_off = _static_int(q_offset) if jnp.ndim(q_offset) == 0 else None
    extent = (static_off + seq_q if static_off is not None else seq_k + seq_q) + seq_k + 1
    off = jnp.asarray(q_offset, jnp.int32)
    if off.ndim == 0:
        p = (q_offset if static_off is None else static_off) + jnp.arange(seq_q)[:, None]  # [T, 1]
        return pattern.mask(p, jnp.arange(seq_k)[None, :], jnp, extent=extent, seq_k=seq_k)
    p = off[:, None, None] + jnp.arange(seq_q)[None, :, None]  # [B, T, 1]
    mask = pattern.mask(p, jnp.arange(seq_k)[None, None, :], jnp, extent=extent, seq_k=seq_k)
    return jnp.moveaxis(mask, 0, 1) if mask.ndim == 4 else mask[:, None]  # [B, H or 1, T, S]


_PROBED: dict[Any, str | None] = {}


def _probe(run, q, k, v, lengths, impl, pattern, q_offset, knobs) -> str | None:
    """On a GPU, compiles `run` once per configuration; returns the failure, or None."""
    if not on_gpu():
        return None
    static_off = _static_int(q_offset)
    key = (impl, pattern, q.shape, str(q.dtype), k.shape, static_off if static_off is not None else "traced",
           lengths is None, tuple(sorted(knobs.items())))
    if key not in _PROBED:
        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
        args = (spec(q), spec(k), spec(v), None if lengths is None else jax.ShapeDtypeStruct((q.shape[0],), jnp.int32))
        if static_off is None:  # a traced offset: probe with 0 (same kernel, offsets are data)
            run = functools.partial(run.func, *run.args, **{**run.keywords, "q_offset": 0})
        try:
            jax.jit(run).lower(*args).compile()
            _PROBED[key] = None
        except Exception as e:  # Triton/cuDNN reject this configuration on this card
            _PROBED[key] = f"{type(e).__name__}: {str(e)[:300]}"
    return _PROBED[key]
