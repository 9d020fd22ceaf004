"""Caption videos with a saved VideoCaptioner: files or manifests in, one record per input out.

Legend: B clips per model call, T sampled frames, C = 3 channels, H x W frame size, M mel bins,
Tm audio feature frames.

    Captioner(model_dir).caption(["a.mp4", "data/manifest.jsonl"], beam=4)
      -> [{"id", "path", "caption", "frames", "duration", "timings": {...}}, ...]

How a clip becomes model input: the preprocessing of the run that trained the model (its
``config.yaml`` beside the exported folder: frames, crop, short side, audio on/off) unless the
caller overrides it; frames are sampled uniformly over the whole clip (``count`` mode), so a
video of any length becomes ``frames`` frames. With ``window_seconds`` the clip is cut into
windows instead and each window is captioned with its time stamps (``segments``).

Audio longer than the model's ``max_audio_frames`` is average-pooled in time to fit, with
``audio_hop_seconds`` scaled by the same factor, so the audio stays aligned with the frames
(the audio counterpart of sampling frames).

In window mode the soundtrack of a video is decoded once and cut into the windows
(``audio.slice_wave``): decoding it per window would read the whole track again each time
(decord's AudioReader loads the whole file), a cost quadratic in the video's length. The
windows get the same audio as ``start`` / ``end`` manifest lines for them would.

Failure behaviour: an input that cannot be decoded (missing, empty, truncated, corrupt ...)
yields an error record ``{"id", "path", "error", "reason"}`` in its place and the other inputs
are still captioned; so does an input the model cannot take (``missing_modality``: e.g. an
audio-only line for a model that requires video; see ``UnsupportedInput``). A replacement
sample is never drawn (``strict`` decoding), so a caption always belongs to the file it is
reported for. A missing or corrupt model folder raises ``ModelLoadError`` naming the folder
and what is wrong.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from mmsparse.data import DataConfig, MediaDataset, MediaError, Sample, collate, load_manifest
from mmsparse.data import audio as audio_mod
from mmsparse.data.decode import call_with_timeout
from mmsparse.models.text import PAD

MANIFEST_SUFFIXES = (".jsonl", ".json")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ModelLoadError(ValueError):
    """The model folder is missing, is not a saved captioner, or holds corrupt files."""


class UnsupportedInput(ValueError):
    """An input that decodes but that the model cannot take: a modality it requires is missing
    (an audio-only line for a video model, a silent video for a model that requires audio), or
    it has none of the modalities the model reads. Reported like a MediaError: ``path``,
    ``reason`` (``missing_modality``) and ``detail``, in an error record of its own."""

    reason = "missing_modality"

    def __init__(self, path: str | os.PathLike, detail: str):
        self.path, self.detail = str(path), detail
        super().__init__(f"{path}: {self.reason} ({detail})")


@dataclass
class Preprocess:
    """How a clip is turned into model input (the run's data settings by default)."""

    frames: int = 16
    crop: tuple[int, int] | None = None
    short_side: int | None = None
    load_audio: bool = True
    backend: str = "decord"
    extra: dict[str, Any] = field(default_factory=dict)   # further DataConfig fields
    source: str = "defaults"

    def data_config(self, frames: int | None = None) -> DataConfig:
        """The DataConfig of captioning. Pixels stay uint8 (``extra`` may say otherwise): the
        model normalises them on its device with the float path's arithmetic, so the captions
        are the same while the CPU does no float work per pixel and a quarter of the bytes move."""
        kw = dict(backend=self.backend, mode="count", num_frames=frames or self.frames, crop=self.crop,
                  short_side=self.short_side, load_audio=self.load_audio, load_image=True, train=False,
                  flip=False, strict=True, min_frames=1, max_retries=0, pixel_dtype="uint8")
        kw.update({k: v for k, v in self.extra.items() if k in DataConfig.__dataclass_fields__
                   and k not in ("strict", "train", "max_retries")})
        return DataConfig(**kw)


def resolve_model_dir(model_dir: str | os.PathLike) -> Path:
    """The folder holding config.json + model.safetensors: ``model_dir`` itself or, for a run
    folder, its ``export/``. Raises ModelLoadError when there is none."""
    d = Path(model_dir)
    if not d.exists():
        raise ModelLoadError(f"model folder {d} does not exist (expected a folder written by save_pretrained, "
                             f"e.g. <run folder>/export)")
    if not d.is_dir():
        raise ModelLoadError(f"model folder {d} is a file, not a folder written by save_pretrained")
    if not (d / "config.json").exists() and (d / "export" / "config.json").is_file():
        return d / "export"
    return d


def load_preprocess(model_dir: str | os.PathLike) -> Preprocess:
    """The data settings of the run that trained the model (``<run>/config.yaml``, the parent of
    an exported ``<run>/export``), or defaults when there is no run config beside the model."""
    d = Path(model_dir)
    for cand in (d / "run_config.yaml", d.parent / "config.yaml"):
        if cand.is_file():
            import yaml

            try:
                tree = yaml.safe_load(cand.read_text()) or {}
            except yaml.YAMLError:
                continue
            data = tree.get("data") if isinstance(tree, dict) else None
            if not isinstance(data, dict):
                continue
            crop = data.get("crop")
            # DataConfig's fields sit in ``data`` itself, or under ``data.extra`` in configs saved
            # before 2026-12 (with ``frames`` for ``num_frames``)
            flat = {**(data.get("extra") or {}), **data}
            return Preprocess(
                frames=int(data.get("num_frames") or data.get("frames") or 16), crop=tuple(crop) if crop else None,
                short_side=data.get("short_side"), load_audio=bool(data.get("load_audio", True)),
                backend=str(data.get("backend") or "decord"),
                extra={k: v for k, v in flat.items()
                       if k in ("mode", "target_fps", "stride", "sample_rate", "n_mels", "hop_seconds",
                                "win_seconds", "normalize", "decode_threads", "decode_timeout",
                                "audio_backend", "video_fallback")},
                source=str(cand))
    return Preprocess()


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto",
               **overrides):
    """VideoCaptioner.from_pretrained with every failure turned into a ModelLoadError."""
    from mmsparse.models import VideoCaptioner

    d = resolve_model_dir(model_dir)
    try:
        model = VideoCaptioner.from_pretrained(d, map_location=device, backend=backend, **overrides)
    except ModelLoadError:
        raise
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise ModelLoadError(f"cannot load the model in {d}: {err}") from err
    if model.tokenizer is None:
        raise ModelLoadError(f"model folder {d} has no tokenizer.json: it cannot write captions")
    return model.eval()


