"""What the model tests compare when two ways of running a captioner must agree: one forward
and backward (`run`), and the encoding, caption logits and every weight's gradient of two such
runs (`assert_same`)."""

from __future__ import annotations


def run(model, batch) -> tuple:
    """(encoding, caption logits, {weight name: gradient}) of one forward and backward of
    `model` on `batch`, the loss reading both the logits and the encoding."""
    model.zero_grad(set_to_none=True)
    memory, _, _ = model.encode(batch)
    logits = model(batch)
    (logits.float().square().mean() + memory.float().square().mean()).backward()
    return memory.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}


def assert_same(got: tuple, want: tuple, positions=None) -> None:
    """Two `run` results agree: the encoding (at `positions` of the stream; None: all) and the
    logits within 1e-5, the same weights with gradients (more than 20), each within 1e-5 of its
    largest entry."""
    mem_got, mem_want = (got[0], want[0]) if positions is None else (got[0][:, positions], want[0][:, positions])
    assert (mem_got - mem_want).abs().max().item() < 1e-5
    assert (got[1] - want[1]).abs().max().item() < 1e-5
    assert got[2].keys() == want[2].keys() and len(got[2]) > 20
    for name, g in got[2].items():
        w = want[2][name]
        assert (g - w).abs().max().item() <= 1e-5 * (1 + w.abs().max().item()), name
