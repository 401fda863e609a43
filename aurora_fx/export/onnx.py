r"""One-call ONNX export with the adapters baked in, verified in onnxruntime.

``to_onnx`` runs ``torch.onnx.export(dynamo=True)`` on the adapted model itself (it keeps its
class, so HF ``ModelOutput``\\s and timm forwards export as usual). The fused AuroRA op reaches
ONNX through ``translation.aurora_delta_add_onnx`` (standard opset-18 ops; its nodes are named
``node_aurora_delta_add*`` so the adapter stays recognisable); unfused adapters export as their
plain ops. The exact, unmerged AuroRA adapter is in the graph, weights as initializers.

Example:
    >>> result = aurora_fx.export.to_onnx(model, "model.onnx", example_kwargs=batch)
    >>> result.max_abs_diff      # onnxruntime vs PyTorch on two input shapes
    {(2, 16): 7.2e-07, (3, 19): 8.1e-07}
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from aurora_fx.attach import attach
from aurora_fx.export.dynamic_axes import dynamic_spec, reshaped, traceable
from aurora_fx.export.rows import INDEX_INPUT, RowRouted, example_index, routes_rows, row_routed
from aurora_fx.export.translation import (
    aurora_delta_add_onnx,
    aurora_linear_onnx,
    lora_delta_add_onnx,
    lora_linear_onnx,
)
from aurora_fx.owners import iter_bindings, swap_module
from aurora_fx.passes.fuse import FUSED_LORA_OP, FUSED_OP
from aurora_fx.passes.match import find_sites
from aurora_fx.quantized import float_linear, quantization
from aurora_fx.records import SiteRequest
from aurora_fx.surgery import merge as merge_adapters
from aurora_fx.tracing import get_submodule

__all__ = ["to_onnx", "ExportResult", "ExportVerificationError", "run_onnx", "flatten_outputs", "output_names",
           "is_decoder", "exportable_experts", "float_bases", "explain_conversion_error", "strip_prefix"]

TWO_GB = 2 * 1024**3
TRANSLATIONS = {FUSED_OP: aurora_delta_add_onnx, FUSED_LORA_OP: lora_delta_add_onnx,
                torch.ops.aurora_fx.aurora_linear.default: aurora_linear_onnx,
                torch.ops.aurora_fx.lora_linear.default: lora_linear_onnx}
ADAPTER_NODE_MARKS = ("aurora_delta_add", "aurora_linear")  # node names the AuroRA translations emit


class ExportVerificationError(RuntimeError):
    """onnxruntime disagrees with PyTorch by more than the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    """What ``to_onnx`` wrote and how it checked it.

    Attributes:
        path: The ``.onnx`` file.
        input_names: Graph inputs, in order.
        output_names: Graph outputs (``ModelOutput`` keys when the model returns one).
        dynamic_axes: Input name → names of its dynamic axes.
        max_abs_diff: ORT-vs-PyTorch max abs difference per verified input shape.
        seconds: Export time (without verification).
        bytes: Size of the file (plus external data, if any).
        op_counts: ONNX op type → count in the main graph.
        adapter_nodes: Nodes coming from the fused AuroRA ops.
        notes: What the exporter decided for you (e.g. a decoder exported without its KV cache).
        files: Every other file written beside the graph (``to_onnx_decoder``'s serving folder).
    """

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, tuple[str, ...]]
    max_abs_diff: dict[tuple[int, ...], float] = field(default_factory=dict)
    seconds: float = 0.0
    bytes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    adapter_nodes: int = 0
    notes: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """Tensors of a model output in export order (ModelOutput values, tuples, a tensor)."""
    if torch.is_tensor(outputs):
        return [outputs]
    if hasattr(outputs, "to_tuple"):
        return [t for t in outputs.to_tuple() if torch.is_tensor(t)]
    if isinstance(outputs, (tuple, list)):
        return [t for o in outputs for t in flatten_outputs(o)]
    if isinstance(outputs, dict):
        return [t for o in outputs.values() for t in flatten_outputs(o)]
    raise TypeError(f"cannot export outputs of type {type(outputs).__name__}; return tensors, tuples or a ModelOutput")


