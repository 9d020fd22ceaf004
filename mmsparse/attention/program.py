"""Mask programs: the token-level form of every pattern, shared by all backends and kernels.

Legend: N tokens, A attributes, P pieces (runs of tokens), M pairs being classified.

A pattern lowers to a `MaskProgram`: a table of per-token integer attributes `attrs (A, N)`
and a boolean formula over query/key attribute pairs in disjunctive normal form:

    mask(q, k) = OR over clauses ( AND over the clause's predicates )

Predicates are tuples, small enough to pass to a kernel as compile-time constants:

    ("eq", a)           attrs[a][q] == attrs[a][k]
    ("ne", a)           attrs[a][q] != attrs[a][k]
    ("range", a, l, h)  attrs[l][q] <= attrs[a][k] < attrs[h][q]
    ("cong", a, m)      (attrs[a][q] - attrs[a][k]) % m == 0
    ("qflag", a)        attrs[a][q] != 0
    ("kflag", a)        attrs[a][k] != 0
    ("le", a)           attrs[a][k] <= attrs[a][q]
    ("coarse", t, g, h) key group k // h is listed in tables[t][q // g] (rows padded with -1)

A clause with no predicate is true everywhere (dense attention). Attribute 0 is always the
token position. A kernel evaluates a partial block's mask by loading the attributes of its
queries and keys (a few int32 vectors) and applying the predicates in registers; no N x N
mask exists anywhere.

The same formula is evaluated two ways here: `evaluate` on token indices (reference, sdpa
and flex backends), and `classify` on attribute *intervals* of runs of tokens (the block
compiler), which tells for a pair of runs whether some pair may attend (exists) and whether
every pair does (all). `classify` is exact per predicate and conservative for a clause.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Predicate = tuple
Clause = tuple[Predicate, ...]

POS = 0  # attribute index of the token position

_KINDS = {"eq": 1, "ne": 1, "range": 3, "cong": 2, "qflag": 1, "kflag": 1, "le": 1, "coarse": 3}


@dataclass(eq=False)
class MaskProgram:
    """attrs (A, N) int64; clauses in DNF; names[a] describes attribute a; tables (R, r) int64."""

    attrs: torch.Tensor
    clauses: tuple[Clause, ...]
    names: tuple[str, ...]
    tables: tuple[torch.Tensor, ...] = ()

    def __post_init__(self):
        for clause in self.clauses:
            for pred in clause:
                if pred[0] not in _KINDS or len(pred) != 1 + _KINDS[pred[0]]:
                    raise ValueError(f"malformed mask predicate {pred!r}")

    @property
    def n(self) -> int:
        return self.attrs.shape[1]

    @property
    def is_dense(self) -> bool:
        return any(len(c) == 0 for c in self.clauses)

    def to(self, device) -> "MaskProgram":
        return MaskProgram(
            self.attrs.to(device), self.clauses, self.names, tuple(t.to(device) for t in self.tables)
        )

    # -- token level -------------------------------------------------------------------------
    def evaluate(self, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """mask for broadcastable index tensors qi, ki (valid positions in [0, N))."""
        shape = torch.broadcast_shapes(qi.shape, ki.shape)
        out = torch.zeros(shape, dtype=torch.bool, device=qi.device)
        for clause in self.clauses:
            term = torch.ones(shape, dtype=torch.bool, device=qi.device)
            for pred in clause:
                term = term & self._pred(pred, qi, ki)
            out = out | term
        return out

    def _pred(self, pred: Predicate, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        A, kind = self.attrs, pred[0]
        if kind == "eq":
            return A[pred[1]][qi] == A[pred[1]][ki]
        if kind == "ne":
            return A[pred[1]][qi] != A[pred[1]][ki]
        if kind == "range":
            key = A[pred[1]][ki]
            return (A[pred[2]][qi] <= key) & (key < A[pred[3]][qi])
        if kind == "cong":
            return (A[pred[1]][qi] - A[pred[1]][ki]) % pred[2] == 0
        if kind == "qflag":
            return (A[pred[1]][qi] != 0).expand(torch.broadcast_shapes(qi.shape, ki.shape))
        if kind == "kflag":
            return (A[pred[1]][ki] != 0).expand(torch.broadcast_shapes(qi.shape, ki.shape))
        if kind == "le":
            return A[pred[1]][ki] <= A[pred[1]][qi]
        if kind == "coarse":
            table = self.tables[pred[1]]
            rows = table[A[POS][qi] // pred[2]]  # (..., r)
            return (rows == (A[POS][ki] // pred[3]).unsqueeze(-1)).any(-1)
        raise AssertionError(kind)

    # -- interval level ----------------------------------------------------------------------
    def classify(
        self, q_lo: torch.Tensor, q_hi: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For M pairs of token runs, given each run's attribute minima and maxima
        ((A, M) each for the query runs and the key runs), return (exists, all), both (M,).

        exists is False only where no query of the run attends any key of the other run;
        all is True only where every query attends every key.
        """
        m = q_lo.shape[1]
        dev = q_lo.device
        exists = torch.zeros(m, dtype=torch.bool, device=dev)
        every = torch.zeros(m, dtype=torch.bool, device=dev)
        for clause in self.clauses:
            e = torch.ones(m, dtype=torch.bool, device=dev)
            a = torch.ones(m, dtype=torch.bool, device=dev)
            for pred in clause:
                pe, pa = self._interval(pred, q_lo, q_hi, k_lo, k_hi)
                e, a = e & pe, a & pa
            exists, every = exists | e, every | a
        return exists, every

    def _interval(self, pred, q_lo, q_hi, k_lo, k_hi):
        kind = pred[0]
        if kind in ("eq", "ne"):
            i = pred[1]
            overlap = (q_lo[i] <= k_hi[i]) & (k_lo[i] <= q_hi[i])
            single = (q_lo[i] == q_hi[i]) & (k_lo[i] == k_hi[i]) & (q_lo[i] == k_lo[i])
            if kind == "eq":
                return overlap, single
            return ~single, ~overlap
        if kind == "range":
            i, lo, hi = pred[1:]
            # union over queries of [lo, hi) is taken as [min lo, max hi): conservative;
            # intersection is [max lo, min hi).
            exists = (k_hi[i] >= q_lo[lo]) & (k_lo[i] < q_hi[hi]) & (q_lo[lo] < q_hi[hi])
            every = (k_lo[i] >= q_hi[lo]) & (k_hi[i] < q_lo[hi])
            return exists, every
        if kind == "cong":
            i, mod = pred[1:]
            if mod == 1:
                ones = torch.ones_like(q_lo[i], dtype=torch.bool)
                return ones, ones
            # some difference q - k in [q_lo - k_hi, q_hi - k_lo] is a multiple of mod
            d_lo, d_hi = q_lo[i] - k_hi[i], q_hi[i] - k_lo[i]
            exists = torch.div(d_hi, mod, rounding_mode="floor") * mod >= d_lo
            single = (q_lo[i] == q_hi[i]) & (k_lo[i] == k_hi[i])
            return exists, single & (d_lo % mod == 0)
        if kind == "qflag":
            i = pred[1]
            return (q_lo[i] != 0) | (q_hi[i] != 0), (q_lo[i] > 0) | (q_hi[i] < 0)
        if kind == "kflag":
            i = pred[1]
            return (k_lo[i] != 0) | (k_hi[i] != 0), (k_lo[i] > 0) | (k_hi[i] < 0)
        if kind == "le":
            i = pred[1]
            return k_lo[i] <= q_hi[i], k_hi[i] <= q_lo[i]
        if kind == "coarse":
            return self._coarse_interval(pred, q_lo, q_hi, k_lo, k_hi)
        raise AssertionError(kind)

    def _coarse_interval(self, pred, q_lo, q_hi, k_lo, k_hi):
        table, gq, gk = self.tables[pred[1]], pred[2], pred[3]
        qg0, qg1 = q_lo[POS] // gq, q_hi[POS] // gq
        kg0, kg1 = k_lo[POS] // gk, k_hi[POS] // gk
        exists = torch.zeros_like(qg0, dtype=torch.bool)
        span = int((qg1 - qg0).max().item()) + 1 if qg0.numel() else 0
        for s in range(span):
            rows = table[torch.minimum(qg0 + s, qg1)]  # (M, r)
            hit = (rows >= kg0[:, None]) & (rows <= kg1[:, None])
            exists |= hit.any(-1)
        single = (qg0 == qg1) & (kg0 == kg1)
        every = single & (table[qg0] == kg0[:, None]).any(-1)
        return exists, every
