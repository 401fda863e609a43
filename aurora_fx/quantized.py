"""Quantized linear sites: an ``nn.Linear`` whose weight is stored quantized (QLoRA-style bases).

Recognised layouts (``quantization(module)`` names them; ``sites()`` shows the name per site):

* bitsandbytes ``Linear4bit`` (``bitsandbytes.nf4`` / ``bitsandbytes.fp4``) and ``Linear8bitLt`` with int8 weights
  (``bitsandbytes.int8``);
* torchao weight-only quantization (``quantize_(model, Int8WeightOnlyConfig())``, int4 layouts): the weight is a
  torchao tensor subclass (``torchao.Int8Tensor``, ...);
* any other ``nn.Linear`` whose weight is a tensor subclass with a ``dequantize()`` method (``<module>.<class>``).

The base stays quantized: an adapted quantized layer runs its own forward (the quantizer's kernel, no float copy of
the weight kept) and the adapter adds to its output (``owners.WrappedOwner``). Where the base weight itself is
needed, rarely (AROMA's effective-weight norm at a merge, ``merge(dequantize=True)``), ``dequantized_weight`` makes a
transient float copy. Quantized modules that are not ``nn.Linear`` (``torch.ao`` dynamic quantization, packed
parameters) stay refused, by name.

Example:
    >>> model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    >>> [s.quantization for s in aurora_fx.sites(model, "q_proj").matched][:1]
    ['bitsandbytes.nf4']
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["quantization", "dequantized_weight", "float_linear", "quantize_linears", "frozen_base_forward", "SCHEMES"]

SCHEMES = ("bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8", "torchao-int4")


def quantization(module: nn.Module) -> str | None:
    """The quantization of ``module``'s weight when it is a quantized ``nn.Linear`` (module docstring), else None."""
    if not isinstance(module, nn.Linear):
        return None
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    kind = type(weight)
    if kind in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point:
        return None
    name = kind.__name__
    if kind.__module__.startswith("bitsandbytes"):
        if name == "Params4bit" and getattr(weight, "bnb_quantized", False):
            return f"bitsandbytes.{weight.quant_type}"
        if name == "Int8Params" and weight.dtype == torch.int8:
            return "bitsandbytes.int8"
        return None  # e.g. Int8Params still in float (has_fp16_weights): an ordinary float weight
    if callable(getattr(weight, "dequantize", None)) and kind not in (torch.Tensor, nn.Parameter):
        root = kind.__module__.split(".")[0]
        return f"{root}.{name}"
    return None


def dequantized_weight(module: nn.Module) -> Tensor:
    """A transient float32 ``(d_out, d_in)`` copy of a quantized linear's weight (never kept by aurora_fx)."""
    weight = module.weight
    kind = type(weight).__name__
    with torch.no_grad():
        if kind == "Params4bit":
            return _dequantize_bnb4(weight)
        if kind == "Int8Params":
            scale = weight.SCB if weight.SCB is not None else module.state.SCB
            return weight.data.float() * scale.float()[:, None] / 127.0
        return weight.dequantize().float()


def float_linear(layer: nn.Module, delta: Tensor | None = None) -> nn.Linear:
    """A float32 ``nn.Linear`` holding ``dequant(W)`` (``+ delta``, a ``(d_out, d_in)`` update) and the bias."""
    weight = dequantized_weight(layer)
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight if delta is None else weight + delta.to(weight))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.float())
    return out


def _dequantize_bnb4(weight: Tensor) -> Tensor:
    """Bitsandbytes 4-bit weights, also after its CPU eval path repacked them in place (``packing_format_for_cpu``)."""
    import copy

    import bitsandbytes.functional as bnbf

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return bnbf.dequantize_4bit(data, state).float()


class _FrozenQuantizedLinear(torch.autograd.Function):
    """``base(x)`` of a frozen quantized linear whose backward keeps nothing but the layer itself.

    The quantizers' own autograd may keep a float copy of the weight for the input gradient (torchao's weight-only
    tensors save ``dequant(W)ᵀ`` for backward); this one saves nothing and dequantizes transiently in the
    backward: ``∂L/∂x = g·dequant(W)`` (the base is linear in x).
    """

    @staticmethod
    def forward(ctx, x: Tensor, base_forward, module: nn.Module) -> Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        with torch.no_grad():
            return base_forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = dequantized_weight(ctx.module).to(grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None, None


def frozen_base_forward(module: nn.Module, base_forward, x: Tensor) -> Tensor:
    """``base_forward(x)`` for an adapted quantized linear.

    Through ``_FrozenQuantizedLinear`` when its parameters are frozen and x needs a gradient, otherwise the
    quantizer's own path. (Quantized layers without an adapter keep their quantizer's own backward.)
    """
    frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
    if frozen and torch.is_grad_enabled() and x.requires_grad:
        return _FrozenQuantizedLinear.apply(x, base_forward, module)
    return base_forward(x)


def quantize_linears(model: nn.Module, scheme: str, skip: str = "lm_head") -> nn.Module:
    """Quantize every ``nn.Linear`` of a float model in place (the ones whose path contains ``skip`` stay float).

    For QLoRA on a model already in memory (on a GPU, ``from_pretrained(..., quantization_config=...)`` does the
    same while loading). Schemes: ``bnb-nf4`` / ``bnb-fp4`` (bitsandbytes ``Linear4bit``, float32 compute),
    ``bnb-int8`` (``Linear8bitLt``), ``torchao-int8`` (``Int8WeightOnlyConfig``), ``torchao-int4``
    (``IntxWeightOnlyConfig(weight_dtype=torch.int4)``, the CPU int4 layout).

    Example:
        >>> quantize_linears(llama, "bnb-nf4")
        >>> aurora_fx.apply(llama, "q_proj|v_proj", method="lora")   # QLoRA
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    targets = [(path, m) for path, m in model.named_modules()
               if type(m) is nn.Linear and path and (not skip or skip not in path)]
    if scheme.startswith("torchao"):
        return _torchao(model, scheme, {id(m) for _, m in targets})
    for path, linear in targets:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, _bnb(linear, scheme))
    return model


def _bnb(linear: nn.Linear, scheme: str) -> nn.Module:
    import bitsandbytes as bnb

    if scheme == "bnb-int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, quant_type=scheme.split("-")[1])
    layer.load_state_dict(linear.state_dict())
    layer.train(linear.training)  # (bitsandbytes' CPU kernels differ between train and eval by ~1e-3)
    return layer.to(linear.weight.device)  # (bitsandbytes quantizes on the move)


def _torchao(model: nn.Module, scheme: str, chosen: set[int]) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if scheme == "torchao-int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4)
    quantize_(model, config, filter_fn=lambda m, fqn: id(m) in chosen)
    return model
