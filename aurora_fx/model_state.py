"""The one record aurora_fx keeps on a user's model (beside the rewritten owners themselves).

``ModelState`` remembers each parameter's ``requires_grad`` from before the first ``apply``
(``unload`` restores them) and the ``trainable_modules`` that train beside the adapters
(checkpoints save their weights). It lives in one attribute of the model, ``_aurora_fx``, and is
copied along by ``copy.deepcopy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

__all__ = ["ModelState", "model_state", "update_model_state", "clear_model_state"]

_ATTR = "_aurora_fx"


@dataclass(frozen=True)
class ModelState:
    """What aurora_fx remembers about a model it adapted.

    Attributes:
        requires_grad: Parameter name → ``requires_grad`` before the first ``apply``.
        trainable_modules: Module paths whose parameters train besides the adapters.
        controller: A weak reference to the ``AromaController`` driving the model, or None: its state goes into
            ``model.state_dict()``'s adapter record (so a Trainer checkpoint holds it).
        resumed_controller: Controller state found in a loaded state dict's record (``AromaCallback`` resumes it).
        names: The adapter names, in the order they were added (``apply(..., name=...)``); ``adapter_rows``
            indexes them.
        active: The active names (``set_adapters``).
    """

    requires_grad: dict[str, bool] = field(default_factory=dict)
    trainable_modules: tuple[str, ...] = ()
    controller: Any = None
    resumed_controller: dict[str, Any] | None = None
    names: tuple[str, ...] = ()
    active: tuple[str, ...] = ()


def model_state(model: nn.Module) -> ModelState | None:
    """The model's ``ModelState``, or None if aurora_fx never adapted it."""
    state = model.__dict__.get(_ATTR)
    return state if isinstance(state, ModelState) else None


def update_model_state(model: nn.Module, **changes) -> ModelState:
    """Create the record on first use (snapshotting ``requires_grad``), then apply ``changes``."""
    state = model_state(model)
    if state is None:
        state = ModelState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    state = replace(state, **changes)
    model.__dict__[_ATTR] = state
    return state


def clear_model_state(model: nn.Module) -> ModelState | None:
    """Remove the record (``unload``); returns what it held."""
    return model.__dict__.pop(_ATTR, None)
