"""Kernel tests run under the Triton interpreter on a machine without a GPU; tests/conftest.py
sets TRITON_INTERPRET before triton is first imported."""
