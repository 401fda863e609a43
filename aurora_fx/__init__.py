"""aurora_fx: torch.fx model surgery for AuroRA, AROMA and LoRA adapters.

Example:
    >>> import aurora_fx
    >>> aurora_fx.sites(model, pattern="query|value")        # dry run: what would be adapted
    >>> aurora_fx.apply(model, pattern="query|value")         # AuroRA r̃=2, α=4, fused op
    >>> optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=2e-3)

``import aurora_fx`` itself imports nothing heavy (not even torch): each public name below is loaded
from its module on first use, after the built-in methods (aurora, lora, aroma) have registered
themselves, so the command line and ``--help`` start at once.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# Public name → (module, attribute); None means the module itself.
_PUBLIC: dict[str, tuple[str, str | None]] = {
    "apply": ("aurora_fx.surgery", "apply"),
    "sites": ("aurora_fx.passes.match", "find_sites"),
    "adapters": ("aurora_fx.inventory", "adapters"),
    "trainable_parameters": ("aurora_fx.inventory", "trainable_parameters"),
    "disable_adapters": ("aurora_fx.surgery", "disable_adapters"),
    "delete_adapter": ("aurora_fx.surgery", "delete_adapter"),
    "set_adapters": ("aurora_fx.named", "set_adapters"),
    "adapter_names": ("aurora_fx.named", "adapter_names"),
    "adapter_rows": ("aurora_fx.named", "adapter_rows"),
    "merge": ("aurora_fx.surgery", "merge"),
    "unload": ("aurora_fx.surgery", "unload"),
    "save_adapters": ("aurora_fx.checkpoint", "save_adapters"),
    "load_adapters": ("aurora_fx.checkpoint", "load_adapters"),
    "load_peft_lora": ("aurora_fx.peft_import", "load_peft_lora"),
    "from_pretrained": ("aurora_fx.pretrained", "from_pretrained"),
    "inspect": ("aurora_fx.report", "inspect"),
    "AdapterReport": ("aurora_fx.report", "AdapterReport"),
    "AromaController": ("aurora_fx.aroma", "AromaController"),
    "AromaCallback": ("aurora_fx.aroma_callback", "AromaCallback"),
    "register_adapter": ("aurora_fx.registry", "register_adapter"),
    "export": ("aurora_fx.export", None),
    "AuroraConfig": ("aurora_fx.config", "AuroraConfig"),
    "LoraConfig": ("aurora_fx.config", "LoraConfig"),
    "AromaConfig": ("aurora_fx.config", "AromaConfig"),
    "Site": ("aurora_fx.records", "Site"),
    "SiteTable": ("aurora_fx.records", "SiteTable"),
    "AdapterInfo": ("aurora_fx.records", "AdapterInfo"),
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    """The public names of ``__all__``, imported when first asked for (then cached as attributes).

    A submodule (``aurora_fx.checkpoint``, ``aurora_fx.distributed``) is imported on first access too, as
    it would be after an eager ``import aurora_fx``.
    """
    if name not in _PUBLIC:
        if importlib.util.find_spec(f"aurora_fx.{name}") is None:
            raise AttributeError(f"module 'aurora_fx' has no attribute {name!r}")
        return importlib.import_module(f"aurora_fx.{name}")
    importlib.import_module("aurora_fx.methods")  # the built-in methods register themselves
    module_name, attr = _PUBLIC[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
