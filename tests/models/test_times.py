"""Per-sample times in one batch: clips sampled at different frame spacings keep their own
AVSync pairs."""

import torch


def _take(batch, idx):
    """The samples `idx` of a Batch dict (tensors and per-sample lists sliced, the rest kept)."""
    n = len(batch["id"])
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
            out[k] = v[idx]
        elif k in ("id", "caption", "captions"):
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out


def test_each_sample_keeps_its_own_times(tiny, batch):
    """Clips sampled at different frame spacings share a batch: every sample is encoded with
    its own times (its own AVSync pairs), exactly as when it is encoded alone."""
    tiny.set_backend("reference")
    b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    vt = b["video_times"]
    b["video_times"][1::2] = vt[1::2, :1] + (vt[1::2] - vt[1::2, :1]) * 3  # every other clip: 3x the spacing
    with torch.no_grad():
        whole = tiny.encode(b)[0]
        for i in (0, 1, 2, 3):
            alone = tiny.encode(_take(b, [i]))[0]
            assert (whole[i] - alone[0]).abs().max().item() < 1e-5, i
        # the first sample's times would pair sample 1's audio with other frames: the test can fail
        first = dict(b, video_times=b["video_times"][[0] * len(b["id"])])
        assert (tiny.encode(first)[0][1] - whole[1]).abs().max().item() > 1e-3
    stream = tiny.embed(b)
    assert len(stream.groups()) == 2 and stream.sample_layouts[0] != stream.sample_layouts[1]
