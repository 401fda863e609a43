"""Which input axes ``to_onnx`` exports as dynamic, and the example inputs that trace and verify them.

* Batch (axis 0) is dynamic for every tensor input, one ``batch`` dimension for all.
* The sequence (axis 1) is dynamic for token inputs (2-D/3-D integer) and for float ``(B, L, D)``
  inputs such as ``inputs_embeds``; fixed-layout features (``input_features`` of speech models,
  ``pixel_values``) keep their other axes.
* Sequences come in groups that share one length: the encoder's (``input_ids``, ``attention_mask``,
  positional inputs, ...; ``seq``) and the decoder's (every ``decoder_*`` input; ``decoder_seq``), so an
  encoder-decoder model takes any pair of lengths.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["dynamic_dims", "dynamic_spec", "traceable", "reshaped", "seq_group"]

# Float 3-D inputs whose axis 1 is not a sequence (mel bins, channels).
_FIXED_LAYOUT = ("input_features", "pixel_values", "pixel_mask")


def seq_group(name: str) -> str:
    """The sequence group of an input: ``decoder_seq`` for ``decoder_*`` inputs, else ``seq``."""
    return "decoder_seq" if name.startswith("decoder_") else "seq"


def dynamic_dims(t: Any, name: str = "") -> tuple[int, ...]:
    """The dynamic axes of input ``name`` (see the module docstring)."""
    if not torch.is_tensor(t) or t.dim() == 0:
        return ()
    tokens = t.dim() in (2, 3) and not t.is_floating_point()
    embeds = t.dim() == 3 and t.is_floating_point() and not name.startswith(_FIXED_LAYOUT)
    return (0, 1) if tokens or embeds else (0,)


def _named(args: tuple, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())


def dynamic_spec(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, dict[str, tuple[str, ...]]]:
    """``dynamic_shapes`` for torch.export, and the dynamic axis names per keyword input."""
    dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq"),
            "decoder_seq": torch.export.Dim("decoder_seq")}

    def axis_names(t: Any, name: str) -> tuple[str, ...]:
        return tuple("batch" if d == 0 else seq_group(name) for d in dynamic_dims(t, name))

    def spec(t: Any, name: str) -> Any:
        return {d: dims[n] for d, n in zip(dynamic_dims(t, name), axis_names(t, name), strict=True)} or None

    axes = {k: axis_names(v, k) for k, v in kwargs.items() if dynamic_dims(v, k)}
    keyword = {k: spec(v, k) for k, v in kwargs.items()}
    if args:
        positional = tuple(spec(a, f"arg{i}") for i, a in enumerate(args))
        return ((positional, keyword) if kwargs else positional), axes
    return keyword, axes


def _tiled(value: Any, axis: int) -> Any:
    return torch.cat([value, value], dim=axis) if torch.is_tensor(value) and value.shape[axis] == 1 else value


def traceable(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Examples for tracing with dynamic axes: a size-1 dynamic axis is tiled to 2.

    ``torch.export`` specializes an axis whose example size is 1 to the constant 1, so a batch-1
    example (or a decoder given only its start token) would give a graph that takes only that size.
    Each group of inputs sharing a dimension is tiled together, so the shapes stay consistent; the
    user's own example is still the one verified.
    """
    named = dict(_named(args, kwargs))
    groups = {"batch": [(n, 0) for n, t in named.items() if 0 in dynamic_dims(t, n)]}
    for n, t in named.items():
        if 1 in dynamic_dims(t, n):
            groups.setdefault(seq_group(n), []).append((n, 1))
    tile: dict[str, list[int]] = {}
    for members in groups.values():
        if members and all(named[n].shape[axis] == 1 for n, axis in members):
            for n, axis in members:
                tile.setdefault(n, []).append(axis)
    out = {}
    for n, t in named.items():
        for axis in tile.get(n, ()):
            t = _tiled(t, axis)
        out[n] = t
    return tuple(out[f"arg{i}"] for i in range(len(args))), {k: out[k] for k in kwargs}


def reshaped(value: Any, name: str) -> Any:
    """A differently shaped input of the same kind: batch + 1 and, for sequences, length ± 3."""
    axes = dynamic_dims(value, name)
    if not axes:
        return value
    shape = list(value.shape)
    shape[0] += 1
    if 1 in axes:  # shorter when long (position limits), longer when short
        shape[1] = shape[1] - 3 if shape[1] > 8 else shape[1] + 3
    if "mask" in name:
        return torch.ones(shape, dtype=value.dtype)
    if value.is_floating_point():
        return torch.randn(shape, dtype=value.dtype) * value.float().std().clamp_min(1e-3).to(value.dtype)
    low, high = int(value.min()), int(value.max())
    return torch.randint(low, high + 1, shape, dtype=value.dtype)
