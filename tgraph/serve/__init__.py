"""Serving tgraph models with Ray Serve (`pip install 'tgraph[serve]'`).

    tgraph serve MODEL_OR_DIR [MORE ...] [--replicas N] [--port P] [--address RAY_ADDRESS]

`TgraphServer` (the deployment class), `build_app` and `app` (a builder for Ray's own
`serve run tgraph.serve:app models=...`) come from `tgraph.serve.deployment` and need Ray;
`tgraph.serve.models` and `tgraph.serve.requests` (the models and the request checks) do not.
"""
_RAY_NAMES = ("TgraphServer", "build_app", "app")


def __getattr__(name):
    if name in _RAY_NAMES:
        try:
            from . import deployment
        except ImportError as e:
            raise ImportError(f"tgraph.serve.{name} needs Ray Serve: pip install 'tgraph[serve]' ({e})") from None
        return getattr(deployment, name)
    raise AttributeError(f"module 'tgraph.serve' has no attribute {name!r}")


__all__ = list(_RAY_NAMES)
