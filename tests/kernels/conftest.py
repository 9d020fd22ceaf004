"""Test this checkout's kernels, and run them under the Triton interpreter when there is no GPU.

1. `kernels/` is installed as `mmsparse.kernels` through a package-dir mapping; an editable
   install of *another* checkout maps it there even when `mmsparse` itself comes from this
   one (the current directory). Point `mmsparse.kernels` at this checkout's `kernels/` then.
2. TRITON_INTERPRET is read when triton's own library and the kernels are decorated, so it must
   be set before either is imported. If an earlier test imported triton in compiled mode, drop
   triton and the kernel module (not the C extension) from sys.modules so that they are
   imported again, interpreted.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
_KMOD = "mmsparse.kernels.block_sparse_attention"

import mmsparse  # noqa: E402

if any(Path(p).resolve() == _KERNELS.parent / "mmsparse" for p in mmsparse.__path__):
    _spec = importlib.util.find_spec("mmsparse.kernels")
    if _spec is None or Path(_spec.origin).resolve().parent != _KERNELS:
        for _name in [n for n in sys.modules if n == "mmsparse.kernels" or n.startswith("mmsparse.kernels.")]:
            del sys.modules[_name]
        _spec = importlib.util.spec_from_file_location(
            "mmsparse.kernels", _KERNELS / "__init__.py", submodule_search_locations=[str(_KERNELS)]
        )
        _pkg = importlib.util.module_from_spec(_spec)
        sys.modules["mmsparse.kernels"] = _pkg
        _spec.loader.exec_module(_pkg)
        mmsparse.kernels = _pkg

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _lang = sys.modules.get("triton.language")
    if _lang is not None and type(_lang.zeros).__name__ != "InterpretedFunction":
        for _name in list(sys.modules):
            top = _name.split(".")
            if (top[0] == "triton" and top[1:2] != ["_C"]) or _name == _KMOD:
                del sys.modules[_name]
        _pkg = sys.modules.get("mmsparse.kernels")
        if _pkg is not None and hasattr(_pkg, "block_sparse_attention"):
            del _pkg.block_sparse_attention
