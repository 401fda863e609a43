"""``AdapterSet``: the adapters of several names on one site, added up or chosen per row of a batch.

A model with one adapter name keeps each adapter in its owner's slot (``owner.adapter``). Once a second name
exists (``apply(..., name="support")``), every slot holds an ``AdapterSet`` whose children are the named adapters
(``owner.adapter.default``, ``owner.adapter.support``); the owner graph calls the set as one module instead of
inlining (or fusing) one adapter. The set computes, in this order:

* **rows** (``aurora_fx.adapter_rows``): row ``i`` of the batch gets adapter ``rows[i]`` (an index into the model's
  names, ``-1`` for none). When every adapter has a ``RowForm`` (LoRA, AuroRA, AROMA) and their dropout can be
  applied once, this is one gathered computation over stacked, rank-padded factors: ``z = A[rows]·x``,
  ``g(z)`` (identity for LoRA/AROMA rows, the ANL with each row's own ``H``/``Ws`` for AuroRA rows; padded ranks
  masked out of the spline sum), ``B[rows]·g(z)``. No Python loop over adapters; gradients reach each adapter
  from its own rows only. Without autograd (serving) the stacked factors are cached until a tensor of the set
  changes (its version counter moves). Otherwise (another method, AuroRA adapters with different spline grids, different
  active dropouts in training) each adapter runs on the batch and its output is masked to its rows.
* **active names** (``aurora_fx.set_adapters``): the sum of the active adapters' outputs. Eagerly only the
  active ones run; under ``torch.compile``/``torch.export`` every adapter runs, weighted by the ``gate`` buffer
  (1 active, 0 not), so switching writes a buffer and never recompiles.

The first dimension of a site's input is taken as the batch row (true of every ``transformers`` layer, and of
``generate``'s decoding steps); a site whose input has another first dimension is refused when rows are set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aurora_fx import functional as AF
from aurora_fx.methods.base import RowForm
from aurora_fx.ops.dropout import InputDropout

__all__ = ["AdapterSet", "Stacked", "stack_forms"]


class AdapterSet(nn.Module):
    """Named adapters of one site (children by name), summed over the active names or routed per row.

    Args:
        adapters: Name → adapter module (registered adapters of any methods, same ``in_features``/``out_features``).
        names: The model's adapter names, in order (``rows`` indexes them).

    Example:
        >>> s = AdapterSet({"a": lora_a, "b": aurora_b}, names=("a", "b"))   # doctest: +SKIP
        >>> s.set_active(("b",)); s(x)            # aurora_b(x)
        >>> s.rows = torch.tensor([0, 1, -1]); s(x)  # row 0: lora_a, row 1: aurora_b, row 2: nothing
    """

    inline = False  # the owner graph calls the set (``passes.insert_adapters``), it is not traced into it

    def __init__(self, adapters: dict[str, nn.Module], names: tuple[str, ...]) -> None:
        super().__init__()
        first = next(iter(adapters.values()))
        self.in_features, self.out_features = first.in_features, first.out_features
        for name, adapter in adapters.items():
            self.add_module(name, adapter)
        self.register_buffer("gate", torch.ones(len(adapters)), persistent=False)
        self.register_buffer("lookup", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.active: tuple[str, ...] = tuple(adapters)
        self.rows: Tensor | None = None
        self._cache: tuple[tuple, Stacked] | None = None
        self.set_names(names)

    # -- names ----------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The names this site holds, in order."""
        return tuple(self._modules)

    def set_names(self, model_names: tuple[str, ...]) -> None:
        """Index the model's names: ``lookup[g]`` is this set's position of model name ``g``, or -1."""
        local = [self.names.index(n) if n in self.names else -1 for n in model_names]
        self.lookup = torch.tensor(local, dtype=torch.int64, device=self.gate.device)

    def set_active(self, names: tuple[str, ...]) -> None:
        """Activate ``names`` (those this site holds; others are ignored), in place (no recompilation)."""
        self.active = tuple(n for n in self.names if n in names)
        with torch.no_grad():
            self.gate.copy_(torch.tensor([float(n in names) for n in self.names]))

    def fusion(self) -> str:
        """A set never fuses: it is called as one module (see the module docstring)."""
        return "several named adapters share this site (an AdapterSet runs them)"

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The active adapters' sum, or each row's adapter when ``rows`` is set."""
        if self.rows is not None:
            return self._rows_delta(x, self._local_rows(x))
        adapters = list(self._modules.values())
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return sum(self.gate[i] * a(x) for i, a in enumerate(adapters))
        live = [self._modules[n](x) for n in self.active]
        return sum(live[1:], live[0]) if live else self._zeros(x)

    def _zeros(self, x: Tensor) -> Tensor:
        dtype = next(iter(self.parameters()), x).dtype
        return x.new_zeros(*x.shape[:-1], self.out_features, dtype=dtype)

    def _local_rows(self, x: Tensor) -> Tensor:
        rows = self.rows
        if not torch.compiler.is_compiling() and not torch.compiler.is_exporting() and x.shape[0] != rows.shape[0]:
            raise ValueError(f"adapter_rows has {rows.shape[0]} row(s) but this site's input has {x.shape[0]} in its "
                             f"first dimension (shape {tuple(x.shape)}); give one adapter index per batch row (repeat "
                             f"them for beams or samples: ids.repeat_interleave(num_beams))")
        rows = rows.to(x.device)
        return torch.where(rows >= 0, self.lookup[rows.clamp(min=0)], -1)

    def _rows_delta(self, x: Tensor, local: Tensor) -> Tensor:
        key = self._cache_key()
        if key is not None and self._cache is not None and self._cache[0] == key:
            return _gathered_delta(x, local, self._cache[1], 0.0)
        forms = self._row_forms()
        if forms is None:
            return self._masked_delta(x, local)
        stacked = stack_forms(forms)
        if key is not None:
            self._cache = (key, stacked)
        return _gathered_delta(x, local, stacked, self._shared_dropout(forms))

    def _cache_key(self) -> tuple | None:
        """The key of the stacked factors' cache while serving (eval, no autograd, not traced), else None.

        The stack is reused until a tensor of the set changes (its identity or its version counter).
        """
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return None
        return tuple((id(t), t._version) for t in (*self.parameters(), *self.buffers()))

    def _row_forms(self) -> list[RowForm] | None:
        forms = [getattr(a, "row_form", lambda: None)() for a in self._modules.values()]
        if any(f is None for f in forms):
            return None
        if len({f.grid for f in forms if f.H is not None}) > 1:
            return None  # AuroRA adapters on different spline grids: no shared basis
        if self.training and len({f.dropout for f in forms}) > 1:
            return None
        return forms

    def _shared_dropout(self, forms: list[RowForm]) -> float:
        return forms[0].dropout if self.training else 0.0

    def _masked_delta(self, x: Tensor, local: Tensor) -> Tensor:
        """Each adapter on the whole batch, kept on its own rows (methods without a row form)."""
        out = self._zeros(x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        for i, adapter in enumerate(self._modules.values()):
            out = out + adapter(x) * (local == i).to(out.dtype).view(shape)
        return out


def _stack(tensors: list[Tensor], rank: int, dims: tuple[int, ...]) -> Tensor:
    """``tensors`` zero-padded to ``rank`` along ``dims`` and stacked on a new first dimension."""
    padded = []
    for t in tensors:
        pad = [0] * (2 * t.dim())
        for d in dims:
            pad[2 * (t.dim() - 1 - d) + 1] = rank - t.shape[d]
        padded.append(F.pad(t, pad))
    return torch.stack(padded)


@dataclass(frozen=True)
class Stacked:
    """The row forms of a set, rank-padded and stacked (index ``k`` is the set's ``k``-th adapter).

    ``a`` ``(N, R, d_in)``, ``b`` ``(N, d_out, R)`` (scale folded in); for sets with AuroRA members also ``h``
    ``(N, R, R)``, ``ws`` ``(N, R, G+K)``, ``linear`` ``(N,)`` (1 for identity-code rows) and ``used`` ``(N, R)``
    (the ranks that enter the spline sum: an AuroRA adapter's real ones), with the shared ``knots`` and ``order``.
    """

    a: Tensor
    b: Tensor
    h: Tensor | None = None
    ws: Tensor | None = None
    linear: Tensor | None = None
    used: Tensor | None = None
    knots: Tensor | None = None
    order: int = 3


def stack_forms(forms: list[RowForm]) -> Stacked:
    """``Stacked`` factors of ``forms`` (differentiable: gradients reach each adapter's own tensors)."""
    dtype = forms[0].A.dtype
    rank = max(f.A.shape[0] for f in forms)
    a = _stack([f.A.to(dtype) for f in forms], rank, (0,))
    b = _stack([f.B.to(dtype) for f in forms], rank, (1,))
    nonlinear = [f for f in forms if f.H is not None]
    if not nonlinear:
        return Stacked(a, b)
    ref, device = nonlinear[0], a.device
    empty_h = torch.zeros(0, 0, dtype=dtype, device=device)
    empty_ws = torch.zeros(0, ref.Ws.shape[1], dtype=dtype, device=device)
    h = _stack([f.H.to(dtype) if f.H is not None else empty_h for f in forms], rank, (0, 1))
    ws = _stack([f.Ws.to(dtype) if f.Ws is not None else empty_ws for f in forms], rank, (0,))
    linear = torch.tensor([float(f.H is None) for f in forms], dtype=dtype, device=device)
    used = torch.stack([(torch.arange(rank, device=device) < f.A.shape[0]) & (f.H is not None) for f in forms])
    return Stacked(a, b, h, ws, linear, used, ref.knots, ref.order)


def _gathered_delta(x: Tensor, local: Tensor, stacked: Stacked, dropout: float) -> Tensor:
    """Row ``i``: ``B_k·g_k(A_k·drop(x_i))`` with ``k = local[i]`` (0 where ``k = -1``), over stacked factors.

    The two projections run as single GEMMs over every adapter's ranks side by side (``N·R`` columns: tiny next
    to ``d``), each row keeping its own adapter's block: a per-row batched product with an inner size of R would
    stream x once per row at a fraction of the GEMM's speed.
    """
    k = local.clamp(min=0)
    n, rank = x.shape[0], stacked.a.shape[1]
    lead = x.shape[:-1]
    xs = x.to(stacked.a.dtype).reshape(n, -1, x.shape[-1])  # (n, L, d_in)
    if dropout > 0:
        xs = InputDropout(dropout)(xs)
    blocks = torch.nn.functional.one_hot(k, stacked.a.shape[0]).to(xs.dtype)  # (n, N)
    blocks = blocks * (local >= 0).to(xs.dtype).unsqueeze(1)  # a row without an adapter keeps no block
    z_all = (xs @ stacked.a.reshape(-1, xs.shape[-1]).t()).unflatten(-1, (-1, rank))  # (n, L, N, R)
    z = (z_all * blocks[:, None, :, None]).sum(2)  # (n, L, R): the row's own adapter's code
    code = _code(z, k, stacked)
    spread = code.unsqueeze(2) * blocks[:, None, :, None]  # (n, L, N, R): zero outside the row's block
    out = spread.flatten(2) @ stacked.b.transpose(1, 2).reshape(-1, stacked.b.shape[1])  # (n, L, d_out)
    return out.reshape(*lead, out.shape[-1])


def _code(z: Tensor, k: Tensor, s: Stacked) -> Tensor:
    """``g_k(z)`` per row: the identity for linear forms, the ANL (padded ranks masked) for AuroRA ones."""
    if s.h is None:
        return z
    fixed = torch.tanh(torch.bmm(torch.tanh(z), s.h[k].transpose(1, 2)))  # (n, L, R); 0 on linear rows (H = 0)
    sd = AF.spline_dtype(z.dtype)
    basis = AF.bspline_basis(z.to(sd), s.knots, s.order)  # (n, L, R, G+K)
    summed = (basis * s.used[k].to(sd)[:, None, :, None]).sum(-2)  # (n, L, G+K): real ranks of AuroRA rows only
    learnable = torch.bmm(summed, s.ws[k].to(sd).transpose(1, 2)).to(z.dtype)  # (n, L, R)
    return z * s.linear[k].view(-1, 1, 1) + fixed + learnable
