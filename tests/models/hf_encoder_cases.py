"""Tiny Hugging Face encoders (BERT, RoBERTa, ALBERT) saved as checkpoints, with their references.

Every parameter is re-randomised before saving (HF initialises LayerNorms to 1/0 and
biases to 0), so a swapped, untransposed or unused tensor cannot hide. Inputs are a
batch of two rows, the second right-padded (attention_mask 0 and the pad token id on
its tail), with random segment ids when the model has segments.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

# Our output name -> HF output attributes to try, in order.
HF_OUTPUTS = {
    "last_hidden_state": ("last_hidden_state",),
    "pooler_output": ("pooler_output",),
    "logits": ("logits", "prediction_logits"),
    "seq_relationship_logits": ("seq_relationship_logits",),
    "sop_logits": ("sop_logits",),
}


@dataclass
class Spec:
    config_cls: Any
    model_cls: Any
    kwargs: Dict[str, Any]
    outputs: Tuple[str, ...]          # our output names, compared with HF's (see HF_OUTPUTS)


def randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "LayerNorm" in name or "layer_norm" in name
            if norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


class HFCase:
    def __init__(self, name: str, spec: Spec, directory: Path):
        torch.manual_seed(0)
        self.name, self.spec, self.dir = name, spec, directory
        self.hf_config = spec.config_cls(**spec.kwargs, attn_implementation="eager")
        self.model = spec.model_cls(self.hf_config).eval()
        randomize(self.model)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.vocab = self.hf_config.vocab_size
        self.pad = self.hf_config.pad_token_id
        self.type_vocab = self.hf_config.type_vocab_size

    def inputs(self, lengths: Sequence[int] = (9, 5), seed: int = 1) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        seq = max(lengths)
        ids = np.full((len(lengths), seq), self.pad, np.int64)
        mask = np.zeros_like(ids)
        tokens = np.array([t for t in range(self.vocab) if t != self.pad])
        for row, n in enumerate(lengths):
            ids[row, :n] = rng.choice(tokens, size=n)
            mask[row, :n] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.type_vocab > 1:
            feeds["token_type_ids"] = rng.integers(0, self.type_vocab, size=ids.shape).astype(np.int64)
        return feeds

    def reference(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        ref = {}
        for ours in self.spec.outputs:
            attr = next(a for a in HF_OUTPUTS[ours] if getattr(out, a, None) is not None)
            ref[ours] = getattr(out, attr).numpy()
        return ref

    def hf_parameter_count(self) -> int:
        return self.model.num_parameters()

    # ---- edited copies of the checkpoint, for the strict-loading tests
    def copy(self, dest: Path, edit_weights=None, edit_config=None) -> Path:
        shutil.copytree(self.dir, dest)
        if edit_weights is not None:
            weights = load_file(str(dest / "model.safetensors"))
            edit_weights(weights)
            save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
        if edit_config is not None:
            config = json.loads((dest / "config.json").read_text())
            edit_config(config)
            (dest / "config.json").write_text(json.dumps(config))
        return dest


def cache(tmp_path_factory, specs: Dict[str, Spec]):
    """A module-scoped getter: each case is built and saved once, on first use."""
    made: Dict[str, HFCase] = {}

    def get(name: str) -> HFCase:
        if name not in made:
            made[name] = HFCase(name, specs[name], tmp_path_factory.mktemp(name))
        return made[name]
    return get


def row_outputs(outs: Dict[str, np.ndarray], row: int, n: int) -> Dict[str, np.ndarray]:
    """Row `row` of each output, cut to its first n tokens where the output has a token axis."""
    return {k: v[row, :n] if v.ndim == 3 else v[row] for k, v in outs.items()}


def single_row(feeds: Dict[str, np.ndarray], row: int, n: int) -> Dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[row:row + 1, :n]) for k, v in feeds.items()}


def onnx_parameter_elements(model, names) -> Tuple[int, int]:
    """(number of initializers named like our parameters, their total element count)."""
    names = set(names)
    inits = [t for t in model.graph.initializer if t.name in names]
    return len(inits), int(sum(np.prod(t.dims, dtype=np.int64) for t in inits))
