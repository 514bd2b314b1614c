"""flash-attention's tolerance rule, shared by the kernel tests: a fast path's error against a float64
reference is at most twice torch's own error in the same dtype, plus a floor of 8 fp32 ulps of the
output's magnitude (for fp32 inputs, where both errors are last-bit summation-order effects)."""
import torch

ERROR_RATIO = 2
FLOOR_ULPS = 8


def assert_flash_rule(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor) -> None:
    """out: the fast path's result; torch_out: torch's in the same dtype; ref64: the float64 reference."""
    torch_err = (torch_out.double() - ref64).abs().max().item()
    kernel_err = (out.double() - ref64).abs().max().item()
    floor = FLOOR_ULPS * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert kernel_err <= ERROR_RATIO * torch_err + floor, \
        f"kernel error {kernel_err:.3g} vs torch error {torch_err:.3g} (limit {ERROR_RATIO}x + {floor:.3g})"
