"""The JSON-lines protocol between bench/generate.py and one contender's runner process.

Each contender runs in its own process (its own venv where it needs one: onnxruntime-genai and
optimum pull the CPU onnxruntime wheel), so its peak RSS is its own and its libraries never meet
the others'. The harness writes one JSON request per line on the runner's stdin and reads one
JSON reply per line from the runner's real stdout; the runner points fd 1 at stderr first, so
whatever a library prints cannot corrupt the replies.

Requests:  {"cmd": "load", ...contender options}  -> {"ok": true, "load_s", "rss_bytes", "info"}
           {"cmd": "run", "prompts": [[ids]], "new": N} -> {"ok": true, "ids": [[new ids per row]],
                "start": t0, "stamps": [t per new token], "end": t1, "peak_rss_bytes"}
           {"cmd": "quit"}
A failure is {"ok": false, "error": "one line"} (the traceback goes to the runner's log).

Standard library only: every venv runs this file.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from typing import Callable, List


def _status_kib(field: str) -> int:
    """A `VmHWM:`/`VmRSS:` value of this process in KiB, 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set since the last `reset_peak_rss` (or process start)."""
    kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


class Stamps:
    """Wall-clock stamps of one generate call: its start, one per new token, its end."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stamps: List[float] = []
        self.end = self.start

    def stamp(self, *_ignored) -> None:
        self.stamps.append(time.perf_counter())

    def finish(self) -> "Stamps":
        self.end = time.perf_counter()
        return self

    def as_json(self) -> dict:
        return {"start": self.start, "stamps": self.stamps, "end": self.end}


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def serve(load: Callable[..., object], run: Callable[[object, List[List[int]], int], tuple]) -> None:
    """Answer requests until "quit" or end of input.

    `load(**options)` returns (state, info dict); `run(state, prompts, new)` returns
    (ids per row, Stamps).
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                       # library prints go to the log, not into the replies
    sys.stdout = sys.stderr
    state = None

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            cmd = request.pop("cmd")
            if cmd == "quit":
                reply({"ok": True})
                return
            if cmd == "load":
                start = time.perf_counter()
                state, info = load(**request)
                reply({"ok": True, "load_s": time.perf_counter() - start, "rss_bytes": rss_bytes(),
                       "peak_rss_bytes": peak_rss_bytes(), "info": info})
            elif cmd == "run":
                reset_peak_rss()
                ids, stamps = run(state, request["prompts"], int(request["new"]))
                reply({"ok": True, "ids": ids, **stamps.as_json(), "peak_rss_bytes": peak_rss_bytes()})
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:        # noqa: BLE001 - every failure becomes one reply line
            traceback.print_exc(file=sys.stderr)
            reply({"ok": False, "error": one_line(exc)})
