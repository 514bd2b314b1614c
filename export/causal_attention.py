"""A TorchScript-exporter symbolic for causal `scaled_dot_product_attention` that keeps the query's dtype.

torch's own symbolic (opset 14+) builds the causal mask as a float32 constant. In an fp16 graph the
exporter's type promotion then turns the CLIP text encoder's attention and residual stream float32
while its LayerNorm weights stay fp16, and the graph fails ONNX validation. Here the mask is cast to the
query's dtype (`CastLike`, opset 15+) and the attention is left to torch's symbolic with that mask.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.onnx import symbolic_helper, symbolic_opset14

_OP = "aten::scaled_dot_product_attention"


@symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "v", "b")
def _sdpa(g, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if is_causal:
        attn_mask, is_causal = _causal_mask_like(g, query, key), False
    return symbolic_opset14.scaled_dot_product_attention(g, query, key, value, attn_mask, dropout_p, is_causal,
                                                         scale, enable_gqa)


def _causal_mask_like(g, query, key):
    # [L, S]: 0 on and below the diagonal, -inf above, in the query's dtype
    def last_but_one(shape):
        return g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([-2])),
                    g.op("Constant", value_t=torch.tensor([-1])))

    size = g.op("Concat", last_but_one(g.op("Shape", query)), last_but_one(g.op("Shape", key)), axis_i=0)
    lower = g.op("Trilu", g.op("Expand", g.op("Constant", value_t=torch.tensor([1.0])), size), upper_i=0)
    zero = g.op("Constant", value_t=torch.tensor([0.0]))
    mask = g.op("Where", g.op("Equal", lower, zero), g.op("Constant", value_t=torch.tensor([-float("inf")])), zero)
    return g.op("CastLike", mask, query)


@contextlib.contextmanager
def dtype_preserving_causal_attention(opset: int) -> Iterator[None]:
    """Within this block, TorchScript exports at `opset` (15 or newer, for CastLike) build causal attention
    masks in the query's dtype."""
    torch.onnx.register_custom_op_symbolic(_OP, _sdpa, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_OP, opset)
