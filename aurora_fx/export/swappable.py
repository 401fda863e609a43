"""Swappable adapters: one base ONNX graph, adapter weights as inputs, one weight file per fine-tune.

``to_onnx_swappable`` exports the adapted model and turns every adapter tensor (A, B, H, Ws; U, V
for AROMA) into an *overridable initializer*: a graph input whose default value is zero, which
makes every adapter's output exactly zero, so the graph alone computes the base model.
``save_adapter_weights`` writes a fine-tune's adapter tensors as an onnxruntime adapter file
(``AdapterFormat``, ORT ≥ 1.20) keyed by those input names; at run time the file is activated per
request with ``RunOptions.add_active_adapter`` (or its tensors are fed as plain inputs).

Example:
    >>> graph = to_onnx_swappable(model_a, "base.onnx", example_kwargs=batch)
    >>> save_adapter_weights(model_a, "a.onnx_adapter"); save_adapter_weights(model_b, "b.onnx_adapter")
    >>> session = SwappableSession("base.onnx")
    >>> session.run(batch, adapter="a.onnx_adapter")     # fine-tune A; adapter=None: the base model

All fine-tunes must share the sites, methods and ranks of the exported structure (AROMA's grown
rank may differ: its U/V inputs have a symbolic width).

**Named slots.** A graph exported from a model with several named adapters (``aurora_fx.named``) has one slot per
name (inputs ``<site>.adapter.<name>.A``, ...) and an ``adapter_index`` input. ``save_adapter_weights(model, path,
slot="b")`` writes a fine-tune's adapter (the model's only one, or ``name=``) keyed for slot ``b``, so a fine-tune
trained alone fills any slot of the same structure; ``SwappableSession.run(feeds, adapter=[file_a, file_b])``
activates several files at once (one per slot), and each row runs the slot its index names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from aurora_fx.atomic import atomic_path
from aurora_fx.export.onnx import ExportResult, to_onnx
from aurora_fx.named import check_name, resolve_name
from aurora_fx.owners import iter_bindings
from aurora_fx.registry import is_registered_adapter

__all__ = ["to_onnx_swappable", "save_adapter_weights", "adapter_tensors", "make_overridable", "SwappableSession",
           "ADAPTER_MARK"]

ADAPTER_MARK = ".adapter"  # adapter tensors are named <site module>.adapter[_param].<A|B|H|Ws|U|V>


def _stored(model: nn.Module):
    """``(fully qualified name, tensor, variable axis or None)`` of every stored adapter tensor."""
    for path, module in model.named_modules():
        if is_registered_adapter(module):
            for name, t in module.stored_tensors().items():
                yield f"{path}.{name}", t, module.variable_width.get(name)


def adapter_tensors(model: nn.Module, name: str | None = None, slot: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors of ``model`` by their fully qualified names (the ONNX input names).

    Args:
        model: An adapted model.
        name: Only the adapter of this name (``aurora_fx.named``); None: every adapter, unless ``slot`` is given.
        slot: Key the tensors for this named slot of a graph with several names (``<site>.adapter.<slot>.A``),
            whatever the adapter is called in ``model`` (then ``name`` may be left out for a one-name model).
    """
    if name is None and slot is None:
        return {key: t.detach() for key, t, _ in _stored(model)}
    name = resolve_name(model, name)
    out = {}
    for owner, gm, b in iter_bindings(model, name):
        target = f"{b.slot}.{check_name(slot)}" if slot is not None else b.attr
        for tensor_name, t in gm.get_submodule(b.attr).stored_tensors().items():
            out[".".join(p for p in (owner, target, tensor_name) if p)] = t.detach()
    return out


def _make_overridable(proto: onnx.ModelProto, names: dict[str, int | None]) -> list[str]:
    graph = proto.graph
    found = []
    for init in graph.initializer:
        if init.name not in names:
            continue
        value = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(np.zeros_like(value), init.name))  # zero effect by default
        shape = list(value.shape)
        axis = names[init.name]
        if axis is not None:  # e.g. AROMA's U, V: the grown width differs between fine-tunes
            shape[axis] = f"{init.name}_width"
        graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, shape))
        found.append(init.name)
    missing = set(names) - set(found)
    if missing:
        raise RuntimeError(f"adapter tensors {sorted(missing)[:3]} are not initializers of the exported graph")
    return found


