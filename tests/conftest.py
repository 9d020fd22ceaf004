"""Test-session set-up shared by every folder.

Without a GPU the Triton kernels run under the Triton interpreter. TRITON_INTERPRET is read
when triton and the kernels are first imported, so it is set here, before any test module
(or torch's own lazy imports) brings triton in.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
