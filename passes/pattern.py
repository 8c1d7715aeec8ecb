"""Pattern rewriting: fusion rules that read like the math they replace.

After onnxscript's rewriter. A `Rule` gives one or more `pattern`s built with an op
builder (``op.Exp(op.Sub(x, op.ReduceMax(x, axes=axes)))``), a `check` that returns a
reason when a structurally matching subgraph must still be refused, and a `rewrite`
that builds the replacement with the IR `Builder`. `RewritePass` applies a list of rules
to a fixed point.

Matching rules:
* a `Var` binds a value (or an attribute); used twice, it must bind the same thing,
  which is how ``x`` in softmax's Sub and ReduceMax is required to be one tensor;
* a pattern node object used twice must match one graph node (DAG patterns);
* Add and Mul are tried in both input orders;
* every matched node except the root must have no users outside the match, or the
  rewrite would have to keep it alive and compute things twice: such a match is refused
  with the reason "intermediate ... used elsewhere".

A rule that does not fire where its root op appears records a near miss (the node and
the first reason), which `tgraph export --report` and `explain()` show.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from tgraph.ir import Builder, Graph, Node, Value

from .base import Pass
from .rewrite import replace_value

COMMUTATIVE = frozenset({"Add", "Mul", "And", "Or", "Equal"})


class NoMatch(Exception):
    """Raised inside the matcher with a human-readable reason."""


# ---------------------------------------------------------------- pattern objects
@dataclass(eq=False)
class Var:
    """Binds any value (or, in an attribute position, any attribute value)."""

    name: str
    predicate: Optional[Callable[[Any], bool]] = None
    describe: str = ""


@dataclass(eq=False)
class ConstPat:
    """Matches a constant. `value` (a number) requires every element to equal it (within
    `rtol`); `predicate` tests the array. `name` binds the array."""

    name: Optional[str] = None
    value: Optional[float] = None
    predicate: Optional[Callable[[np.ndarray], bool]] = None
    rtol: float = 1e-6


@dataclass(eq=False)
class OpPat:
    op: str
    inputs: Tuple[Any, ...]
    attrs: Dict[str, Any]
    domain: str = ""
    name: Optional[str] = None          # bind the matched node's output under this name
    outputs: int = 1
    index: int = 0                      # which output of the node this pattern stands for


Pattern = Union[Var, ConstPat, OpPat]


class OpBuilder:
    """`op.MatMul(a, b)` builds a pattern node; `op.MatMul(a, b, _name="scores")` binds it."""

    def __init__(self, domain: str = ""):
        self._domain = domain

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)

        def make(*inputs, _name: Optional[str] = None, _domain: Optional[str] = None, **attrs) -> OpPat:
            return OpPat(op, tuple(inputs), attrs, domain=self._domain if _domain is None else _domain, name=_name)
        return make

    @staticmethod
    def const(value: Optional[float] = None, name: Optional[str] = None, predicate=None, rtol: float = 1e-6) -> ConstPat:
        return ConstPat(name=name, value=value, predicate=predicate, rtol=rtol)


# ---------------------------------------------------------------- matches
@dataclass
class Match:
    root: Node
    bindings: Dict[str, Any] = field(default_factory=dict)
    nodes: List[Node] = field(default_factory=list)

    def __getattr__(self, name: str):
        try:
            return self.__dict__["bindings"][name]
        except KeyError:
            raise AttributeError(f"match has no binding {name!r}") from None

    def get(self, name: str, default=None):
        return self.bindings.get(name, default)


def _norm_attr(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(_norm_attr(x) for x in v)
    return v


class Matcher:
    """Matches one pattern rooted at one node; raises NoMatch with the first reason."""

    def __init__(self, graph: Graph):
        self.graph = graph

    def match(self, pattern: OpPat, node: Node) -> Match:
        m = Match(node)
        state = {"b": {}, "pats": {}, "nodes": {}}
        self._op(pattern, node.outputs[pattern.index], state)
        m.bindings = state["b"]
        m.nodes = list(state["nodes"].values())
        return m

    def _bind(self, name: str, value: Any, state) -> None:
        b = state["b"]
        if name in b:
            old = b[name]
            same = old is value if isinstance(value, Value) or isinstance(old, Value) else \
                _norm_attr(old) == _norm_attr(value)
            if not same:
                raise NoMatch(f"{name!r} would bind two different things")
        else:
            b[name] = value

    def _value(self, p: Pattern, v: Optional[Value], state, where: str) -> None:
        if isinstance(p, Var):
            if v is None:
                raise NoMatch(f"{where}: missing input")
            if p.predicate is not None and not p.predicate(v):
                raise NoMatch(f"{where}: {v.name} is not {p.describe or p.name}")
            self._bind(p.name, v, state)
        elif isinstance(p, ConstPat):
            if v is None or v.const is None:
                raise NoMatch(f"{where}: expected a constant, found {'nothing' if v is None else v.name}")
            arr = v.const
            if p.value is not None:
                if arr.size == 0 or not np.allclose(arr.astype(np.float64), p.value, rtol=p.rtol, atol=0):
                    raise NoMatch(f"{where}: constant {v.name} is not {p.value}")
            if p.predicate is not None and not p.predicate(arr):
                raise NoMatch(f"{where}: constant {v.name} fails the rule's test")
            if p.name:
                self._bind(p.name, arr, state)
        elif isinstance(p, OpPat):
            if v is None:
                raise NoMatch(f"{where}: missing input")
            self._op(p, v, state)
        else:  # a literal attribute-like value in an input slot is a pattern bug
            raise TypeError(f"bad pattern element {p!r}")

    def _op(self, p: OpPat, v: Value, state) -> None:
        seen = state["pats"].get(id(p))
        if seen is not None:
            if seen is not v:
                raise NoMatch(f"{p.op}: a shared subpattern matched two different values")
            return
        node = v.producer
        if node is None or node.op != p.op or node.domain != p.domain or v.index != p.index:
            found = "a graph input/constant" if node is None else node.qualified_op
            raise NoMatch(f"expected {p.op} for {v.name}, found {found}")
        ins = list(node.inputs)
        while len(ins) > len(p.inputs) and ins[-1] is None:
            ins.pop()
        if len(ins) != len(p.inputs):
            raise NoMatch(f"{node.name}: {p.op} has {len(ins)} inputs, pattern wants {len(p.inputs)}")
        for key, want in p.attrs.items():
            have = node.attrs.get(key)
            if isinstance(want, Var):
                if want.predicate is not None and not want.predicate(have):
                    raise NoMatch(f"{node.name}: attribute {key}={have!r} is not {want.describe or want.name}")
                self._bind(want.name, have, state)
            elif callable(want):
                if not want(have):
                    raise NoMatch(f"{node.name}: attribute {key}={have!r} rejected")
            elif _norm_attr(have) != _norm_attr(want):
                raise NoMatch(f"{node.name}: attribute {key}={have!r}, pattern wants {want!r}")
        orders = [list(range(len(ins)))]
        if p.op in COMMUTATIVE and len(ins) == 2:
            orders.append([1, 0])
        last: Optional[NoMatch] = None
        for order in orders:
            trial = {"b": dict(state["b"]), "pats": dict(state["pats"]), "nodes": dict(state["nodes"])}
            try:
                for pi, gi in enumerate(order):
                    self._value(p.inputs[pi], ins[gi], trial, f"{node.name} input {gi}")
            except NoMatch as e:
                last = e
                continue
            state.update(trial)
            state["pats"][id(p)] = v
            state["nodes"][id(node)] = node
            if p.name:
                self._bind(p.name, v, state)
            return
        raise last  # type: ignore[misc]


def escapes(graph: Graph, m: Match) -> Optional[str]:
    """A reason if an intermediate of the match is used outside it."""
    inside = {id(n) for n in m.nodes}
    outputs = {id(v) for v in graph.outputs}
    for node in m.nodes:
        if node is m.root:
            continue
        for out in node.outputs:
            if id(out) in outputs:
                return f"intermediate {out.name} is a graph output"
            for user, _ in out.uses:
                if id(user) not in inside:
                    return f"intermediate {out.name} is used elsewhere (by {user.name})"
    return None


# ---------------------------------------------------------------- rules and the pass
class Rule:
    """A fusion rule. Subclasses define `name`, `pattern(op)` (or `patterns(op)`),
    optionally `check(match, graph)` returning a refusal reason, and `rewrite(b, match)`
    returning the replacement value for the root's output."""

    name: ClassVar[str] = ""

    def pattern(self, op: OpBuilder) -> OpPat:
        raise NotImplementedError

    def patterns(self, op: OpBuilder) -> List[OpPat]:
        return [self.pattern(op)]

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        return None

    def match(self, graph: Graph, node: Node, patterns: Sequence[OpPat], reasons: List[str]) -> Optional[Tuple[Match, int]]:
        """Find this rule's match rooted at `node`, or None (appending why to `reasons`).
        The default tries each pattern; rules whose shapes vary too much for a table of
        patterns (attention) override this with a procedural matcher raising NoMatch."""
        matcher = Matcher(graph)
        for pat in patterns:
            if pat.op != node.op or pat.domain != node.domain:
                continue
            try:
                m = matcher.match(pat, node)
            except NoMatch as e:
                reasons.append(str(e))
                continue
            reason = escapes(graph, m) or self.check(m, graph)
            if reason is not None:
                reasons.append(reason)
                continue
            return m, pat.index
        return None

    def rewrite(self, b: Builder, m: Match) -> Union[Value, Sequence[Value]]:
        raise NotImplementedError


