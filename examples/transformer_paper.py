"""The paper's Transformer (Vaswani et al. 2017) from Python: build, inspect, export, run.

    python examples/transformer_paper.py
"""
import tempfile
from pathlib import Path

import numpy as np

from tgraph.api import build
from tgraph.codegen.onnx import save_onnx
from tgraph.runtime import Session


def main() -> None:
    small = {"d_model": "256", "num_heads": "4", "d_ff": "1024", "num_encoder_layers": "2",
             "num_decoder_layers": "2", "vocab_size": "8000"}
    unoptimised = build("transformer", small, level=0)
    optimised = build("transformer", small, level=2)
    print("as built:", unoptimised.graph.op_histogram())
    print("-O2:     ", optimised.graph.op_histogram())
    with tempfile.TemporaryDirectory() as tmp:
        path = save_onnx(optimised.graph, Path(tmp) / "transformer.onnx")
        session = Session(path)
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(0, 8000, (2, 12)), "decoder_input_ids": rng.integers(0, 8000, (2, 7)),
                 "attention_mask": np.ones((2, 12), np.int64)}
        logits = session.run(feeds)["logits"]
        print(f"logits {logits.shape} on {session.providers[0]}; next tokens: {logits[:, -1].argmax(-1)}")


if __name__ == "__main__":
    main()
