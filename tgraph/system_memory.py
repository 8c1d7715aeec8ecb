"""How much memory this process can still allocate: the one answer behind every "does it fit" check
(`tgraph.resources` before building a config, `tgraph.ir.lazy` before materialising a weight).

MemAvailable + SwapFree from /proc/meminfo (os.sysconf where there is none), capped by the
process's own cgroup v2 memory limit (its page cache counted as reclaimable) and by RLIMIT_AS.
None when none of these can be read: then nothing is refused.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

try:
    import resource
except ImportError:                 # not on Windows
    resource = None


def _meminfo() -> Dict[str, int]:
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
    except (OSError, ValueError, IndexError):
        return {}


def _cgroup_room() -> Optional[int]:
    """Bytes left under this process's cgroup v2 memory limit, if it runs under one."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            current = int(f.read())
        with open(os.path.join(base, "memory.stat")) as f:
            cache = next((int(line.split()[1]) for line in f if line.startswith("file ")), 0)
        return max(int(limit) - current + cache, 0)
    except (OSError, ValueError, IndexError):
        return None


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate (None: unknown, so no check)."""
    info = _meminfo()
    if "MemAvailable" in info:
        room: Optional[int] = info["MemAvailable"] + info.get("SwapFree", 0)
    else:
        try:
            room = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            room = None
    limits = [r for r in (room, _cgroup_room()) if r is not None]
    if resource is not None:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    return min(limits) if limits else None
