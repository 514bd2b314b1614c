"""Compile the kernels for an H100 (sm_90) without a GPU, so CPU-only CI catches what the interpreter cannot:
compile errors, and lost vectorization or pipelining (no cp.async) in the attention kernel.

    env -u TRITON_INTERPRET python -m sdrt.kernels.compile_check [group_norm] [attention]
    # prints one JSON line per kernel configuration

Needs the ptxas that ships in the triton wheel; no CUDA driver.
"""
from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import flash_attention, group_norm_silu
from .launch import is_interpreted


def compile_for_cuda(kernel, arg_types: dict, constexprs: dict, divisible_by_16: tuple = (), *,
                     capability: int = 90, num_warps: int = 4, num_stages: int = 3) -> dict:
    """PTX statistics of `kernel` compiled for sm_`capability`.

    arg_types: Triton types ("*fp16", "i32", "fp32") of the runtime arguments; every other argument is a
    constexpr taken from `constexprs`. divisible_by_16: the arguments the runtime would mark so (aligned
    pointers, integers that are multiples of 16).
    """
    names = kernel.arg_names
    signature = {name: arg_types.get(name, "constexpr") for name in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name in divisible_by_16}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    return dict(kernel=kernel.__name__, shared_bytes=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                cp_async=ptx.count("cp.async"), scalar_or_vector_global_loads=ptx.count("ld.global"))


def _attention(dtype: str, head_dim: int, block_m: int, block_n: int, num_warps: int, num_stages: int) -> dict:
    # q/k/v/o as [B, L, H, D] views: row strides H * D (multiples of 16), head strides D (40 is not).
    pointers = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    ints = {f"stride_{t}{d}": "i32" for t in "qkvo" for d in ("b", "h", "m" if t in "qo" else "n")}
    arg_types = {**pointers, **ints, "qk_scale": "fp32", "HEADS": "i32", "LQ": "i32", "LK": "i32"}
    divisible = tuple(pointers) + tuple(n for n in ints if n[-1] != "h" or head_dim % 16 == 0)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                      INTERPRETER_BF16=False, DOT_PRECISION="ieee" if dtype == "fp32" else None,
                      ALIGN=16 // {"fp16": 2, "bf16": 2, "fp32": 4}[dtype],
                      stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
    result = compile_for_cuda(flash_attention._attention_kernel, arg_types, constexprs, divisible,
                              num_warps=num_warps, num_stages=num_stages)
    return dict(result, dtype=dtype, head_dim=head_dim)


def _group_norm_nhwc_fp16() -> list:
    # Channels-last: stride_c == 1 (a constexpr after Triton's specialization), C = 320.
    common = dict(x_ptr="*fp16", partial_ptr="*fp32", HW="i32", HW_PER_SPLIT="i32", SPLITS="i32", GROUPS="i32",
                  CHANNELS_PER_GROUP="i32", stride_n="i32", stride_hw="i32")
    divisible = ("x_ptr", "y_ptr", "partial_ptr", "weight_ptr", "bias_ptr", "HW", "HW_PER_SPLIT", "stride_n", "stride_hw")
    stats = compile_for_cuda(group_norm_silu._group_norm_stats_kernel, common,
                             dict(stride_c=1, BLOCK_C=16, BLOCK_HW=256), divisible, num_warps=8)
    apply = compile_for_cuda(group_norm_silu._group_norm_apply_kernel,
                             dict(common, y_ptr="*fp16", weight_ptr="*fp16", bias_ptr="*fp16", eps="fp32"),
                             dict(stride_c=1, HAS_WEIGHT=True, HAS_BIAS=True, SILU=True, INTERPRETER_BF16=False,
                                  BLOCK_C=16, BLOCK_HW=256, BLOCK_SPLITS=8), divisible, num_warps=8)
    return [stats, apply]


def _attention_configs() -> list:
    return [_attention("fp16", 40, 128, 64, 4, 3), _attention("bf16", 160, 64, 64, 4, 3),
            _attention("fp32", 80, 64, 32, 4, 2)]


CHECKS = {"group_norm": _group_norm_nhwc_fp16, "attention": _attention_configs}


def main(argv: list) -> int:
    unknown = [name for name in argv if name not in CHECKS]
    if unknown:
        print(f"compile_check: unknown kernel {unknown[0]!r} (choose from {', '.join(CHECKS)})", file=sys.stderr)
        return 2
    if is_interpreted(flash_attention._attention_kernel):
        print("compile_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    for name in argv or CHECKS:
        for result in CHECKS[name]():
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
