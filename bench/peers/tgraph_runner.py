"""Contender: tgraph's `tgraph.generate.Generator`, from whichever tgraph the running python imports.

`source` is a checkpoint directory (today's engine traces, optimises and exports it in the
process: that is its build time) or a generation directory written by
`tgraph export CKPT --task generate -o DIR` (the new engine only reads it).
"""
from __future__ import annotations

import os

import protocol


def load(source: str, threads: int, level=None, options=None):
    """`options`: extra Generator keyword arguments from --tgraph-option."""
    import tgraph
    from tgraph.generate import Generator

    kwargs = {"provider": "cpu", "threads": threads, "eos_token_id": None, "pad_token_id": 0}
    if level is not None:
        kwargs["level"] = int(level)
    kwargs.update(options or {})
    gen = Generator(source, **kwargs)
    return gen, {"tgraph": os.path.dirname(tgraph.__file__), "provider": str(getattr(gen, "provider", "")),
                 "build_seconds": getattr(gen, "build_seconds", None), "options": options or {}}


def run(gen, prompts, new: int):
    stamps = protocol.Stamps()
    result = gen.generate(prompts, max_new_tokens=new, callback=stamps.stamp)
    stamps.finish()
    return [list(map(int, row)) for row in result.ids], stamps


if __name__ == "__main__":
    protocol.serve(load, run)
