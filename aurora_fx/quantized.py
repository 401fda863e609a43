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

__all__ = ["quantization", "dequantized_weight"]


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
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
        if kind == "Int8Params":
            scale = weight.SCB if weight.SCB is not None else module.state.SCB
            return weight.data.float() * scale.float()[:, None] / 127.0
        return weight.dequantize().float()
