"""Greedy `generate` of a transformers-style model (HF eager or optimum's ORT model), timed per token.

A LogitsProcessor stamps the clock each time generate hands it the logits of a new position,
i.e. once per new token right after that token's forward pass; the prompt's pass gives the
first stamp, so prefill = first stamp - start. EOS is disabled (eos_token_id=None) so every
call emits exactly `new` tokens.
"""
from __future__ import annotations

from typing import List

from protocol import Stamps


def timed_generate(model, prompts: List[List[int]], new: int):
    import torch
    import transformers

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.stamp()
            return scores

    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts, dtype=torch.long)
    stamps = Stamps()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                             logits_processor=transformers.LogitsProcessorList([Stamp()]))
    stamps.finish()
    return out[:, ids.shape[1]:].tolist(), stamps
