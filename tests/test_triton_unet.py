"""The reference U-Net under `use_kernels(TritonKernels())` against the same U-Net on plain torch ops.

A tiny random U-Net (channels 32/64, 8 norm groups, 8 heads of 4 and 8 dims, 77 context tokens) run in the
interpreter without CUDA; flash-attention's rule on the whole network: the kernels' error against a
float64 run is at most twice the torch path's own error in the same dtype. Target: < 15 s on 2 CPU cores.
"""
import copy

import pytest
import torch

from sdrt.config import UNetConfig
from sdrt.kernels import TritonKernels
from sdrt.models.ops import use_kernels
from sdrt.models.unet import UNet
from tolerance import assert_flash_rule

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def unet_and_inputs():
    cfg = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                     cross_attention_dim=32, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, 32)
    timestep = torch.tensor(500)
    with torch.no_grad():
        ref64 = copy.deepcopy(unet).double()(sample.double(), timestep, context.double())
    return unet, sample, timestep, context, ref64


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-nchw", "bf16-nhwc"])
def test_unet_with_triton_kernels_matches_torch(unet_and_inputs, dtype, channels_last):
    unet, sample, timestep, context, ref64 = unet_and_inputs
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    unet = copy.deepcopy(unet).to(DEVICE, dtype).to(memory_format=memory_format)
    sample = sample.to(DEVICE, dtype).to(memory_format=memory_format)
    context, timestep, ref64 = context.to(DEVICE, dtype), timestep.to(DEVICE), ref64.to(DEVICE)
    with torch.no_grad():
        torch_out = unet(sample, timestep, context)
        with use_kernels(TritonKernels()):
            kernel_out = unet(sample, timestep, context)
    assert_flash_rule(kernel_out, torch_out, ref64)
