"""Expert routing: add each expert's adapter output where an experts forward really computes.

An adapted experts module (``owners.build_wrapped_owner``) runs its own forward, unchanged, inside an
``ExpertRouting`` torch-function mode. The mode follows the adapted 3-D parameters through the few
operations an experts forward applies to them and, where a linear map on expert weights happens, adds
the adapter family's output (``methods/experts.py``) to the result:

================================================  ============================================
what the forward does                             what is added
================================================  ============================================
``W[e]`` then ``F.linear(x, ·)`` or ``x @ ·``     ``Δ_e(x)``          (``eager`` loops)
``W[ids]`` then ``torch.bmm``                     ``Δ_{ids[i]}(x_i)`` (``batched_mm``)
``W`` / ``W.transpose(-2, -1)`` then grouped mm   per-expert slices   (``grouped_mm``, its fallback op)
================================================  ============================================

Transposes (``.t()``, ``.T``, ``.mT``, ``transpose``) and dtype/device casts of a followed weight are
followed too. Any other operation that makes a tensor out of a followed weight raises
``ExpertRoutingError`` naming it: an adapter is never silently skipped. Nothing of size
``E × d_in × d_out`` is made: the adapters see activations only. The mode is dynamo-traceable (a list
and ``is`` comparisons), so ``torch.compile`` and ``torch.export`` see through it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["ExpertRouting", "ExpertRoutingError", "Followed"]

_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm}
_BMM = {torch.bmm, Tensor.bmm}
_GROUPED_OPS = {"transformers::grouped_mm_fallback"}
_CASTS = {Tensor.to, Tensor.contiguous, Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16}
_GETITEM = {Tensor.__getitem__}


class ExpertRoutingError(RuntimeError):
    """An experts forward used an adapted expert weight in a way the routing cannot follow."""


@dataclass(frozen=True)
class Followed:
    """A tensor made from an adapted expert parameter, and which expert(s) it holds.

    Attributes:
        tensor: The tensor itself (compared with ``is``).
        family: The site's ``ExpertAdapters``.
        site: The site path (for errors).
        io: Its last two dimensions are ``(d_in, d_out)`` (``x @ W``), else ``(d_out, d_in)`` (``F.linear``).
        expert: The one expert of a 2-D slice ``W[e]``, or None.
        ids: The per-row experts of a gathered ``W[ids]``, or None (None and no expert: the whole ``W``).
    """

    tensor: Tensor
    family: nn.Module
    site: str
    io: bool
    expert: Any = None
    ids: Tensor | None = None


def _is_grouped(func: Any) -> bool:
    if func is torch._grouped_mm:
        return True
    name = getattr(func, "_qualified_op_name", None) or (func.name() if hasattr(func, "name") and callable(
        func.name) and hasattr(func, "_schema") else None)
    return isinstance(name, str) and name.split(".")[0] in _GROUPED_OPS


class ExpertRouting(TorchFunctionMode):
    """Adds expert adapters' outputs on the executed path of an experts forward (module docstring).

    Args:
        weights: ``(parameter, family, site path, io)`` per adapted expert parameter.

    Example:
        >>> with ExpertRouting([(experts.gate_up_proj, family, "mlp.experts.gate_up_proj", False)]):
        ...     out = experts_forward(experts, hidden, top_k_index, top_k_weights)
    """

    def __init__(self, weights: list[tuple[Tensor, nn.Module, str, bool]]) -> None:
        super().__init__()
        self.followed = [Followed(w, fam, site, io) for w, fam, site, io in weights]

    def _find(self, value: Any) -> Followed | None:
        if not isinstance(value, Tensor):
            return None
        for f in self.followed:
            if f.tensor is value:
                return f
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self._handler(func)
        if handler is not None:
            result = handler(func, args, kwargs)
            if result is not NotImplemented:
                return result
        self._refuse_others(func, args, kwargs)
        return func(*args, **kwargs)

    def _handler(self, func):
        if func in _GETITEM:
            return self._getitem
        if func in _LINEAR:
            return self._linear
        if func in _MATMUL:
            return self._matmul
        if func in _BMM:
            return self._bmm
        if func in _CASTS:
            return self._cast
        if _is_transpose(func):
            return self._transpose
        if _is_grouped(func):
            return self._grouped
        return None

    # -- followed views ---------------------------------------------------------------------------
    def _follow(self, tensor: Tensor, source: Followed, **changes: Any) -> Tensor:
        fields = {"family": source.family, "site": source.site, "io": source.io, "expert": source.expert,
                  "ids": source.ids, **changes}
        self.followed.append(Followed(tensor, **fields))
        return tensor

    def _getitem(self, func, args, kwargs):
        source = self._find(args[0])
        if source is None or source.expert is not None or source.ids is not None:
            return NotImplemented
        index = args[1]
        out = func(*args, **kwargs)
        integer = isinstance(index, Tensor) and not index.is_floating_point() and index.dtype != torch.bool
        if isinstance(index, int) or (integer and index.dim() == 0):
            return self._follow(out, source, expert=index)
        if integer and index.dim() == 1:
            return self._follow(out, source, ids=index)
        raise ExpertRoutingError(f"{source.site}: the experts forward indexes the expert weight with {index!r}; "
                                 f"aurora_fx follows W[e] (one expert) and W[ids] (a 1-D index per row) only")

    def _transpose(self, func, args, kwargs):
        source = self._find(args[0])
        if source is None:
            return NotImplemented
        t = args[0]
        dims = args[1:3] if len(args) >= 3 else (-2, -1)
        if {d % t.dim() for d in dims} != {t.dim() - 2, t.dim() - 1}:
            raise ExpertRoutingError(f"{source.site}: the experts forward transposes dimensions {dims} of the expert "
                                     f"weight; aurora_fx follows a swap of the last two only")
        return self._follow(func(*args, **kwargs), source, io=not source.io)

    def _cast(self, func, args, kwargs):
        source = self._find(args[0])
        if source is None:
            return NotImplemented
        return self._follow(func(*args, **kwargs), source)

    # -- linear maps on followed weights --------------------------------------------------------------
    def _linear(self, func, args, kwargs):
        x = kwargs.get("input", args[0] if args else None)
        source = self._find(kwargs.get("weight", args[1] if len(args) > 1 else None))
        if source is None or source.expert is None or source.io:
            return NotImplemented
        return source.family.add_expert(func(*args, **kwargs), source.expert, x)

    def _matmul(self, func, args, kwargs):
        x, w = args[0], args[1]
        source = self._find(w)
        if source is None or not source.io:
            return NotImplemented
        if source.expert is not None:
            return source.family.add_expert(func(*args, **kwargs), source.expert, x)
        if source.ids is not None and x.dim() == 3:
            return self._bmm(torch.bmm, (x, w), {})
        return NotImplemented

    def _bmm(self, func, args, kwargs):
        a, b = args[0], args[1]
        left, right = self._find(a), self._find(b)
        if right is not None and right.ids is not None and right.io:  # x (S, k, in) @ W[ids] (S, in, out)
            out = func(*args, **kwargs)
            return _add_rows(right, out, a)
        if left is not None and left.ids is not None and not left.io:  # W[ids] (S, out, in) @ x (S, in, k)
            out = func(*args, **kwargs)
            return _add_rows(left, out.transpose(1, 2), b.transpose(1, 2)).transpose(1, 2)
        return NotImplemented

    def _grouped(self, func, args, kwargs):
        x, w = args[0], args[1]
        offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
        source = self._find(w)
        if source is None or source.expert is not None or source.ids is not None or not source.io or offs is None:
            return NotImplemented
        return source.family.add_grouped(func(*args, **kwargs), x, offs)

    def _refuse_others(self, func, args, kwargs) -> None:
        leaves = tree_leaves((args, kwargs))
        hit = next((f for leaf in leaves if (f := self._find(leaf)) is not None), None)
        if hit is None or _harmless(func):
            return
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)
        raise ExpertRoutingError(
            f"{hit.site}: the experts forward applies {name} to the adapted expert weight, which aurora_fx cannot "
            f"follow (it follows W[e] with F.linear or @, W[ids] with torch.bmm, and W with grouped_mm), so the "
            f"adapter would be skipped. Switch the model to another experts implementation "
            f"(model.set_experts_implementation('batched_mm') or 'eager'), or leave this parameter out of the "
            f"pattern")


def _add_rows(source: Followed, out: Tensor, x: Tensor) -> Tensor:
    """``out += Δ`` for ``x`` ``(S, k, d_in)`` and ``out`` ``(S, k, d_out)`` whose row s goes to expert ``ids[s]``."""
    s, k, d_in = x.shape
    if k == 1:  # batched_mm: one row per (token, expert) pair; a (S, d_out) view of out takes it in place
        flat = out.select(1, 0)
        result = source.family.add_rows(flat, x.select(1, 0), source.ids)
        return out if result is flat else result.unsqueeze(1)
    ids = source.ids.repeat_interleave(k)
    delta = source.family.add_rows(out.new_zeros(s * k, out.shape[-1]), x.reshape(s * k, d_in), ids)
    return out + delta.view(s, k, -1)


def _is_transpose(func: Any) -> bool:
    return func in (Tensor.transpose, torch.transpose, Tensor.t, torch.t, Tensor.mT.__get__, Tensor.T.__get__,
                    Tensor.mT, Tensor.T, Tensor.swapaxes, torch.swapaxes)


def _harmless(func: Any) -> bool:
    """Reads that make no tensor from the weight's values: shape, dtype, device, pointers."""
    name = getattr(func, "__name__", "")
    return name in {"size", "dim", "__get__", "data_ptr", "is_contiguous", "numel", "stride", "element_size",
                    "__len__", "get_device", "is_floating_point"} or func in (operator.is_, operator.is_not)
