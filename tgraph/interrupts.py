"""SIGTERM as an exception, so a terminated command unwinds (and cleans up) as on Ctrl-C.

Its own module because both the CLI and `tgraph serve` (whose `ray.init` replaces the
handler) install it.
"""
from __future__ import annotations


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds (and cleans up) as on Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated()
