"""Converters from the common caption datasets' annotation files to mmsparse manifests.

Each converter reads the dataset's annotation file in its published layout and returns manifest
records whose ``video`` path comes from ``video_pattern`` (a ``str.format`` pattern relative to
the manifest, with ``{id}`` and, where the dataset has them, ``{split}``, ``{recipe_type}``).

- MSR-VTT (``train_val_videodatainfo.json`` / ``test_videodatainfo.json``)::

      {"videos": [{"video_id": "video0", "split": "train", "start time": .., "end time": .., ...}],
       "sentences": [{"video_id": "video0", "caption": "...", "sen_id": 0}, ...]}

  One record per video with all its sentences as references. The clips are already cut, so
  the YouTube start/end times are not copied.
- ActivityNet Captions (``train.json``, ``val_1.json``, ``val_2.json``)::

      {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], ...], "sentences": [...]}}

  One record per event (``<video>_<k>``) with its start / end clamped to the duration.
- YouCook2 (``youcookii_annotations_trainval.json``)::

      {"database": {"GLd3aX16zBg": {"duration": 241.62, "subset": "training", "recipe_type": "113",
                    "annotations": [{"segment": [90, 102], "id": 0, "sentence": "..."}, ...]}}}

  One record per annotated segment (``<video>_<id>``).

Malformed entries raise ValueError naming the annotation file and the entry; events whose
segment is empty after clamping are skipped and counted in ``ConvertReport``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .manifest import write_manifest

FORMATS = ("msrvtt", "activitynet", "youcook2")


@dataclass
class ConvertReport:
    records: int = 0
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.records} records" + (f", {len(self.skipped)} skipped" if self.skipped else "")


def _load(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def _need(obj: Any, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing key {key!r}")
    val = obj[key]
    if not isinstance(val, kind) or isinstance(val, bool):
        raise ValueError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {type(val).__name__}")
    return val


def _segment(seg: Any, duration: float | None, where: str) -> tuple[float, float]:
    if not (isinstance(seg, (list, tuple)) and len(seg) == 2 and all(isinstance(x, (int, float)) for x in seg)):
        raise ValueError(f"{where}: a segment must be [start, end] seconds, got {seg!r}")
    a, b = max(0.0, float(seg[0])), float(seg[1])
    if duration is not None:
        b = min(b, float(duration))
    return a, b


def msrvtt(ann: str | Path, video_pattern: str = "videos/{id}.mp4", split: str | None = None,
           report: ConvertReport | None = None) -> list[dict]:
    """MSR-VTT annotation JSON -> records (one a video, every sentence a reference)."""
    data = _load(ann)
    report = report if report is not None else ConvertReport()
    videos = _need(data, "videos", list, str(ann))
    sentences = _need(data, "sentences", list, str(ann))
    caps: dict[str, list[tuple[int, str]]] = {}
    for k, s in enumerate(sentences):
        where = f"{ann}: sentences[{k}]"
        vid = _need(s, "video_id", str, where)
        caps.setdefault(vid, []).append((int(s.get("sen_id", k)), _need(s, "caption", str, where).strip()))
    out = []
    for k, v in enumerate(videos):
        where = f"{ann}: videos[{k}]"
        vid = _need(v, "video_id", str, where)
        vsplit = v.get("split")
        if split is not None and vsplit != split:
            continue
        refs = [c for _, c in sorted(caps.get(vid, []))]
        if not refs:
            report.skipped.append(f"{vid}: no sentences")
            continue
        out.append({"id": vid, "video": video_pattern.format(id=vid, split=vsplit or ""), "caption": refs})
    report.records += len(out)
    return out


def activitynet(ann: str | Path, video_pattern: str = "videos/{id}.mp4", split: str | None = None,
                report: ConvertReport | None = None) -> list[dict]:
    """ActivityNet Captions JSON -> records (one an event, with start / end)."""
    data = _load(ann)
    report = report if report is not None else ConvertReport()
    if not isinstance(data, dict):
        raise ValueError(f"{ann}: expected an object keyed by video id, got {type(data).__name__}")
    out = []
    for vid, entry in data.items():
        where = f"{ann}: {vid}"
        duration = float(_need(entry, "duration", (int, float), where))
        stamps = _need(entry, "timestamps", list, where)
        sents = _need(entry, "sentences", list, where)
        if len(stamps) != len(sents):
            raise ValueError(f"{where}: {len(stamps)} timestamps but {len(sents)} sentences")
        for k, (seg, sent) in enumerate(zip(stamps, sents)):
            a, b = _segment(seg, duration, f"{where}: timestamps[{k}]")
            if not isinstance(sent, str):
                raise ValueError(f"{where}: sentences[{k}] must be a string")
            if b <= a:
                report.skipped.append(f"{vid}[{k}]: empty segment {seg}")
                continue
            out.append({"id": f"{vid}_{k}", "video": video_pattern.format(id=vid, split=split or ""),
                        "caption": sent.strip(), "start": a, "end": b})
    report.records += len(out)
    return out


def youcook2(ann: str | Path, video_pattern: str = "videos/{id}.mp4", split: str | None = None,
             report: ConvertReport | None = None) -> list[dict]:
    """YouCook2 annotation JSON -> records (one an annotated step, with start / end).

    ``split`` filters on the ``subset`` field (``training`` / ``validation``); the pattern may use
    ``{split}`` and ``{recipe_type}`` to match the raw_videos/<subset>/<recipe_type>/ layout.
    """
    data = _load(ann)
    report = report if report is not None else ConvertReport()
    db = _need(data, "database", dict, str(ann))
    out = []
    for vid, entry in db.items():
        where = f"{ann}: database.{vid}"
        subset = entry.get("subset", "") if isinstance(entry, dict) else ""
        if split is not None and subset != split:
            continue
        duration = entry.get("duration")
        anns = _need(entry, "annotations", list, where)
        path = video_pattern.format(id=vid, split=subset, recipe_type=entry.get("recipe_type", ""))
        for k, a in enumerate(anns):
            w = f"{where}.annotations[{k}]"
            s, e = _segment(_need(a, "segment", list, w), duration, w)
            sent = _need(a, "sentence", str, w)
            if e <= s:
                report.skipped.append(f"{vid}[{k}]: empty segment")
                continue
            out.append({"id": f"{vid}_{a.get('id', k)}", "video": path, "caption": sent.strip(),
                        "start": s, "end": e})
    report.records += len(out)
    return out


CONVERTERS: dict[str, Callable[..., list[dict]]] = {"msrvtt": msrvtt, "activitynet": activitynet,
                                                    "youcook2": youcook2}


def convert(fmt: str, ann: str | Path, out: str | Path, video_pattern: str = "videos/{id}.mp4",
            split: str | None = None) -> ConvertReport:
    """Convert annotation file ``ann`` in format ``fmt`` and write the manifest ``out``."""
    if fmt not in CONVERTERS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    report = ConvertReport()
    records = CONVERTERS[fmt](ann, video_pattern=video_pattern, split=split, report=report)
    if not records:
        raise ValueError(f"{ann}: no records converted" + (f" for split {split!r}" if split else ""))
    write_manifest(out, records)
    return report