def make_overridable(proto: onnx.ModelProto, model: nn.Module) -> list[str]:
    """Turn ``model``'s adapter tensors in ``proto`` into zero-default graph inputs (in place)."""
    found = _make_overridable(proto, {name: axis for name, _, axis in _stored(model)})
    del proto.graph.value_info[:]  # intermediate shapes depend on the fed adapter (AROMA widths): re-infer
    onnx.checker.check_model(proto)
    return found


def to_onnx_swappable(model: nn.Module, path: str | os.PathLike, example_inputs: tuple | None = None,
                      example_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> ExportResult:
    """Export ``model``'s structure with adapter weights as zero-default graph inputs.

    Verification (``verify=True``) runs with ``model``'s own weights fed as inputs.
    """
    if not adapter_tensors(model):
        raise ValueError("the model has no adapters; swappable export needs aurora_fx.apply(model, ...) first")
    verify = kwargs.pop("verify", True)
    result = to_onnx(model, path, example_inputs, example_kwargs, verify=False, **kwargs)
    proto = onnx.load(str(result.path))
    make_overridable(proto, model)
    with atomic_path(result.path) as tmp:
        onnx.save_model(proto, tmp)
    if verify:
        _verify(model, result.path, example_inputs, example_kwargs, kwargs.get("atol", 1e-4))
    return result


def _verify(model: nn.Module, path: Path, args: tuple | None, kwargs: dict | None, atol: float) -> None:
    from aurora_fx.export.onnx import ExportVerificationError, flatten_outputs

    session = SwappableSession(path)
    feeds = dict(kwargs or {})
    feeds.update({name: t for name, t in zip(session.data_inputs, args or (), strict=False)})
    with torch.no_grad():
        expected = flatten_outputs(model.eval()(*(args or ()), **(kwargs or {})))
    got = session.run(feeds, weights=adapter_tensors(model))
    diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=False))
    if diff > atol:
        raise ExportVerificationError(f"swappable graph with the model's own adapter weights differs by {diff:.3g}")


def save_adapter_weights(model: nn.Module, path: str | os.PathLike, *, name: str | None = None,
                         slot: str | None = None) -> Path:
    """Write ``model``'s adapter tensors as an onnxruntime adapter file (``.onnx_adapter``), atomically.

    ``name`` picks one named adapter; ``slot`` keys the file for that slot of a graph with several names
    (see the module docstring).
    """
    import onnxruntime as ort

    tensors = adapter_tensors(model, name, slot)
    if not tensors:
        raise ValueError("the model has no adapters to save; call aurora_fx.apply(model, ...) first")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v.float().contiguous().numpy())
                        for k, v in tensors.items()})
    target = Path(path)
    with atomic_path(target) as tmp:
        fmt.export_adapter(str(tmp))
    return target


@dataclass
class SwappableSession:
    """One onnxruntime session (CPU provider) serving any number of adapter files."""

    path: str | os.PathLike

    def __post_init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        self.adapter_inputs = [n for n in names if ADAPTER_MARK in n]
        self.data_inputs = [n for n in names if ADAPTER_MARK not in n]
        self._adapters: dict[str, Any] = {}

    def run(self, feeds: dict[str, Any], adapter: str | os.PathLike | list | None = None,
            weights: dict[str, torch.Tensor] | None = None) -> list[np.ndarray]:
        """Run with adapter files, plain weight tensors, or neither (the base).

        ``adapter``: one file (``add_active_adapter``) or a list of them, which fills several slots.
        """
        import onnxruntime as ort

        inputs = {k: (v.numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in feeds.items()
                  if k in self.data_inputs}
        if weights is not None:
            inputs.update({k: v.float().contiguous().numpy() for k, v in weights.items()})
        options = ort.RunOptions()
        for key in [] if adapter is None else [str(a) for a in (adapter if isinstance(adapter, list) else [adapter])]:
            if key not in self._adapters:
                loaded = ort.LoraAdapter()
                loaded.Load(key)  # memory-maps the file
                self._adapters[key] = loaded
            options.add_active_adapter(self._adapters[key])
        return self.session.run(None, inputs, run_options=options)
