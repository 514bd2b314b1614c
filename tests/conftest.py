import os

import torch

# The Triton kernels run on CPU tensors only under Triton's interpreter, which `@triton.jit` picks when
# a kernel module is imported: set it before any test module can import one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
