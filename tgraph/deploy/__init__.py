"""Handing tgraph's artifacts to serving engines that run beyond one process.

`tgraph.deploy.triton` writes NVIDIA Triton Inference Server model repositories;
`tgraph.deploy.triton_check` checks one against Triton's rules. (Ray Serve: `tgraph.serve`.)
"""
from .triton import write_triton_repository
from .triton_check import check_model_dir, check_repository

__all__ = ["write_triton_repository", "check_model_dir", "check_repository"]
