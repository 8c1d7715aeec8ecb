"""Argument parsing shared by every `tgraph` subcommand (no command runs here).

* `TgraphParser`: argparse that reports a usage mistake as one line, ``tgraph: error: ...``,
  with "did you mean" from the names that exist (subcommands, flags, choices).
* Global flags (`--debug`, `--verbose`, `--quiet`, `--print-ir-after-all`) are accepted before
  or after the subcommand: `add_global_flags` puts them on the top parser and on every
  subparser, so a command reads them as `args.debug`, `args.verbose`, `args.quiet`.
* `parse_sets`: ``--set key=value`` pairs.

Subcommand modules (cli_generate, cli_info ...) import from here, never from `tgraph.cli`,
which imports them: so the command line has no import circle.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Dict, List, Optional, Sequence

from .errors import ConfigError
from .suggest import close_matches

EXIT_USAGE = 2

#: (flags, help) of the options every subcommand accepts, anywhere on the command line.
GLOBAL_FLAGS = (
    (("--debug",), "show the Python traceback of an error"),
    (("-v", "--verbose"), "say more: e.g. why CUDA is not used"),
    (("-q", "--quiet"), "print only results and errors (no notes, no progress bars)"),
    (("--print-ir-after-all",), "print the IR before the first pass and after every pass (to stderr)"),
)


def parse_sets(items: Optional[List[str]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_dims(text: Optional[str]) -> Dict[str, int]:
    dims = {"batch": 1, "seq": 8, "decoder_seq": 8}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) <= 0:
            raise ConfigError(f"--dims expects name=positive_int[,...], got {item!r}")
        dims[key.strip()] = int(value)
    return dims


def _given_dim_names(text: Optional[str]) -> List[str]:
    return [item.partition("=")[0].strip() for item in (text or "").split(",") if item.strip()]


def check_dims(text: Optional[str], declared: List[tuple]) -> None:
    """Every dim named in --dims must be a symbolic dim of the model's inputs (else it would be ignored)."""
    known = sorted({d for shape in declared for d in (shape or ()) if isinstance(d, str)})
    unknown = [n for n in _given_dim_names(text) if n not in known]
    if unknown:
        raise ConfigError(f"--dims: the model has no dim {unknown[0]!r} (its inputs' dims are "
                          f"{', '.join(known) or 'all static'})")


def level_of(args) -> int:
    """The -O level a command runs at: the one given, else the API's default."""
    from .passes.manager import DEFAULT_LEVEL

    return DEFAULT_LEVEL if args.level is None else args.level


def provider_text(session, args) -> str:
    """The provider a command ran on, in a few words, for its result line. Why CUDA is not
    used is one note on stderr with `--verbose` (and `tgraph doctor` says what is missing)."""
    reason = session.fallback_reason()
    if reason and getattr(args, "verbose", False):
        print(f"tgraph: note: CUDA not used: {reason}", file=sys.stderr)
    return session.describe(verbose=False, hint="" if getattr(args, "verbose", False) else "--verbose says why")


def add_global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """The global flags, on the top parser (default False) or a subparser (no default, so a
    flag given before the subcommand is not reset by the subparser). A flag a subcommand
    already defines for itself is left to it."""
    for flags, help_text in GLOBAL_FLAGS:
        if any(f in parser._option_string_actions for f in flags):
            continue
        parser.add_argument(*flags, action="store_true", help=help_text,
                            default=False if top else argparse.SUPPRESS)


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def add_global_flags_everywhere(parser: argparse.ArgumentParser) -> None:
    """`add_global_flags` on `parser` and on every (nested) subparser."""
    add_global_flags(parser, top=True)
    stack = list(_subparsers(parser).values())
    while stack:
        p = stack.pop()
        add_global_flags(p, top=False)
        stack.extend(_subparsers(p).values())


def _option_candidates(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """What a mistyped flag may have meant: each long option, and each choice of an option
    (``fp16`` -> ``--dtype float16``), keyed by the text to compare with."""
    out: Dict[str, str] = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.help == argparse.SUPPRESS:
            continue
        for s in longs:
            out.setdefault(s[2:], s)
        for choice in action.choices or ():
            if isinstance(choice, str):          # not numbers: `--fp16` is no `--block-size 16`
                out.setdefault(choice, f"{longs[0]} {choice}")
    return out


def _model_names() -> List[str]:
    from .models import MODELS

    return sorted(MODELS)


def _config_key_names() -> set:
    from .models import MODELS

    return {f.name for family in MODELS.values() for f in dataclasses.fields(family.config_cls)}


def suggest_flag(word: str, parser: argparse.ArgumentParser) -> str:
    """``" (did you mean --dtype float16?)"`` for an unknown flag such as ``--fp16``, or ``""``."""
    name, _, value = word.partition("=")
    name = name.lstrip("-")
    if not name:
        return ""
    if "--set" in parser._option_string_actions and name.replace("-", "_") in _config_key_names():
        key = name.replace("-", "_")
        return f" (did you mean --set {key}={value or 'VALUE'}? `tgraph config MODEL` lists a model's keys)"
    candidates = _option_candidates(parser)
    best = close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean {candidates[best[0]]}?)" if best else ""


_INVALID_CHOICE = re.compile(r"invalid choice: '?(?P<word>[^']*?)'? \(choose from (?P<choices>.*)\)$")


class TgraphParser(argparse.ArgumentParser):
    """One-line usage errors with suggestions; `--help` stays argparse's. Flags are never
    abbreviated (`--max-new-token` is an error with a suggestion, not `--max-new-tokens`): a
    prefix that is unique today would silently change meaning when a flag is added. Subparsers
    are made by `add_parser`, which uses this class, so every (nested) subcommand inherits it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        m = _INVALID_CHOICE.search(message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group("choices")) or [c.strip() for c in m.group("choices").split(",")]
            best = close_matches(m.group("word"), choices, n=1, cutoff=0.5)
            if best:
                message += f"; did you mean {best[0]!r}?"
            elif self.prog == "tgraph":                    # `tgraph gtp2`: a model where a command goes
                model = close_matches(m.group("word"), _model_names(), n=1)
                if model:
                    message += f"; {m.group('word')!r} looks like the model {model[0]!r}: give a command first, " \
                               f"e.g. `tgraph run {model[0]}`"
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        print(f"tgraph: error: {where}{message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        """As argparse, but unknown flags are named with a suggestion from the subcommand's own flags."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            target = self._chosen_subparser(parsed)
            flag = next((e for e in extras if e.startswith("-")), None)
            hint = suggest_flag(flag, target) if flag else ""
            target.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def _chosen_subparser(self, parsed) -> argparse.ArgumentParser:
        parser = self
        while True:
            subs = _subparsers(parser)
            dest = next((a.dest for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            name = getattr(parsed, dest, None) if dest else None
            if name not in subs:
                return parser
            parser = subs[name]
