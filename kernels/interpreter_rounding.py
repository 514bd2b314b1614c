"""Round-to-nearest-even fp32 -> bf16 for Triton's interpreter, whose cast to bf16 truncates.

Compiled kernels round to nearest even on their own; kernels call this only under the interpreter, so
the CPU tests see the numerics a GPU produces.
"""
import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """x (fp32) rounded to the nearest bf16 value, still as fp32 (a later cast to bf16 is then exact)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
