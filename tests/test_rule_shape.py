"""Every fusion rule is one pattern + check + rewrite in the one engine (tgraph issue 11).

No rule lists spelling variants (`patterns`) or matches by hand (`match`): the spellings
`canonicalize` does not bring together are `Or`/`optional` inside the one `pattern`.
"""
import inspect

import pytest

from tgraph.passes import fuse_elementwise, ort_fusions
from tgraph.passes.pattern import CompiledRule, OpBuilder, Or, OpPat, RewritePass, Rule

MODULES = (fuse_elementwise, ort_fusions)


def _rule_classes():
    return [c for m in MODULES for _, c in inspect.getmembers(m, inspect.isclass)
            if issubclass(c, Rule) and c is not Rule and c.__module__ == m.__name__]


def _rules():
    """The rule instances the modules' passes apply."""
    return [r for m in MODULES for _, p in inspect.getmembers(m, inspect.isclass)
            if issubclass(p, RewritePass) and p is not RewritePass and p.__module__ == m.__name__
            for r in p().rules()]


def test_the_modules_have_rules_and_every_one_is_applied_by_a_pass():
    classes = _rule_classes()
    assert {c.__name__ for c in classes} >= {"SoftmaxRule", "LayerNormRule", "RMSNormRule", "GeluRule", "SkipNormRule"}
    assert {type(r) for r in _rules()} == set(classes)


@pytest.mark.parametrize("cls", _rule_classes(), ids=lambda c: c.__name__)
def test_rule_defines_one_pattern_and_no_hand_matching(cls):
    below_rule = cls.__mro__[: cls.__mro__.index(Rule)]
    assert sum("pattern" in k.__dict__ for k in below_rule) == 1, f"{cls.__name__} must define `pattern` once"
    for forbidden in ("patterns", "match"):
        assert not any(forbidden in k.__dict__ for k in below_rule), f"{cls.__name__} defines `{forbidden}`"


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r.name)
def test_rule_pattern_is_one_pattern_object(rule):
    p = rule.pattern(OpBuilder())
    assert isinstance(p, (OpPat, Or)), f"{rule.name}: pattern() returned {type(p).__name__}"
    compiled = CompiledRule.of(rule)                # not the hand-matcher transition path
    assert compiled.pattern is not None and compiled.roots, rule.name
