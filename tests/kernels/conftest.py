"""Run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET is read when triton's own library and the kernels are decorated, so it must
be set before either is imported. If an earlier test imported triton in compiled mode, drop
triton and the kernel module from sys.modules so that they are imported again, interpreted.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _lang = sys.modules.get("triton.language")
    if _lang is not None and type(_lang.zeros).__name__ != "InterpretedFunction":
        for _name in list(sys.modules):
            top = _name.split(".")
            if (top[0] == "triton" and top[1:2] != ["_C"]) or _name == "mmsparse.kernels.block_sparse_attention":
                del sys.modules[_name]
        _pkg = sys.modules.get("mmsparse.kernels")
        if _pkg is not None and hasattr(_pkg, "block_sparse_attention"):
            del _pkg.block_sparse_attention
