"""`upcast_attention` (SD 2.1's U-Net config): attention scores and softmax in float32 in any model dtype,
on every backend - torch, the Triton kernel, and the ONNX graph that ONNX Runtime and TensorRT run.

The inputs that matter are the ones whose scores overflow fp16: q . k * scale > 65504. The semantics
are diffusers' `Attention(upcast_attention=True)`: fp32 scores and softmax, probabilities rounded to the
value dtype before P V (`upcast_reference`); the tolerance is flash-attention's rule against it.
CPU tests: the flag reaches the dispatch point from the config, the torch and wide-head paths compute in
fp32, the kernel (in Triton's interpreter) keeps fp32 scores, the fp16 ONNX graph keeps fp32 scores.
CUDA tests: the same on the GPU in fp16. Target: < 20 s on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sdrt.components import Components
from sdrt.models import ops, random_weights
from sdrt.models.unet import UNet
from tolerance import assert_flash_rule

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp16 GPU path needs a CUDA GPU")
FP16_MAX = torch.finfo(torch.float16).max


def overflowing_qkv(dtype=torch.float16, device="cpu", head_dim=64, seed=0):
    """q, k, v [1, 2, 24, D] whose scaled scores exceed the fp16 range (checked)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, 24, head_dim, generator=g) * 200 for _ in range(2))
    v = torch.randn(1, 2, 24, head_dim, generator=g)
    assert (q @ k.transpose(-1, -2) * head_dim ** -0.5).abs().max() > FP16_MAX
    return tuple(t.to(device, dtype) for t in (q, k, v))


def upcast_reference(q, k, v):
    """diffusers' upcast attention: fp32 scores and softmax, probabilities in v's dtype for P V."""
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    return scores.softmax(-1).to(v.dtype) @ v


class RecordingKernels(ops.TorchKernels):
    """The torch reference, noting the upcast flag of every attention call."""

    def __init__(self):
        self.upcasts = []

    def attention(self, q, k, v, scale=None, upcast=False):
        self.upcasts.append(upcast)
        return super().attention(q, k, v, scale, upcast)


def tiny_unet(upcast: bool, dtype=torch.float32) -> UNet:
    base = random_weights.components("tiny", seed=3).unet
    unet = UNet(dataclasses.replace(base.config, upcast_attention=upcast))
    unet.load_state_dict(base.state_dict())
    return unet.to(dtype).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("upcast", [False, True])
def test_the_config_flag_reaches_every_unet_attention_call(upcast):
    unet, kernels = tiny_unet(upcast), RecordingKernels()
    with torch.no_grad(), ops.use_kernels(kernels):
        unet(torch.randn(1, 4, 8, 8), 500, torch.randn(1, 77, unet.config.cross_attention_dim))
    # 4 transformers (down, mid, 2 up) x (self, cross)
    assert len(kernels.upcasts) == 8 and set(kernels.upcasts) == {upcast}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_torch_upcast_computes_in_float32_and_rounds_once(dtype):
    q, k, v = overflowing_qkv(dtype)
    out = ops.attention(q, k, v, upcast=True)
    assert out.dtype == dtype
    assert torch.equal(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype))
    q32, k32, v32 = (t.float() for t in (q, k, v))
    assert torch.equal(ops.attention(q32, k32, v32, upcast=True), ops.attention(q32, k32, v32))  # fp32: no-op


def test_wide_heads_that_leave_the_kernel_keep_the_flag():
    from sdrt.kernels import MAX_KERNEL_HEAD_DIM, TritonKernels

    q, k, v = overflowing_qkv(head_dim=2 * MAX_KERNEL_HEAD_DIM)
    assert torch.equal(TritonKernels.attention(q, k, v, None, upcast=True),
                       ops.TorchKernels.attention(q, k, v, None, upcast=True))


def test_kernel_keeps_float32_scores_in_the_interpreter():
    pytest.importorskip("triton")
    from sdrt.kernels import TritonKernels

    q, k, v = overflowing_qkv()
    out = TritonKernels.attention(q, k, v, None, upcast=True)
    assert torch.isfinite(out).all()
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_flash_rule(out, upcast_reference(q, k, v), ref64)


def test_fp16_onnx_graph_keeps_upcast_scores_in_float32(tmp_path):
    """Every Softmax of the fp16 U-Net graph reads float32 scores when upcast is set, float16 when not."""
    onnx = pytest.importorskip("onnx")
    from sdrt.export.onnx import export_onnx

    base = random_weights.components("tiny", dtype=torch.float16, seed=3)
    softmax_types = {}
    for upcast in (False, True):
        parts = Components(base.tokenizer, base.text_encoder, tiny_unet(upcast, torch.float16), base.vae,
                           base.scheduler_config, f"random tiny upcast={upcast}")
        export = export_onnx(parts, tmp_path / str(upcast), names=("unet",))
        graph = onnx.load(str(export.path("unet"))).graph  # the export stores inferred shapes and types
        types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
        softmax_types[upcast] = {types[n.input[0]] for n in graph.node if n.op_type == "Softmax"}
    assert softmax_types == {False: {onnx.TensorProto.FLOAT16}, True: {onnx.TensorProto.FLOAT}}


# ------------------------------------------------------------------------------------------ CUDA
@requires_cuda
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fp16_upcast_attention_on_cuda_stays_finite_and_accurate(kernels):
    if kernels == "triton":
        pytest.importorskip("triton")
        from sdrt.kernels import TritonKernels as impl
    else:
        impl = ops.TorchKernels
    q, k, v = overflowing_qkv(device="cuda")
    out = impl.attention(q, k, v, None, upcast=True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_flash_rule(out, upcast_reference(q, k, v), ref64)

