"""Op traits live in the op table (tgraph/ir/traits.py) and say what the kernels do: a
commutative op's reference kernel gives the same result with its inputs swapped, an
elementwise unary op's kernel works element by element, and the pass-level op classes
(precision's, CSE's, the viewer's) are read from the table."""
import numpy as np
import pytest

from tgraph.ir.opdefs import OPS
from tgraph.ir.traits import TRAITS, has_trait, ops_with

RNG = np.random.default_rng(3)


def test_every_declared_trait_is_known_and_used():
    used = set().union(*(d.traits for d in OPS.values()))
    assert used == TRAITS
    with pytest.raises(KeyError, match="unknown op trait"):
        ops_with("commutatve")


@pytest.mark.parametrize("name", sorted(ops_with("commutative")))
def test_commutative_kernels_ignore_input_order(name):
    d = OPS[name]
    boolean = "comparison" in d.traits and name != "Equal"
    a, b = (RNG.random((3, 4)) > 0.5, RNG.random((1, 4)) > 0.5) if boolean else \
        (RNG.standard_normal((3, 4)).astype(np.float32), RNG.standard_normal((1, 4)).astype(np.float32))
    np.testing.assert_array_equal(d.kernel(a, b), d.kernel(b, a))


@pytest.mark.parametrize("name", sorted(n for n in ops_with("elementwise") if OPS[n].inputs == (1, 1)
                                        and not OPS[n].attrs and not OPS[n].domain))
def test_elementwise_unary_kernels_act_per_element(name):
    d = OPS[name]
    x = (RNG.random(6) > 0.5) if name == "Not" else np.abs(RNG.standard_normal(6)).astype(np.float32) + 0.1
    whole = np.asarray(d.kernel(x))
    parts = np.concatenate([np.asarray(d.kernel(x[i:i + 1])) for i in range(6)])
    np.testing.assert_array_equal(whole, parts)


def test_passes_read_their_op_classes_from_the_table():
    from tgraph.passes import cse, precision
    from tgraph.view import graph as view_graph

    assert cse.COMMUTATIVE == ops_with("commutative")
    assert precision.LAYOUT == ops_with("layout")
    assert precision.ELEMENTWISE.isdisjoint(ops_with("comparison") | ops_with("conversion"))
    assert view_graph.FUSED_OPS == ops_with("fused")
    assert has_trait("MatMulNBits", "fused", domain="com.microsoft") and not has_trait("MatMul", "fused")
    assert not has_trait("NoSuchOp", "elementwise")
