"""Library fast paths that skip their own sub-layers, and how aurora_fx keeps adapters on them.

``nn.TransformerEncoderLayer`` calls a fused kernel with ``linear1.weight`` (and the attention's
weights) in eval mode under ``no_grad``, which would silently skip adapters there. While an
adapter lives under such a layer the fast path is switched off (``guard_fast_paths``); the
layer takes its regular path, which calls its sub-layers. ``GUARDED_READS`` tells the site
scanner (``passes/match.py``) which direct weight reads of these parents are covered that way.
This module is the one place that knows about them.
"""

from __future__ import annotations

from torch import nn

from aurora_fx.tracing import get_submodule

__all__ = ["GUARDED_READS", "guard_fast_paths", "release_fast_paths"]

# Parents whose forward reads these children's weights only on a fast path that guard_fast_paths
# switches off.
GUARDED_READS: dict[type, frozenset[str]] = {nn.TransformerEncoderLayer: frozenset({"linear1", "linear2"})}
_SAVED = "_aurora_fx_saved_activation_relu_or_gelu"


def _fast_path_layers(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    layers = []
    for path in paths:
        parts = path.split(".")
        for i in range(len(parts)):
            module = get_submodule(model, ".".join(parts[:i]))
            if isinstance(module, nn.TransformerEncoderLayer) and module not in layers:
                layers.append(module)
    return layers


def guard_fast_paths(model: nn.Module, paths: list[str]) -> None:
    """Switch off the eval/no_grad fused kernel of TransformerEncoderLayers above ``paths``.

    With ``activation_relu_or_gelu`` falsy the layer takes its regular path (the activation
    function itself is unchanged).
    """
    for layer in _fast_path_layers(model, paths):
        if not hasattr(layer, _SAVED):
            setattr(layer, _SAVED, layer.activation_relu_or_gelu)
            layer.activation_relu_or_gelu = 0


def release_fast_paths(model: nn.Module, holds_adapter) -> None:
    """Restore fast paths of guarded layers for which ``holds_adapter(layer)`` is now False."""
    for _path, layer in model.named_modules():
        guarded = isinstance(layer, nn.TransformerEncoderLayer) and hasattr(layer, _SAVED)
        if guarded and not holds_adapter(layer):
            layer.activation_relu_or_gelu = getattr(layer, _SAVED)
            delattr(layer, _SAVED)
