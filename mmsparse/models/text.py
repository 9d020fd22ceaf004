"""Caption text tokenizer: byte-level BPE trained on the manifest captions (`tokenizers`).

No hub downloads: the vocabulary is learned from the training captions and saved with the
model (`tokenizer.json`). Special tokens: <pad> = 0, <bos> = 1, <eos> = 2, <unk> = 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


class CaptionTokenizer:
    """Wraps a `tokenizers.Tokenizer` (byte-level BPE) with the caption model's conventions."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        for i, s in enumerate(SPECIALS):
            if tokenizer.token_to_id(s) != i:
                raise ValueError(f"tokenizer must map {s!r} to id {i}, got {tokenizer.token_to_id(s)}")

    # construction --------------------------------------------------------------------------
    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1) -> "CaptionTokenizer":
        """Train a byte-level BPE of at most `vocab_size` tokens on `captions`."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        captions = [c for c in captions if c]
        if not captions:
            raise ValueError("CaptionTokenizer.train needs at least one non-empty caption")
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(captions, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "CaptionTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception type
            raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from err
        return cls(tok)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    def to_str(self) -> str:
        return self.tok.to_str()

    # use -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text.strip().lower()).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        return self.tok.decode([i for i in ids if i > UNK]).strip()

    def batch(self, texts: list[str], max_len: int, device=None) -> torch.Tensor:
        """ids (B, L) long: <bos> text <eos> <pad>..., truncated to `max_len` (L <= max_len)."""
        rows = [[BOS] + self.encode(t)[: max_len - 2] + [EOS] for t in texts]
        length = max(len(r) for r in rows)
        out = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        if device is None:
            return out
        if torch.device(device).type == "cuda":  # from pinned memory: a copy that does not wait
            return out.pin_memory().to(device, non_blocking=True)  # for the GPU's queue
        return out.to(device)

    def __eq__(self, other) -> bool:
        return isinstance(other, CaptionTokenizer) and json.loads(self.to_str()) == json.loads(other.to_str())
