"""Every fusion rule in tgraph.passes is written for the one pattern engine: a `pattern`,
a `check` and a `rewrite`. None overrides the matcher (`match`) or gives a list of
`patterns`: what a rule accepts must be readable in its pattern."""
import pytest

import tgraph.passes  # noqa: F401  (registers every pass, importing each rule's module)
from tgraph.passes.base import PASSES
from tgraph.passes.pattern import OpBuilder, RewritePass, Rule, root_ops

def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


RULES = sorted({c for c in _subclasses(Rule) if c.__module__.startswith("tgraph.passes.")},
               key=lambda c: (c.__module__, c.__name__))


#: The rule objects the registered passes apply (a rule may take constructor options).
INSTANCES = {}
for _cls in PASSES.values():
    if issubclass(_cls, RewritePass):
        for _r in _cls().rules():
            INSTANCES.setdefault(type(_r), []).append(_r)


def test_rules_are_found_and_every_one_is_applied_by_a_registered_pass():
    names = {c.__name__ for c in RULES}
    assert {"AttentionRule", "MergedHeadsRule", "ExplicitCausalRule", "RotaryRule", "SoftmaxRule", "LayerNormRule",
            "RMSNormRule", "GeluRule", "SkipNormRule"} <= names, names
    assert set(RULES) <= set(INSTANCES), sorted(c.__name__ for c in set(RULES) - set(INSTANCES))


@pytest.mark.parametrize("rule", RULES, ids=[f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}" for c in RULES])
def test_rule_is_one_pattern_without_a_hand_matcher(rule):
    own = [c for c in rule.__mro__ if c not in (Rule, object)]
    assert not any("match" in vars(c) for c in own), f"{rule.__name__} overrides match"
    assert not any("patterns" in vars(c) for c in own), f"{rule.__name__} defines patterns"
    assert any("pattern" in vars(c) for c in own), f"{rule.__name__} has no pattern"
    for instance in INSTANCES.get(rule, []):
        assert root_ops(instance.pattern(OpBuilder()))      # one pattern: an op or an Or of ops
