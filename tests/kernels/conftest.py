"""Run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET is read when a kernel is decorated, so it must be set before the kernel
module is imported; if another test imported it first (compiled mode), reload it here.
"""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _mod = sys.modules.get("mmsparse.kernels.block_sparse_attention")
    if _mod is not None and not type(_mod._fwd_kernel).__name__ == "InterpretedFunction":
        importlib.reload(_mod)
