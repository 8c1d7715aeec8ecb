"""`tgraph deploy triton ...` and `tgraph serve ...`: handing models to serving engines.

    tgraph deploy triton MODEL_OR_DIR -o REPO [--name NAME] [--max-batch-size B] [--instances K]
                         [--kind cpu|gpu] [--dynamic-batching]
    tgraph serve MODEL_OR_DIR [MORE ...] [--replicas N] [--port P] [--address RAY_ADDRESS]
                 [--max-batch-size B]

See `tgraph.deploy.triton` and `tgraph.serve`.
"""
from __future__ import annotations

import argparse
import time

from .errors import ConfigError


def add_parsers(sub) -> None:
    p = sub.add_parser("deploy", help="write a serving engine's model repository")
    p.set_defaults(handler=cmd_deploy)
    engines = p.add_subparsers(dest="engine", required=True)
    t = engines.add_parser("triton", help="a Triton Inference Server model repository (onnxruntime backend)")
    t.add_argument("model", metavar="MODEL_OR_DIR", help=".onnx file, generation directory, or a model tgraph builds")
    t.add_argument("-o", "--output", required=True, metavar="REPO", help="the model repository (created if missing)")
    t.add_argument("--name", default=None, help="model name (and directory); default from MODEL_OR_DIR")
    t.add_argument("--max-batch-size", type=int, default=None,
                   help="Triton's max_batch_size (default 8 when the graph has a batch axis, else 0)")
    t.add_argument("--instances", type=int, default=1, help="instance_group count")
    t.add_argument("--kind", choices=["cpu", "gpu"], default="cpu", help="instance_group kind")
    t.add_argument("--dynamic-batching", action="store_true", help="let Triton batch requests (preferred sizes)")
    t.add_argument("--cuda-graphs", action="store_true", help=argparse.SUPPRESS)
    t.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="config override for a model tgraph builds")

    s = sub.add_parser("serve", help="serve models over HTTP with Ray Serve")
    s.set_defaults(handler=cmd_serve)
    s.add_argument("models", nargs="+", metavar="MODEL_OR_DIR",
                   help="an encoder .onnx (or a directory with model.onnx) or a generation directory; several "
                        "are served side by side, chosen by the request's \"model\"")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="HTTP address (default loopback only)")
    s.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local Ray)")
    s.add_argument("--max-batch-size", type=int, default=8, help="requests per @serve.batch call")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    s.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    s.add_argument("--threads", type=int, default=None, help="onnxruntime threads per replica")
    s.add_argument("--num-cpus", type=int, default=None, help="local Ray only: CPUs it may use (default all)")
    s.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")


def cmd_deploy(args) -> int:
    from .cli_args import parse_sets as _parse_sets
    from .deploy.triton import write_triton_repository

    if args.cuda_graphs:
        raise ConfigError("--cuda-graphs: Triton's onnxruntime backend does not capture CUDA graphs "
                          "(optimization.cuda.graphs is TensorRT-only, and onnxruntime's enable_cuda_graph needs "
                          "I/O at fixed addresses, which Triton does not give); not written")
    start = time.perf_counter()
    result = write_triton_repository(args.model, args.output, name=args.name, max_batch_size=args.max_batch_size,
                                     instances=args.instances, kind=args.kind,
                                     dynamic_batching=args.dynamic_batching, overrides=_parse_sets(args.sets))
    print(f"wrote Triton models {', '.join(result['models'])} in {args.output} "
          f"(config.pbtxt checked: {result['checked_with']}, {time.perf_counter() - start:.2f}s)")
    return 0


def cmd_serve(args) -> int:
    from .serve.launch import serve_from_cli

    return serve_from_cli(args)

