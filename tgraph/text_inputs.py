"""Text in, model feeds out; hidden states in, sentence embeddings out.

`text_feeds` tokenizes a batch of texts with the model's tokenizer.json the way Hugging Face
and sentence-transformers do (special tokens added, truncated to the model's length, no
padding from the file's own settings), pads the batch on the right with an attention mask,
and fills each text input the model declares by name: `input_ids`, `attention_mask`,
`token_type_ids` (zeros), `position_ids` (0, 1, ... per row). Any other input cannot come from
text and is refused by name. `pool` is sentence-transformers' Pooling (+ Normalize) module:
the masked mean or the first ([CLS]) token of a [batch, seq, hidden] output, then L2 norm.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError, InputError

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
HIDDEN_OUTPUTS = ("last_hidden_state", "hidden_states", "encoder_last_hidden_state")


def max_text_length(directory: Optional[Path], positions: Optional[int], tokenizer) -> Optional[int]:
    """Tokens per text: sentence-transformers' `max_seq_length` (sentence_bert_config.json), else
    the tokenizer.json's own truncation, else the model's positions; never more than the positions."""
    wanted = None
    config = directory / "sentence_bert_config.json" if directory is not None else None
    if config is not None and config.is_file():
        try:
            value = json.loads(config.read_text()).get("max_seq_length")
        except (OSError, ValueError, AttributeError):
            raise ConfigError(f"{config}: not a JSON object") from None
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"{config}: max_seq_length must be a positive int, got {value!r}")
        wanted = value
    if wanted is None:
        wanted = tokenizer.truncation_length()
    if positions is not None:
        wanted = positions if wanted is None else min(wanted, positions)
    return wanted


def read_text_file(path: str) -> List[str]:
    """One text per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--text-file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--text-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ConfigError(f"--text-file {path}: no text in it (one text per line)")
    return texts


def text_feeds(texts: Sequence[str], tokenizer, input_specs: Sequence[Tuple[str, object]],
               max_length: Optional[int], where: str) -> Tuple[Dict[str, np.ndarray], List[int]]:
    """(feeds, indices of the texts that were truncated) for `input_specs` = [(name, numpy dtype)]."""
    from .tokens import pad_batch

    names = [name for name, _ in input_specs]
    other = [n for n in names if n not in TEXT_INPUTS]
    if other:
        raise ConfigError(f"{where}: input {other[0]!r} cannot be made from text (text fills "
                          f"{', '.join(TEXT_INPUTS)}); give --inputs FILE.npz instead")
    if "input_ids" not in names:
        raise ConfigError(f"{where}: the model has no input_ids input, so it takes no text (its inputs: "
                          f"{', '.join(names)})")
    rows, truncated = tokenizer.encode_all(texts, max_length)
    if "attention_mask" not in names and len({len(r) for r in rows}) > 1:
        raise ConfigError(f"{where}: texts of different lengths need padding, and the model has no "
                          "attention_mask input; give one text at a time")
    ids, mask = pad_batch(rows, 0, "right")
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
              "position_ids": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()}
    dtypes = dict(input_specs)
    return {n: values[n].astype(dtypes[n] or np.int64) for n in names}, truncated


def hidden_output(outputs: Mapping[str, np.ndarray], where: str) -> str:
    """The [batch, seq, hidden] float output to pool: a standard name, else the only 3-D float one."""
    for name in HIDDEN_OUTPUTS:
        if name in outputs:
            return name
    cube = [n for n, a in outputs.items() if np.ndim(a) == 3 and np.asarray(a).dtype.kind == "f"]
    if len(cube) == 1 and "logits" not in cube:
        return cube[0]
    raise ConfigError(f"{where}: --pool needs an encoder's hidden states ([batch, seq, hidden], e.g. "
                      f"last_hidden_state); the outputs are {', '.join(outputs)}")


def pool(hidden: np.ndarray, mask: Optional[np.ndarray], how: str, normalize: bool) -> np.ndarray:
    """sentence-transformers' Pooling: masked mean (sum / max(count, 1e-9)) or the first token;
    then, with `normalize`, x / max(|x|, 1e-12) as torch.nn.functional.normalize. float32."""
    h = np.asarray(hidden, np.float32)
    if how == "cls":
        out = h[:, 0, :]
    elif how == "mean":
        m = np.ones(h.shape[:2], np.float32) if mask is None else np.asarray(mask, np.float32)
        if m.shape != h.shape[:2]:
            raise InputError(f"attention_mask {list(m.shape)} does not match the hidden states {list(h.shape)}")
        out = (h * m[:, :, None]).sum(axis=1) / np.maximum(m.sum(axis=1, keepdims=True), 1e-9)
    else:
        raise ConfigError(f"--pool must be mean or cls, got {how!r}")
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)
