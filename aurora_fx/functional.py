"""The functional oracle: the math of ``docs/methods.md`` and nothing else.

Every fast path in aurora_fx (adapter modules, the rewritten graphs, the fused op, merges and the
ONNX translation) is tested against these functions with random, non-zero adapter weights.

References:
    * LoRA, arXiv 2106.09685: ``Δ(x) = s·B·A·x`` with ``s = α/r``.
    * AuroRA, arXiv 2505.18738: ``Δ(x) = s·B·σ(A·x)`` with the Adaptive Nonlinear Layer
      ``σ(z) = tanh(H·tanh z) + W_s·S(z)`` and ``S(z) = Σ_i basis(z_i)`` a summed cubic B-spline
      basis (docs/methods.md §2.2; ``s = α/r̃``).
    * AROMA, arXiv 2504.05343: a LoRA delta on the active rank-r piece plus frozen merged factors
      ``U·(V·x)`` (docs/methods.md §3.3), and Gram-trace norms of low-rank products (§3.4).

Shapes: ``x`` is ``(..., d_in)``; ``A`` is ``(r, d_in)``; ``B`` is ``(d_out, r)``; ``H`` is
``(r, r)``; ``Ws`` is ``(r, G+K)``; the knots are ``(G+2K+1,)``.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "spline_knots",
    "bspline_basis",
    "spline_dtype",
    "anl",
    "aurora_delta",
    "aurora_static_delta_weight",
    "lora_delta",
    "lora_delta_weight",
    "factors_delta",
    "lowrank_norm2",
    "lowrank_inner",
    "lowrank_diff_norm2",
    "compact_factors",
]


def spline_knots(
    grid_size: int = 5,
    order: int = 3,
    grid_range: tuple[float, float] = (-1.0, 1.0),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform, extended knot vector ``t_j = lo + (j - K)·h``, ``j = 0 … G+2K``.

    With the defaults (G=5, K=3, range [-1, 1], h=0.4) these are the 12 knots -2.2, -1.8, …, 2.2.
    """
    lo, hi = grid_range
    h = (hi - lo) / grid_size
    j = torch.arange(grid_size + 2 * order + 1, dtype=torch.float64, device=device)
    return (lo + (j - order) * h).to(dtype)


def bspline_basis(u: Tensor, knots: Tensor, order: int = 3) -> Tensor:
    """B-spline basis by the Cox–de Boor recursion, vectorised over the basis index.

    ``B_{j,0}(u) = [t_j ≤ u < t_{j+1}]`` (half-open), then for ``k = 1 … K``::

        B_{j,k}(u) = (u - t_j)/(t_{j+k} - t_j)·B_{j,k-1}(u)
                   + (t_{j+k+1} - u)/(t_{j+k+1} - t_{j+1})·B_{j+1,k-1}(u)

    Args:
        u: Any shape ``(...)``; evaluated element-wise in ``u``'s dtype.
        knots: ``(n,)`` non-decreasing knots.
        order: Spline order K (3 = cubic).

    Returns:
        ``(..., n - K - 1)`` basis values; ``(..., G+K)`` for the uniform grid.
        All zero outside ``[t_0, t_{n-1})``.
    """
    t = knots.to(u.dtype)
    u = u.unsqueeze(-1)  # (..., 1)
    b = ((u >= t[:-1]) & (u < t[1:])).to(u.dtype)  # (..., n-1)      B_{j,0}
    for k in range(1, order + 1):
        left = (u - t[: -(k + 1)]) / (t[k:-1] - t[: -(k + 1)]) * b[..., :-1]
        right = (t[k + 1 :] - u) / (t[k + 1 :] - t[1:-k]) * b[..., 1:]
        b = left + right  # (..., n-1-k)    B_{j,k}
    return b


# One node in traced adapter graphs: the recursion is an implementation detail of the oracle.
torch.fx.wrap("bspline_basis")


def spline_dtype(dtype: torch.dtype) -> torch.dtype:
    """The spline branch runs in at least float32, even for bf16/fp16 adapters (docs/methods.md §2.3)."""
    return torch.promote_types(dtype, torch.float32)


def anl(z: Tensor, H: Tensor, Ws: Tensor, knots: Tensor, order: int = 3) -> Tensor:
    """Adaptive Nonlinear Layer ``σ(z) = tanh(H·tanh z) + W_s·Σ_i basis(z_i)``.

    Args:
        z: ``(..., r)`` compressed code.
        H: ``(r, r)`` self-projection (no bias).
        Ws: ``(r, G+K)`` spline weights.
        knots: ``(G+2K+1,)`` knot vector.
        order: Spline order K.

    Returns:
        ``(..., r)``, same dtype as ``z``. Not element-wise: H and the channel sum mix coordinates.
    """
    fixed = torch.tanh(F.linear(torch.tanh(z), H))  # (..., r)      eq. 6
    sd = spline_dtype(z.dtype)
    summed = bspline_basis(z.to(sd), knots, order).sum(-2)  # (..., G+K)  S(z)
    learnable = F.linear(summed, Ws.to(sd))  # (..., r)      eq. 7
    return fixed + learnable.to(z.dtype)


