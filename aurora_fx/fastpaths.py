"""Library fast paths that skip their own sub-layers, and how aurora_fx keeps adapters on them.

``nn.TransformerEncoderLayer`` calls a fused kernel with ``linear1.weight`` (and the attention's
weights) in eval mode under ``no_grad``, which would silently skip adapters there. While an
adapter lives under such a layer the fast path is switched off (``guard_fast_paths``); the
layer takes its regular path, which calls its sub-layers. The ``nn.TransformerEncoder`` above it
would still turn a padded batch into a NestedTensor for that fast path (it checks only the base
weights), which no adapter op takes, so its ``use_nested_tensor`` is switched off too. ``GUARDED_READS`` tells the site
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
# The flag each kind of owner reads, and the value that switches its fast path off.
_SWITCHES: dict[type, tuple[str, object]] = {nn.TransformerEncoderLayer: ("activation_relu_or_gelu", 0),
                                             nn.TransformerEncoder: ("use_nested_tensor", False)}
_SAVED = "_aurora_fx_saved_fast_path"


def _ancestors(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    """The TransformerEncoder(Layer)s above ``paths``, each once."""
    found = []
    for path in paths:
        parts = path.split(".")
        for i in range(len(parts)):
            module = get_submodule(model, ".".join(parts[:i]))
            if type(module) in _SWITCHES and module not in found:
                found.append(module)
    return found


def guard_fast_paths(model: nn.Module, paths: list[str]) -> None:
    """Switch off the fast paths above ``paths``: each layer's fused kernel and each encoder's NestedTensor.

    With ``activation_relu_or_gelu`` falsy the layer takes its regular path (the activation function
    itself is unchanged); with ``use_nested_tensor`` False the encoder keeps a padded batch dense.
    """
    for module in _ancestors(model, paths):
        name, off = _SWITCHES[type(module)]
        if not hasattr(module, _SAVED):
            setattr(module, _SAVED, getattr(module, name))
            setattr(module, name, off)


def release_fast_paths(model: nn.Module, holds_adapter) -> None:
    """Restore fast paths of guarded modules for which ``holds_adapter(module)`` is now False."""
    for _path, module in model.named_modules():
        if type(module) in _SWITCHES and hasattr(module, _SAVED) and not holds_adapter(module):
            setattr(module, _SWITCHES[type(module)][0], getattr(module, _SAVED))
            delattr(module, _SAVED)
