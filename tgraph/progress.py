"""One progress mechanism for every phase that can take a while: load, trace, passes, write,
session creation, generation.

`phase(name)` times a block of work and, once it has lasted `DELAY_S`, shows it on stderr as a
tqdm line that keeps ticking (a thread refreshes the elapsed time, since a trace or a session
start has no steps to count) and stays on screen when the phase ends, so a long run leaves a
log of where the time went. A phase given a `total` is a bar (`bar.update(n)` inside the block;
a `with` block, not a wrapped iterator, so an error closes the bar before it is reported). Every
phase is timed, shown or not, and
`timings()` / `timings_line()` give those durations to `--report`.

Shown when stderr is a terminal, never on stdout. `configure(quiet=True)` (the CLI's `--quiet`,
and `--json`, whose output must be only JSON) hides it; TGRAPH_PROGRESS=1 shows it on a
non-terminal stderr (logs, tests), TGRAPH_PROGRESS=0 hides it everywhere.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

DELAY_S = 1.0                 # phases shorter than this are never drawn
TICK_S = 0.25                 # how often a running phase redraws its elapsed time

_quiet = False
_timings: List[Tuple[str, float]] = []
_local = threading.local()    # .depth: nesting of this thread's phases (a nested one is reported under its parent)


def configure(*, quiet: bool) -> None:
    """Hide (quiet=True) or allow progress for the rest of the process."""
    global _quiet
    _quiet = bool(quiet)


@contextmanager
def command(*, quiet: bool) -> Iterator[None]:
    """One CLI command: its own quiet setting and timings, the process's settings restored after."""
    previous = _quiet
    configure(quiet=quiet)
    reset_timings()
    try:
        yield
    finally:
        configure(quiet=previous)


def enabled() -> bool:
    forced = os.environ.get("TGRAPH_PROGRESS", "").strip()
    if _quiet or forced == "0":
        return False
    if forced == "1":
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):          # a closed or replaced stderr
        return False


def reset_timings() -> None:
    _timings.clear()


def timings() -> List[Tuple[str, float]]:
    """(name, seconds) of every phase finished since the last reset, in the order they ended
    (nested phases indented by two spaces per level, listed before their parent)."""
    return list(_timings)


def timings_line() -> str:
    """`phases: load 1.20s, trace 0.85s, ...` (top-level phases only)."""
    top = [(n, s) for n, s in _timings if not n.startswith(" ")]
    return "phases: " + (", ".join(f"{n} {s:.2f}s" for n, s in top) or "none")


class _Ticker(threading.Thread):
    """Redraws a bar while the main thread is busy inside one long call (no updates to count)."""

    def __init__(self, bar, start: float):
        super().__init__(daemon=True, name="tgraph-progress")
        self.bar, self.start_t, self.stopped = bar, start, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(TICK_S):
            if time.perf_counter() - self.start_t >= DELAY_S:
                with self.bar.get_lock():
                    self.bar.refresh(nolock=True)
                    # tqdm counts only update()'s draws as shown; without this, close() would
                    # think the line was never drawn and leave it without its newline
                    self.bar.last_print_t = self.bar._time()


@contextmanager
def phase(name: str, total: Optional[int] = None, unit: str = "it", show: bool = True) -> Iterator:
    """Time (and, past DELAY_S, show) the enclosed work as `name`; yields the tqdm bar.

    `show=False` only times it (for a phase whose own output is the progress, e.g. streamed text)."""
    from tqdm import tqdm

    start = time.perf_counter()
    show = show and enabled()
    fmt = None if total is not None else "{desc}: {elapsed}"
    bar = tqdm(total=total, desc=name, unit=unit, disable=not show, delay=DELAY_S, leave=True,
               file=sys.stderr, bar_format=fmt, dynamic_ncols=True)
    ticker = _Ticker(bar, start) if show else None
    if ticker is not None:
        ticker.start()
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield bar
    finally:
        _local.depth = depth
        if ticker is not None:
            ticker.stopped.set()
            ticker.join()
        bar.close()
        _timings.append(("  " * depth + name, time.perf_counter() - start))
