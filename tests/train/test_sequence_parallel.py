"""DeepSpeed-Ulysses around sparse attention, on 2 CPU processes (gloo): the sequence-parallel
model gives the loss and gradients of the plain model, each rank's blocks see half the stream,
and a head count the group size does not divide is a clear error."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from mmsparse.train.distributed import free_port


def _batch(tmp: str):
    from mmsparse.data import DataConfig, make_loader, synth

    manifest = synth.make_dataset(tmp, clips=2, frames=8, size=(32, 32), images=0)
    loader = make_loader(manifest, DataConfig(num_frames=8, train=False), batch_size=2, shuffle=False)
    return manifest, next(iter(loader))


def _model(manifest, n_global, compress=0, keys=0):
    from mmsparse.data import manifest_captions
    from mmsparse.models import CaptionTask, CaptionTokenizer, create_model

    torch.manual_seed(0)
    model = create_model("captioner_tiny", n_global=n_global, compress_block=compress, compress_keys=keys)
    model.set_tokenizer(CaptionTokenizer.train(manifest_captions(manifest), vocab_size=model.cfg.vocab_size))
    return model, CaptionTask(model)


def _worker(rank: int, port: int, tmp: str, n_global: int, compress: int, keys: int, out: dict):
    import torch.distributed as dist

    from mmsparse.train.parallel import apply_sequence_parallel

    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/mmsparse-torch-extensions"))
    deepspeed.init_distributed(dist_backend="gloo")  # DistributedAttention talks through deepspeed.comm
    torch.set_num_threads(1)
    manifest, batch = _batch(os.path.join(tmp, "data"))
    model, task = _model(manifest, n_global, compress, keys)
    seen = []
    apply_sequence_parallel(model, dist.new_group([0, 1]), rank, 2)
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    loss, _ = task.training_forward(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():  # what DeepSpeed's all-rank average does
        dist.all_reduce(g)
        g /= 2
    out[rank] = (float(loss), grads, seen)
    dist.destroy_process_group()


@pytest.mark.timeout(600)
# an even and an odd stream length (padded to 2 N/2); with the compressed branch (pooled keys of
# every 8 positions, at most 4 of them: the block grows with the stream), which must see the
# whole stream after the all-to-all, not a rank's slice, and keep the layer's bound there
@pytest.mark.parametrize("n_global,compress,keys", [(2, 0, 0), (3, 0, 0), (3, 8, 4)])
def test_ulysses_matches_the_plain_model(tmp_path, n_global, compress, keys):
    _, batch = _batch(str(tmp_path / "data"))  # written once, before the workers read it
    manifest = tmp_path / "data" / "manifest.jsonl"
    model, task = _model(manifest, n_global, compress, keys)
    if keys:  # the bound binds: fewer, larger pooled blocks than compress alone would give
        from mmsparse.attention.compressed import pooled_block

        n = model.encode(batch)[0].shape[1]
        assert pooled_block(n, compress, keys) > compress
    loss, _ = task.training_forward(batch)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    n_stream = model.encode(batch)[0].shape[1]
    assert n_stream % 2 == n_global % 2

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), str(tmp_path), n_global, compress, keys, out), nprocs=2, join=True)
    for rank in (0, 1):
        sp_loss, grads, seen = out[rank]
        assert seen == [-(-n_stream // 2)]                  # each rank's blocks hold half the tokens
        assert sp_loss == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        assert set(grads) == set(ref)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_heads_must_divide():
    from mmsparse.models import create_model
    from mmsparse.train.parallel import check_heads

    model = create_model("captioner_tiny")  # 2 heads
    assert check_heads(model, 2) == 2
    with pytest.raises(ValueError, match=r"sequence_parallel_size=3 must divide the number of attention heads.*\[2\]"):
        check_heads(model, 3)