def output_names(outputs: Any, taken: tuple[str, ...] = ()) -> list[str]:
    """Names for the flattened outputs: ModelOutput keys, else ``output_<i>``.

    ``_out`` is added to one that is also an input's name in ``taken`` (a diffusers UNet takes ``sample`` and
    returns ``sample``; ONNX needs unique names).
    """
    names = None
    if hasattr(outputs, "keys") and hasattr(outputs, "to_tuple"):
        names = [k for k, v in outputs.items() if torch.is_tensor(v)]
        if len(names) != len(flatten_outputs(outputs)):
            names = None
    if names is None:
        n = len(flatten_outputs(outputs))
        names = ["output"] if n == 1 else [f"output_{i}" for i in range(n)]
    return [f"{n}_out" if n in taken else n for n in names]


def _input_names(model: nn.Module) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return ()


def _check_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:
        raise ValueError(
            f"the model rejects the example inputs ({type(exc).__name__}: {str(exc).splitlines()[0]}); pass inputs "
            f"that model(*example_inputs, **example_kwargs) accepts, e.g. example_kwargs=tokenizer(..., "
            f"return_tensors='pt') for HF text models"
        ) from None


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool, names: list[str]):
    dynamic_shapes = dynamic_spec(args, kwargs)[0] if dynamic else None
    if dynamic:
        args, kwargs = traceable(args, kwargs)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, external_data=False,
                                     custom_translation_table=TRANSLATIONS, dynamic_shapes=dynamic_shapes,
                                     output_names=names, optimize=False)  # keep parameter names; ORT folds at load
        except Exception as exc:
            raise explain_conversion_error(exc) from exc


def _write(program: Any, path: Path, external_data: bool | None) -> int:
    """Save atomically; returns bytes written. External data: data file first, then the model."""
    proto = program.model_proto
    size = proto.ByteSize()
    use_external = external_data if external_data is not None else size > TWO_GB
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_model = Path(tmp) / path.name
        if use_external:
            onnx.save_model(proto, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data")
            os.replace(Path(tmp) / f"{path.name}.data", path.parent / f"{path.name}.data")
        else:
            onnx.save_model(proto, tmp_model)
        with open(tmp_model, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_model, path)
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if use_external and data.exists() else 0)


