"""Convolution sites: ``nn.Conv1d`` / ``nn.Conv2d`` as linear maps on their input patches.

A convolution with weight ``(C_out, C_in, k…)`` computes ``W_flat · patch(x)`` at every output position, with
``W_flat = weight.flatten(1)`` of shape ``(C_out, C_in·∏k)``; its site has ``in_features = C_in·∏k`` and the layout
``conv`` (``records.weight_out_in`` flattens the kernel). The adapter is an ordinary one of that shape (LoRA,
AuroRA, AROMA: its merge, checkpoint and export code unchanged), applied to every patch:

* **code path** (LoRA, AuroRA: methods with ``AdapterBase.code_inner``): ``z = conv(drop(x), A)`` with A reshaped to
  ``(r, C_in, k…)`` and the module's own stride, padding and dilation (PEFT's factorisation: A is a convolution
  with r output channels), then the rest of the adapter per position in the r-channel space (LoRA ``s·B·z``, AuroRA
  ``s·B·σ(z)``: B is a 1×1 convolution);
* **patch path** (any other method, e.g. AROMA's pieces): ``unfold`` the input into patches and run the adapter on
  them (exact, and k…-times the input's memory).

Input dropout drops input pixels on the code path (as PEFT's conv LoRA does) and patch entries on the patch path.
Refused, with the reason (``Site.unsupported``): ``groups > 1`` (depthwise and grouped convolutions: a low-rank
update across groups is not a grouped convolution, and PEFT cannot merge it either), padding modes other than
``zeros``, and subclasses with their own forward (``Conv2dSame``-style dynamic padding).

Example:
    >>> [s.path for s in aurora_fx.sites(resnet18, "layer1.0.conv").matched]
    ['layer1.0.conv1', 'layer1.0.conv2']
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from aurora_fx.records import Site

__all__ = ["CONV_TYPES", "conv_site", "conv_delta"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d}


def conv_site(path: str, module: nn.Module, adapted: str | None, owner_type: str) -> Site:
    """The site of a ``nn.Conv1d`` / ``nn.Conv2d`` at ``path`` (its ``unsupported`` fact set when refused)."""
    weight = module.weight
    out_channels, in_channels, *kernel = weight.shape
    return Site(path=path, owner=path, param="weight", kind="conv", op=f"conv{len(kernel)}d", layout="conv",
                in_features=in_channels * math.prod(kernel), out_features=out_channels, dtype=str(weight.dtype),
                adapted=adapted, owner_type=owner_type, is_parameter=isinstance(weight, nn.Parameter),
                floating=weight.dtype.is_floating_point, ndim=2, unsupported=_unsupported(module))


def _unsupported(module: nn.Module) -> str | None:
    base = next(t for t in CONV_TYPES if isinstance(module, t))
    if module.groups > 1:
        return (f"a grouped convolution (groups={module.groups}, depthwise when it equals the channels): a low-rank "
                f"update across groups is not a grouped convolution and cannot be merged; adapt the pointwise "
                f"(1×1) convolutions around it instead")
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: only zero padding is supported for convolution sites"
    if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size,
                                                                          strict=True)):
        return "padding='same' with an even kernel pads unevenly, which the adapter's patches cannot follow"
    if type(module).forward is not base.forward and type(module).__mro__[0] is not base:
        return (f"{type(module).__name__} overrides {base.__name__}.forward (e.g. dynamic 'same' padding), so the "
                f"adapter's convolution could not follow its geometry")
    return None


def conv_delta(adapter: nn.Module, x: Tensor, conv: nn.Module) -> Tensor:
    """``Δ(x)`` of a convolution site: ``(N, C_out, L…)`` like the convolution's output (module docstring)."""
    dims = conv.weight.dim() - 2
    if adapter.has_code_delta:
        a, conv_fn = adapter.A, _CONV_FN[dims]
        z = conv_fn(adapter._input(x, a), a.view(a.shape[0], *conv.weight.shape[1:]), None, conv.stride, conv.padding,
                    conv.dilation)
        inner = adapter.code_inner(z.movedim(1, -1)).movedim(-1, 1)  # (r channels: small)
        b = adapter.B * adapter.scale
        return conv_fn(inner, b.view(*b.shape, *(1,) * dims))  # B as a pointwise convolution, channels first
    return _patch_delta(adapter, x, conv, dims)


def _padding(conv: nn.Module) -> tuple[int, ...]:
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return tuple(conv.padding)


def _patch_delta(adapter: nn.Module, x: Tensor, conv: nn.Module, dims: int) -> Tensor:
    """The adapter on every unfolded input patch (any method)."""
    padding = _padding(conv)
    if dims == 1:  # a 1-D convolution as a 2-D one of height 1
        x2 = x.unsqueeze(-2)
        kernel, stride = (1, conv.kernel_size[0]), (1, conv.stride[0])
        padding, dilation = (0, padding[0]), (1, conv.dilation[0])
    else:
        x2, kernel, stride, dilation = x, conv.kernel_size, conv.stride, conv.dilation
    patches = F.unfold(x2, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C·∏k, L)
    delta = adapter(patches.transpose(1, 2)).transpose(1, 2)  # (N, C_out, L)
    out_size = [(size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, k, s, p, d in zip(x2.shape[2:], kernel, stride, padding, dilation, strict=True)]
    out = delta.reshape(*delta.shape[:2], *out_size)
    return out.squeeze(-2) if dims == 1 else out
