"""Contender: onnxruntime-genai's Generator loop over its model builder's directory.

Prefill is everything up to the first chosen token: GeneratorParams, Generator (it allocates
the shared past/present buffers for max_length), append_tokens (runs the prompt) and the first
generate_next_token (picks the token). Every later generate_next_token runs one decode step.
EOS: genai refuses an eos id outside the vocabulary, so EOS is disabled its own way, with
min_length = max_length (every row emits exactly `new` tokens; if a contender's greedy pick
were the EOS id, genai's ids would differ from the others' and the harness reports it).
"""
from __future__ import annotations

import json

import protocol


def load(model_dir: str, threads: int):
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    config.clear_providers()            # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    import onnxruntime
    return og.Model(config), {"onnxruntime_genai": og.__version__, "onnxruntime": onnxruntime.__version__}


def run(model, prompts, new: int):
    import numpy as np
    import onnxruntime_genai as og

    ids = np.asarray(prompts, dtype=np.int32)
    batch, length = ids.shape
    stamps = protocol.Stamps()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length + new, min_length=length + new, do_sample=False,
                              batch_size=batch)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    for _ in range(new):
        generator.generate_next_token()
        stamps.stamp()
    stamps.finish()
    return [generator.get_sequence(row)[length:].tolist() for row in range(batch)], stamps


if __name__ == "__main__":
    protocol.serve(load, run)
