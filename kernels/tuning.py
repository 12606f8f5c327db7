"""Choosing a launch configuration on the device a kernel runs on, at the first call of a shape.

A launcher's default configuration is chosen without a GPU (registers and spills from ``ptxas``
for sm_90, ``benchmarks/compile_check.py``); which of a few good candidates is fastest depends
on the card, the shape and the compiler, and the one H200 run measured differences up to 1.65x
between them (``benchmarks/results/h200-2026-11-27``). A launcher with more than one candidate
for a call therefore asks :func:`choose`: on a CUDA device, the first call of each key (shape,
dtype, ...) times every candidate on that call's own inputs and keeps the fastest for the rest
of the process; later calls with the key cost one dict lookup.

Timing: one launch of a candidate first (it compiles, or loads from Triton's cache, and warms),
then ``ROUNDS`` rounds of ``REPS`` launches between CUDA events, each round queued behind a short
GPU busy-wait so that the launches run back to back (the kernels' time, not the host's); a
candidate's time is its median round. The fastest replaces the default only when it is at least
``MARGIN`` faster, so that noise between near-equal candidates leaves the default in place. A
candidate that raises (e.g. Triton's OutOfResources for a tile too large for the card) is
dropped. Where the launcher says how to combine two candidates (attention: each candidate changes
one thing from the default), the fastest is also tried together with each of the next two that
beat the default.

Launchers that tune: attention (forward and backward separately), add + LayerNorm (forward,
backward), the masked patch loss, the un-shuffle (forward, backward) and the masking gather's
backward, GELU's backward with fc1's bias gradient, the bias-gradient column sum, and the MLP's
fc1 + GELU and fc2's input gradient + GELU's backward (cuBLAS and the separate pass, or one
Triton GEMM with the pass in its epilogue: :mod:`mimfast.kernels.gelu_matmul`).

Not tuned, the default (the first candidate) or the choice already made is used instead:
off CUDA (Triton's interpreter); while a CUDA graph is being captured (a capture must not
synchronise; warm-up steps before a capture make the choice); while ``torch.compile`` traces;
and everywhere with the environment variable ``MIMFAST_AUTOTUNE=0``, which makes every process
launch the same configurations. :func:`chosen` lists the choices made and what each candidate
took (the benchmarks record it).

Every candidate computes the same function (the tests hold each to the eager reference), but
block sizes change the order of floating-point sums: results are bit-identical from call to
call within a process, and between processes only with ``MIMFAST_AUTOTUNE=0``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Hashable, Sequence

import torch

__all__ = ["applies", "choose", "chosen", "distinct", "enabled", "reset"]

ENV = "MIMFAST_AUTOTUNE"
ROUNDS = 3
REPS = 5
MARGIN = 0.03  # a candidate must be >= 3% faster than the default to replace it
COMBINED = 2  # combinations of the fastest candidate with the next ones that beat the default
# a GPU busy-wait before each timed round (about 2 ms at 2 GHz), longer than the host takes to
# enqueue REPS launches: the round then times the kernels back to back, not the launch overhead
SLEEP_CYCLES = 4_000_000

_choice: dict[Hashable, Any] = {}
_report: list[dict] = []


def enabled() -> bool:
    """False when ``MIMFAST_AUTOTUNE`` is ``0`` (or ``false`` / ``off`` / ``no``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def reset() -> None:
    """Forget every choice (the next call of each key tunes again)."""
    _choice.clear()
    _report.clear()


def chosen() -> list[dict]:
    """The choices made in this process: key, the chosen candidate's name, ms per candidate."""
    return [dict(r) for r in _report]


def distinct(candidates) -> tuple[tuple[str, Any], ...]:
    """(name, config) pairs with each config once, the first name kept, in order (a launcher
    builds its alternatives by rule; some coincide with the default at some shapes)."""
    out, seen = [], set()
    for name, cfg in candidates:
        if cfg not in seen:
            seen.add(cfg)
            out.append((name, cfg))
    return tuple(out)


def _measure(run: Callable[[Any], None], candidate: Any, device: torch.device) -> float:
    """Milliseconds of one ``run(candidate)`` on the GPU (median of ROUNDS rounds of REPS calls)."""
    with torch.cuda.device(device):
        run(candidate)  # compile / load and warm
        torch.cuda.synchronize(device)
        rounds = []
        for _ in range(ROUNDS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(SLEEP_CYCLES)  # the launches queue up behind it: GPU time, not the host's
            start.record()
            for _ in range(REPS):
                run(candidate)
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) / REPS)
    return sorted(rounds)[len(rounds) // 2]


def _combined(candidates, times, run, device, errors, combine) -> list[tuple[str, Any]]:
    """The fastest winner combined with each of the next ``COMBINED`` winners (candidates at
    least ``MARGIN`` faster than the default), timed into ``times``."""
    limit = times[candidates[0][0]] * (1 - MARGIN)
    winners = sorted((c for c in candidates[1:] if times[c[0]] < limit), key=lambda c: times[c[0]])
    seen = [cfg for _, cfg in candidates]
    out = []
    for name, cfg in winners[1:1 + COMBINED]:
        merged = combine(winners[0][1], cfg)
        if merged is None or merged in seen:
            continue
        seen.append(merged)
        out.append((f"{winners[0][0]}+{name}", merged))
        _time(run, merged, device, out[-1][0], times, errors)
    return out


def applies(device: torch.device) -> bool:
    """Whether launches on ``device`` are tuned at all (CUDA; the launchers ask before building
    a key, so that interpreted launches pay nothing)."""
    return device.type == "cuda"


def _may_tune(device: torch.device) -> bool:
    if not applies(device) or not enabled() or torch.compiler.is_compiling():
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _time(run, cand, device, name, times, errors) -> None:
    try:
        times[name] = _measure(run, cand, device)
    except Exception as e:  # noqa: BLE001 - a candidate the card cannot run is dropped
        times[name], errors[name] = math.inf, f"{type(e).__name__}: {str(e)[:200]}"


def choose(key: Hashable, candidates: Sequence[tuple[str, Any]], run: Callable[[Any], None],
           device: torch.device, combine: Callable[[Any, Any], Any] | None = None) -> Any:
    """The candidate to launch for ``key``: ``candidates`` are (name, config) pairs, the default
    first; ``run(config)`` launches the op once on the current call's inputs (its outputs are
    dropped). Tunes once per key where :mod:`this module <mimfast.kernels.tuning>` allows.

    ``combine(a, b)``: a configuration with the changes of both ``a`` and ``b`` from the default,
    or None where they conflict or add nothing. Given, the fastest candidate that beats the
    default is then combined with each of the next ``COMBINED`` that do, and those are timed too
    (named ``"a+b"``): each candidate changes one thing, and changes that win alone may win
    together."""
    hit = _choice.get(key)
    if hit is not None:
        return hit
    default = candidates[0][1]
    if len(candidates) == 1 or not _may_tune(device):
        return default
    times = {}
    errors = {}
    for name, cand in candidates:
        _time(run, cand, device, name, times, errors)
    if combine is not None:
        candidates = list(candidates) + _combined(candidates, times, run, device, errors, combine)
    fastest = min(range(len(candidates)), key=lambda i: times[candidates[i][0]])
    default_ms = times[candidates[0][0]]
    pick = fastest if times[candidates[fastest][0]] < default_ms * (1 - MARGIN) else 0
    best_name, best = candidates[pick]
    _choice[key] = best
    _report.append(dict(key=repr(key), chosen=best_name,
                        ms={n: (None if math.isinf(t) else round(t, 4)) for n, t in times.items()},
                        **(dict(errors=errors) if errors else {})))
    return best
