"""A model of your own in the tgraph DSL, exported from the command line:

    tgraph export examples/custom_model.py:make -o tiny.onnx --set layers=2
    tgraph run examples/custom_model.py:make --check

`make` is the factory the CLI calls; `--set key=value` become its keyword arguments.
"""
from tgraph.dsl import Embedding, FeedForward, InputSpec, LayerNorm, Module, ModuleList, MultiHeadAttention
from tgraph.ir import DType


class Block(Module):
    """A pre-LN decoder block (GPT-2 style)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(d), MultiHeadAttention(d, heads, causal=True)
        self.ln_2, self.mlp = LayerNorm(d), FeedForward(d, 4 * d, act="gelu_tanh")

    def forward(self, x):                        # x: (B, T, C)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyLM(Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int):
        super().__init__()
        self.vocab = vocab
        self.embed = Embedding(vocab, d)
        self.blocks = ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln_f = LayerNorm(d)

    def input_specs(self):
        return {"input_ids": InputSpec(DType.int64, ("batch", "seq"))}

    def forward(self, input_ids):
        x = self.embed(input_ids)                # (B, T) -> (B, T, C)
        for block in self.blocks:
            x = block(x)
        return {"logits": self.ln_f(x) @ self.embed.weight.swap_last()}   # (B, T, V)


def make(vocab: int = 1000, d: int = 64, heads: int = 4, layers: int = 1) -> TinyLM:
    return TinyLM(vocab, d, heads, layers)
