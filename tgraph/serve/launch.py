"""`tgraph serve`: start (or join) Ray, run the application, stop cleanly.

A local Ray is started with the CPUs asked for, no dashboard and HTTP on --host (loopback
by default); with --address the application is deployed on that cluster instead. On
Ctrl-C, SIGTERM or after --duration seconds the application is deleted and, for a local
Ray, Serve and Ray are shut down: nothing is left running.
"""
from __future__ import annotations

import sys
import time

from ..errors import ConfigError, TgraphError

APP_NAME = "tgraph"
LOCAL_OBJECT_STORE = 200 << 20        # what a few tiny tensors in flight need; Ray's default is 30% of RAM


def _check(args) -> None:
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.replica_cpus < 0 or args.batch_wait_ms < 0:
        raise ConfigError("--replica-cpus and --batch-wait-ms must be >= 0")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be > 0 seconds, got {args.duration}")
    if args.address and args.num_cpus is not None:
        raise ConfigError("--num-cpus sizes a local Ray; an existing cluster (--address) has its own")


def serve_from_cli(args) -> int:
    from .models import named_models

    _check(args)
    models = named_models(args.models)                 # paths and kinds checked before Ray starts
    if not args.address:
        _check_port_free(args.host, args.port)
    try:
        import ray
        from ray import serve

        from .deployment import build_app
    except ImportError as e:
        raise ConfigError(f"tgraph serve needs Ray Serve: pip install 'tgraph[serve]' ({e})") from None
    local = not args.address
    if local:
        # address="local": a Ray of its own, never one some `ray start` left running; on loopback
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    _sigterm_unwinds_again()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(models, replicas=args.replicas, max_batch_size=args.max_batch_size,
                        batch_wait_s=args.batch_wait_ms / 1000.0, replica_cpus=args.replica_cpus,
                        threads=args.threads)
        start = time.perf_counter()
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False,
                      logging_config={"log_level": "WARNING", "enable_access_log": False})
        except RuntimeError as e:     # a replica failed to start: Ray's message ends with its cause
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise TgraphError(f"the Ray Serve application did not start: {lines[-1] if lines else e}") from None
        kinds = ", ".join(f"{n} ({'embeddings' if _kind(p) == 'encoder' else 'completions'})"
                          for n, p in models.items())
        print(f"serving {kinds} at http://{args.host}:{args.port} with {args.replicas} replica(s) on "
              f"{'a local Ray' if local else args.address} (ready in {time.perf_counter() - start:.1f}s; "
              f"{'stops after %gs' % args.duration if args.duration else 'Ctrl-C stops'})", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
        return 0
    finally:
        try:
            if not local:
                serve.delete(APP_NAME)      # a local Ray goes as a whole: its processes end with it
        finally:
            ray.shutdown()
        print("tgraph serve: stopped", file=sys.stderr, flush=True)


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the HTTP server will
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None


def _sigterm_unwinds_again() -> None:
    """ray.init replaces SIGTERM's handler with sys.exit; put back tgraph's (unwind like Ctrl-C,
    so the finally below shuts Serve and Ray down and the CLI exits 143)."""
    import signal
    import threading

    from ..interrupts import raise_terminated

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


def _kind(path: str) -> str:
    from .models import model_kind

    return model_kind(path)
