"""``aᵀ·b`` for two tall matrices: the weight gradients of the rank-r adapters.

The adapters' backward needs ``∂L/∂A = g_zᵀ·x`` and ``∂L/∂B = σᵀ·g``: an ``(N, r)`` and an ``(N, d)``
operand reduced over the N tokens into an ``(r, d)`` result. The CPU BLAS runs this "transposed-A"
skinny GEMM on two cores at about half the speed of reading ``b`` once (N=4096, d=768, r=2: 1.7 ms
against 0.6 ms for the ``(N, d)·(d, r)`` product that reads the same matrix). Splitting the tokens
into up to 16 row blocks and running them as one batched GEMM, then summing the ``(p, r, d)`` partial
products, keeps both cores streaming: 1.0 ms there, 2.4 ms instead of 4.8 ms at d=3072.
(``benchmarks/bench_adapter.py`` measures the whole backward.) Small products and non-CPU tensors
take the plain GEMM.

Example::

    >>> import torch
    >>> a, b = torch.randn(4096, 2), torch.randn(4096, 768)
    >>> torch.allclose(tn(a, b), a.t() @ b, atol=1e-3)
    True
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["tn"]

MIN_ELEMENTS = 1 << 20  # b's size from which the blocked form wins on this CPU (measured; below it, loses)
MIN_ROWS = 256  # rows per block
MAX_BLOCKS = 16


def tn(a: Tensor, b: Tensor) -> Tensor:
    """``a.t() @ b`` for ``a`` (N, r) and ``b`` (N, d): a batched GEMM over row blocks on CPU, else one GEMM."""
    n = a.shape[0]
    blocks = min(MAX_BLOCKS, n // MIN_ROWS)
    if a.device.type != "cpu" or b.numel() < MIN_ELEMENTS or blocks < 2:
        return a.t() @ b
    m = n // blocks * blocks
    rows = m // blocks
    out = (a[:m].reshape(blocks, rows, a.shape[1]).transpose(1, 2) @ b[:m].reshape(blocks, rows, b.shape[1])).sum(0)
    if m < n:
        out.addmm_(a[m:].t(), b[m:])
    return out
