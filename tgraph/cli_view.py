"""`tgraph view`: a picture of a model's IR (SVG or HTML), or the ONNX file in Netron.

    tgraph view gpt2 -o gpt2.svg -O 2                 # fused ops highlighted, modules as clusters
    tgraph view ./ckpt -o ckpt.html --before-after    # -O0 beside -O2, layers open one at a time
    tgraph view model.onnx --netron                   # Netron on http://127.0.0.1:8080
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .errors import ConfigError

NETRON_PORT = 8080


def add_parsers(sub) -> None:
    p = sub.add_parser("view", help="draw a model's graph (SVG/HTML), or open an .onnx file in Netron",
                       description="Draw the IR after -O N with modules as nested clusters, fused ops highlighted "
                                   "(with the pass that made them) and shapes on edges. Needs Graphviz's `dot` "
                                   "(apt-get install graphviz).")
    p.set_defaults(handler=cmd_view)
    p.add_argument("model", metavar="MODEL_OR_ONNX", help="registered name, file.py:factory, checkpoint dir, or .onnx")
    p.add_argument("-o", "--output", default=None, help="picture to write: .svg or .html")
    p.add_argument("-O", dest="level", type=int, choices=[0, 1, 2, 3], default=None,
                   help="optimization level to draw (default 2; 0 = as built or as imported)")
    p.add_argument("--before-after", action="store_true", help="draw -O0 beside -O N, removed and created ops marked")
    p.add_argument("--no-shapes", action="store_true", help="leave the value types off the edges")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--seed", type=int, default=0, help="seed for random weight initialisation")
    p.add_argument("--netron", action="store_true", help="serve the ONNX file (a model: exported at -O N) with Netron "
                   "on localhost until Ctrl-C (pip install netron)")
    p.add_argument("--port", type=int, default=NETRON_PORT, help=f"--netron: the port (default {NETRON_PORT})")


def cmd_view(args) -> int:
    from .cli_args import parse_sets
    from .passes.manager import DEFAULT_LEVEL

    level = DEFAULT_LEVEL if args.level is None else args.level
    overrides = parse_sets(args.sets)
    if args.netron:
        if args.output or args.before_after:
            raise ConfigError("--netron shows the ONNX file itself: it takes no -o or --before-after")
        return _serve_netron(args.model, level, overrides, args.seed, args.port)
    if not args.output:
        raise ConfigError("tgraph view needs -o FILE.svg or -o FILE.html (or --netron)")
    from .view import view

    start = time.perf_counter()
    result = view(args.model, args.output, level=level, before_after=args.before_after, overrides=overrides,
                  seed=args.seed, shapes=not args.no_shapes)
    ops = f"{result.ops_before} -> {result.ops} ops" if result.ops_before is not None else f"{result.ops} ops"
    fused = " ".join(f"{k}={v}" for k, v in result.fusions.items()) or "none"
    print(f"wrote {result.path} ({ops}, -O{level}, fusions: {fused}, {time.perf_counter() - start:.2f}s)")
    return 0


def _serve_netron(source: str, level: int, overrides, seed: int, port: int) -> int:
    try:
        import netron
    except ImportError:
        raise ConfigError("--netron needs the netron package: pip install netron (or pip install 'tgraph[view]')") \
            from None
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {port}")
    with tempfile.TemporaryDirectory(prefix="tgraph-netron-") as tmp:
        if source.endswith(".onnx"):
            if not Path(source).is_file():
                raise ConfigError(f"ONNX file not found: {source}")
            path = source
        else:
            from .api import export_onnx

            path = str(Path(tmp) / "model.onnx")
            export_onnx(source, path, overrides=overrides, seed=seed, level=level)
        try:
            host, bound = netron.start(path, address=("127.0.0.1", port), browse=False)
        except OSError as e:
            raise ConfigError(f"--netron: cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None
        print(f"Netron is showing {source} at http://{host}:{bound} (Ctrl-C stops it)", flush=True)
        try:
            netron.wait()
        finally:
            netron.stop()
    return 0
