"""Test-session set-up shared by every folder.

Without a GPU the Triton kernels run under the Triton interpreter. TRITON_INTERPRET is read
when triton and the kernels are first imported, so it is set here, before any test module
(or torch's own lazy imports) brings triton in.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def set_options():
    """mmsparse.kernels.options.set_kernel_options for one test: the program's kernel options
    are restored after it (imported here, after TRITON_INTERPRET is set)."""
    from mmsparse.kernels.options import set_kernel_options

    previous = set_kernel_options()
    yield set_kernel_options
    set_kernel_options(previous)
