"""Caption decoder: a causal text transformer with cross-attention to the encoder tokens.

Legend: B batch (x beams in generation), L text tokens, P cached past tokens, N memory
(encoder) tokens, Q pooled memory tokens, C decoder channels, E encoder channels, H heads,
D head dim, V vocabulary.

Cross-attention reads either every encoder token (`cross="all"`) or Q tokens pooled from them
by learned queries (`cross="pooled"`, CoCa's attentional pooler), which keeps decoding cheap
on 100K-token streams. Generation keeps a KV cache: per layer the self-attention keys and
values of the tokens so far and the cross-attention keys and values of the memory (computed
once per clip).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

from .text import EOS


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, h, c // h).transpose(1, 2)  # (B, H, n, D)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, n, C)


def _key_mask(pad: torch.Tensor | None) -> torch.Tensor | None:
    """pad (B, N) True on padding -> SDPA boolean mask (B, 1, 1, N) True where attended."""
    return None if pad is None else (~pad)[:, None, None, :]


class CrossAttention(nn.Module):
    """Queries (B, L, C) attend keys / values made from memory (B, N, E)."""

    def __init__(self, dim: int, mem_dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.h = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(mem_dim, 2 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def memory_kv(self, memory: torch.Tensor):
        """memory (B, N, E) -> k, v (B, H, N, D)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self.k_norm(_heads(k, self.h)), _heads(v, self.h)

    def forward(self, x, kv, pad=None):
        q = self.q_norm(_heads(self.q(x), self.h))
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=_key_mask(pad))
        return self.proj(_merge(out))


class AttentionalPooler(nn.Module):
    """Q learned queries attend the memory (B, N, E) -> (B, Q, E) (CoCa)."""

    def __init__(self, mem_dim: int, n_queries: int, num_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, mem_dim) * 0.02)
        self.norm_q = nn.LayerNorm(mem_dim)
        self.attn = CrossAttention(mem_dim, mem_dim, num_heads)
        self.norm = nn.LayerNorm(mem_dim)

    def forward(self, memory, pad=None):
        q = self.norm_q(self.queries).expand(memory.shape[0], -1, -1)
        return self.norm(self.attn(q, self.attn.memory_kv(memory), pad))


class DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention (KV cache), cross-attention to memory, MLP."""

    def __init__(self, dim: int, mem_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.h = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, mem_dim, num_heads, qk_norm)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def self_attn(self, x, cache: dict | None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = self.q_norm(_heads(q, self.h)), self.k_norm(_heads(k, self.h)), _heads(v, self.h)
        past = 0
        if cache is not None:
            if cache.get("k") is not None:
                past = cache["k"].shape[2]
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, P + L, D)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        L = q.shape[2]
        if L == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # the newest token sees all
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # several new tokens after a cached prefix
            mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(_merge(out))

    def forward(self, x, mem_kv=None, mem_pad=None, cache: dict | None = None):
        """x (B, L, C); mem_kv: cross keys / values (None: text only, no cross-attention)."""
        x = x + self.drop_path(self.self_attn(self.norm1(x), cache))
        if mem_kv is not None:
            x = x + self.drop_path(self.cross(self.norm2(x), mem_kv, mem_pad))
        return x + self.drop_path(self.mlp(self.norm3(x)))


class CaptionDecoder(nn.Module):
    """Text transformer: ids (B, L) + memory (B, N, E) -> logits (B, L, V)."""

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, mem_dim: int,
                 max_len: int = 64, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 cross: str = "all", n_pool: int = 64, drop_path_rate: float = 0.0):
        super().__init__()
        if cross not in ("all", "pooled"):
            raise ValueError(f"cross must be 'all' or 'pooled', got {cross!r}")
        self.max_len, self.cross = max_len, cross
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.tok_embed.weight, std=0.02)
        heads_mem = max(1, mem_dim // (dim // num_heads))
        self.pooler = AttentionalPooler(mem_dim, n_pool, heads_mem) if cross == "pooled" else None
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, mem_dim, num_heads, mlp_ratio, qk_norm, dpr[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok_embed.weight  # tied

    def prepare_memory(self, memory, pad=None):
        """memory (B, N, E), pad (B, N) -> what cross-attention reads (pooled or not)."""
        if self.pooler is not None:
            return self.pooler(memory, pad), None
        return memory, pad

    def _embed(self, ids, pos0: int = 0):
        L = ids.shape[1]
        if pos0 + L > self.max_len:
            raise ValueError(f"text of {pos0 + L} tokens is longer than the decoder's max_len={self.max_len}")
        return self.tok_embed(ids) + self.pos_embed[pos0 : pos0 + L]

    def forward(self, ids, memory, pad=None, prepared: bool = False, mem_kvs: list | None = None):
        """ids (B, L), memory (B, N, E) -> logits (B, L, V). `mem_kvs`: the layers' cross keys
        and values of this (prepared) memory from `memory_kvs`, for several calls on one memory
        (candidate captions, greedy steps); `memory` is then not read."""
        if mem_kvs is None:
            if not prepared:
                memory, pad = self.prepare_memory(memory, pad)
            mem_kvs = self.memory_kvs(memory)
        elif len(mem_kvs) != len(self.blocks):
            raise ValueError(f"mem_kvs has {len(mem_kvs)} layers' keys and values, the decoder {len(self.blocks)}")
        x = self._embed(ids)
        for blk, kv in zip(self.blocks, mem_kvs):
            x = blk(x, kv, pad)
        return self.head(self.norm(x))

    def memory_kvs(self, memory) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cross-attention keys and values (B, H, N, D) of every layer, of a prepared memory
        (B, N, E): computed once, read by any number of `forward(..., mem_kvs=)` calls."""
        return [blk.cross.memory_kv(memory) for blk in self.blocks]

    def text_features(self, ids):
        """ids (B, L) -> (B, C): the final state at each caption's <eos> (text only, causal)."""
        x = self._embed(ids)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        is_eos = ids == EOS
        last = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
        return x[torch.arange(ids.shape[0], device=ids.device), last]

    # generation ---------------------------------------------------------------------------
    def init_cache(self, memory, pad=None, prepared: bool = False) -> list[dict]:
        """Per layer: cross keys / values of the memory and an empty self-attention cache."""
        if not prepared:
            memory, pad = self.prepare_memory(memory, pad)
        return [{"mem_kv": kv, "pad": pad, "k": None, "v": None} for kv in self.memory_kvs(memory)]

    def step(self, ids, cache: list[dict], pos: int):
        """ids (B, L) new tokens at positions [pos, pos + L) -> logits (B, V) of the last."""
        x = self._embed(ids, pos)
        for blk, c in zip(self.blocks, cache):
            x = blk(x, c["mem_kv"], c["pad"], cache=c)
        return self.head(self.norm(x[:, -1]))

    @staticmethod
    def reorder_cache(cache: list[dict], rows: torch.Tensor) -> None:
        """Keep beam `rows` (B,) of the self-attention cache (memory rows are per clip and the
        beams of a clip share them, so they stay)."""
        for c in cache:
            if c["k"] is not None:
                c["k"], c["v"] = c["k"].index_select(0, rows), c["v"].index_select(0, rows)
