"""Exporters: ONNX with the adapters baked in (``to_onnx``), or swappable (``to_onnx_swappable``)."""

from aurora_fx.export.onnx import ExportResult, ExportVerificationError, run_onnx, to_onnx
from aurora_fx.export.swappable import SwappableSession, save_adapter_weights, to_onnx_swappable

__all__ = [
    "to_onnx",
    "to_onnx_swappable",
    "save_adapter_weights",
    "SwappableSession",
    "ExportResult",
    "ExportVerificationError",
    "run_onnx",
]
