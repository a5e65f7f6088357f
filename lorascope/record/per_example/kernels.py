"""The tensor kernels of the per-example norms: per-example gradient factors of one call (:func:`contributions`),
their squared norms (:func:`self_norm`) and the cross terms of a weight shared by several calls (:func:`cross`),
by Gram matrices or by forming the per-example gradients, whichever is cheaper within a memory budget.

Every function works on examples first, positions flattened: (B, T, F). Everything is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

# Temporaries of one norm computation stay below max(this, size of its inputs) elements (tiling, chunking).
_TEMP_ELEMENTS = 1 << 25


@dataclass(eq=False)
class Contribution:
    """One call's per-example gradient of one parameter: ``sum_t rows_t cols_t^T`` in the parameter's stored
    layout (rows dense (B, T, P), or token ids (B, T) standing for one-hot rows), or ``direct`` (B, P)."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    direct: torch.Tensor | None = None

    @property
    def index(self) -> bool:
        return self.rows is not None and not self.rows.is_floating_point()


@dataclass(eq=False)
class Stash:
    """What a finished call keeps for the calls of the same parameter still to come."""

    full: Contribution | None
    toward: dict[int, torch.Tensor] = field(default_factory=dict)  # id(call) -> its gradient rows at its ids


def normalized(kind: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x_hat in float32 of a ``"layer_norm"`` or ``"rms_norm"`` module, over its normalized (trailing)
    dimensions."""
    k = cast(torch.Tensor, module.weight).ndim  # nn.Module's attributes type as Tensor | Module
    xf = x.float().reshape(*x.shape[: x.ndim - k], -1)
    if kind == "layer_norm":
        var, mean = torch.var_mean(xf, dim=-1, keepdim=True, unbiased=False)
        return ((xf - mean) * torch.rsqrt(var + cast(float, module.eps))).reshape(x.shape)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        eps = torch.finfo(x.dtype).eps  # nn.RMSNorm's default
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)



def positions(t: torch.Tensor, batch_dim: int, feature_dims: int) -> torch.Tensor:
    """(B, T, F) (or (B, T) for ``feature_dims=0``): examples first, positions flattened, features flattened."""
    if batch_dim:
        t = t.movedim(batch_dim, 0)
    b = t.shape[0]
    if feature_dims == 0:
        return t.reshape(b, -1)
    features = t.shape[t.ndim - feature_dims:].numel()
    return t.reshape(b, -1, features)


def contributions(kind: str, module: nn.Module, x: torch.Tensor, d: torch.Tensor, batch_dim: int
                  ) -> dict[str, Contribution]:
    """Per-example gradient factors of the weight and bias of a module of ``kind`` from one call's input ``x``
    and output gradient ``d``."""
    if kind == "embedding":
        ids = positions(x, batch_dim, 0)
        cols = positions(d, batch_dim, 1).float()
        padding = cast("int | None", module.padding_idx)
        if padding is not None:  # the padding row gets no gradient
            cols = cols * (ids != padding).unsqueeze(-1)
        return {"weight": Contribution(rows=ids, cols=cols)}
    dd = positions(d, batch_dim, 1).float()
    out = {"bias": Contribution(direct=dd.sum(1))}
    if kind in ("linear", "conv1d"):
        a = positions(x, batch_dim, 1).float()
        out["weight"] = Contribution(rows=dd, cols=a) if kind == "linear" else Contribution(rows=a, cols=dd)
        return out
    k = cast(torch.Tensor, module.weight).ndim
    x_hat = positions(normalized(kind, module, x), batch_dim, k)
    out["weight"] = Contribution(direct=(positions(d, batch_dim, k).float() * x_hat).sum(1))
    out["bias"] = Contribution(direct=positions(d, batch_dim, k).float().sum(1))
    return out


def self_norm(c: Contribution) -> torch.Tensor:
    """(B,) squared Frobenius norms of the per-example gradients of one contribution."""
    if c.direct is not None:
        return c.direct.square().sum(1)
    rows, cols = c.rows, c.cols
    assert rows is not None and cols is not None
    if c.index:
        return _segment_sums(rows, [cols])[0].square().sum((1, 2))
    if rows.shape[1] == 1:
        return rows.square().sum((1, 2)) * cols.square().sum((1, 2))
    return _inner(rows, cols, rows, cols)


def _inner(r1: torch.Tensor, k1: torch.Tensor, r2: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """(B,) inner products :math:`\\langle \\sum_s r_{1s} k_{1s}^T, \\sum_t r_{2t} k_{2t}^T \\rangle` per example,
    by Gram matrices (tiled over positions) or by forming both sums, whichever costs fewer operations, unless
    only the other keeps its temporaries within budget."""
    b, s, p = r1.shape
    t, q = r2.shape[1], k1.shape[2]
    budget = max(_TEMP_ELEMENTS, r1.numel() + k1.numel() + r2.numel() + k2.numel())
    same = r1 is r2 and k1 is k2
    direct_per_example = p * q * (1 if same else 2)
    gram = s * t * (p + q + 1) < p * q * (s + t + 1)
    if (direct_per_example <= budget) != (2 * s * t <= budget):
        gram = direct_per_example > budget
    if gram:  # sum_{s,t} (r1_s . r2_t)(k1_s . k2_t), over position tiles of at most budget / (2B) pairs
        tile = max(1, math.isqrt(max(1, budget // (2 * b))))
        total = r1.new_zeros(b)
        for i in range(0, s, tile):
            for j in range(0, t, tile):
                rr = r1[:, i:i + tile] @ r2[:, j:j + tile].transpose(1, 2)
                total += (rr * (k1[:, i:i + tile] @ k2[:, j:j + tile].transpose(1, 2))).sum((1, 2))
        return total
    step = max(1, budget // direct_per_example)  # examples at a time
    parts = []
    for i in range(0, b, step):
        g1 = r1[i:i + step].transpose(1, 2) @ k1[i:i + step]
        parts.append(g1.square().sum((1, 2)) if same else
                     (g1 * (r2[i:i + step].transpose(1, 2) @ k2[i:i + step])).sum((1, 2)))
    return torch.cat(parts)


def cross(stash: Stash, c: Contribution, call_key: int) -> torch.Tensor:
    """(B,) inner products between a finished call's per-example gradients and ``c``'s."""
    if call_key in stash.toward:  # the partner's gradient rows at this call's ids, (B, T, Q)
        assert c.cols is not None
        return (stash.toward[call_key] * c.cols).sum((1, 2))
    p = stash.full
    if p is None:
        raise RuntimeError("a shared weight's partner call kept no factors")
    if p.direct is not None or c.direct is not None:
        if p.direct is None or c.direct is None:
            raise RuntimeError("a parameter shared between a matrix module and a norm module")
        return (p.direct * c.direct).sum(1)
    assert p.rows is not None and p.cols is not None and c.rows is not None and c.cols is not None
    if p.index and c.index:  # sum over shared token ids of the two calls' summed rows
        sp, sc = _segment_sums(torch.cat([p.rows, c.rows], 1), [p.cols, c.cols])
        return (sp * sc).sum((1, 2))
    if p.index:
        return (_rows_at(c, p.rows) * p.cols).sum((1, 2))
    if c.index:
        return (_rows_at(p, c.rows) * c.cols).sum((1, 2))
    return _inner(p.rows, p.cols, c.rows, c.cols)


def _rows_at(dense: Contribution, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids[b, t]`` of each example's gradient ``sum_s rows_s cols_s^T``: (B, T, Q), without forming it."""
    assert dense.rows is not None and dense.cols is not None
    b, s, _ = dense.rows.shape
    picked = dense.rows.gather(2, ids.unsqueeze(1).expand(b, s, ids.shape[1]))  # (B, S, T)
    return picked.transpose(1, 2) @ dense.cols


def _segment_sums(ids: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum the vectors of equal ids within each example, for each of ``parts`` (consecutive position ranges
    of ``ids``): list of (B, T_all, Q), one row per distinct id (unused rows zero)."""
    b, t = ids.shape
    sorted_ids, order = ids.sort(dim=1)
    start = torch.ones_like(sorted_ids, dtype=torch.bool)
    start[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = torch.empty_like(order).scatter_(1, order, start.long().cumsum(1) - 1)
    out, offset = [], 0
    for cols in parts:
        n = cols.shape[1]
        index = segment[:, offset:offset + n].unsqueeze(-1).expand(b, n, cols.shape[2])
        out.append(cols.new_zeros(b, t, cols.shape[2]).scatter_add_(1, index, cols))
        offset += n
    return out


def make_stash(c: Contribution, pending: Sequence[tuple[int, torch.Tensor | None]], keep_all: bool,
               batch_dim: int) -> Stash:
    """What the still pending calls of the same weight will need from ``c``: ``pending`` holds, per call, its
    key and, for an embedding call whose input is known, its token ids (None otherwise)."""
    if c.rows is None or c.index:
        return Stash(full=c)  # small: ids or direct gradients, and the output gradients of an embedding
    toward: dict[int, torch.Tensor] = {}
    need_full = keep_all
    for key, ids in pending:
        if ids is not None:
            toward[key] = _rows_at(c, positions(ids, batch_dim, 0))
        else:
            need_full = True
    return Stash(full=c if need_full else None, toward=toward)
