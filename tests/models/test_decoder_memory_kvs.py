"""The decoder's cross keys and values computed once and read by many calls (candidate
captions, greedy steps): the same logits as computing them per call, and the long-clip scorer and
the captioner's candidate ranking project the memory once per layer, not once per candidate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsparse.models import create_model
from mmsparse.models.decoder import CrossAttention


def test_shared_keys_and_values_give_the_same_logits(tokenizer, batch):
    torch.manual_seed(0)
    model = create_model("captioner_tiny", tokenizer=tokenizer).eval()
    with torch.no_grad():
        memory, pad, _ = model.encode(batch)
        mem, mpad = model.decoder.prepare_memory(memory, pad)
        ids = model.tokenize(batch)[:, :-1]
        want = model.decoder(ids, mem, mpad, prepared=True)
        kvs = model.decoder.memory_kvs(mem)
        assert len(kvs) == len(model.decoder.blocks)
        assert torch.equal(model.decoder(ids, None, mpad, prepared=True, mem_kvs=kvs), want)
        # keys and values of one clip expanded to several captions (no copy) read the same
        one = [(k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)) for k, v in kvs]
        three = ids[:1].expand(3, -1)
        got = model.decoder(three, None, None if mpad is None else mpad[:1].expand(3, -1), prepared=True, mem_kvs=one)
        assert (got - want[:1]).abs().max().item() < 1e-5
        with pytest.raises(ValueError, match="mem_kvs has 1 layers"):
            model.decoder(ids, None, mpad, prepared=True, mem_kvs=kvs[:1])


def _count_memory_kv(monkeypatch) -> dict:
    calls = {"n": 0}
    original = CrossAttention.memory_kv

    def counted(self, memory):
        calls["n"] += 1
        return original(self, memory)

    monkeypatch.setattr(CrossAttention, "memory_kv", counted)
    return calls


def test_the_long_clip_scorer_projects_the_memory_once_per_task(monkeypatch):
    """score(): every candidate's log-likelihood as a plain decoder call computes it, from one
    projection of the memory per layer and task group (was one per candidate and greedy step)."""
    from mmsparse.data import longtasks as lt
    from mmsparse.eval import longbench as lb

    spec = lb.BenchSpec(**lb.SMOKE)
    model = lb.build_model(spec, "tiled_compress", 0, "cpu").eval()
    plans = lb.eval_plans(spec, 48, 2, spec.eval_seed)  # 2 clips of every task
    calls = _count_memory_kv(monkeypatch)
    rows = lb.score(model, plans, spec, "cpu", spec.eval_seed, keep_ll=True)
    layers = len(model.decoder.blocks)
    assert calls["n"] == len(lt.TASKS) * layers, calls  # one chunk, four task groups
    # each candidate's log-likelihood against a decoder call that projects the memory itself
    chunk, memory, pad = next(lb._encoded(model, plans, spec, "cpu", spec.eval_seed))
    mem, mpad = model.decoder.prepare_memory(memory, pad)
    for i, (plan, row) in enumerate(zip(chunk, rows_in_chunk_order(rows, chunk))):
        cands = lt.candidates(plan.task)
        ids = model.tokenizer.batch(cands, model.cfg.max_text_len, "cpu")
        with torch.no_grad():
            logits = model.decoder(ids[:, :-1], mem[i:i + 1].expand(len(cands), -1, -1),
                                   None if mpad is None else mpad[i:i + 1].expand(len(cands), -1), prepared=True)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = (ids[:, 1:] != 0).float()
        keep[:, 0] = 0.0
        np.testing.assert_allclose(row["ll"], (logp * keep).sum(1).tolist(), rtol=1e-5, atol=1e-5)


def rows_in_chunk_order(rows: list[dict], chunk) -> list[dict]:
    """score()'s rows come grouped by task; the rows of `chunk`'s clips in chunk order."""
    order = []
    for task in dict.fromkeys(p.task for p in chunk):
        order += [i for i, p in enumerate(chunk) if p.task == task]
    by_clip = dict(zip(order, rows[:len(chunk)]))
    return [by_clip[i] for i in range(len(chunk))]
