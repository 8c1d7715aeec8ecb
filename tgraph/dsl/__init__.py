"""The Python DSL: modules, parameters, symbolic tensors, standard layers and `trace`."""
from .layers import (ACTIVATIONS, Embedding, FeedForward, LayerNorm, LearnedPositions, Linear, MultiHeadAttention,
                     RMSNorm, SinusoidalPositions, attention, gelu, gelu_tanh, padding_keep_mask, relu, silu,
                     sinusoid_table)
from .module import InputSpec, Module, ModuleList, Parameter, trace
from .tensor import Tensor, arange, causal_mask, concat, lowest, tensor, where

__all__ = [
    "ACTIVATIONS", "Embedding", "FeedForward", "InputSpec", "LayerNorm", "LearnedPositions", "Linear", "Module",
    "ModuleList", "MultiHeadAttention", "Parameter", "RMSNorm", "SinusoidalPositions", "Tensor", "arange", "attention",
    "causal_mask", "concat", "gelu", "gelu_tanh", "lowest", "padding_keep_mask", "relu", "silu", "sinusoid_table",
    "tensor", "trace", "where",
]
