"""Pattern rewriting: fusion rules that read like the math they replace.

After onnxscript's rewriter. A `Rule` gives its `pattern` built with an op builder
(``op.Exp(op.Sub(x, op.ReduceMax(x, axes=axes)))``), a `check` that returns a reason
when a structurally matching subgraph must still be refused, and a `rewrite` that
builds the replacement with the IR `Builder`. `RewritePass` applies a list of rules to a
fixed point. Rules never match by hand: everything a rule accepts is in its pattern.

Pattern elements:
* `Var` binds a value (or an attribute); used twice, it must bind the same thing, which
  is how ``x`` in softmax's Sub and ReduceMax is required to be one tensor. `ANY`
  matches any value and binds nothing.
* `ConstPat` (``op.const(0.5)``) matches a constant, optionally of a given value.
* `OpPat` (``op.MatMul(a, b)``) matches a node; the same pattern object used twice must
  match one graph node (DAG patterns, `Shared` sub-patterns).
* `Or(p1, p2, ...)` matches any alternative; `optional(wrap, x)` is ``Or(wrap(x), x)``,
  for layers a spelling may or may not have (a Cast, a scale, a mask).

The matcher backtracks: an alternative that matched a subtree is given up again when a
later sibling fails under its bindings. Ops whose `OpDef` has the trait "commutative"
are tried in both input orders. Every matched node except the root must have no users
outside the match (nodes that only feed the match, such as the Shape arithmetic of a
Reshape being replaced, count as part of it), or the rewrite would have to keep it alive
and compute things twice: such a match is refused with "intermediate ... used elsewhere".
A fused op that also returns a matched intermediate (SkipLayerNormalization's residual
sum) names its binding in `Rule.also_replaces`: that value's other users read the new
op's next output instead.

A rule that does not fire where its root op appears records a near miss (the node and
the reason from the attempt that got furthest), which `tgraph export --report` and
`explain()` show.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from tgraph.ir import Builder, Graph, Node, Value
from tgraph.ir.traits import has_trait

from .base import Pass
from .constants import small_const
from .rewrite import builder_at, replace_match

#: A constant pattern with a `value` reads at most this many elements to compare them
#: (a larger constant, e.g. a checkpoint weight, is never read to find out).
MAX_COMPARED_ELEMENTS = 4096


class NoMatch(Exception):
    """Raised with a human-readable reason when a subgraph is refused."""


# ---------------------------------------------------------------- pattern objects
@dataclass(eq=False)
class Var:
    """Binds any value (or, in an attribute position, any attribute value); an empty
    name binds nothing."""

    name: str
    predicate: Optional[Callable[[Any], bool]] = None
    describe: str = ""


ANY = Var("")


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


@dataclass(eq=False)
class Or:
    """Matches the first alternative that leads to a whole match (backtracking)."""

    alternatives: Tuple[Any, ...]
    name: Optional[str] = None          # bind the index of the alternative that matched

    def __init__(self, *alternatives, name: Optional[str] = None):
        if not alternatives:
            raise ValueError("Or needs at least one alternative")
        self.alternatives = tuple(alternatives)
        self.name = name


Pattern = Union[Var, ConstPat, OpPat, Or]


def optional(wrap: Callable[[Any], Any], inner: Any) -> Or:
    """``Or(wrap(inner), inner)``: a layer that a spelling may or may not put around `inner`."""
    return Or(wrap(inner), inner)


def root_ops(p: Pattern) -> FrozenSet[Tuple[str, str]]:
    """The (domain, op) pairs a pattern's root can be, so a rule is tried only where it can fire."""
    if isinstance(p, OpPat):
        return frozenset({(p.domain, p.op)})
    if isinstance(p, Or):
        return frozenset().union(*(root_ops(a) for a in p.alternatives))
    raise TypeError(f"a pattern's root must be an op or an Or of ops, got {p!r}")


class OpBuilder:
    """`op.MatMul(a, b)` builds a pattern node; `op.MatMul(a, b, _name="scores")` binds it."""

    def __init__(self, domain: str = ""):
        self._domain = domain

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)

        def make(*inputs, _name: Optional[str] = None, _domain: Optional[str] = None, _outputs: int = 1,
                 _index: int = 0, **attrs) -> OpPat:
            return OpPat(op, tuple(inputs), attrs, domain=self._domain if _domain is None else _domain,
                         name=_name, outputs=_outputs, index=_index)
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
    root_index: int = 0                 # which output of the root the pattern stands for

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


