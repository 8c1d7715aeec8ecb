"""Every config key of a model family: its type, default and one-line meaning.

The meaning is read from the config dataclass's own source, so there is no second list
to drift from the code: the comment at the end of the field's line (continued on
comment-only lines aligned under it), else the comment lines just above the field.
Names that several families share with one meaning (`num_heads`, `vocab_size` ...) are
explained once, in `SHARED_MEANINGS`; a family's own comment then adds its specifics
(``token vocabulary size; bert-base-uncased``). `tgraph config MODEL` prints these; tests check
that every key of every family has a meaning and that each shared name is shared.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Tuple


#: One meaning for a field name that two or more families use in the same sense.
SHARED_MEANINGS: Dict[str, str] = {
    "vocab_size": "token vocabulary size (rows of the embedding)",
    "d_model": "width of the hidden states",
    "hidden_size": "width of the hidden states",
    "n_embd": "width of the hidden states",
    "num_heads": "attention heads per layer",
    "n_head": "attention heads per layer",
    "num_layers": "layers (blocks)",
    "n_layer": "layers (blocks)",
    "num_decoder_layers": "decoder blocks",
    "d_ff": "feed-forward (MLP) width",
    "intermediate_size": "feed-forward (MLP) width",
    "max_position_embeddings": "rows of the learned position table: the longest sequence",
    "n_positions": "rows of the learned position table: the longest sequence",
    "layer_norm_eps": "LayerNorm epsilon",
    "layer_norm_epsilon": "norm epsilon",
    "rope_theta": "rotary embedding base",
    "mlp_bias": "biases on the MLP projections",
    "tie_word_embeddings": "the LM head reuses the token embedding matrix",
}


@dataclass(frozen=True)
class ConfigKey:
    name: str
    type: str            # as written for `--set`: int, float, bool, str, "int or none" ...
    default: Any
    meaning: str


#: What `tgraph config` calls a field `--set` cannot write (a structure read from config.json).
CHECKPOINT_ONLY = "from config.json"


def type_name(annotation: Any) -> str:
    """``int``, ``bool``, ``int or none`` (Optional[int]) ..., as the CLI parses them;
    `CHECKPOINT_ONLY` for a structured field (RoPE scaling) that only a checkpoint sets."""
    if typing.get_origin(annotation) is typing.Union:
        if not all(a in (int, float, bool, str, type(None)) for a in typing.get_args(annotation)):
            return CHECKPOINT_ONLY
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(type_name(a) for a in args)
        return f"{text} or none" if len(args) < len(typing.get_args(annotation)) else text
    if annotation not in (int, float, bool, str):
        return CHECKPOINT_ONLY
    return annotation.__name__


def _comments(source: str) -> Dict[int, Tuple[int, str, bool]]:
    """{line: (column, text, alone)}: each comment, and whether it is alone on its line."""
    out: Dict[int, Tuple[int, str, bool]] = {}
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip(), False)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return {line: (col, text, line not in code_lines) for line, (col, text, _) in out.items()}


@lru_cache(maxsize=None)
def _class_field_docs(cls: type) -> Dict[str, str]:
    """The documented fields defined in `cls`'s own body (not inherited)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    import ast

    body = ast.parse(source).body[0].body
    comments = _comments(source)
    out: Dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        words: List[str] = []
        trailing = next((comments[n] for n in range(node.lineno, node.end_lineno + 1)
                         if n in comments and not comments[n][2]), None)
        if trailing is not None:
            words.append(trailing[1])
            line = node.end_lineno + 1
            while line in comments and comments[line][2] and comments[line][0] == trailing[0]:
                words.append(comments[line][1])
                line += 1
        else:                       # comment lines just above, indented as the field
            line = node.lineno - 1
            above: List[str] = []
            while line in comments and comments[line][2] and comments[line][0] == node.col_offset:
                above.insert(0, comments[line][1])
                line -= 1
            words = above
        text = " ".join(w for w in words if w)
        if text:
            out[node.target.id] = text
    return out


def field_docs(config_cls: type) -> Dict[str, str]:
    """{field: meaning} for every documented field, own or inherited (the nearest class wins)."""
    out: Dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_class_field_docs(klass))
    return out


def meaning(name: str, comment: str) -> str:
    """The shared meaning of `name` with the family's comment as its detail, else the comment."""
    shared = SHARED_MEANINGS.get(name)
    if shared is None:
        return comment
    return f"{shared}; {comment}" if comment and comment.lower() not in shared.lower() else shared


def config_keys(config_cls: type) -> List[ConfigKey]:
    """The keys `--set` accepts for `config_cls`, in declaration order."""
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    keys = []
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:       # type: ignore[misc]
            default = f.default_factory()                         # type: ignore[misc]
        else:
            default = None
        keys.append(ConfigKey(f.name, type_name(hints[f.name]), default, meaning(f.name, docs.get(f.name, ""))))
    return keys
