"""Contender: Hugging Face transformers, PyTorch eager on the CPU (the checkpoint as saved)."""
from __future__ import annotations

import protocol
from hf_generate import timed_generate


def load(checkpoint: str, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, {"torch": torch.__version__, "transformers": transformers.__version__,
                   "threads": torch.get_num_threads()}


if __name__ == "__main__":
    protocol.serve(load, timed_generate)
