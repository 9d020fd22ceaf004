"""Training tasks in open_clip's style: a task wraps the model and its loss.

    task = CaptionTask(model)
    loss, metrics = task.training_forward(batch)   # batch: the mmsparse.data Batch dict

Metrics are detached 0-dim tensors (no device sync inside the step; call .item() to log).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .text import PAD


class CaptionTask(nn.Module):
    """Cross-entropy of the caption tokens (teacher forcing), padding ignored."""

    def __init__(self, model, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def training_forward(self, batch):
        ids = self.model.tokenize(batch)  # (B, L)
        logits = self.model(batch, ids[:, :-1])  # (B, L - 1, V)
        target = ids[:, 1:]
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=PAD,
                               label_smoothing=self.label_smoothing)
        with torch.no_grad():
            real = target != PAD
            acc = ((logits.argmax(-1) == target) & real).sum() / real.sum().clamp(min=1)
        return loss, {"loss": loss.detach(), "token_acc": acc, "tokens": real.sum()}

    forward = training_forward


class ContrastiveTask(nn.Module):
    """Symmetric InfoNCE between media embeddings and caption embeddings (CLIP)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_forward(self, batch):
        ids = self.model.tokenize(batch)
        media = self.model.media_embedding(batch)  # (B, P)
        text = self.model.text_embedding(ids)  # (B, P)
        scale = self.model.logit_scale.clamp(max=4.6052).exp()  # at most 100 (CLIP)
        logits = scale * media @ text.t()  # (B, B)
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        with torch.no_grad():
            m2t = (logits.argmax(1) == labels).float().mean()
            t2m = (logits.argmax(0) == labels).float().mean()
        return loss, {"loss": loss.detach(), "acc_media_to_text": m2t, "acc_text_to_media": t2m,
                      "logit_scale": scale.detach().squeeze(0)}

    forward = training_forward
