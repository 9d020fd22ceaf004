"""Per-layer attention pattern schedules of the multimodal encoder.

A schedule maps (layer index, StreamLayout of this batch) to a Pattern, or to None for dense
attention (SDPA flash, no mask). Patterns are assembled from the parts that fit the segments
present, so a batch without audio still runs (no audio window, no AVSync).

Schedules (`ModelConfig.schedule`):
- "tiled": every layer: Tiled windows per modality (video 3D tiles, audio and image 2D tiles)
  | Global(n_global) | AVSync(av_window). Tile-aligned: on a stream in tile order whose grid
  the tile divides, every computed block is full (docs/benchmarks.md: block utilization). A grid
  the tile does not divide has smaller edge tiles and blocks straddling them: 224 x 224 frames
  give a 14 x 14 patch grid, so with the default (4, 4, 8) tiles 60 % of the E1 captioner's
  blocks are partial (utilization 0.58); no tile of 128 tokens divides 14 x 14. The kernels
  skip the empty parts of those blocks (bench/NOTES.md v8). `video_tile_align` (and the audio
  and image ones) pads every tile's slot to a block multiple instead, so e.g. (4, 14, 14)
  tiles of 784 tokens fill 13 whole 64-token blocks (`Segment.tile_align`). The default.
- "tiled_shifted": even layers as "tiled"; odd layers shift every tile window by half a tile
  along each axis the grid has more than one tile on (Video Swin's shifted windows), so tokens
  of neighbouring tiles meet even at radius 0. The shifted windows straddle the stored tiles:
  at (4, 14, 14), radius 0, 64-token blocks with `video_tile_align=64`, 77 % of the computed
  pairs are kept in a shifted layer against 89 % in an unshifted one.
- "tiled_axial": even layers as "tiled"; odd layers the video time columns (Axial(0)) with the
  own tile, plus the audio / image / global / AVSync parts (TimeSformer-like reach in time).
- "local": token-level Local windows instead of tiles (NATTEN semantics, partial blocks).
- "local_axial": even layers as "local"; odd layers the video time columns (Axial(0)) with the
  token-level window, plus the other parts: "local" with TimeSformer-like reach in time, so it
  differs from "local" in the axial layers alone (the long-clip benchmark compares the two).
- "tiled_dilated": even layers as "tiled"; odd layers the own video tile plus a dilated window in
  time at each token's place (Local((9, 1, 1), dilation=(d, 1, 1))), d = one tile's tubelets x
  4 ** (layer // 2): the time reach grows geometrically with depth (1 s, 4 s, 16 s ... apart at
  the long-clip benchmark's tiles) for 8 more keys a token.
- "dense": every layer dense (the baseline of bench/model.py); `backend` is then unused.

`video_radius_every` = k: the video tiles (or the "local" windows built from them) take
`video_radius` in layers 0, k, 2k, ... only, radius 0 in the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmsparse.attention import AVSync, Axial, Global, Local, Pattern, StreamLayout, Tiled
from mmsparse.attention.patterns import global_flag
from mmsparse.attention.program import POS
from mmsparse.attention.stream import gap_positions  # noqa: F401 (re-exported: the models' gaps)

SCHEDULES = ("tiled", "tiled_shifted", "tiled_axial", "tiled_dilated", "local", "local_axial", "dense")
DILATED_WINDOW = 9  # keys in time of a "tiled_dilated" odd layer's window (itself and 4 each side)


@dataclass(frozen=True)
class Gaps(Pattern):
    """Each stream position outside every segment and the global range (alignment padding,
    tile padding) attends itself, so no query row is empty (an empty row would be NaN in masked
    SDPA). Itself only: a gap lies in a block of its own segment's padding or of the real tokens
    beside it, which are computed anyway, so the gaps add no block (letting them attend one
    another added a partial block for every pair of padded tiles: 900 of 2,772 at 64 frames)."""

    def clauses(self, ctx):
        flag = ctx.attr("gap", lambda: gap_positions(ctx.stream))
        return [(("qflag", flag), ("eq", POS))]


@dataclass(frozen=True)
class StreamGlobal(Pattern):
    """`Global(n)` on a stream with alignment gaps: the first `n` positions attend every
    position that is not a gap and are attended by everything. The gaps (padding tokens of no
    segment, isolated by `Gaps`) are then out of every real token's reach by the pattern alone,
    so the model passes no key-padding mask for them: the kernels skip the per-key padding test
    in every block (Global's row would otherwise reach the gaps, which only the mask hid)."""

    n: int

    def clauses(self, ctx):
        first = global_flag(ctx, self.n, "StreamGlobal")
        real = ctx.attr("real", lambda: ~gap_positions(ctx.stream))
        return [(("qflag", first), ("kflag", real)), (("kflag", first),)]


def _has_gaps(stream: StreamLayout) -> bool:
    return sum(s.numel for s in stream.segments) + stream.n_global < stream.length


def layer_pattern(cfg, layer: int, stream: StreamLayout) -> Pattern | None:
    """The pattern of encoder layer `layer` on `stream` (None: dense)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.schedule == "dense":
        return None
    present = {s.modality: s for s in stream.segments}
    parts: list[Pattern] = []
    odd_axial = cfg.schedule in ("tiled_axial", "local_axial") and layer % 2 == 1
    video_radius = cfg.video_radius if layer % cfg.video_radius_every == 0 else 0
    for m, tile, radius in (("video", cfg.video_tile, video_radius),
                            ("audio", cfg.audio_tile, cfg.audio_radius),
                            ("image", cfg.image_tile, cfg.image_radius)):
        seg = present.get(m)
        if seg is None:
            continue
        if cfg.schedule in ("local", "local_axial"):
            window = tuple(min(2 * r * t + 1 if r else t, s) for t, r, s in
                           zip(_tup(tile, seg.ndim), _tup(radius, seg.ndim), seg.shape))
            local = Local(window, modality=m)
            parts.append(Axial(0, modality=m) | local if odd_axial and m == "video" else local)
        elif odd_axial and m == "video":
            parts.append(Axial(0, modality=m) | Tiled(tuple(tile), radius=0, modality=m))
        elif cfg.schedule == "tiled_dilated" and layer % 2 == 1 and m == "video":
            t = seg.shape[0]
            w = min(DILATED_WINDOW, t)
            d = max(1, min(_tup(tile, seg.ndim)[0] * 4 ** (layer // 2), t // w))
            ones = (1,) * (seg.ndim - 1)
            parts.append(Tiled(_tup(tile, seg.ndim), radius=0, modality=m)
                         | Local((w, *ones), dilation=(d, *ones), modality=m))
        else:
            tile_ = _tup(tile, seg.ndim)
            shift = 0
            if cfg.schedule == "tiled_shifted" and layer % 2 == 1:
                shift = tuple(t // 2 if s > t else 0 for t, s in zip(tile_, seg.shape))
            parts.append(Tiled(tile_, radius=_tup(radius, seg.ndim), shift=shift, modality=m))
    gaps = _has_gaps(stream)
    if stream.n_global:
        parts.append(StreamGlobal(stream.n_global) if gaps else Global(stream.n_global))
    timed = {s.modality for s in stream.segments if s.seconds is not None}
    if cfg.av_window and len(timed) >= 2:
        parts.append(AVSync(float(cfg.av_window)))
    if gaps:
        parts.append(Gaps())
    pattern = parts[0]
    for p in parts[1:]:
        pattern = pattern | p
    return pattern


def _tup(v, n):
    return (int(v),) * n if isinstance(v, int) else tuple(int(x) for x in v)