@dataclass
class NearMiss:
    rule: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} at {self.node}: {self.reason}"


def apply_rules(graph: Graph, rules: Sequence[Rule], near_misses: Optional[List[NearMiss]] = None,
                max_rounds: int = 8) -> Dict[str, int]:
    """Apply rules until none fires; returns {rule name: rewrites}."""
    counts = {r.name: 0 for r in rules}
    compiled = [(r, r.patterns(OpBuilder())) for r in rules]
    for _ in range(max_rounds):
        fired = False
        # Consumers first: the outermost root is tried before the subexpressions it contains,
        # so LayerNorm fuses with its scale and bias rather than stopping at the Div.
        for node in list(reversed(graph.nodes)):
            if node.graph is not graph:          # removed by an earlier rewrite this round
                continue
            for rule, pats in compiled:
                reasons: List[str] = []
                try:
                    found = rule.match(graph, node, pats, reasons)
                except NoMatch as e:
                    found = None
                    reasons.append(str(e))
                if found is None:
                    if reasons and near_misses is not None:
                        near_misses.append(NearMiss(rule.name, node.name, reasons[0]))
                    continue
                _replace(graph, rule, *found)
                counts[rule.name] += 1
                fired = True
                break
        if not fired:
            break
    return counts


def _replace(graph: Graph, rule: Rule, m: Match, index: int) -> None:
    root = m.root
    b = Builder(graph)
    b.insert_before = root
    scope = root.meta.get("scope", "")
    b.scope = scope.split(".") if scope else []
    new = rule.rewrite(b, m)
    news = list(new) if isinstance(new, (list, tuple)) else [new]
    old_outs = [root.outputs[index]] if len(news) == 1 else list(root.outputs)
    for old, nv in zip(old_outs, news):
        if nv.type.dtype != old.type.dtype:
            raise TypeError(f"rule {rule.name} changed dtype of {old.name}: {old.type} -> {nv.type}")
        replace_value(graph, old, nv)
    # The match's intermediates were used only inside it (checked before rewriting), so
    # with the root's uses moved to the replacement the whole match is dead.
    graph.remove_nodes(m.nodes)


@dataclass
class RewritePass(Pass):
    """Base of fusion passes: subclasses set `rules()`; the result counts rewrites per rule."""

    def rules(self) -> List[Rule]:
        raise NotImplementedError

    def run(self, graph: Graph) -> Dict[str, int]:
        self.near_misses: List[NearMiss] = []
        return apply_rules(graph, self.rules(), self.near_misses)


def explain(graph: Graph, rules: Sequence[Rule]) -> List[NearMiss]:
    """Near misses of `rules` on a copy of `graph` (the graph itself is not changed)."""
    misses: List[NearMiss] = []
    apply_rules(graph.copy(), rules, misses)
    return misses
