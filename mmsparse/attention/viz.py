"""Pictures of patterns: the block layout and one query token's keys on its grid.

    mmsparse viz "Local((7, 13, 13))" --grid 32,48,48 --out a2.png
    mmsparse viz longformer --grid 4096 --out longformer.png
    python -m mmsparse.attention.viz "Tiled((4, 4, 8), 1)" --grid 16,32,32 --order 4,4,8

PATTERN is a preset name (longformer, bigbird, sparse_transformer, video_swin, sliding_tile,
sliding_window_with_sinks) or an expression over the pattern classes, e.g.
"Local((3, 9, 9)) | Global(4)".
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import patterns as P
from .blocklayout import build_layout
from .stream import StreamLayout, token_table

_NAMES = {
    name: getattr(P, name)
    for name in ("Local", "Tiled", "Axial", "Strided", "Fixed", "Global", "Sinks", "Causal", "Dense", "Random", "AVSync")
}


def parse_pattern(spec: str) -> P.Pattern:
    """A preset name or an expression over the pattern classes (no other names allowed)."""
    spec = spec.strip()
    if spec in P.PRESETS:
        return P.PRESETS[spec]()
    namespace = dict(_NAMES, **P.PRESETS)
    try:
        code = compile(spec, "<pattern>", "eval")
    except SyntaxError as err:
        raise ValueError(f"PATTERN {spec!r} is not a preset name nor a valid expression: {err.msg}") from None
    unknown = set(code.co_names) - set(namespace)
    if unknown:
        raise ValueError(f"PATTERN {spec!r} uses unknown names {sorted(unknown)}; known: {sorted(namespace)}")
    pattern = eval(code, {"__builtins__": {}}, namespace)  # names restricted above
    if isinstance(pattern, tuple):  # timesformer_divided() gives (time, space)
        pattern = pattern[0]
    if not isinstance(pattern, P.Pattern):
        raise ValueError(f"PATTERN {spec!r} does not evaluate to a pattern")
    return pattern


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated ints, got {text!r}") from None


def draw(pattern: P.Pattern, stream: StreamLayout, out: str, block: int = 128, query: int | None = None, exact_limit: float = 2e8):
    """Write a PNG: block layout (left) and the keys of one query token on its grid (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bl = build_layout(pattern, stream, block, block)
    n = bl.n
    seg = stream.segments[0]
    if query is None:  # the token at the centre of the grid
        centre = torch.tensor([[s // 2 for s in seg.shape]])
        raster = 0
        for a, s in enumerate(seg.shape):
            raster = raster * s + int(centre[0, a])
        query = seg.offset + int(seg.raster_to_order()[raster])
    if not 0 <= query < n:
        raise ValueError(f"--query must be in [0, {n}), got {query}")
    row = bl.program.evaluate(torch.tensor([query]), torch.arange(n))
    full_q = torch.zeros(bl.num_q_blocks, bl.num_k_blocks)
    rows = torch.repeat_interleave(torch.arange(bl.num_q_blocks), (bl.q_full_ptr[1:] - bl.q_full_ptr[:-1]).long())
    full_q[rows, bl.q_full_idx.long()] = 2
    rows = torch.repeat_interleave(torch.arange(bl.num_q_blocks), (bl.q_part_ptr[1:] - bl.q_part_ptr[:-1]).long())
    full_q[rows, bl.q_part_idx.long()] = 1

    title = f"{pattern!r}"[:110]
    stats = f"N={n}, block {block}: {bl.num_full} full + {bl.num_partial} partial blocks ({100 * bl.block_density:.2f} %)"
    if bl.num_partial * block * block <= exact_limit:
        stats += f"; density {100 * bl.density():.3f} %, utilization {100 * bl.utilization():.1f} %"
    stats += f"; query {query} attends {int(row.sum())} keys"

    grid_tokens = row[seg.offset : seg.end].float()
    raster = seg.to_raster(grid_tokens[None, :, None])[0, :, 0].reshape(seg.shape)
    table = token_table(stream)
    qcoord = table.coords[query, : seg.ndim].tolist() if int(table.segment[query]) == 0 else None
    if seg.ndim == 3:
        t0 = qcoord[0] if qcoord else 0
        ts = [t for t in range(t0 - 3, t0 + 4) if 0 <= t < seg.shape[0]]
        panels = [(f"t={t}", raster[t]) for t in ts]
    elif seg.ndim == 2:
        panels = [("grid", raster)]
    else:
        panels = [("positions", raster[None, :])]
    fig = plt.figure(figsize=(4 + 2.6 * len(panels), 4.6))
    ax = fig.add_subplot(1, len(panels) + 1, 1)
    ax.imshow(full_q, cmap="Blues", vmin=0, vmax=2, interpolation="nearest")
    ax.set_title("blocks (dark: full, light: partial)", fontsize=8)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    for i, (name, img) in enumerate(panels):
        a = fig.add_subplot(1, len(panels) + 1, i + 2)
        a.imshow(img, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto" if seg.ndim == 1 else "equal")
        if qcoord and (seg.ndim < 3 or name == f"t={qcoord[0]}"):
            y, x = (qcoord[-2], qcoord[-1]) if seg.ndim >= 2 else (0, qcoord[0])
            a.plot([x], [y], "r+", markersize=10)
        a.set_title(name, fontsize=8)
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{title}\n{stats}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return stats


def register(subparsers) -> None:
    p = subparsers.add_parser("viz", help="draw a sparse attention pattern as a PNG", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pattern", help="preset name or pattern expression")
    p.add_argument("--grid", required=True, help="token grid, e.g. 32,48,48 or 4096")
    p.add_argument("--order", default="raster", help="raster or a tile shape, e.g. 4,4,8")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--query", type=int, default=None, help="query token position (default: grid centre)")
    p.add_argument("--out", default="pattern.png")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        grid = _ints(args.grid, "--grid")
        order = "raster" if args.order == "raster" else _ints(args.order, "--order")
        stream = StreamLayout.from_grid(grid, order=order)
        stats = draw(parse_pattern(args.pattern), stream, args.out, args.block, args.query)
    except ValueError as err:
        print(f"mmsparse viz: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {stats}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m mmsparse.attention.viz")
    register(parser.add_subparsers(dest="command"))
    sys.exit(_main(parser.parse_args(["viz"] + sys.argv[1:])))
