"""The block-sparse kernels' view of a layout: CSR index lists, block sizes and the mask
program's parts, as plain tensors and tuples (mmsparse.attention builds it from a BlockLayout).

Legend: N tokens, Mq / Mk query / key blocks of block_q / block_k tokens, A mask attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class BlockCSR:
    """A layout's block structure as CSR lists (all int32): q_full_ptr (Mq + 1,), q_full_idx:
    the key blocks attended fully by each query block; q_part_ptr, q_part_idx: those attended
    partially (a mask decides per pair); k_*: the transposes (query blocks of each key block),
    for the dK / dV pass. Shared by BlockLists and mmsparse.attention's BlockLayout."""

    n: int
    block_q: int
    block_k: int
    q_full_ptr: torch.Tensor
    q_full_idx: torch.Tensor
    q_part_ptr: torch.Tensor
    q_part_idx: torch.Tensor
    k_full_ptr: torch.Tensor
    k_full_idx: torch.Tensor
    k_part_ptr: torch.Tensor
    k_part_idx: torch.Tensor

    @property
    def num_q_blocks(self) -> int:
        return self.q_full_ptr.numel() - 1

    @property
    def num_k_blocks(self) -> int:
        return self.k_full_ptr.numel() - 1

    @property
    def num_full(self) -> int:
        return self.q_full_idx.numel()

    @property
    def num_partial(self) -> int:
        return self.q_part_idx.numel()


@dataclass(eq=False)
class BlockLists(BlockCSR):
    """The block-sparse kernels' input: the CSR lists (BlockCSR) and the mask program's parts,
    clauses (its DNF: tuples of predicate tuples), attrs (A, N) its token attributes, tables
    its coarse tables (see mmsparse.attention.program). `programs` caches the KernelProgram
    per device."""

    clauses: tuple
    attrs: torch.Tensor
    tables: tuple = ()
    programs: dict = field(default_factory=dict, repr=False)


def rows_of(ptr: torch.Tensor) -> torch.Tensor:
    """CSR row index of each entry."""
    counts = (ptr[1:] - ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts)
