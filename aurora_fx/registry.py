"""The method registry: method name → config class → adapter module class, filled by a decorator.

Every adapter method is one module class registered once with ``@register_adapter`` (the way
torchao registers a handler per config type). Nothing else in aurora_fx names a concrete method:
``apply(method=...)``, checkpoints, the CLI's ``--method`` choices and PEFT import all go through
this table.

Implementer's side: a frozen ``AdapterConfig`` subclass with ``method: ClassVar[str] = "mine"``, and
an ``aurora_fx.methods.base.AdapterBase`` subclass with ``config_class = MyConfig``, its own
parameters, ``forward`` and ``oracle_delta`` (``delta_weight`` to merge, ``fusion`` to fuse), decorated
with ``@register_adapter``. ``tests/test_registry.py`` holds a complete method in under 40 lines.

User's side: ``aurora_fx.apply(model, "query|value", method="scaled")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aurora_fx.config import AdapterConfig

__all__ = [
    "register_adapter",
    "unregister_adapter",
    "adapter_class",
    "config_class",
    "method_names",
    "is_registered_adapter",
    "build_adapter",
    "make_config",
    "config_from_dict",
]

_ADAPTERS: dict[str, type] = {}


def register_adapter(cls: type) -> type:
    """Class decorator: make ``cls`` the adapter of ``cls.config_class.method``.

    Raises:
        TypeError: ``cls`` has no ``config_class`` that is an ``AdapterConfig`` with a method name.
        ValueError: Another class already holds that method name.
    """
    config_cls = getattr(cls, "config_class", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, AdapterConfig) and config_cls.method):
        raise TypeError(f"{cls.__name__} needs a config_class: an AdapterConfig subclass with a non-empty "
                        f"ClassVar 'method' (e.g. method: ClassVar[str] = 'mymethod')")
    name = config_cls.method
    held = _ADAPTERS.get(name)
    if held is not None and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method {name!r} is already registered by {held.__module__}.{held.__qualname__}; "
                         f"give {cls.__name__}'s config another method name")
    _ADAPTERS[name] = cls
    return cls


def unregister_adapter(method: str) -> None:
    """Remove a registered method (built-in methods cannot be removed)."""
    if method in ("aurora", "lora", "aroma"):
        raise ValueError(f"the built-in method {method!r} cannot be unregistered")
    _ADAPTERS.pop(method, None)


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order (the built-ins first, then user methods)."""
    return tuple(_ADAPTERS)


def adapter_class(method: str | AdapterConfig) -> type:
    """The adapter module class of a method name or a config.

    Raises:
        ValueError: Unknown method (the message lists the registered ones).
    """
    name = method.method if isinstance(method, AdapterConfig) else method
    cls = _ADAPTERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(_ADAPTERS)} "
                         f"(new methods register with @aurora_fx.registry.register_adapter)")
    return cls


def config_class(method: str) -> type[AdapterConfig]:
    """The config class of a method name."""
    return adapter_class(method).config_class


def is_registered_adapter(module: object) -> bool:
    """True for instances of any registered adapter class."""
    return isinstance(module, tuple(_ADAPTERS.values()))


def build_adapter(config: AdapterConfig, in_features: int, out_features: int, *, device=None, dtype=None):
    """A fresh adapter module for ``config`` on a ``(in_features → out_features)`` site."""
    return adapter_class(config)(in_features, out_features, config, device=device, dtype=dtype)


def make_config(
    method: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    config: Any = None,
) -> AdapterConfig:
    """Build the config for ``method``, with the method's own defaults for unset fields.

    Args:
        method: A registered method name (``"aurora"``, ``"lora"``, ``"aroma"``, ...), any case; None means
            ``config``'s method, or ``"aurora"`` without a config. A method that contradicts ``config`` is refused.
        rank: Overrides the method's default rank.
        alpha: Overrides the method's default alpha.
        dropout: Overrides the method's default dropout.
        config: A ready aurora_fx config (``apply`` converts a ``peft.LoraConfig`` first, with
            ``aurora_fx.peft_config.as_aurora_config``); then ``rank``/``alpha``/``dropout`` must be unset.

    Raises:
        ValueError: Unknown method, invalid values, or both ``config`` and loose fields.
        TypeError: ``config`` is not an aurora_fx config.
    """
    if config is not None:
        if any(v is not None for v in (rank, alpha, dropout)):
            raise ValueError("pass either config=... or rank/alpha/dropout, not both; put the values in the config")
        if isinstance(config, AdapterConfig):
            if method is not None and str(method).lower() != config.method:
                raise ValueError(f"method={method!r} but config is {type(config).__name__}(...) (method "
                                 f"{config.method!r}); pass only the config, or a {method} config")
            return config
        kind = f"{type(config).__module__}.{type(config).__qualname__}"
        raise TypeError(f"config must be an aurora_fx config ({', '.join(_config_names())}) or a peft.LoraConfig, "
                        f"got {kind}")
    method = "aurora" if method is None else method
    if not isinstance(method, str):
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(method_names())}")
    overrides = {k: v for k, v in (("rank", rank), ("alpha", alpha), ("dropout", dropout)) if v is not None}
    return config_class(method.lower())(**overrides)


def _config_names() -> list[str]:
    return [f"aurora_fx.{adapter_class(m).config_class.__name__}" for m in method_names()]


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Inverse of ``AdapterConfig.to_dict``; validates like the constructor."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in method_names():
        raise ValueError(f"unknown adapter method {method!r} in config; expected one of {sorted(method_names())}")
    cls = config_class(method)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown {method} config field(s) {sorted(unknown)}; known fields: {sorted(fields)}")
    for name, value in data.items():
        if isinstance(value, list):  # JSON turns tuples into lists
            data[name] = tuple(value)
    return cls(**data)
