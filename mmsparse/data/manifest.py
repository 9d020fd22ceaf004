"""Manifests: JSON Lines, one sample a line.

A line is an object with:

- ``id`` (str, required, unique in the file),
- at least one of ``video``, ``audio``, ``image``: paths relative to the manifest's folder
  (absolute paths are kept as they are); ``audio`` may be omitted when the audio track of
  ``video`` is used,
- ``caption``: a string or a non-empty list of reference strings (optional for unlabelled data),
- ``start`` / ``end``: optional seconds bounding the clip inside ``video`` / ``audio``,
- anything else is kept in ``Sample.meta`` (e.g. the synthetic generator's event times).

Errors name the manifest file and the 1-based line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mmsparse.fileio import atomic_write_text

MEDIA_KEYS = ("video", "audio", "image")
_KNOWN = {"id", "caption", "start", "end", *MEDIA_KEYS}


@dataclass(frozen=True)
class Sample:
    """One validated manifest line; media paths are resolved against the manifest folder."""

    id: str
    video: Path | None = None
    audio: Path | None = None
    image: Path | None = None
    captions: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def caption(self) -> str:
        """The first reference (the training target); empty when unlabelled."""
        return self.captions[0] if self.captions else ""

    @property
    def primary_path(self) -> Path:
        """The file that failures of this sample are reported against."""
        return self.video or self.image or self.audio  # type: ignore[return-value]


def parse_line(obj: Any, root: Path, where: str) -> Sample:
    """Validate one decoded JSON value; ``where`` (``file:line``) prefixes every error."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    sid = obj.get("id")
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"{where}: 'id' must be a non-empty string, got {sid!r}")
    paths: dict[str, Path | None] = {}
    for key in MEDIA_KEYS:
        val = obj.get(key)
        if val is None:
            paths[key] = None
            continue
        if not isinstance(val, str) or not val:
            raise ValueError(f"{where}: '{key}' must be a non-empty path string, got {val!r}")
        p = Path(val)
        paths[key] = p if p.is_absolute() else root / p
    if not any(paths.values()):
        raise ValueError(f"{where}: sample {sid!r} names no media; expected one of {MEDIA_KEYS}")
    cap = obj.get("caption", [])
    if isinstance(cap, str):
        caps: tuple[str, ...] = (cap,)
    elif isinstance(cap, list) and all(isinstance(c, str) for c in cap):
        caps = tuple(cap)
    else:
        raise ValueError(f"{where}: 'caption' must be a string or a list of strings, got {cap!r}")
    start, end = obj.get("start"), obj.get("end")
    for name, val in (("start", start), ("end", end)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0):
            raise ValueError(f"{where}: '{name}' must be a number of seconds >= 0, got {val!r}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"{where}: 'end' ({end}) must be greater than 'start' ({start})")
    if (start is not None or end is not None) and paths["video"] is None and paths["audio"] is None:
        raise ValueError(f"{where}: 'start'/'end' need a 'video' or 'audio' path")
    meta = {k: v for k, v in obj.items() if k not in _KNOWN}
    return Sample(
        id=sid, video=paths["video"], audio=paths["audio"], image=paths["image"], captions=caps,
        start=None if start is None else float(start), end=None if end is None else float(end),
        line=int(where.rsplit(":", 1)[-1]) if where.rsplit(":", 1)[-1].isdigit() else 0, meta=meta,
    )


def load_manifest(path: str | Path) -> list[Sample]:
    """Read and validate a manifest.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: a line is not JSON, misses a field, has a wrong type, or repeats an id;
            the message names ``<manifest>:<line>``.
    """
    path = Path(path)
    root = path.resolve().parent
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            s = parse_line(obj, root, where)
            if s.id in seen:
                raise ValueError(f"{where}: duplicate id {s.id!r} (first on line {seen[s.id]})")
            seen[s.id] = lineno
            samples.append(s)
    if not samples:
        raise ValueError(f"{path}: manifest has no samples")
    return samples


def manifest_captions(path: str | Path) -> list[str]:
    """Every reference caption of a manifest, in order (what a caption tokenizer trains on)."""
    return [c for s in load_manifest(path) for c in (s.captions or [s.caption])]


def write_manifest(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records (already holding manifest-relative paths) as JSON Lines, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    return path
