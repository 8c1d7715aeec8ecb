"""`PassManager` and `optimize`: run passes in order, verify after each, record what changed.

After torch.fx's pass manager: a failure is re-raised naming the failing pass and the
passes already run, since a broken invariant is usually the fault of the pass just
before the check, not of the code that trips over it later.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, TextIO, Union

from tgraph.errors import ConfigError, TgraphError, VerifyError
from tgraph.ir import Graph

from .base import Pass, PassLike, parse_pipeline
from .levels import level_pipeline
from .pattern import NearMiss

#: The level `optimize(graph)` uses when given neither a level nor a pipeline.
DEFAULT_LEVEL = 2


class PassError(TgraphError):
    """A pass raised, or left the graph broken."""


@dataclass
class PassRecord:
    """What one pass did: its changes, node counts and timings."""

    name: str
    changes: Dict[str, int]
    nodes_before: int
    nodes_after: int
    seconds: float
    verify_seconds: float = 0.0
    near_misses: List[NearMiss] = field(default_factory=list)   # why rules did not fire (one type, for --report)

    @property
    def changed(self) -> bool:
        return any(self.changes.values())

    def changes_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.changes.items() if v) or "-"


@dataclass
class PipelineResult:
    """The records of a pipeline run, in order."""

    records: List[PassRecord] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.records)

    @property
    def seconds(self) -> float:
        return sum(r.seconds + r.verify_seconds for r in self.records)

    @property
    def passes(self) -> List[str]:
        return [r.name for r in self.records]

    def counts(self) -> Dict[str, Dict[str, int]]:
        """``{pass: {what: count}}``; a pass run several times has its counts summed."""
        out: Dict[str, Dict[str, int]] = {}
        for r in self.records:
            acc = out.setdefault(r.name, {})
            for k, v in r.changes.items():
                acc[k] = acc.get(k, 0) + v
        return out

    def summary(self) -> Dict[str, Dict[str, int]]:
        """`counts()` restricted to passes that changed something, and to non-zero counts."""
        return {name: {k: v for k, v in c.items() if v}
                for name, c in self.counts().items() if any(c.values())}

    def fusions(self) -> Dict[str, int]:
        """``{fusion: rewrites}`` of the fusion passes (named ``fuse-*``), e.g.
        ``{"attention": 12, "layer-norm": 25}``: which fusions fired and how often."""
        out: Dict[str, int] = {}
        for name, c in self.counts().items():
            if name.startswith("fuse-"):
                for k, v in c.items():
                    if v:
                        out[k] = out.get(k, 0) + v
        return out

    def near_misses(self, only_unfired: bool = True) -> Dict[str, List[str]]:
        """``{rule: ["at NODE: reason", ...]}`` of rewrite rules that did not fire (all rules
        when `only_unfired` is False); a rule that fired anywhere is not reported as missing."""
        counts = {k: v for c in self.counts().values() for k, v in c.items()}
        out: Dict[str, List[str]] = {}
        for r in self.records:
            for m in r.near_misses:
                if only_unfired and counts.get(m.rule, 0):
                    continue
                line = f"at {m.node}: {m.reason}"
                if line not in out.setdefault(m.rule, []):
                    out[m.rule].append(line)
        return out

    def __str__(self) -> str:
        if not self.records:
            return "no passes run"
        width = max(len(r.name) for r in self.records)
        lines = [f"{'pass':<{width}}  {'nodes':>13}  {'ms':>8}  changes"]
        for r in self.records:
            nodes = f"{r.nodes_before} -> {r.nodes_after}"
            lines.append(f"{r.name:<{width}}  {nodes:>13}  {r.seconds * 1e3:8.2f}  {r.changes_text()}")
        lines.append(f"{'total':<{width}}  {'':>13}  {self.seconds * 1e3:8.2f}")
        return "\n".join(lines)


_PRINT_IR_TO: List[TextIO] = []          # the streams of the active `print_ir_after_all` blocks


@contextmanager
def print_ir_after_all(out: Optional[TextIO] = None) -> Iterator[None]:
    """Inside this block every `PassManager` not told otherwise prints the IR before its
    first pass and after each pass to `out` (default stderr), like MLIR's
    ``-mlir-print-ir-after-all``: the CLI's ``--print-ir-after-all`` reaches the passes of
    any command this way, without a flag threaded through every API in between."""
    _PRINT_IR_TO.append(out if out is not None else sys.stderr)
    try:
        yield
    finally:
        _PRINT_IR_TO.pop()


class PassManager:
    """Runs passes in order on one graph (mutating it).

    verify: call `graph.verify()` on the input and after every pass.
    print_ir: print the IR before the first pass and after each pass, to `out`
        (default stdout), like xDSL's ``--print-between-passes``; None (the default):
        only inside a `print_ir_after_all` block, to its stream.
    """

    def __init__(self, passes: Union[str, Sequence[PassLike]], *, verify: bool = True,
                 print_ir: Optional[bool] = None, out: Optional[TextIO] = None):
        self.passes: List[Pass] = parse_pipeline(passes)
        self.verify = verify
        if print_ir is None and _PRINT_IR_TO:
            print_ir, out = True, out if out is not None else _PRINT_IR_TO[-1]
        self.print_ir = bool(print_ir)
        self.out = out

    def _print(self, graph: Graph, header: str) -> None:
        stream = self.out if self.out is not None else sys.stdout
        print(f"// ----- {header} -----", file=stream)
        print(graph, file=stream)

    def run(self, graph: Graph) -> PipelineResult:
        result = PipelineResult()
        if self.verify:
            try:
                graph.verify()
            except TgraphError as e:
                raise VerifyError(f"input graph fails verification before any pass: {e}") from e
        if self.print_ir:
            self._print(graph, "IR before passes")
        from tgraph.progress import phase

        with phase("passes", total=len(self.passes), unit="pass") as bar:
            for p in self.passes:
                bar.set_postfix_str(p.name, refresh=False)
                done = ", ".join(result.passes) or "none"
                before = len(graph.nodes)
                existing = {id(n): n for n in graph.nodes}     # (kept alive: a freed id can be reused)
                t0 = time.perf_counter()
                try:
                    changes = p.run(graph)
                except Exception as e:
                    err = PassError(f"pass {p.name!r} failed (passes already run: {done}): {type(e).__name__}: {e}")
                    err.pass_name, err.passes_run = p.name, result.passes
                    raise err from e
                seconds = time.perf_counter() - t0
                if changes is None:
                    changes = {}
                if not isinstance(changes, dict):
                    raise PassError(f"pass {p.name!r} returned {type(changes).__name__}, expected a dict of counts")
                misses = list(getattr(p, "near_misses", None) or [])
                if not all(isinstance(m, NearMiss) for m in misses):
                    raise PassError(f"pass {p.name!r} recorded near misses that are not pattern.NearMiss")
                record = PassRecord(p.name, dict(changes), before, len(graph.nodes), seconds, near_misses=misses)
                _mark_created(graph, existing, p.name)
                if self.verify:
                    t1 = time.perf_counter()
                    try:
                        graph.verify()
                    except TgraphError as e:
                        err = VerifyError(f"graph fails verification after pass {p.name!r} "
                                          f"(passes already run: {done}): {e}")
                        err.pass_name, err.passes_run = p.name, result.passes
                        raise err from e
                    record.verify_seconds = time.perf_counter() - t1
                result.records.append(record)
                if self.print_ir:
                    self._print(graph, f"IR after {p.spec()} ({record.changes_text()})")
                bar.update(1)
        return result

    __call__ = run


def _mark_created(graph: Graph, existing: dict, pass_name: str) -> None:
    """Record on each node a pass created its name (``meta["created_by"]``), for `tgraph view`
    and `inspect`: which fusion made this Attention. A node keeps the first pass that made it."""
    for n in graph.nodes:
        if id(n) not in existing:
            n.meta.setdefault("created_by", pass_name)


def resolve_pipeline(level: Optional[int] = None,
                     pipeline: Union[str, Sequence[PassLike], None] = None) -> List[Pass]:
    """The passes for an `optimize` call: an explicit pipeline, else the level's."""
    if level is not None and pipeline is not None:
        raise ConfigError("give an optimization level or a pipeline, not both")
    if pipeline is not None:
        return parse_pipeline(pipeline)
    return parse_pipeline(level_pipeline(DEFAULT_LEVEL if level is None else level))


def optimize(graph: Graph, level: Optional[int] = None, pipeline: Union[str, Sequence[PassLike], None] = None,
             *, verify: bool = True, print_ir: Optional[bool] = None, out: Optional[TextIO] = None) -> PipelineResult:
    """Optimize `graph` in place at -O`level` (default `DEFAULT_LEVEL`) or with an explicit pipeline."""
    passes = resolve_pipeline(level, pipeline)
    return PassManager(passes, verify=verify, print_ir=print_ir, out=out).run(graph)
