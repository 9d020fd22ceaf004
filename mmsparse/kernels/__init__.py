"""The Triton kernels: the bottom layer of mmsparse (they import only torch, triton and each other).

They take tensors, CSR block lists (`block_sparse.BlockLists`) and geometry tuples, never a
Pattern or a BlockLayout: deciding which kernel runs a layout is mmsparse.attention's job
(`mmsparse.attention.backends.triton_kernels`).

- `block_sparse`: block-sparse attention over CSR block lists (a subpackage: mask program,
  work lists, tiles, forward, backward);
- `axial_attention`: dense attention within the lines of a raster grid, read in place;
- `strided_attention`: `rest | Strided(s)` as block-sparse rest + axial lines, merged by LSE;
- `rope`: the fused QKV split + rotary embedding;
- `common`: limits, input checks and the one autograd shell every attention op runs in;
- `options`: `KernelOptions`, every tuning knob, with its environment-variable overrides.
"""
