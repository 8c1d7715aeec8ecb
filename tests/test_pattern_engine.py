"""The pattern engine itself (passes/pattern.py): alternatives with backtracking, optional
layers, ANY, shared sub-patterns, commutativity from op traits, feeders absorbed into a
match, the furthest reason reported, and that a rewrite only touches the graph through
`replace_match`. Each case builds a tiny IR graph with the Builder."""
import numpy as np
import pytest

from tgraph.ir import Builder, DType, Graph, TensorType
from tgraph.ir.evaluate import evaluate
from tgraph.ir.lazy import LazyTensor
from tgraph.passes.pattern import (ANY, Matcher, NoMatch, OpBuilder, Or, Rule, Var, apply_rules, explain,
                                   optional, root_ops)

op = OpBuilder()


def graph_with(fn, *shapes):
    """A graph whose inputs have `shapes` (float32) and whose one output is fn(b, *inputs)."""
    g = Graph()
    b = Builder(g)
    xs = [g.add_input(f"x{i}", TensorType(DType.float32, s)) for i, s in enumerate(shapes)]
    g.outputs = [fn(b, *xs)]
    return g, xs


def root(g):
    return g.outputs[0].producer


def test_or_backtracks_when_a_later_sibling_fails():
    # Pattern Add(Or(Exp(a), c), Neg(a)) on Add(Exp(x0), Neg(x1)).
    g, (x0, x1) = graph_with(lambda b, x, y: b.op("Add", b.op("Exp", x), b.op("Neg", y)), (3,), (3,))
    a, c = Var("a"), Var("c")
    pat = op.Add(Or(op.Exp(a), c), op.Neg(a))
    m = Matcher(g).match(pat, root(g))
    # Exp's input x0 is not Neg's input x1, so the Exp branch fails at Neg and the matcher
    # backtracks to bind c = Exp(x0) and a = x1.
    assert m.a is x1 and m.c.producer.op == "Exp"


def test_or_alternative_index_is_bound_by_name():
    g, _ = graph_with(lambda b, x: b.op("Sqrt", b.op("Exp", x)), (2,))
    pat = op.Sqrt(Or(op.Log(Var("x")), op.Exp(Var("x")), name="which"))
    assert Matcher(g).match(pat, root(g)).which == 1


def test_optional_layer_present_or_absent():
    pat = op.Sqrt(optional(lambda inner: op.Cast(inner, to=ANY), Var("x")))
    g1, (x,) = graph_with(lambda b, x: b.op("Sqrt", x), (2,))
    g2, (y,) = graph_with(lambda b, x: b.op("Sqrt", b.op("Cast", x, to=DType.float32)), (2,))
    assert Matcher(g1).match(pat, root(g1)).x is x
    assert Matcher(g2).match(pat, root(g2)).x is y


def test_commutativity_comes_from_the_op_table():
    g, (x, y) = graph_with(lambda b, x, y: b.op("Mul", b.op("Exp", x), y), (2,), (2,))
    assert Matcher(g).match(op.Mul(Var("v"), op.Exp(Var("u"))), root(g)).u is x     # swapped: Mul is commutative
    g2, _ = graph_with(lambda b, x, y: b.op("Sub", b.op("Exp", x), y), (2,), (2,))
    with pytest.raises(NoMatch):
        Matcher(g2).match(op.Sub(Var("v"), op.Exp(Var("u"))), root(g2))          # Sub is not


def test_shared_subpattern_must_be_one_node_and_var_one_value():
    x = Var("x")
    e = op.Exp(x)
    pat = op.Add(e, e)
    g, _ = graph_with(lambda b, x: (lambda t: b.op("Add", t, t))(b.op("Exp", x)), (2,))
    Matcher(g).match(pat, root(g))
    g2, _ = graph_with(lambda b, x: b.op("Add", b.op("Exp", x), b.op("Exp", x)), (2,))
    with pytest.raises(NoMatch, match="shared subpattern"):
        Matcher(g2).match(pat, root(g2))
    g3, _ = graph_with(lambda b, x, y: b.op("Add", b.op("Exp", x), b.op("Exp", y)), (2,), (2,))
    with pytest.raises(NoMatch):
        Matcher(g3).match(op.Add(op.Exp(x), op.Exp(x)), root(g3))


def test_the_reason_reported_is_from_the_attempt_that_got_furthest():
    g, _ = graph_with(lambda b, x: b.op("Sqrt", b.op("Exp", b.op("Neg", x))), (2,))
    pat = op.Sqrt(Or(op.Log(Var("x")), op.Exp(op.Tanh(Var("x")))))
    with pytest.raises(NoMatch, match="expected Tanh"):
        Matcher(g).match(pat, root(g))


def test_root_ops_of_an_or():
    assert root_ops(Or(op.Add(ANY, ANY), op.Mul(ANY, ANY))) == {("", "Add"), ("", "Mul")}
    with pytest.raises(TypeError):
        root_ops(Var("x"))


class _ExpLog(Rule):
    """Log(Exp(x)) -> x + 0 (an Add, so the rewrite has a node of its own)."""

    name = "exp-log"

    def pattern(self, op):
        return op.Log(op.Exp(Var("x")))

    def rewrite(self, b, m):
        return b.op("Add", m.x, b.const(np.zeros((), np.float32)))


def test_rule_refuses_escaping_intermediates_and_reports_a_near_miss():
    def build(b, x):
        e = b.op("Exp", x)
        return b.op("Add", b.op("Log", e), e)        # Exp is used outside the match
    g, _ = graph_with(build, (2,))
    misses = explain(g, [_ExpLog()])
    assert any("used elsewhere" in m.reason for m in misses)
    assert apply_rules(g, [_ExpLog()]) == {"exp-log": 0}


def test_rule_rewrites_and_values_hold():
    g, _ = graph_with(lambda b, x: b.op("Mul", b.op("Log", b.op("Exp", x)), x), (4,))
    x = np.array([0.5, -1.0, 2.0, 3.0], np.float32)
    before = evaluate(g, {"x0": x})
    assert apply_rules(g, [_ExpLog()]) == {"exp-log": 1}
    assert "Exp" not in g.op_histogram() and "Log" not in g.op_histogram()
    np.testing.assert_allclose(evaluate(g, {"x0": x})[g.outputs[0].name], before[g.outputs[0].name], rtol=1e-6)


def test_nodes_that_only_feed_the_match_are_absorbed():
    # Reshape(Exp(x), Shape(Exp(x))): the Shape reads the intermediate Exp but only feeds the
    # match, so the match is not refused and the Shape dies with it.
    class ReshapeExp(Rule):
        name = "reshape-exp"

        def pattern(self, op):
            return op.Reshape(op.Exp(Var("x")), ANY, allowzero=ANY)

        def rewrite(self, b, m):
            return b.op("Exp", m.x)

    def build(b, x):
        e = b.op("Exp", x)
        return b.op("Reshape", e, b.op("Shape", e))
    g, _ = graph_with(build, (2, 3))
    assert apply_rules(g, [ReshapeExp()]) == {"reshape-exp": 1}
    assert g.op_histogram() == {"Exp": 1}


def test_a_large_constant_is_never_read_to_compare_it():
    class Unread(LazyTensor):
        def _compute(self):
            raise AssertionError(f"weight {self.label} was read")

    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.float32, (5000,)))
    w = g.add_constant(Unread((5000,), np.float32, "w"), hint="w", is_param=True)
    g.outputs = [b.op("Mul", x, w)]
    with pytest.raises(NoMatch, match="is not 0.0"):
        Matcher(g).match(op.Mul(Var("x"), op.const(0.0)), root(g))
