"""What a run prints: warnings that do not apply to it are dropped where they are raised, and
nothing else is; the one slow first-run step (DeepSpeed's CPU op build) is announced."""

from __future__ import annotations

import logging

import pytest

from mmsparse.train import distributed


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_only_the_named_warnings_are_dropped():
    distributed.quiet_warnings()
    distributed.quiet_warnings()  # idempotent: one filter per logger
    ds = logging.getLogger("DeepSpeed")
    assert sum(isinstance(f, distributed._DropNotApplicable) for f in ds.filters) == 1
    ext = logging.getLogger("torch.utils.cpp_extension")
    keep = _Keep()
    levels = ds.level, ext.level
    for lg in (ds, ext):
        lg.addHandler(keep)
        lg.setLevel(logging.INFO)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("Attempting to get learning rate from scheduler before it has started")
        ext.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        ds.warning("total_num_steps 3 is less than warmup_num_steps 20")   # applies: kept
        ds.info("Setting accelerator to CPU.")                                # not a warning: kept
        ext.warning("Error building extension 'x'")                           # kept
    finally:
        for lg, level in zip((ds, ext), levels):
            lg.removeHandler(keep)
            lg.setLevel(level)
    assert [r.getMessage() for r in keep.records] == [
        "total_num_steps 3 is less than warmup_num_steps 20", "Setting accelerator to CPU.",
        "Error building extension 'x'"]


def test_the_op_build_is_announced_only_when_it_will_happen(tmp_path, monkeypatch, capsys):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if distributed.torch.cuda.is_available():
        pytest.skip("the op is a CPU one")
    msg = distributed.announce_op_build()
    assert msg is not None and "once" in msg and str(tmp_path) in msg and "60-90 s" in msg
    assert msg in capsys.readouterr().err
    built = tmp_path / "deepspeed_shm_comm"
    built.mkdir(exist_ok=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    assert distributed.announce_op_build() is None
    assert capsys.readouterr().err == ""
