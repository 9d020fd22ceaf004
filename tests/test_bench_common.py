"""bench/common.py: result names that never overwrite, the environment of a run, the timers."""

from __future__ import annotations

import re

import pytest

from bench import common


def test_result_stem_takes_the_next_free_name_across_suffixes(tmp_path):
    sfx = (".json", ".md", ".png")
    first = common.result_stem(tmp_path, "attention", "nvidia-h200", "A5", "2026-12-04", sfx)
    assert first.name == "attention-nvidia-h200-2026-12-04-A5" and (tmp_path / f"{first.name}.json").exists()
    (tmp_path / "attention-nvidia-h200-2026-12-04-A5-2.png").write_bytes(b"")  # a stray plot takes -2 too
    second = common.result_stem(tmp_path, "attention", "nvidia-h200", "A5", "2026-12-04", sfx)
    assert second.name == "attention-nvidia-h200-2026-12-04-A5-3"
    assert common.result_stem(tmp_path, "model", "cpu", "", "2026-12-04").name == "model-cpu-2026-12-04"


@pytest.mark.parametrize("kind, device, date, label, match", [
    ("Attention", "nvidia-h200", "2026-12-04", "", "kind"),
    ("model", "NVIDIA H200", "2026-12-04", "", "device"),
    ("model", "cpu", "04-12-2026", "", "date"),
    ("model", "cpu", "2026-12-04", "a/b", "label"),
])
def test_result_name_rejects_malformed_parts(kind, device, date, label, match):
    with pytest.raises(ValueError, match=match):
        common.result_name(kind, device, date, label)


def test_out_folder_refuses_a_file_name(tmp_path):
    with pytest.raises(ValueError, match="--out takes a folder"):
        common.out_folder(str(tmp_path / "r.json"))
    assert common.out_folder(str(tmp_path / "runs")) == tmp_path / "runs"


def test_environment_names_the_code_and_the_machine():
    env = common.environment("cpu")
    assert env["device"].startswith("CPU ") and env["torch"] and re.fullmatch(r"\d{4}-\d{2}-\d{2}", env["date"])
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["git_commit"])
    assert common.slug(env["device"]).startswith("cpu-")


def test_timers_count_their_calls():
    calls = []
    ms, out = common.mean_step_ms(lambda: calls.append(1) or len(calls), steps=4, warmup=2, device="cpu")
    assert len(calls) == 6 and out == 6 and ms >= 0
    calls.clear()
    assert common.median_ms(lambda: calls.append(1), "cpu", reps=40) >= 0 and len(calls) == 1 + 4
    assert common.lower_median([4, 1, 3, 2]) == 2 and common.lower_median([{"t": 5}], key=lambda r: r["t"]) == {"t": 5}
    with pytest.raises(ValueError, match="steps"):
        common.mean_step_ms(lambda: None, steps=0, warmup=0, device="cpu")


def test_git_commit_of_a_copied_tree_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMSPARSE_GIT_COMMIT", "0123abc")
    assert common.git_commit() == "0123abc" and common.environment("cpu")["git_commit"] == "0123abc"
    from mmsparse.eval.longbench import software

    assert software()["commit"] == "0123abc"  # the long-clip runs record it
    monkeypatch.delenv("MMSPARSE_GIT_COMMIT")
    assert common.git_commit() != "0123abc"


def test_profile_breakdown_sums_kernel_time_by_category():
    """A step of matrix products and a concatenation: the products land in "matmul", the copy in
    "copy", and the categories add up to the kernel time per step."""
    import torch

    a, b = torch.randn(384, 384), torch.randn(384, 384)

    def step():
        for _ in range(4):
            c = a @ b
        return torch.cat([c, c])

    prof = common.profile_breakdown(step, 3, "cpu", top=5)
    cats = prof["categories"]
    assert prof["steps"] == 3 and 0 < prof["kernel_ms"] and prof["wall_ms"] > 0
    assert sum(cats.values()) == pytest.approx(prof["kernel_ms"])
    assert cats["matmul"] > 0.5 * prof["kernel_ms"], cats
    assert cats.get("copy", 0.0) > 0, cats
    assert len(prof["top"]) <= 5 and prof["top"][0]["category"] == "matmul"
    assert list(cats.values()) == sorted(cats.values(), reverse=True)
    with pytest.raises(ValueError, match="steps"):
        common.profile_breakdown(step, 0, "cpu")
