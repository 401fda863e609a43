"""aurora_fx: torch.fx model surgery for AuroRA, AROMA and LoRA adapters.

Example:
    >>> import aurora_fx
    >>> aurora_fx.sites(model, pattern="query|value")        # dry run: what would be adapted
    >>> aurora_fx.apply(model, pattern="query|value")         # AuroRA r̃=2, α=4, fused op
    >>> optimizer = torch.optim.AdamW(aurora_fx.trainable_parameters(model), lr=2e-3)
"""

import aurora_fx.methods  # noqa: F401, I001  (registers the built-in methods: aurora, lora, aroma)
from aurora_fx.aroma import AromaController
from aurora_fx.checkpoint import load_adapters, save_adapters
from aurora_fx.config import AromaConfig, AuroraConfig, LoraConfig
from aurora_fx.inventory import adapters, trainable_parameters
from aurora_fx.passes.match import find_sites as sites
from aurora_fx.peft_import import load_peft_lora
from aurora_fx.pretrained import from_pretrained
from aurora_fx.records import AdapterInfo, Site, SiteTable
from aurora_fx.registry import register_adapter
from aurora_fx.report import AdapterReport, inspect
from aurora_fx.surgery import apply, disable_adapters, merge, unload

__version__ = "0.1.0"

# Loaded on first use, so that ``import aurora_fx`` imports neither transformers, PEFT nor onnx.
_LAZY = {"export": ("aurora_fx.export", None), "AromaCallback": ("aurora_fx.aroma_callback", "AromaCallback")}


def __getattr__(name: str):
    """``aurora_fx.export`` and ``aurora_fx.AromaCallback``, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'aurora_fx' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value

__all__ = [
    "apply",
    "sites",
    "adapters",
    "trainable_parameters",
    "disable_adapters",
    "merge",
    "unload",
    "save_adapters",
    "load_adapters",
    "load_peft_lora",
    "from_pretrained",
    "inspect",
    "AdapterReport",
    "AromaController",
    "AromaCallback",
    "register_adapter",
    "export",
    "AuroraConfig",
    "LoraConfig",
    "AromaConfig",
    "Site",
    "SiteTable",
    "AdapterInfo",
    "__version__",
]
