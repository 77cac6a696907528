"""Pieces shared by the benchmarks: run facts, hardware ceilings, timing, tables, JSON.

Every benchmark prints the hardware limit beside its result and names the card, the
library versions, the date and the command line, so a number can be traced to a run.
Import this only after the benchmark has set its `XLA_PYTHON_CLIENT_*` variables:
importing it imports jax.
"""

from __future__ import annotations

import datetime
import glob
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_cuda():
    """The `torch` module when it is installed and sees a CUDA device, else None."""
    try:
        import torch
    except Exception:  # not installed, or a broken install: both mean "no torch here"
        return None
    return torch if torch.cuda.is_available() else None


def _version(name: str) -> str | None:
    """The installed version, read from package metadata (importing torch would touch the GPU)."""
    try:
        return importlib.metadata.version(name)
    except Exception:
        return None


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) or None
    except Exception:
        return None


def environment() -> dict[str, Any]:
    """Facts about this run: card, versions, date, command line, relevant env vars."""
    dev = jax.devices()[0]
    # Only a process that already uses torch asks it for the card's name: our timed runs
    # keep torch (and its CUDA context) out of the process.
    torch = torch_cuda() if "torch" in sys.modules else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3"] + [shlex.quote(a) for a in sys.argv]),
        "host": platform.node(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_device_kind": dev.device_kind,
        "jax_device_count": jax.device_count(),
        "torch_device_name": torch.cuda.get_device_name(0) if torch else None,
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "git": _git_revision(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "TF_CPP"))},
    }


def card_slug(env: dict[str, Any]) -> str:
    """A short file-name-safe card name: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    name = (env.get("torch_device_name") or env["jax_device_kind"]).lower()
    for card in ("h200", "h100", "a100", "l40s", "l4", "a10g", "t4"):
        if card in name:
            return card
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "unknown"


def print_environment(env: dict[str, Any]) -> None:
    print(f"date        {env['date_utc']}")
    print(f"command     {env['command']}")
    print(f"card        jax: {env['jax_device_kind']} ({env['jax_backend']}, {env['jax_device_count']} device(s))"
          f"; torch: {env['torch_device_name'] or '-'}")
    print(f"versions    jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, "
          f"torch {env['torch'] or '-'}, transformers {env['transformers'] or '-'}, python {env['python']}")
    print(f"ollm-jax    git {env['git'] or '?'}")
    if env["env"]:
        print("env         " + " ".join(f"{k}={v}" for k, v in sorted(env["env"].items())))


# ----------------------------------------------------------------------------- ceilings


def jax_copy_bandwidth(nbytes: int, reps: int = 10) -> float:
    """Device memory bandwidth in bytes/s of a jitted elementwise op over a bf16 buffer.

    `x + 1` reads and writes every element once (a multiply by 1 could be simplified
    away), so bytes moved = 2 * nbytes. Best of `reps` after one compile run.
    """
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    step = jax.jit(lambda a: a + 1)
    step(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        y = step(x)
        y.block_until_ready()
        best = min(best, time.perf_counter() - t0)
        del y
    del x
    return 2 * (nbytes // 2) * 2 / best


def torch_copy_bandwidth(nbytes: int, reps: int = 10) -> float | None:
    """Device memory bandwidth in bytes/s of torch `dst.copy_(src)` (read + write),
    best of `reps` by CUDA events; None without torch + CUDA."""
    torch = torch_cuda()
    if torch is None:
        return None
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (nbytes // 2) * 2 / best


def torch_copy_bandwidth_in_child(nbytes: int) -> float | None:
    """`torch_copy_bandwidth` measured in a child process, so torch's CUDA context never
    shares the timed process; None where torch has no CUDA (or the child fails)."""
    code = f"import sys; sys.path.insert(0, {REPO!r}); from bench import common; print(common.torch_copy_bandwidth({nbytes}))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        value = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "None"
        return None if value == "None" else float(value)
    except Exception:
        return None


def copy_bandwidth(nbytes: int, torch_bw: float | None) -> dict[str, Any]:
    """The jax copy bandwidth measured here, torch's (measured in the HF child process,
    or None) and the one used as the ceiling (the higher)."""
    jax_bw = jax_copy_bandwidth(nbytes)
    used, source = (torch_bw, "torch copy_") if torch_bw and torch_bw > jax_bw else (jax_bw, "jax x+1")
    return {"buffer_bytes": nbytes, "jax_Bps": jax_bw, "torch_Bps": torch_bw, "used_Bps": used, "source": source}


# ----------------------------------------------------------------------------- timing, output


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of `fn()`; `fn` must block on its own device work."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_seconds(call: Callable[[], Any], reps: int) -> float:
    """Median wall seconds of `call()` blocked on, over `reps` runs after one untimed run
    (compilation, warm-up)."""
    jax.block_until_ready(call())
    return median([timed(lambda: jax.block_until_ready(call()))[0] for _ in range(reps)])


def busy_ns(spans: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals: time a device had work, counted once
    where kernels of several streams overlap."""
    busy, end = 0, None
    for start, stop in sorted(spans):
        if end is None or start >= end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    return busy


def device_kernel_events(call: Callable[[], Any], reps: int = 1) -> list[tuple[str, int, int]] | None:
    """(name, start ns, duration ns) of every kernel and copy on the device's stream lines
    in a `jax.profiler` trace of `reps` calls of `call()` (after one untimed call); None
    where the trace has no GPU plane (the CPU). XLA runs without command buffers while
    profiling, which changes the gaps between kernels, not the kernels."""
    if jax.default_backend() != "gpu":
        return None
    jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(reps):
                jax.block_until_ready(call())
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return None
        data = jax.profiler.ProfileData.from_file(paths[0])
    return [(ev.name, ev.start_ns, ev.duration_ns)
            for plane in data.planes if plane.name.startswith("/device:GPU:")
            for line in plane.lines if line.name.startswith("Stream")
            for ev in line.events]


def device_busy_seconds(call: Callable[[], Any], reps: int = 3) -> float | None:
    """Seconds the GPU spends running kernels and copies per `call()`: the union of the
    intervals of `device_kernel_events` over `reps` calls, divided by `reps`; None off the
    GPU. Host dispatch and launch gaps are not counted, which a wall-clock time keeps:
    side by side the two separate kernel time from per-call overhead."""
    events = device_kernel_events(call, reps)
    return events_busy_ns(events) / 1e9 / reps if events else None


def events_busy_ns(events: list[tuple[str, int, int]]) -> int:
    """`busy_ns` of (name, start ns, duration ns) events."""
    return busy_ns([(start, start + dur) for _, start, dur in events])


def kernel_table(events: list[tuple[str, int, int]], per: int) -> list[dict[str, Any]]:
    """Events (name, start ns, duration ns) grouped by kernel name, slowest first: calls
    and microseconds per unit (`per` units in the trace, e.g. decode steps) and
    microseconds per call."""
    total: dict[str, list[float]] = {}
    for name, _, dur in events:
        calls_ns = total.setdefault(name, [0, 0.0])
        calls_ns[0] += 1
        calls_ns[1] += dur
    rows = [{"kernel": name, "calls_per": calls / per, "us_per": ns / 1e3 / per, "us_per_call": ns / 1e3 / calls}
            for name, (calls, ns) in total.items()]
    return sorted(rows, key=lambda r: -r["us_per"])


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(c) for c in row] for row in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def save_json(path: str, obj: Any) -> None:
    """Writes atomically (a killed run leaves the previous complete file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