def anl_rows(z: Tensor, H: Tensor, Ws: Tensor, knots: Tensor, order: int = 3) -> Tensor:
    """``anl`` with each row's own ``H`` and ``Ws``: ``z`` ``(S, r)``, ``H`` ``(S, r, r)``, ``Ws`` ``(S, r, G+K)``.

    Row i is ``anl(z[i], H[i], Ws[i])`` (the expert adapters' grouped path: row i's expert's σ).
    """
    fixed = torch.tanh(torch.bmm(H, torch.tanh(z).unsqueeze(-1)).squeeze(-1))  # (S, r)
    sd = spline_dtype(z.dtype)
    summed = bspline_basis(z.to(sd), knots, order).sum(-2)  # (S, G+K)
    learnable = torch.bmm(Ws.to(sd), summed.unsqueeze(-1)).squeeze(-1)  # (S, r)
    return fixed + learnable.to(z.dtype)


def aurora_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    H: Tensor,
    Ws: Tensor,
    knots: Tensor,
    scale: float,
    order: int = 3,
) -> Tensor:
    """AuroRA adapter output ``Δ(x) = s·B·σ(A·x)`` (docs/methods.md §2.3, without dropout).

    Args:
        x: ``(..., d_in)`` adapter input (already dropped out, if dropout is used).
        A: ``(r, d_in)`` down-projector.
        B: ``(d_out, r)`` up-projector.
        H: ``(r, r)`` ANL self-projection.
        Ws: ``(r, G+K)`` ANL spline weights.
        knots: ``(G+2K+1,)`` knot vector.
        scale: ``s = α / r̃``.
        order: Spline order K.

    Returns:
        ``(..., d_out)``.
    """
    z = F.linear(x, A)  # (..., r)
    return F.linear(anl(z, H, Ws, knots, order), B) * scale  # (..., d_out)


def aurora_static_delta_weight(
    A: Tensor, B: Tensor, H: Tensor, Ws: Tensor, knots: Tensor, scale: float, order: int = 3
) -> Tensor:
    """Static (lossy) merge ``ΔW = s·B·σ(Aᵀ)ᵀ``: σ applied to each column of A (paper App. B.1).

    Returns:
        ``(d_out, d_in)``. ``B·σ(A)·x ≠ B·σ(A·x)``: this drops ``B·σ(0)`` and the nonlinearity in x.
    """
    return scale * (B @ anl(A.t(), H, Ws, knots, order).t())  # (d_out, d_in)


def lora_delta(x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """LoRA adapter output ``Δ(x) = s·B·A·x``; ``(..., d_in) → (..., d_out)``."""
    return F.linear(F.linear(x, A), B) * scale


def lora_delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Exact LoRA merge ``ΔW = s·B·A``; ``(d_out, d_in)``."""
    return scale * (B @ A)


def factors_delta(x: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Frozen merged AROMA components ``U·(V·x)``; U ``(d_out, P)``, V ``(P, d_in)``."""
    return F.linear(F.linear(x, V), U)


def lowrank_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """Frobenius inner product ``⟨B1·A1, B2·A2⟩ = tr((B1ᵀB2)(A2·A1ᵀ))`` from r×r Gram matrices.

    Never forms an m×n product: O((m+n)·r²), computed in float64.
    """
    b1, a1, b2, a2 = (t.detach().double() for t in (B1, A1, B2, A2))
    return torch.trace((b1.t() @ b2) @ (a2 @ a1.t()))


def lowrank_norm2(B: Tensor, A: Tensor) -> Tensor:
    """``‖B·A‖²_F = tr((BᵀB)(AAᵀ))`` (docs/methods.md §3.4), float64, clamped at 0."""
    return lowrank_inner(B, A, B, A).clamp_min(0.0)


def lowrank_diff_norm2(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """``‖B1·A1 − B2·A2‖²_F`` from Gram traces, float64, clamped at 0."""
    value = lowrank_norm2(B1, A1) + lowrank_norm2(B2, A2) - 2.0 * lowrank_inner(B1, A1, B2, A2)
    return value.clamp_min(0.0)


def compact_factors(U: Tensor, V: Tensor, tol: float) -> tuple[Tensor, Tensor, float]:
    """Re-compress ``ΔW = U·V`` to its effective rank (docs/methods.md §3.9), never forming ΔW.

    Thin QR of U and of Vᵀ, SVD of the small core ``C = Ru·Rvᵀ``, keep the singular values above
    ``tol·σ₁``: ``U' = Qu·Uc[:, :k]·Σ[:k]``, ``V' = (Qv·Vc[:, :k])ᵀ``. Cost O((m+n)·P²) for P columns;
    computed in float64. ``‖U·V − U'·V'‖_F`` is exactly the dropped tail ``‖σ_{k+1:}‖₂``.

    Args:
        U: ``(m, P)``.
        V: ``(P, n)``.
        tol: Relative tolerance in [0, 1); 0 keeps every non-zero singular value.

    Returns:
        ``(U', V', tail)`` with U' ``(m, k)``, V' ``(k, n)`` in U's and V's dtypes, ``k ≤ min(m, n, P)``.
    """
    if U.shape[1] == 0:
        return U, V, 0.0
    Qu, Ru = torch.linalg.qr(U.double())  # (m, p), (p, P)
    Qv, Rv = torch.linalg.qr(V.double().t())  # (n, q), (q, P)
    Uc, S, Vch = torch.linalg.svd(Ru @ Rv.t())  # core (p, q)
    keep = int((max(tol * S[0].item(), 0.0) < S).sum()) if S.numel() and S[0] > 0 else 0
    tail = float(torch.linalg.vector_norm(S[keep:])) if S.numel() else 0.0
    new_u = (Qu @ Uc[:, :keep]) * S[:keep]  # (m, k)
    new_v = Vch[:keep] @ Qv.t()  # (k, n)
    return new_u.to(U.dtype), new_v.to(V.dtype), tail