def run_onnx(path: str | os.PathLike, feeds: dict[str, Any]) -> list[np.ndarray]:
    """Run an ONNX file in onnxruntime on the CPU provider (chosen explicitly)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: constant-folding notes about CastLike are noise
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: _numpy(v) for k, v in feeds.items() if k in wanted})


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


def _verify(model: nn.Module, path: Path, args: tuple, kwargs: dict[str, Any], dynamic: bool, atol: float,
            input_names: list[str]) -> dict[tuple[int, ...], float]:
    diffs = {}
    trials = [(args, kwargs)]
    if dynamic:
        trials.append((tuple(reshaped(a, f"arg{i}") for i, a in enumerate(args)),
                       {k: reshaped(v, k) for k, v in kwargs.items()}))
    for a, kw in trials:
        with torch.no_grad():
            expected = flatten_outputs(model(*a, **kw))
        feeds = dict(zip(input_names, [t for t in a if torch.is_tensor(t)], strict=False))
        feeds.update({k: v for k, v in kw.items() if torch.is_tensor(v)})
        got = run_onnx(path, feeds)
        diff = max(float(np.abs(g - _numpy(e)).max()) if e.numel() else 0.0
                   for g, e in zip(got, expected, strict=False))
        key = tuple(next(t for t in [*a, *kw.values()] if torch.is_tensor(t)).shape)
        diffs[key] = diff
        if not diff <= atol:
            raise ExportVerificationError(
                f"onnxruntime differs from PyTorch by max abs {diff:.3g} (> atol {atol:g}) on inputs of shape {key}; "
                f"the file {str(path)!r} was written but should not be trusted")
    return diffs


def default_atol(model: nn.Module) -> float:
    """Verification tolerance: 1e-4, or 3e-2 when any parameter is bf16/fp16."""
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    return 3e-2 if half else 1e-4


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
    verify: bool = True,
    merge: bool = False,
    lossy: bool = False,
    external_data: bool | None = None,
    atol: float | None = None,
    adapter_index: bool | None = None,
) -> ExportResult:
    """Export ``model`` (adapters baked in) to one ONNX file and check it in onnxruntime.

    Args:
        model: An adapted (or plain) model. Exported in eval mode; the model is not modified.
        path: Target ``.onnx`` file, written atomically.
        example_inputs: Positional example inputs (e.g. ``(pixels,)`` for timm).
        example_kwargs: Keyword example inputs (HF: ``input_ids``, ``attention_mask``). For an HF
            decoder ``use_cache=False`` is added unless given (``ExportResult.notes`` says so);
            ``to_onnx_decoder`` exports the KV cache.
        dynamic: Batch axes dynamic, and sequence axes of token inputs (2-D/3-D integer) and of
            float ``(B, L, D)`` inputs; other axes keep the example's size.
        verify: Check in onnxruntime (CPU) on the example and on a differently shaped input.
        merge: Export LoRA/AROMA merged into the base weights (the base graph with new weights);
            AuroRA needs ``lossy=True`` too.
        lossy: Allow AuroRA's lossy static merge when ``merge=True``.
        external_data: Put weights in ``<path>.data``; default only above 2 GB.
        atol: Verification tolerance (max abs difference); default 1e-4, or 3e-2 for a model with
            bf16/fp16 parameters (half-precision rounding alone differs by ~4e-3 between runtimes).
        adapter_index: Add the ``adapter_index`` input (int64 ``(batch,)``, indices into
            ``aurora_fx.adapter_names(model)``, -1 for the base): each row runs its own named adapter
            (``aurora_fx.export.rows``). Default: on for a model with several names.

    Returns:
        An ``ExportResult``.
    """
    args = tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    if not args and not kwargs:
        raise ValueError("to_onnx needs example_inputs=(...) or example_kwargs={...} to trace the model")
    notes = _cache_off(model, kwargs)
    target = Path(path)
    atol = default_atol(model) if atol is None else atol
    exported = copy.deepcopy(model).eval()
    notes += exportable_experts(exported) + float_bases(exported)
    if merge:
        merge_adapters(exported, lossy=lossy)
    if routes_rows(exported, None if merge else adapter_index):
        batch = next(t for t in [*args, *kwargs.values()] if torch.is_tensor(t)).shape[0]
        kwargs.setdefault(INDEX_INPUT, example_index(exported, batch))
        exported = row_routed(exported).eval()
    outputs = _check_inputs(exported, args, kwargs)
    names = output_names(outputs, _input_names(exported))
    start = time.perf_counter()
    program = _export(exported, args, kwargs, dynamic, names)
    seconds = time.perf_counter() - start
    if isinstance(exported, RowRouted):  # parameter names as in the model itself (adapter files match them)
        strip_prefix(program.model_proto, "model.")
    size = _write(program, target, external_data)
    proto = onnx.load(str(target), load_external_data=False)
    input_names = [i.name for i in proto.graph.input]
    diffs = _verify(exported, target, args, kwargs, dynamic, atol, input_names) if verify else {}
    return ExportResult(
        path=target, input_names=tuple(input_names), output_names=tuple(o.name for o in proto.graph.output),
        dynamic_axes=dynamic_spec(args, kwargs)[1] if dynamic else {}, max_abs_diff=diffs, seconds=seconds,
        bytes=size, op_counts=dict(Counter(n.op_type for n in proto.graph.node)),
        adapter_nodes=sum(any(m in n.name for m in ADAPTER_NODE_MARKS) for n in proto.graph.node), notes=notes)


def strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
    """Rename the initializers ``<prefix>name`` to ``name``, and every use of them."""
    renamed = {i.name: i.name[len(prefix):] for i in proto.graph.initializer if i.name.startswith(prefix)}
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
    for value in proto.graph.value_info:
        value.name = renamed.get(value.name, value.name)


def is_decoder(model: nn.Module) -> bool:
    """An HF causal LM: it can generate and has a KV cache (``config.use_cache``)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return (config is not None and hasattr(config, "use_cache") and not getattr(config, "is_encoder_decoder", False)
            and callable(can_generate) and bool(can_generate()))


