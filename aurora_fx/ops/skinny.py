"""The adapters' skinny products on CPU: ``aᵀ·b`` (weight gradients) and ``base + t·up`` (rank-r updates).

``tn``: the backward needs ``∂L/∂A = g_zᵀ·x`` and ``∂L/∂B = σᵀ·g``: an ``(N, r)`` and an ``(N, d)``
operand reduced over the N tokens into an ``(r, d)`` result. The CPU BLAS runs this "transposed-A"
skinny GEMM on two cores at about half the speed of reading ``b`` once (N=4096, d=768, r=2: 1.7 ms
against 0.6 ms for the ``(N, d)·(d, r)`` product that reads the same matrix). Splitting the tokens
into up to 16 row blocks and running them as one batched GEMM, then summing the ``(p, r, d)`` partial
products, keeps both cores streaming: 1.0 ms there, 2.4 ms instead of 4.8 ms at d=3072.

``low_rank_into``: writing ``bias + t·up`` for ``t`` (N, r), ``up`` (r, d) with a K=r GEMM costs
1.3–1.6 ms at N=4096, d=768 (a bias broadcast into the same output: 0.5 ms); for r ≤ 4 one
``addcmul`` pass per rank is faster (r=1: 0.7 ms, r=2: 0.8–1.1 ms). Float32/float64 only (bf16 would
round once per rank instead of once).

Small products, bf16/fp16 and non-CPU tensors take the plain GEMM.
(``benchmarks/bench_adapter.py`` measures the whole forward and backward.)

Example::

    >>> import torch
    >>> a, b = torch.randn(4096, 2), torch.randn(4096, 768)
    >>> torch.allclose(tn(a, b), a.t() @ b, atol=1e-3)
    True
    >>> out, bias = torch.empty(4096, 768), torch.randn(768)
    >>> torch.allclose(low_rank_into(out, a, b[:2], bias), torch.addmm(bias, a, b[:2]), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tn", "low_rank_into", "low_rank"]

MIN_ELEMENTS = 1 << 20  # b's size from which the blocked form wins on this CPU (measured; below it, loses)
MIN_ROWS = 256  # rows per block
MAX_BLOCKS = 16
MAX_ELEMENTWISE_RANK = 4  # ranks up to which low_rank_into runs one addcmul pass per rank


def _cpu_float(t: Tensor) -> bool:
    """CPU float32/float64: the only tensors the split forms are for (bf16 partials would round before the sum)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def tn(a: Tensor, b: Tensor) -> Tensor:
    """``a.t() @ b`` for ``a`` (N, r) and ``b`` (N, d): a batched GEMM over row blocks on CPU, else one GEMM."""
    n = a.shape[0]
    blocks = min(MAX_BLOCKS, n // MIN_ROWS)
    if not _cpu_float(a) or b.numel() < MIN_ELEMENTS or blocks < 2:
        return a.t() @ b
    m = n // blocks * blocks
    rows = m // blocks
    out = (a[:m].reshape(blocks, rows, a.shape[1]).transpose(1, 2) @ b[:m].reshape(blocks, rows, b.shape[1])).sum(0)
    if m < n:
        out.addmm_(a[m:].t(), b[m:])
    return out


def low_rank_into(out: Tensor, t: Tensor, up: Tensor, base: Tensor | None = None) -> Tensor:
    """``out = base + t·up`` (``base`` broadcastable to out, or None) for ``t`` (N, r), ``up`` (r, d); returns out.

    ``out`` may be ``base`` itself (an in-place update). ``t`` and ``up`` share a dtype; when ``out`` has
    another (a float32 adapter on a bf16/fp16 base) the product is formed in t's dtype and added in out's.
    """
    r = t.shape[1]
    if t.dtype != out.dtype:
        product = (t @ up).to(out.dtype)
        return out.copy_(product) if base is None else torch.add(base, product, out=out)
    if _cpu_float(t) and 0 < r <= MAX_ELEMENTWISE_RANK:
        if base is None:
            torch.mul(t[:, :1], up[0], out=out)
        else:
            torch.addcmul(base, t[:, :1], up[0], out=out)
        for i in range(1, r):
            out.addcmul_(t[:, i:i + 1], up[i])
    elif base is None:
        torch.mm(t, up, out=out)
    else:
        torch.addmm(base, t, up, out=out)
    return out


def low_rank(t: Tensor, up: Tensor) -> Tensor:
    """``t·up`` for ``t`` (N, r), ``up`` (r, d), as ``low_rank_into`` writes it."""
    return low_rank_into(t.new_empty(t.shape[0], up.shape[1]), t, up)
