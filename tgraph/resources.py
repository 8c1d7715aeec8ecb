"""Bounds before work: estimate what a config will need before building it, and refuse what cannot fit.

`n_layer: 1000000` would otherwise build a million blocks (minutes, gigabytes of Python objects)
before anything fails, and `--set vocab_size=10**11` would die in an allocation. The estimate
needs no per-family formula: building a module only declares its parameters (no arrays), so
tgraph builds the family at 1 and 2 of each `repeated` field (layers, groups; see
`models.config_checks`) at the real widths, and extrapolates multilinearly to the real counts
(exact for stacks of identical blocks, and for products such as ALBERT's groups x layers per group).

Needed memory = the float32 weights (the export materialises them) + a measured per-module
overhead for the modules, traced nodes and ONNX protos they become; available memory is
`tgraph.system_memory.available_memory`.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from .errors import ConfigError
from .models.config_checks import repeated_fields
from .system_memory import available_memory

# Measured on GPT-2 blocks (build + trace + -O2 + to_onnx): ~18 KiB of Python objects per module.
BYTES_PER_MODULE = 16 * 1024
BYTES_PER_PARAMETER = 4                # float32 weights, as built and as traced


@dataclass(frozen=True)
class Estimate:
    parameters: int
    modules: int
    largest: int                       # elements in the largest single parameter

    @property
    def bytes(self) -> int:
        return self.parameters * BYTES_PER_PARAMETER + self.modules * BYTES_PER_MODULE


def _probe(build, config: Any, values: Dict[str, int]) -> Tuple[int, int, int]:
    """(parameters, modules, largest) of the model built with `values` for its repeated fields.

    The probe skips the config's own validation (a probe such as ALBERT with more groups than
    layers is not a model anyone would run, but it has the right parameters)."""
    probe = copy.copy(config)
    for name, value in values.items():
        object.__setattr__(probe, name, value)
    model = build(probe)
    sizes = [math.prod(p.shape) for _, p in model.named_parameters()]
    return sum(sizes), sum(1 for _ in model.named_modules()), max(sizes, default=0)


def estimate(build, config: Any) -> Estimate:
    """Parameter and module counts of `build(config)`, from at most 2^k small probes (k repeated fields)."""
    fields = [f for f in repeated_fields(config) if getattr(config, f) is not None]
    target = {f: int(getattr(config, f)) for f in fields}
    base = {f: min(v, 1) for f, v in target.items()}
    varied = [f for f in fields if target[f] > base[f]]
    probes: Dict[Tuple[str, ...], Tuple[int, int, int]] = {}
    for n in range(len(varied) + 1):
        for subset in itertools.combinations(varied, n):
            probes[subset] = _probe(build, config, {**base, **{f: base[f] + 1 for f in subset}})
    totals = [0, 0]
    for subset in probes:
        # mixed finite difference over `subset`, times the product of the steps to the real counts
        delta = [0, 0]
        for k in range(len(subset) + 1):
            for inner in itertools.combinations(subset, k):
                sign = (-1) ** (len(subset) - k)
                delta = [d + sign * v for d, v in zip(delta, probes[inner][:2])]
        steps = math.prod(target[f] - base[f] for f in subset)
        totals = [t + d * steps for t, d in zip(totals, delta)]
    largest = max(p[2] for p in probes.values())
    return Estimate(max(totals[0], 0), max(totals[1], 0), largest)


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(family: Any, config: Any, label: str) -> Estimate:
    """ConfigError, saying how much is needed and how much is available, when `config` cannot fit."""
    est = estimate(family.build, config)
    room = available_memory()
    if room is not None and est.bytes > room:
        raise ConfigError(f"{label}: this {family.name} config needs about {gib(est.bytes)} of memory "
                          f"({est.parameters:,} parameters, {est.modules:,} modules) but only {gib(room)} is "
                          "available; reduce the sizes (layers, widths, vocabulary)")
    return est
