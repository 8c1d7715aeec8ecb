"""Contender: optimum's ORTModelForCausalLM over its own `optimum-cli export onnx` directory."""
from __future__ import annotations

import protocol
from hf_generate import timed_generate


def load(model_dir: str, threads: int):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(model_dir, provider="CPUExecutionProvider",
                                                session_options=options)
    import optimum.version
    return model, {"onnxruntime": ort.__version__, "optimum": optimum.version.__version__,
                   "use_io_binding": bool(getattr(model, "use_io_binding", False))}


if __name__ == "__main__":
    protocol.serve(load, timed_generate)
