"""mmsparse.models: the multimodal sparse transformer, the caption decoder, tasks, registry.

Public API::

    from mmsparse.data import manifest_captions
    from mmsparse.models import CaptionTokenizer, create_model, CaptionTask, ContrastiveTask, VideoCaptioner

    tok = CaptionTokenizer.train(manifest_captions("data/manifest.jsonl"), vocab_size=1024)  # byte-level BPE
    model = create_model("captioner_base", tokenizer=tok)        # tiny / small / base / large
    model = create_model("captioner_base", tokenizer=tok, schedule="dense")   # dense SDPA baseline

    task = CaptionTask(model)                        # or ContrastiveTask(model)
    loss, metrics = task.training_forward(batch)     # batch: the mmsparse.data Batch dict

    captions = model.generate(batch, beam=4, max_len=32, length_penalty=1.0)   # list[str]
    model.save_pretrained("run/model")               # model.safetensors + config.json + tokenizer.json
    model = VideoCaptioner.from_pretrained("run/model", map_location="cuda", backend="auto")

- `model(batch, ids)` -> teacher-forced logits (B, L, V); `model.encode(batch)` -> (memory
  (B, N, E), pad_mask (B, N), StreamLayout). The forward takes the data batch as it comes
  (tensors are moved to the model's device) and raises ValueError for a missing required
  modality, a clip longer than `max_frames`, or frames of a wrong shape.
- `model.blocks`: the encoder's ModuleList of `SparseBlock(x, block_layout, rope)`, and
  `model.decoder.blocks`: wrap them from outside for activation checkpointing / DeepSpeed.
- Patterns per layer come from `ModelConfig.schedule` (schedule.py); `backend` is passed to
  `sparse_attention` ("auto" / "reference" / "sdpa" / "flex" / "triton"; `model.set_backend`).
- `ModelConfig`: every knob, saved as config.json; `create_model(name, **overrides)`;
  `list_models()`.
- `from_pretrained` raises ValueError on a missing, corrupt (checksum, safetensors) or
  mismatched (keys, shapes, tokenizer size) file.
"""

from .captioner import ModelConfig, VideoCaptioner
from .decoder import CaptionDecoder
from .layers import SparseBlock, SparseSelfAttention
from .registry import create_model, list_models, register_model
from .schedule import SCHEDULES, layer_pattern
from .tasks import CaptionTask, ContrastiveTask
from .text import CaptionTokenizer

__all__ = [
    "CaptionDecoder", "CaptionTask", "CaptionTokenizer", "ContrastiveTask", "ModelConfig", "SCHEDULES",
    "SparseBlock", "SparseSelfAttention", "VideoCaptioner", "create_model", "layer_pattern",
    "list_models", "register_model",
]
