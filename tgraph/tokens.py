"""Token-level plumbing for generation: special token ids, the tokenizer, prompt batches.

Special ids (eos, pad, bos, decoder start) come from what the user passes, else from the
checkpoint's `generation_config.json` over its `config.json` (as Hugging Face reads them),
else from the model config's own fields. Text needs a `tokenizer.json` (the `tokenizers`
library, imported only when one is used). Prompts of different lengths are padded with an
attention mask: on the left for a decoder-only model (new tokens must follow every row's last
real token), on the right for an encoder's input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ConfigError, InputError

SPECIAL = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id")
UNSET: Any = object()      # "not given" (None means "there is none")


@dataclass(frozen=True)
class SpecialTokens:
    eos: Tuple[int, ...] = ()                 # any of these ends a row
    pad: int = 0                              # fills prompts and finished rows
    bos: Optional[int] = None                 # explicit: prepended to decoder-only prompts
    decoder_start: Optional[int] = None       # first decoder token of an encoder-decoder


def _ids_of(value: Any, key: str, where: str) -> Tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in items):
        raise ConfigError(f"{where}: {key} must be a non-negative int (or a list of them), got {value!r}")
    return tuple(int(v) for v in items)


def checkpoint_special_ids(directory: Union[str, Path]) -> dict:
    """{key: value} for the special ids a checkpoint directory names (generation_config wins)."""
    from .checkpoints import checkpoint_file, read_json_file

    found: dict = {}
    for name in ("config.json", "generation_config.json"):
        path = checkpoint_file(Path(directory), name)
        if not path.is_file():
            continue
        data = read_json_file(path)
        found.update({k: data[k] for k in SPECIAL if isinstance(data, dict) and k in data})
    return found


def resolve_special_tokens(given: Mapping[str, Any], checkpoint: Mapping[str, Any], config: Any = None
                           ) -> SpecialTokens:
    """Given ids (UNSET = not given) over the checkpoint's over the model config's.

    pad falls back to the first eos id (as Hugging Face's generate does), then 0; the
    decoder start to the bos id, then pad. An explicit bos is kept apart: only it is prepended.
    """
    def pick(key):
        if given.get(key, UNSET) is not UNSET:
            return _ids_of(given[key], key, "argument")
        if key in checkpoint:
            return _ids_of(checkpoint[key], key, "checkpoint config")
        return _ids_of(getattr(config, key, None), key, "model config")

    eos, pad, bos, start = (pick(k) for k in SPECIAL)
    pad_id = pad[0] if pad else (eos[0] if eos else 0)
    explicit_bos = bos if given.get("bos_token_id", UNSET) is not UNSET else ()
    return SpecialTokens(eos=eos, pad=pad_id, bos=explicit_bos[0] if explicit_bos else None,
                         decoder_start=start[0] if start else (bos[0] if bos else pad_id))


# ------------------------------------------------------------------ tokenizer
class TextTokenizer:
    """A `tokenizers.Tokenizer` read from a tokenizer.json: text <-> ids."""

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"no tokenizer: {path} does not exist")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("text prompts need the `tokenizers` package (pip install tokenizers)") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises bare Exceptions for malformed files
            raise ConfigError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self.path = path
        # Hugging Face's fast tokenizer applies the file's padding and truncation only when a call
        # asks for them; so do we (a sentence-transformers tokenizer.json pads every text to 128
        # with [PAD] ids that would count as prompt tokens). Padding is done with masks, elsewhere.
        settings = self._tok.truncation
        self._file_truncation = int(settings["max_length"]) if settings and settings.get("max_length") else None
        self._tok.no_padding()
        self._tok.no_truncation()

    def encode(self, text: str) -> list:
        return list(self._tok.encode(text).ids)

    def encode_all(self, texts: Sequence[str], max_length: Optional[int] = None) -> Tuple[list, list]:
        """(ids of each text, indices of those cut to `max_length`): special tokens added, never
        padded (the caller pads, with a mask), as Hugging Face's fast tokenizer called with
        truncation=True, max_length=max_length."""
        if max_length is not None:
            self._tok.enable_truncation(int(max_length))
        try:
            encodings = self._tok.encode_batch(list(texts))
        finally:
            self._tok.no_truncation()
        return [list(e.ids) for e in encodings], [i for i, e in enumerate(encodings) if e.overflowing]

    def truncation_length(self) -> Optional[int]:
        """The max_length the tokenizer.json itself truncates to, if it sets one."""
        return self._file_truncation

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Text of one row's tokens as they arrive, in pieces that never split a character.

    A byte-level BPE token can hold part of a UTF-8 character ("é" is two tokens, an
    emoji up to four): decoding the ids so far and printing what is new would print
    U+FFFD for the half character, and never take it back. `tokenizers`' DecodeStream
    holds such bytes until the character is complete. `step` returns the new text ("" while
    a character is incomplete); `finish` returns what is still held when the row ends (an
    incomplete character then decodes as the full decode does), so the pieces always add
    up to `TextTokenizer.decode` of all the ids.
    """

    def __init__(self, tokenizer: TextTokenizer):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list = []
        self._shown = ""

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        piece = self._stream.step(self._tokenizer._tok, int(token_id)) or ""
        self._shown += piece
        return piece

    def finish(self) -> str:
        """What the pieces so far lack of the full decode (held bytes of an unfinished character)."""
        full = self._tokenizer.decode(self._ids)
        rest = full[len(self._shown):] if full.startswith(self._shown) else ""
        self._shown += rest
        return rest


def find_tokenizer(model: str) -> Optional[TextTokenizer]:
    """The tokenizer.json of a checkpoint directory, if it has one."""
    if not Path(model).is_dir():
        return None
    from .checkpoints import checkpoint_file

    path = checkpoint_file(Path(model), "tokenizer.json")
    return TextTokenizer(path) if path.is_file() else None


# ------------------------------------------------------------------ prompts
def normalise_prompts(prompts: Any, tokenizer: Optional[TextTokenizer]) -> list:
    """A str, a list of ids, or a list of either -> a list of id lists (one per row)."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)                                     # a [batch, seq] array: equal rows
    if isinstance(prompts, (str, np.ndarray)) or (isinstance(prompts, (list, tuple)) and prompts
                                                   and all(isinstance(t, (int, np.integer)) for t in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError("no prompt: give a text, a list of token ids, or a list of either")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise InputError(f"prompt {i} is text, but the model has no tokenizer.json "
                                 "(give token ids instead, e.g. --prompt-ids 1,2,3)")
            p = tokenizer.encode(p)
        ids = np.asarray(p)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise InputError(f"prompt {i}: expected a flat list of integer token ids, got {p!r}")
        rows.append([int(t) for t in ids])
    return rows


def check_ids(rows: Sequence[Sequence[int]], vocab_size: Optional[int]) -> None:
    for i, row in enumerate(rows):
        bad = [t for t in row if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise InputError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
                             if vocab_size is not None else f"prompt {i}: token id {bad[0]} is negative")


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> Tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask), both int64 [batch, longest]; `side` "left" or "right"."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, np.int64)
    mask = np.zeros((len(rows), longest), np.int64)
    for i, row in enumerate(rows):
        cols = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[i, cols] = row
        mask[i, cols] = 1
    return ids, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Hugging Face's positions for a padded batch: cumsum(mask) - 1, pads at 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