@dataclass
class _State:
    """One branch of the search: what is bound so far. Copied when a branch forks."""

    bindings: Dict[str, Any] = field(default_factory=dict)
    pats: Dict[int, Value] = field(default_factory=dict)      # id(OpPat) -> the value it matched
    nodes: Dict[int, Node] = field(default_factory=dict)

    def fork(self) -> "_State":
        return _State(dict(self.bindings), dict(self.pats), dict(self.nodes))


class Matcher:
    """Matches one pattern rooted at one node; raises NoMatch with the furthest reason."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._best: Tuple[int, str] = (-1, "no alternative matched")

    def all_matches(self, pattern: Pattern, node: Node) -> Iterator[Match]:
        """Every structural match of `pattern` at `node` (alternatives in order)."""
        index = pattern.index if isinstance(pattern, OpPat) else 0
        for st in self._value(pattern, node.outputs[index], _State(), "root"):
            yield Match(node, st.bindings, list(st.nodes.values()), index)

    def match(self, pattern: Pattern, node: Node) -> Match:
        for m in self.all_matches(pattern, node):
            return m
        raise NoMatch(self._best[1])

    @property
    def reason(self) -> str:
        """Why the attempt that got furthest failed."""
        return self._best[1]

    @property
    def depth(self) -> int:
        """How many nodes the attempt that got furthest had matched."""
        return self._best[0]

    def _fail(self, st: _State, reason: str) -> None:
        if len(st.nodes) > self._best[0]:
            self._best = (len(st.nodes), reason)

    def _bind(self, name: Optional[str], value: Any, st: _State) -> bool:
        if not name:
            return True
        b = st.bindings
        if name in b:
            old = b[name]
            same = old is value if isinstance(value, Value) or isinstance(old, Value) else \
                _norm_attr(old) == _norm_attr(value)
            if not same:
                self._fail(st, f"{name!r} would bind two different things")
            return same
        b[name] = value
        return True

    def _value(self, p: Pattern, v: Optional[Value], st: _State, where: str) -> Iterator[_State]:
        if isinstance(p, Or):
            for i, alt in enumerate(p.alternatives):
                trial = st.fork()
                if p.name and not self._bind(p.name, i, trial):
                    continue
                yield from self._value(alt, v, trial, where)
            return
        if v is None:
            self._fail(st, f"{where}: missing input")
            return
        if isinstance(p, Var):
            if p.predicate is not None and not p.predicate(v):
                self._fail(st, f"{where}: {v.name} is not {p.describe or p.name}")
            elif self._bind(p.name, v, st):
                yield st
        elif isinstance(p, ConstPat):
            reason = _const_refusal(p, v)
            if reason:
                self._fail(st, f"{where}: {reason}")
            elif self._bind(p.name, v.const, st):
                yield st
        elif isinstance(p, OpPat):
            yield from self._op(p, v, st)
        else:  # a literal attribute-like value in an input slot is a pattern bug
            raise TypeError(f"bad pattern element {p!r}")

    def _op(self, p: OpPat, v: Value, st: _State) -> Iterator[_State]:
        seen = st.pats.get(id(p))
        if seen is not None:
            if seen is v:
                yield st
            else:
                self._fail(st, f"{p.op}: a shared subpattern matched two different values")
            return
        node = v.producer
        if node is None or node.op != p.op or node.domain != p.domain or v.index != p.index:
            found = "a graph input/constant" if node is None else node.qualified_op
            self._fail(st, f"expected {p.op} for {v.name}, found {found}")
            return
        ins = list(node.inputs)
        while len(ins) > len(p.inputs) and ins[-1] is None:
            ins.pop()
        if len(ins) != len(p.inputs):
            self._fail(st, f"{node.name}: {p.op} has {len(ins)} inputs, pattern wants {len(p.inputs)}")
            return
        if p.outputs != 1 and len(node.outputs) != p.outputs:
            self._fail(st, f"{node.name}: {p.op} has {len(node.outputs)} outputs, pattern wants {p.outputs}")
            return
        st = st.fork()
        for key, want in p.attrs.items():
            have = node.attrs.get(key)
            if isinstance(want, Var):
                if want.predicate is not None and not want.predicate(have):
                    self._fail(st, f"{node.name}: attribute {key}={have!r} is not {want.describe or want.name}")
                    return
                if not self._bind(want.name, have, st):
                    return
            elif callable(want):
                if not want(have):
                    self._fail(st, f"{node.name}: attribute {key}={have!r} rejected")
                    return
            elif _norm_attr(have) != _norm_attr(want):
                self._fail(st, f"{node.name}: attribute {key}={have!r}, pattern wants {want!r}")
                return
        st.pats[id(p)] = v
        st.nodes[id(node)] = node
        if p.name and not self._bind(p.name, v, st):
            return
        orders = [list(range(len(ins)))]
        if len(ins) == 2 and has_trait(node, "commutative"):
            orders.append([1, 0])
        for order in orders:
            yield from self._inputs(p, node, [ins[i] for i in order], order, 0, st.fork())

    def _inputs(self, p: OpPat, node: Node, ins: List[Optional[Value]], order: List[int], k: int,
                st: _State) -> Iterator[_State]:
        if k == len(ins):
            yield st
            return
        for after in self._value(p.inputs[k], ins[k], st.fork(), f"{node.name} input {order[k]}"):
            yield from self._inputs(p, node, ins, order, k + 1, after)


def _const_refusal(p: ConstPat, v: Value) -> Optional[str]:
    if v.const is None:
        return f"expected a constant, found {v.name}"
    arr = v.const
    if p.value is not None:
        small = small_const(v, MAX_COMPARED_ELEMENTS, params=True)
        if small is None or small.size == 0 or not np.allclose(np.asarray(small, np.float64), p.value,
                                                               rtol=p.rtol, atol=0):
            return f"constant {v.name} is not {p.value}"
    if p.predicate is not None and not p.predicate(arr):
        return f"constant {v.name} fails the rule's test"
    return None


def with_feeders(graph: Graph, nodes: Sequence[Node], keep: Sequence[Optional[Value]]) -> List[Node]:
    """`nodes` plus the nodes that only feed them (e.g. the Shape -> Slice -> Concat that
    computes a replaced Reshape's target): they die with the match, so their reading a
    match intermediate is not a use "elsewhere". Producers of `keep` (values the rewrite
    may use) stay."""
    inside = {id(n) for n in nodes}
    kept = {id(v.producer) for v in keep if isinstance(v, Value) and v.producer is not None}
    outputs = {id(v) for v in graph.outputs}
    out = list(nodes)
    changed = True
    while changed:
        changed = False
        for node in list(out):
            for v in node.inputs:
                p = v.producer if v is not None else None
                if p is None or id(p) in inside or id(p) in kept or any(id(o) in outputs for o in p.outputs):
                    continue
                if all(id(u) in inside for o in p.outputs for u, _ in o.uses):
                    inside.add(id(p))
                    out.append(p)
                    changed = True
    return out


def escapes(graph: Graph, m: Match, replaced: Sequence[Value] = ()) -> Optional[str]:
    """A reason if an intermediate of the match is used outside it (`replaced` values may
    be: the rewrite points their uses at its own results)."""
    inside = {id(n) for n in m.nodes}
    outputs = {id(v) for v in graph.outputs}
    free = {id(v) for v in replaced}
    for node in m.nodes:
        if node is m.root:
            continue
        for out in node.outputs:
            if id(out) in free:
                continue
            if id(out) in outputs:
                return f"intermediate {out.name} is a graph output"
            for user, _ in out.uses:
                if id(user) not in inside:
                    return f"intermediate {out.name} is used elsewhere (by {user.name})"
    return None


# ---------------------------------------------------------------- rules and the pass
class Rule:
    """A fusion rule. Subclasses define `name`, `pattern(op)`, optionally
    `check(match, graph)` returning a refusal reason, and `rewrite(b, match)` returning
    the replacement value(s) for the root's output(s)."""

    name: ClassVar[str] = ""
    #: Refuse a match whose intermediates are used elsewhere (a rule whose rewrite keeps
    #: them alive, e.g. one that only adds an input, sets this False).
    private_intermediates: ClassVar[bool] = True
    #: Bindings (``_name=`` of matched nodes) whose values the rewrite's results after the
    #: root's replace, in order: a fused op that also returns a matched intermediate
    #: (SkipLayerNormalization's second output is its residual Add's sum) names it here.
    #: Such a value may have users outside the match; they read the new result, which is
    #: built before the first node producing a replaced value (its inputs must exist there).
    also_replaces: ClassVar[Tuple[str, ...]] = ()

    #: A spelling that did not match is reported as a near miss only when the attempt that
    #: got furthest matched this many nodes: one that fails at the root's inputs is just
    #: another MatMul or Add, not an attention or a norm written slightly differently.
    #: (A structural match refused by `check` is always reported.)
    near_miss_nodes: ClassVar[int] = 2

    def pattern(self, op: OpBuilder) -> Pattern:
        raise NotImplementedError

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        return None

    def rewrite(self, b: Builder, m: Match) -> Union[Value, Sequence[Value]]:
        raise NotImplementedError


@dataclass
class CompiledRule:
    rule: Rule
    pattern: Pattern
    roots: FrozenSet[Tuple[str, str]]

    @classmethod
    def of(cls, rule: Rule) -> "CompiledRule":
        pattern = rule.pattern(OpBuilder())
        return cls(rule, pattern, root_ops(pattern))

    def find(self, graph: Graph, node: Node) -> Tuple[Optional[Match], Optional[str]]:
        """This rule's first acceptable match at `node`, or (None, the reason to report).
        A refusal of a structural match (by `check` or escaping intermediates) is reported
        in preference to spellings that did not match."""
        if (node.domain, node.op) not in self.roots:
            return None, None
        matcher = Matcher(graph)
        refused: Optional[str] = None
        for m in matcher.all_matches(self.pattern, node):
            keep = [v for v in m.bindings.values() if isinstance(v, Value) and not _is_inside(v, m)]
            m.nodes = with_feeders(graph, m.nodes, keep)
            extra = [m.bindings[n] for n in self.rule.also_replaces]
            reason = (escapes(graph, m, extra) if self.rule.private_intermediates else None) or self.rule.check(m, graph)
            if reason is None:
                return m, None
            refused = refused or reason
        if refused:
            return None, refused
        return None, matcher.reason if matcher.depth >= self.rule.near_miss_nodes else None


def _is_inside(v: Value, m: Match) -> bool:
    return v.producer is not None and any(v.producer is n for n in m.nodes)


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
    compiled = [CompiledRule.of(r) for r in rules]
    for _ in range(max_rounds):
        fired = False
        # Consumers first: the outermost root is tried before the subexpressions it contains,
        # so LayerNorm fuses with its scale and bias rather than stopping at the Div.
        for node in list(reversed(graph.nodes)):
            if node.graph is not graph:          # removed by an earlier rewrite this round
                continue
            for c in compiled:
                m, reason = c.find(graph, node)
                if m is None:
                    if reason and near_misses is not None:
                        near_misses.append(NearMiss(c.rule.name, node.name, reason))
                    continue
                _rewrite(graph, c, m)
                counts[c.rule.name] += 1
                fired = True
                break
        if not fired:
            break
    return counts


def _rewrite(graph: Graph, c: CompiledRule, m: Match) -> None:
    extra = [m.bindings[n] for n in c.rule.also_replaces]
    b = builder_at(graph, m.root)
    if extra:                                  # before the first producer of a replaced value
        order = {id(n): i for i, n in enumerate(graph.nodes)}
        b.insert_before = min([m.root] + [v.producer for v in extra], key=lambda n: order[id(n)])
    new = c.rule.rewrite(b, m)
    news = list(new) if isinstance(new, (list, tuple)) else [new]
    if extra:
        olds = [m.root.outputs[m.root_index]] + extra
    else:
        olds = [m.root.outputs[m.root_index]] if len(news) == 1 else list(m.root.outputs)
    replace_match(graph, olds, news, m.nodes, who=f"rule {c.rule.name}")


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
