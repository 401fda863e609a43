"""Grouped matmul for expert adapters: ``y[rows of e] = x[rows of e] @ w[e]`` in one call.

Rows are sorted by expert, expert e's ending at ``offs[e]`` (cumulative, int32), as transformers' ``grouped_mm``
experts implementation hands them. ``torch._grouped_mm`` computes it without a per-expert loop; its CPU kernel
wants float32/bf16/fp16 and 16-byte aligned strides, so the small adapter dimensions (a rank of 2) are padded
with zeros to a multiple of 8 (exact: the padding contributes 0). Where the kernel cannot run (another dtype, a
torch without it) ``available`` says so and the caller loops over experts instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["available", "grouped_mm", "pad_to"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN = 8


def available(x: Tensor) -> bool:
    """Whether ``grouped_mm`` runs for inputs like ``x``."""
    return hasattr(torch, "_grouped_mm") and x.dtype in _DTYPES and x.dim() == 2


def pad_to(t: Tensor, dim: int, multiple: int = _ALIGN) -> Tensor:
    """``t`` with zeros appended along ``dim`` up to a multiple of ``multiple`` (``t`` itself if it is one)."""
    extra = (-t.shape[dim]) % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - dim % t.dim() - 1) + [0, extra]
    return F.pad(t, pad)


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """``x`` ``(S, K)`` @ ``w`` ``(E, K, N)`` per expert group; K and N padded as needed, the result ``(S, N)``."""
    n = w.shape[-1]
    x_p, w_p = pad_to(x, 1), pad_to(pad_to(w, 1), 2)
    out = torch._grouped_mm(x_p.contiguous(), w_p, offs=offs.to(torch.int32))
    return out if out.shape[1] == n else out[:, :n]
