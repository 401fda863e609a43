"""The built-in adapter methods; importing this package registers them (``aurora_fx.registry``)."""

from aurora_fx.methods.aroma import AromaAdapter  # noqa: I001  (registration order: aurora, lora, aroma)
from aurora_fx.methods.aurora import AuroraAdapter
from aurora_fx.methods.base import AdapterBase, Fusion
from aurora_fx.methods.lora import LoraAdapter

__all__ = ["AdapterBase", "Fusion", "AuroraAdapter", "LoraAdapter", "AromaAdapter"]