def exportable_experts(model: nn.Module) -> tuple[str, ...]:
    """Switch a mixture-of-experts model (a copy) to the experts implementation that exports; notes if it did.

    transformers' ``grouped_mm`` is its own custom op with no ONNX form, and ``eager`` loops over a
    data-dependent set of experts that ``torch.export`` cannot trace; ``batched_mm`` computes the same
    outputs with plain batched matmuls.
    """
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    switch = getattr(model, "set_experts_implementation", None)
    if impl in (None, "batched_mm") or not callable(switch):
        return ()
    switch("batched_mm")
    return (f"the experts run as 'batched_mm' in the graph (the model's {impl!r} implementation does not export); "
            f"the outputs are the same",)


def float_bases(model: nn.Module) -> tuple[str, ...]:
    """Give every quantized linear of ``model`` (a copy) a float base, adapters kept; notes if it did.

    The quantizers' kernels have no ONNX form: the graph gets ``dequant(W)`` as a float ``nn.Linear`` (with the same
    adapter, weights copied, where there was one), which computes what the quantized layer computes.
    """
    adapted = {owner: (gm, b) for owner, gm, b in iter_bindings(model) if b.quantization is not None}
    plain = [path for path, m in model.named_modules() if path and quantization(m) is not None and path not in adapted]
    adapters = {b.site: gm.get_submodule(b.attr) for gm, b in adapted.values()}
    kinds = sorted({quantization(m) for path, m in model.named_modules() if path in adapted or path in plain})
    for path in [*adapted, *plain]:
        swap_module(model, path, float_linear(get_submodule(model, path)))
    if not kinds:
        return ()
    if adapters:
        table = find_sites(model, lambda path, m: path in adapters)
        attach(model, [SiteRequest(s, adapters[s.path].config) for s in table.matched], _copy_from(adapters))
    return (f"{len(adapted) + len(plain)} quantized linear(s) ({', '.join(kinds)}) run dequantized in float32 in the "
            f"graph (the quantizers' kernels have no ONNX form); the adapters are unchanged",)


def _copy_from(adapters: dict[str, nn.Module]):
    def fill(site: str, new: nn.Module) -> None:
        old = adapters[site]
        new.load_state(old.state(), old.stored_tensors())
        new.load_state_dict(old.state_dict())

    return fill


_NO_ONNX = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


def explain_conversion_error(error: Exception) -> Exception:
    """A one-line ``ValueError`` for an op without an ONNX translation (else ``error`` itself)."""
    found = _NO_ONNX.search(str(error))
    if found is None:
        return error
    return ValueError(f"the model calls {found.group(1)}, which has no ONNX translation; replace that module (or "
                      f"switch it to a plain-PyTorch implementation) before exporting")


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _cache_off(model: nn.Module, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """A KV cache object cannot be a graph output: turn it off (and say so) unless asked."""
    if "use_cache" in kwargs or not (is_decoder(model) or _is_encoder_decoder(model)):
        return ()
    kwargs["use_cache"] = False
    if _is_encoder_decoder(model):
        return ("exported with use_cache=False: one graph computes the encoder and the whole decoder prefix at "
                "every call; aurora_fx.export.OnnxSeq2SeqGenerator generates greedily over it",)
    return ("exported with use_cache=False: this graph has no KV cache and recomputes the whole prefix at "
            "every token; aurora_fx.export.to_onnx_decoder exports the cache as inputs and outputs for serving",)