@dataclass
class _Unit:
    """One model input: a whole clip, or one window of it."""

    item: int
    sample: Sample
    start: float | None = None
    end: float | None = None
    data: dict | None = None
    caption: str | None = None
    decode_s: float = 0.0
    model_s: float = 0.0
    frames: int = 0
    logprobs: list[float] | None = None


@dataclass
class _Item:
    index: int
    sample: Sample
    path: str
    units: list[_Unit] = field(default_factory=list)
    error: MediaError | UnsupportedInput | None = None
    duration: float | None = None
    fps: float | None = None  # window mode: the video's frame rate, from the duration probe
    pending: int = 0
    decoded: bool = False


class Captioner:
    """Caption videos, images and manifests with a model saved by ``save_pretrained``.

    Args:
        model_dir: the saved model (or a run folder holding ``export/``).
        device: where the model runs.
        backend: attention backend of the encoder ("auto", "reference", "sdpa", "flex", "triton", "flash").
        preprocess: override the data settings read from the run (``load_preprocess``).
        max_frames: lift the model's frame limit (the weights do not depend on it).
    """

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto",
                 preprocess: Preprocess | None = None, max_frames: int | None = None):
        d = resolve_model_dir(model_dir)
        overrides = {"max_frames": max_frames} if max_frames else {}
        self.model = load_model(d, device, backend, **overrides)
        self.model_dir = d
        self.device = torch.device(device)
        self.preprocess = preprocess or load_preprocess(d)
        cfg = self.model.cfg
        self.patch = (cfg.tubelet[1], cfg.tubelet[2])
        self.modalities = set(cfg.modalities)
        self.required = tuple(cfg.required_modalities)
        self._candidates: list[str] | None = None
        self._cost = None

    # inputs ----------------------------------------------------------------------------------
    @staticmethod
    def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike | Sample]) -> list[Sample]:
        """Video / image paths and manifests -> Samples (a manifest contributes its lines, with
        their ids and references; a bare file gets its stem as id, made unique)."""
        if isinstance(inputs, (str, os.PathLike, Sample)):
            inputs = [inputs]
        out: list[Sample] = []
        seen: set[str] = set()
        for x in inputs:
            if isinstance(x, Sample):
                batch = [x]
            else:
                p = Path(x)
                if p.suffix.lower() in MANIFEST_SUFFIXES:
                    batch = load_manifest(p)  # a bad manifest is an error of the call: raise
                else:
                    key = "image" if p.suffix.lower() in IMAGE_SUFFIXES else "video"
                    batch = [Sample(id=p.stem or str(p), **{key: p})]
            for s in batch:
                sid, k = s.id, 2
                while sid in seen:
                    sid, k = f"{s.id}#{k}", k + 1
                seen.add(sid)
                out.append(s if sid == s.id else replace(s, id=sid))
        return out

    # captioning ------------------------------------------------------------------------------
    def caption(self, inputs, beam: int = 1, frames: int | None = None, batch: int = 8,
                window_seconds: float | None = None, window_stride: float | None = None,
                max_len: int | None = None, length_penalty: float = 1.0, candidates: Sequence[str] | None = None,
                count_attention=None) -> list[dict]:
        """Caption every input; one record per input, in input order (see ``iter_caption``)."""
        return list(self.iter_caption(inputs, beam, frames, batch, window_seconds, window_stride, max_len,
                                      length_penalty, candidates, count_attention))

    def iter_caption(self, inputs, beam: int = 1, frames: int | None = None, batch: int = 8,
                     window_seconds: float | None = None, window_stride: float | None = None,
                     max_len: int | None = None, length_penalty: float = 1.0,
                     candidates: Sequence[str] | None = None, count_attention=None) -> Iterator[dict]:
        """Yield one record per input, in input order, as soon as it is done.

        A record: ``id``, ``path``, ``caption``, ``frames`` (sampled per clip or window),
        ``duration`` (seconds, when known), ``timings`` (``decode_s``, ``model_s``, ``total_s``:
        decode time of this input and its share of the batched model time), ``references``
        (manifest captions, when present), ``segments`` (window mode: ``start``, ``end``,
        ``caption`` per window), or ``error`` and ``reason`` when the input could not be read or
        the model cannot take it (``missing_modality``).

        ``candidates``: also rank these captions by the model's log-likelihood given the clip
        (multiple choice): ``choice`` (the most likely) and ``choice_logprobs`` (sum of token
        log-probabilities, aligned with ``candidates``); per window in window mode.
        ``count_attention``: an object with an ``active`` flag (e.g. ``longclip.AttentionCost``)
        switched on only while captions are generated, so hooks on the encoder count each clip once.
        """
        if batch < 1 or beam < 1:
            raise ValueError(f"batch and beam must be >= 1, got batch={batch}, beam={beam}")
        if window_seconds is not None and window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        if window_stride is not None and (window_seconds is None or window_stride <= 0):
            raise ValueError("window_stride needs window_seconds and must be > 0")
        frames = frames or self.preprocess.frames
        limit = self.model.cfg.max_frames
        if limit is not None and frames > limit:
            raise ValueError(f"frames={frames} exceeds the model's max_frames={limit} (pass max_frames= to "
                             f"Captioner to lift it)")
        max_len = max_len or self.model.cfg.max_text_len - 1
        dcfg = self.preprocess.data_config(frames)
        image_cfg = replace(dcfg, image_as_video=True)
        samples = self.expand_inputs(inputs)
        gen = dict(beam=beam, max_len=max_len, length_penalty=length_penalty)
        self._candidates = list(candidates) if candidates else None
        self._cost = count_attention
        if count_attention is not None:
            count_attention.active = False

        items: list[_Item] = []
        ready: list[_Unit] = []
        emitted = 0
        for idx, s in enumerate(samples):
            item = _Item(idx, s, str(s.primary_path))
            items.append(item)
            cfg = image_cfg if (s.video is None and s.image is not None) else dcfg
            try:
                units = self._plan_units(item, window_seconds, window_stride, dcfg.backend)
                self._decode_units(item, units, cfg, window_seconds is not None)
                item.units = units
            except (MediaError, UnsupportedInput) as err:
                item.error, item.units = err, []
            except (ValueError, RuntimeError, OSError) as err:  # e.g. a frame size the model cannot take
                item.error = MediaError(item.path, "corrupt", f"{type(err).__name__}: {err}")
                item.units = []
            item.pending = len(item.units)
            item.decoded = True
            ready.extend(item.units)
            while len(ready) >= batch:
                self._run(ready[:batch], items, gen)
                ready = ready[batch:]
            while emitted < len(items) and items[emitted].decoded and items[emitted].pending == 0:
                yield self._record(items[emitted], window_seconds is not None)
                items[emitted].units = []  # free the decoded tensors
                emitted += 1
        if ready:
            self._run(ready, items, gen)
        while emitted < len(items):
            yield self._record(items[emitted], window_seconds is not None)
            emitted += 1

    # internals -------------------------------------------------------------------------------
    def _decode_units(self, item: _Item, units: list[_Unit], cfg: DataConfig, windowed: bool) -> None:
        """Decode and fit every unit of ``item`` (``u.data``, ``u.decode_s``) and check that the
        model can take it. The windows of a video share one decode of its soundtrack, cut per
        window (only when the model reads audio: otherwise ``_fit`` would drop it anyway).

        Raises:
            MediaError: the input (or its soundtrack) cannot be decoded.
            UnsupportedInput: the model cannot take the decoded input.
        """
        track: dict[str, Any] = {}  # "wave": the whole soundtrack (S,), None when there is none
        for u in units:
            t0 = time.perf_counter()
            if windowed and u.sample.video is not None:
                d = MediaDataset([u.sample], replace(cfg, load_audio=False))[0]
                if cfg.load_audio and "audio" in self.modalities:
                    self._add_window_audio(d, item, u.sample, cfg, track)
            else:
                d = MediaDataset([u.sample], cfg)[0]
            u.data = self._fit(d)
            u.decode_s = time.perf_counter() - t0
            self._check_modalities(u.data, item.path)

    def _add_window_audio(self, d: dict, item: _Item, s: Sample, cfg: DataConfig, track: dict) -> None:
        """Give window ``d`` (decoded without audio) the features ``MediaDataset`` would compute
        for it, from the video's soundtrack decoded once into ``track`` (shared by its windows).

        The audio span is the dataset's: from the first sampled frame to one frame past the
        last, with the frame rate of the video's (duration probe) reader.
        """
        src = s.audio or s.video
        if "wave" not in track:
            try:
                track["wave"] = call_with_timeout(
                    lambda: audio_mod.read_audio(src, cfg.sample_rate, None, None, cfg.audio_backend),
                    cfg.decode_timeout, src)
            except MediaError as err:  # as MediaDataset: a missing track is fine unless asked for
                if err.reason != "no_audio" or cfg.require_audio or s.audio is not None:
                    raise
                track["wave"] = None
        if track["wave"] is None:
            return
        if item.fps is None:
            item.fps = _probe(s.video, cfg.backend)[1]
        t0 = float(d["video_times"][0])
        t1 = float(d["video_times"][-1]) + 1.0 / item.fps
        wave = audio_mod.slice_wave(track["wave"], cfg.sample_rate, t0, t1)  # (S,)
        d["audio"] = audio_mod.log_mel(wave, cfg.sample_rate, cfg.n_mels, cfg.win_seconds, cfg.hop_seconds)
        d["audio_start"] = t0

    def _check_modalities(self, d: dict, path: str) -> None:
        """Raise UnsupportedInput when fitted input ``d`` lacks a modality the model requires or
        has none that it reads (the model would reject the whole batch it is put in)."""
        have = [m for m in ("video", "audio", "image") if d.get(m) is not None]
        missing = [m for m in self.required if d.get(m) is None]
        if missing:
            raise UnsupportedInput(path, f"the model requires {' and '.join(missing)}; this input has "
                                         f"{' and '.join(have) or 'no media'} (model reads {sorted(self.modalities)})")
        if not self.modalities.intersection(have):
            raise UnsupportedInput(path, f"this input has {' and '.join(have) or 'no media'}, none of the "
                                         f"modalities the model reads ({sorted(self.modalities)})")

    def _plan_units(self, item: _Item, window: float | None, stride: float | None, backend: str) -> list[_Unit]:
        s = item.sample
        if s.video is None:
            return [_Unit(item.index, s)]
        if window is None:
            if s.start is not None or s.end is not None:
                item.duration = (s.end - (s.start or 0.0)) if s.end is not None else None
            else:
                item.duration = _probe(s.video, backend)[0]
            return [_Unit(item.index, s)]
        t0 = s.start or 0.0
        if s.end is not None:
            t1 = s.end
        else:
            t1, item.fps = _probe(s.video, backend)
        item.duration = t1 - t0
        stride = stride or window
        units, a = [], t0
        while True:
            b = min(a + window, t1)
            units.append(_Unit(item.index, replace(s, start=a, end=b), a, b))
            if b >= t1 - 1e-6:
                break
            a += stride
        return units

    def _fit(self, d: dict) -> dict:
        """Center-crop frames to a multiple of the patch size; pool over-long audio in time."""
        v = d.get("video")
        if v is not None:
            kh, kw = self.patch
            h, w = v.shape[-2:]
            hh, ww = h - h % kh, w - w % kw
            if hh == 0 or ww == 0:
                raise ValueError(f"frames of {h}x{w} are smaller than the model's {kh}x{kw} patch")
            if (hh, ww) != (h, w):
                y, x = (h - hh) // 2, (w - ww) // 2
                d["video"] = v[..., y:y + hh, x:x + ww].contiguous()
        a = d.get("audio")
        if a is not None and "audio" not in self.modalities:
            d.pop("audio"), d.pop("audio_start", None)
            a = None
        limit = self.model.cfg.max_audio_frames
        if a is not None and limit is not None and a.shape[-1] > limit:
            k = math.ceil(a.shape[-1] / limit)
            d["audio"] = F.avg_pool1d(a[None], k, k, ceil_mode=True)[0]  # (M, ceil(Tm / k))
            d["audio_hop_seconds"] = float(d.get("audio_hop_seconds", 0.01)) * k
        return d

    @torch.no_grad()
    def _run(self, units: list[_Unit], items: list[_Item], gen: dict) -> None:
        # one model call per group of equal frame size and audio hop (collate needs one shape)
        groups: dict[tuple, list[_Unit]] = {}
        for u in units:
            v = u.data.get("video")
            key = (None if v is None else tuple(v.shape[1:]), u.data.get("audio_hop_seconds"),
                   "audio" in u.data)
            groups.setdefault(key, []).append(u)
        for group in groups.values():
            t0 = time.perf_counter()
            b = collate([u.data for u in group])
            if self._cost is not None:
                self._cost.active = True
            try:
                # with candidates to rank, the clips are encoded once for both
                encoded = None
                if self._candidates:
                    with torch.no_grad():
                        encoded = self.model.encode(b)
                caps = self.model.generate(b, **gen, encoded=encoded)
            finally:
                if self._cost is not None:
                    self._cost.active = False
            logps = self._choice_logprobs(encoded) if self._candidates else None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = (time.perf_counter() - t0) / len(group)
            for j, (u, c) in enumerate(zip(group, caps)):
                u.caption, u.model_s = c, dt
                if logps is not None:
                    u.logprobs = [round(float(v), 4) for v in logps[j]]
                u.frames = int(u.data["video"].shape[0]) if "video" in u.data else 1
                u.data = None
                items[u.item].pending -= 1

    @torch.no_grad()
    def _choice_logprobs(self, encoded: tuple) -> torch.Tensor:
        """(B, C) sum of log-probabilities of each candidate caption given each clip, from the
        clips' encoding (`VideoCaptioner.encode`'s result)."""
        model, cands = self.model, self._candidates
        memory, pad, _ = encoded
        mem, mpad = model.decoder.prepare_memory(memory, pad)  # (B, P, E)
        ids = model.tokenizer.batch(cands, model.cfg.max_text_len, self.device)  # (C, L): <bos> text <eos> <pad>
        nb, nc = mem.shape[0], ids.shape[0]
        out = torch.empty(nb, nc)
        for i in range(nb):  # one clip at a time: C candidates share its memory's keys and values
            kvs = [(k.expand(nc, -1, -1, -1), v.expand(nc, -1, -1, -1))
                   for k, v in model.decoder.memory_kvs(mem[i:i + 1])]
            p = None if mpad is None else mpad[i:i + 1].expand(nc, -1)
            logits = model.decoder(ids[:, :-1], None, p, prepared=True, mem_kvs=kvs).float()  # (C, L - 1, V)
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (C, L - 1)
            out[i] = (lp * (ids[:, 1:] != PAD)).sum(-1).cpu()
        return out

    def _record(self, item: _Item, windowed: bool) -> dict:
        s = item.sample
        rec: dict[str, Any] = {"id": s.id, "path": item.path}
        if s.captions:
            rec["references"] = list(s.captions)
        if item.error is not None:
            rec.update(error=str(item.error), reason=item.error.reason)
            return rec
        units = item.units
        dec = sum(u.decode_s for u in units)
        mod = sum(u.model_s for u in units)
        if windowed:
            rec["caption"] = "; ".join(u.caption for u in units)
            rec["segments"] = [{"start": round(u.start, 3), "end": round(u.end, 3), "caption": u.caption}
                               for u in units]
        else:
            rec["caption"] = units[0].caption
        if self._candidates:
            if windowed:
                for seg, u in zip(rec["segments"], units):
                    seg["choice"] = self._candidates[max(range(len(u.logprobs)), key=u.logprobs.__getitem__)]
                    seg["choice_logprobs"] = u.logprobs
            else:
                lp = units[0].logprobs
                rec["choice"] = self._candidates[max(range(len(lp)), key=lp.__getitem__)]
                rec["choice_logprobs"] = lp
        rec["frames"] = units[0].frames
        if item.duration is not None:
            rec["duration"] = round(float(item.duration), 3)
        rec["timings"] = {"decode_s": round(dec, 4), "model_s": round(mod, 4), "total_s": round(dec + mod, 4)}
        return rec


def _probe(path: Path, backend: str) -> tuple[float, float]:
    """(seconds, fps) of the video at `path`, read by `backend` or, when its decoder rejects the
    file (AV1 with decord 0.6.0), by the other one: the same fallback the clips themselves
    decode with."""
    from mmsparse.data.decode import open_video, with_fallback
    from mmsparse.data.errors import media_errors

    def probe(b: str) -> tuple[float, float]:
        with media_errors(path):
            r = open_video(path, b)
            return r.num_frames / r.fps, r.fps

    return with_fallback(probe, path, backend)[0]

