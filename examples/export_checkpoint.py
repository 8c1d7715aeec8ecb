"""Export a Hugging Face checkpoint directory end to end, and check it against transformers.

Nothing is downloaded: a small GPT-2 is random-initialised from a config and saved with
`save_pretrained` (as a real checkpoint directory would be), then tgraph loads it
(safetensors, strict name/shape checks), optimises it, writes ONNX and the NumPy module,
and runs both next to the PyTorch reference.

    python examples/export_checkpoint.py [OUT_DIR]

Needs the test extra (torch, transformers): pip install -e ".[test]".
The same export from the command line: tgraph export OUT_DIR/gpt2-small -o gpt2.onnx
"""
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(out_dir: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tgraph.api import build
    from tgraph.codegen.numpy import load_numpy_module, write_numpy_module
    from tgraph.codegen.onnx import save_onnx
    from tgraph.runtime import Session
    from tgraph.sources import load_model

    ckpt = out_dir / "gpt2-small"
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=1000, n_positions=256)).eval()
    hf.save_pretrained(ckpt, safe_serialization=True)
    print(f"saved a random GPT-2 checkpoint to {ckpt}")

    loaded = load_model(str(ckpt))                       # config.json + model.safetensors -> DSL module
    built = build(loaded, level=2)
    print(built.report)
    onnx_path = save_onnx(built.graph, out_dir / "gpt2.onnx")
    py_path = write_numpy_module(built.graph, out_dir / "gpt2_numpy.py")

    ids = np.array([[15, 7, 311, 42, 9]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    session = Session(onnx_path)
    ort_logits = session.run(feeds)["logits"]
    np_logits = load_numpy_module(py_path).run(feeds)["logits"]
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    print(f"onnxruntime on {session.providers[0]}: max |ORT - torch| = {np.abs(ort_logits - ref).max():.2e}")
    print(f"generated NumPy module:  max |NumPy - torch| = {np.abs(np_logits - ref).max():.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
